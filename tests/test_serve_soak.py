"""The soak and the email bursts measured on a real `python -m pipeline serve` (notebooks 04 and 05), tiny sizes.

These check what is recorded (roles, series, slopes, the burst's resource rows), not how fast serve is.
"""

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from pipeline.audit.base import servemem
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.reporting import report, soakviews, views
from pipeline.audit.scenarios import email_bursts, memory_soak


@pytest.fixture(scope="module", autouse=True)
def fonts_loaded():
    """Draw once before the leak check's snapshot: matplotlib keeps the font files it loads open for good."""
    fig = plt.figure()
    fig.text(0, 0, "serve RSS (+0.00 KiB/run) DATA end → run queued (ms, log) – ≤")
    fig.canvas.draw()
    plt.close(fig)


@pytest.fixture
def recorder(tmp_path):
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    rec.start_session("test", {"why": "serve soak test"})
    return rec


def test_serve_soak_records_a_series_and_a_slope_per_process_role(recorder):
    df = memory_soak.serve_soak(runs=20, warmup=5, every=5, senders=2, recorder=recorder)
    assert set(df.variant) == {"serve"} and set(df.process) == {"serve", "workers", "store"}
    wal = df[df.metric == "store_wal_bytes"].sort_values("rep")  # the alert PipelineStoreWalLarge's baseline
    assert list(wal.runs) == [0, 5, 10, 15, 20] and (wal.value > 0).all() and set(wal.process) == {"store"}
    assert not any("pid" in key for tags in df.tags for key in tags)  # roles, never pids
    rss = df[df.metric == "rss_bytes"]
    for process in ("serve", "workers"):
        points = rss[rss.process == process].sort_values("rep")
        assert list(points.runs) == [0, 5, 10, 15, 20] and (points.value > 0).all()
    slopes = df[df.metric.str.startswith("leak_")]
    assert {(m, p) for m, p in zip(slopes.metric, slopes.process, strict=True)} == {
        ("leak_rss_bytes_per_run", "serve"), ("leak_uss_bytes_per_run", "serve"),
        ("leak_rss_bytes_per_run", "workers"), ("leak_uss_bytes_per_run", "workers"),
        ("leak_max_worker_rss_bytes_per_run", "workers")}
    assert not any(slopes.settled)  # 20 runs are still warm-up: the leak SLAs do not judge them
    serve_slas = [s for s in report.load_slas() if s["scenario"] == "soak" and s["where"].get("variant") == "serve"]
    assert {s["where"]["process"] for s in serve_slas} == {"serve", "workers"}
    assert all(report.select_rows(recorder.measurements(), s).empty for s in serve_slas)
    assert df[df.metric == "runs_failed"].value.item() == 0
    assert df[df.metric == "worker_restarts"].value.item() >= 0
    assert (df[df.metric == "live_workers"].value >= 1).all()  # every mail is parsed by a worker

    m = recorder.measurements()
    assert len(m[m.scenario == "soak"]) == len(df)
    series = soakviews.serve_soak_series(m)
    assert list(series.runs) == [0, 5, 10, 15, 20] and {"serve RSS", "workers RSS (sum)"} <= set(series.columns)
    table = soakviews.serve_slopes(m)
    assert set(table.process) == {"serve", "workers"} and len(table) == 5
    assert soakviews.serve_slope(m, "serve") == pytest.approx(
        slopes[(slopes.metric == "leak_rss_bytes_per_run") & (slopes.process == "serve")].value.item())
    plt.close(soakviews.fig_serve_soak(series, table))
    assert views.soak_series(m).empty  # the in-kernel soak's chart does not pick up serve's rows


def test_email_burst_on_serve_loses_nothing_and_records_resources_by_role(recorder):
    df = email_bursts.email_burst([], burst=20, senders=2, recorder=recorder)
    assert list(df[df.metric == "accepted"].value) == [20] and list(df[df.metric == "lost"].value) == [0]
    latency = df[df.metric == "trigger_latency_ms"]
    assert len(latency) == 20 and (latency.value >= 0).all()
    for metric in ("peak_rss_bytes", "cpu_seconds"):
        picked = df[df.metric == metric]
        assert sorted(picked.process) == ["serve", "workers"] and (picked.value >= 0).all()
    assert (df[df.metric == "peak_rss_bytes"].value > 0).all()
    assert len(df[df.metric == "backlog"]) > 0

    m = recorder.measurements()
    table = views.burst_table(m)
    assert list(table["round"]) == ["burst-20"] and table.lost.item() == 0
    resources = soakviews.burst_resources(m)
    assert list(resources["round"]) == ["burst-20"]
    assert {"peak RSS MB serve", "peak RSS MB workers", "CPU s serve", "CPU s workers"} <= set(resources.columns)


