"""Alert thresholds judged against the audit's measured baselines (pipeline/audit/reporting/alertbaselines.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.audit.base.harness import row
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.reporting import alertbaselines as ab
from pipeline.audit.reporting.report import evaluate_slas, load_slas

RULES = """
groups:
  - name: g
    rules:
      - alert: PipelineTriggerP99Slow
        expr: histogram_quantile(0.99, rate(pipeline_trigger_seconds_bucket[5m])) > {slow}
        for: 5m
        labels: {{severity: warning}}
        annotations: {{summary: s, sla: none}}
      - alert: PipelineServeRssHigh
        expr: pipeline_process_resident_memory_bytes > 300
        for: 5m
        labels: {{severity: warning}}
        annotations: {{summary: s, sla: none}}
      - alert: PipelineRefusingMail
        expr: rate(pipeline_smtp_replies_total[5m]) > 0
        for: 5m
        labels: {{severity: critical}}
        annotations: {{summary: s, sla: none}}
      - alert: PipelineWorkerRestarts
        expr: increase(pipeline_extract_worker_restarts_total[15m]) > 5
        for: 5m
        labels: {{severity: warning}}
        annotations: {{summary: s, sla: none}}
"""


def _rules(tmp_path: Path, slow: float) -> Path:
    path = tmp_path / "alerts.yml"
    path.write_text(RULES.format(slow=slow))
    return path


def _session(tmp_path: Path) -> AuditRecorder:
    """A session holding the two baselines the rules above are paired with."""
    recorder = AuditRecorder(tmp_path / "audit.duckdb")
    recorder.start_session("test")
    # 100 trigger latencies 1..100 ms on bursts: p99 99.01 ms
    recorder.record("email_burst", pd.DataFrame([row("baseline", "trigger_latency_ms", ms, "ms", 0, mode="rate")
                                                 for ms in range(1, 101)]))
    recorder.record("soak", pd.DataFrame([row("serve", "rss_bytes", 200, "bytes", 0, process="serve"),
                                          row("serve", "rss_bytes", 10_000, "bytes", 0, process="workers")]))
    return recorder


def _verdicts(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table.alert, table["on this traffic"], strict=True))


def test_a_threshold_under_its_baseline_fires_and_one_far_above_is_quiet(tmp_path: Path) -> None:
    measurements = _session(tmp_path).measurements()
    firing = ab.baseline_table(measurements, _rules(tmp_path, 0.02))
    assert _verdicts(firing)["PipelineTriggerP99Slow"] == "fires"
    row_ = firing.set_index("alert").loc["PipelineTriggerP99Slow"]
    assert row_.baseline == pytest.approx(0.09901)
    assert row_.headroom == pytest.approx(0.02 / 0.09901)
    assert _verdicts(ab.baseline_table(measurements, _rules(tmp_path, 0.15)))["PipelineTriggerP99Slow"] \
        == "quiet, narrow"
    assert _verdicts(ab.baseline_table(measurements, _rules(tmp_path, 0.25)))["PipelineTriggerP99Slow"] == "quiet"


def test_rows_of_another_process_do_not_count_as_the_baseline(tmp_path: Path) -> None:
    table = ab.baseline_table(_session(tmp_path).measurements(), _rules(tmp_path, 0.25)).set_index("alert")
    assert table.loc["PipelineServeRssHigh"].baseline == 200  # the workers' 10,000 bytes are not serve's
    assert table.loc["PipelineServeRssHigh"]["on this traffic"] == "quiet, narrow"


def test_event_rules_and_unmeasured_rules_say_so_instead_of_passing(tmp_path: Path) -> None:
    verdicts = _verdicts(ab.baseline_table(_session(tmp_path).measurements(), _rules(tmp_path, 0.25)))
    assert verdicts["PipelineRefusingMail"] == "n/a"
    assert verdicts["PipelineWorkerRestarts"] == "unknown"


def test_the_recorded_count_feeds_the_sla(tmp_path: Path) -> None:
    recorder = _session(tmp_path)
    sla = [s for s in load_slas() if s["scenario"] == "alerts"]
    assert len(sla) == 1
    ab.record(recorder, _rules(tmp_path, 0.02))
    assert evaluate_slas(recorder, recorder.session_id, sla, save=False).passed.tolist() == [False]

    recorder.start_session("test")
    recorder.record("email_burst", pd.DataFrame([row("baseline", "trigger_latency_ms", 5, "ms", 0)]))
    ab.record(recorder, _rules(tmp_path, 0.25))
    assert evaluate_slas(recorder, recorder.session_id, sla, save=False).passed.tolist() == [True]


def test_every_level_rule_of_the_shipped_file_is_paired_or_says_why_not() -> None:
    for alert, threshold in ab.rule_thresholds().items():
        if threshold > 0:
            assert alert in ab.BASELINES or alert in ab.UNMEASURED, alert
