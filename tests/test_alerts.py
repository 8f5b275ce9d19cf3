"""docs/performance/alerts.yml: valid for promtool, names only metrics serve exposes, thresholds equal to slas.toml."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docs" / "performance" / "alerts.yml"
SLAS = ROOT / "docs" / "performance" / "slas.toml"
# An alert's threshold is in the metric's base unit; this is how many SLA units one base unit is.
TO_SLA_UNIT = {"ms": 1000.0, "s": 1.0, "MB": 1 / (1024 * 1024), "bytes/run": 1.0, "runs": 1.0}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _exposed_names() -> set[str]:
    """Every series name serve's /metrics can show (a labelled metric shows none until first used)."""
    collector = metrics.ScrapeCollector(runs_by_state=lambda: {"queued": 1}, active_runs=lambda: 0,
                                        health=lambda: None, gateway_restarts=lambda: {"died": 1},
                                        wal_bytes=lambda: 0)
    return {family.name + suffix for family in collector.collect() for suffix in SUFFIXES.get(family.type, ("",))}


@pytest.fixture(scope="module")
def promtool() -> str:
    """The promtool binary; a skip locally, a failure under CI (env var CI set), when it is missing."""
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool not installed (Debian: apt-get install prometheus; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the alert rules must be checked", pytrace=False)
        pytest.skip(reason)
    return found


def test_promtool_accepts_the_alert_rules(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_the_rules_fire_on_the_faults_they_are_for_and_not_on_normal_traffic(promtool: str) -> None:
    """alerts_test.yml: series shaped after a real serve under each fault (a helper's probe scraped them)."""
    result = subprocess.run([promtool, "test", "rules", str(ALERTS.with_name("alerts_test.yml"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_rule_has_for_severity_summary_and_sla() -> None:
    for rule in _rules():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["sla"], rule["alert"]


def test_alerts_name_only_metrics_serve_exposes() -> None:
    exposed = _exposed_names()
    for rule in _rules():
        used = set(re.findall(r"\bpipeline_[a-z0-9_]+", rule["expr"]))
        assert used, rule["alert"]
        assert used <= exposed, f"{rule['alert']} uses {sorted(used - exposed)}"


def test_sla_thresholds_equal_the_slas_toml_targets() -> None:
    slas = {sla["name"]: sla for sla in tomllib.loads(SLAS.read_text())["sla"]}
    tied = [rule for rule in _rules() if rule["annotations"]["sla"] != "none"]
    assert len(tied) >= 4
    for rule in tied:
        sla = slas[rule["annotations"]["sla"]]  # a KeyError: the SLA was renamed or removed
        threshold = float(re.findall(r">\s*([0-9.eE+-]+)\s*$", rule["expr"].strip())[0])
        assert threshold * TO_SLA_UNIT[sla["unit"]] == pytest.approx(float(sla["target"])), rule["alert"]


def test_sla_names_have_no_character_the_report_escapes() -> None:
    """The report's markdown escapes ``_ * |`` in an SLA's name, and outbox.json and the tests match the rows by
    name: a name with ``max_digests_per_hour`` in it no longer matched its row (CI failed on it)."""
    names = [sla["name"] for sla in tomllib.loads(SLAS.read_text())["sla"]]
    assert [n for n in names if set(n) & set("_*|")] == []