def test_small_mail_drain_measures_each_variant_in_interleaved_rounds(recorder):
    variants = {"default": None, "stage_threads": {"runner": {"stage_executor": "thread"}}}
    df = email_bursts.small_mail_drain(burst=60, reps=2, senders=2, variants=variants, recorder=recorder)
    cpu = df[df.metric == "cpu_ms_per_run"]
    assert list(cpu.variant) == ["default", "stage_threads", "stage_threads", "default"]  # the order alternates
    assert (cpu.value > 0).all()
    rates = df[df.metric == "runs_per_s"]
    assert (rates.value > 0).all() and set(rates.variant) <= set(variants)
    table = soakviews.drain_table(recorder.measurements())
    assert set(table.variant) == set(rates.variant)
    if "default" in set(rates.variant):
        assert (table.loc[table.variant == "default", "x default"] == 1.0).all()
    # serve's CPU by process: every one of them worked (the main process, the gateway that took the mail, the
    # pool that digested and delivered, the worker that parsed), and together they are the round's whole CPU
    parts = df[df.metric == "process_cpu_ms_per_run"]
    for rep, variant, total in zip(cpu.rep, cpu.variant, cpu.value, strict=True):
        mine = parts[(parts.rep == rep) & (parts.variant == variant)]
        processes = dict(zip(mine.tags.map(lambda t: t["process"]), mine.value, strict=True))
        assert set(processes) == set(servemem.PROCESSES)
        assert processes["main"] > 0 and processes["gateway"] > 0 and processes["extraction workers"] > 0
        assert variant != "default" or processes["stage pool"] > 0
        assert sum(processes.values()) == pytest.approx(total, rel=1e-6)
    by_process = soakviews.drain_cpu_by_process(recorder.measurements())
    assert list(by_process.process) == list(servemem.PROCESSES) and (by_process["CPU ms per run"] > 0).all()
    main = table["main process CPU ms per run"]
    assert (table["runs/s one core allows at that"] == 1000 / main).all()


def test_a_serve_config_that_names_an_unknown_stage_executor_is_refused(tmp_path):
    from pipeline.config import ConfigurationError, RunnerConfig

    with pytest.raises(ConfigurationError, match="stage_executor"):
        RunnerConfig(stage_executor="dask").validate()


def _soak_rows(rss_by_runs):
    """Serve-soak measurement rows as the scenario records them (serve process RSS against runs)."""
    return pd.DataFrame([{"scenario": "soak", "variant": "serve", "metric": "rss_bytes", "value": float(rss),
                          "unit": "bytes", "rep": i, "tags": {"runs": runs, "process": "serve"}}
                         for i, (runs, rss) in enumerate(rss_by_runs)])


def test_slope_discussion_tells_a_filling_cache_from_a_steady_leak():
    runs = list(range(0, 2001, 200))
    filling = _soak_rows([(r, 60e6 + 6e6 * (1 - 0.998 ** r)) for r in runs])  # approaches a bound
    leaking = _soak_rows([(r, 60e6 + 2048 * r) for r in runs])  # 2 KiB per run, to the end
    assert [round(p) for p in soakviews.slope_segments(soakviews.serve_soak_series(leaking))] == [2048] * 3
    assert "falls from part to part" in soakviews.slope_discussion(filling)
    text = soakviews.slope_discussion(leaking)
    assert "does not fall steadily" in text and "1,953 MB" in text  # 2 KiB x 1M runs
    assert "Too few" in soakviews.slope_discussion(leaking.head(3))


def test_kernel_soak_text_reads_the_recorded_slopes_and_says_when_there_are_none():
    def r(metric, value):
        return {"scenario": "soak", "variant": "email_digest", "metric": metric, "value": value, "unit": "bytes/run",
                "rep": 0, "tags": {}}

    m = pd.DataFrame([r("leak_traced_bytes_per_run", 512.0), r("leak_rss_bytes_per_run", 2048.0),
                      r("traced_bytes_per_run_all_samples", 4096.0)])
    assert soakviews.kernel_soak_slopes(m) == {"traced": 512.0, "rss": 2048.0, "traced_all": 4096.0}
    text = soakviews.kernel_soak_text(m)
    assert "traced memory grows +0.50 KiB per run" in text and "RSS +2.00 KiB per run" in text
    assert "every sample the traced slope is +4.00 KiB per run" in text
    assert soakviews.kernel_soak_text(m.head(0)) == "In-kernel tracemalloc soak: not measured in this session."
