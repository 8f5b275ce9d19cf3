"""The report's tables are arithmetic on recorded rows: check that arithmetic on rows with known values."""

import json
import math
import re

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from pipeline.audit.base.harness import row
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.reporting import hostileviews, scaleoutviews, views
from pipeline.audit.scenarios.concurrency import STAGES


@pytest.fixture
def recorded(tmp_path):
    """A DuckDB session holding rows with round numbers; returns its measurement frame."""
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    rec.start_session("test")

    def record(scenario, rows):
        rec.record(scenario, pd.DataFrame(rows))

    stages = {"Email": 0.01, "Queue": 0.01, "Ingestion": 0.06, "Digest": 0.01, "Delivery": 0.01}
    record("pipeline_profile", [row("baseline", "stage_seconds", s * k, "s", k, stage=st)
                                for k in (1, 2, 3) for st, s in stages.items()])
    record("pdf_scaling", [row(v, "ingest_seconds", t, "s", rep, kind="text", nominal_mb=5, file_mb=5.1)
                           for rep in (0, 1) for v, t in (("pypdf", 6.0), ("pdfium-2w", 1.5))])
    record("runner_overhead", [row("baseline", "ms_per_task", ms, "ms", i, dag="noop_chain")
                               for i, ms in enumerate([0.1, 0.2, 0.3, 0.4, 0.5])])
    return rec.measurements()


def test_stage_breakdown_orders_stages_and_shares_add_up(recorded):
    table = views.stage_breakdown(recorded)
    assert list(table.stage) == ["Email", "Queue", "Ingestion", "Digest", "Delivery"]
    assert table.set_index("stage").median_s["Ingestion"] == pytest.approx(0.12)
    assert table.set_index("stage").share["Ingestion"] == "60%"


def test_engine_table_gives_the_speedup_over_pypdf(recorded):
    table = views.engine_table(recorded)
    assert table["pypdf/pdfium-2w"].item() == pytest.approx(4.0)


def test_the_engine_tables_blanks_are_explained_from_the_session_parameters():
    from pipeline.audit.batch import PROFILES
    standard = views.engines_not_measured(json.dumps(PROFILES["standard"]))
    assert "up to 5 MB only" in standard and "--profile full" in standard
    assert views.engines_not_measured(json.dumps(PROFILES["full"])) == ""
    assert views.engines_not_measured(None) == "" and views.engines_not_measured("{}") == ""


def test_baselines_include_the_runner_overhead(recorded):
    table = views.baselines_table(recorded).set_index("operation")
    runner = table.loc["runner: per no-op task (noop_chain)"]
    assert runner["median"] == pytest.approx(0.3) and runner["n"] == 5 and runner["unit"] == "ms"


def test_empty_sessions_give_empty_tables_not_invented_figures(tmp_path):
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    rec.start_session("test")
    m = rec.measurements()
    assert views.optimization_table(m).empty and views.engine_table(m).empty and views.baselines_table(m).empty


def test_fault_table_shows_each_fault_with_its_figures_replies_and_skip_reason(tmp_path):
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    rec.start_session("test")
    kill = [row("kill_serve", metric, value, "messages") for metric, value in
            (("sent", 100), ("acked", 97), ("lost", 0), ("duplicated", 1), ("untyped", 0))]
    kill += [row("kill_serve", "recover_s", s, "s", i) for i, s in enumerate([2.0, 3.5])]
    kill += [row("kill_serve", "replies", n, "replies", reply=code) for code, n in (("250", 97), ("refused", 12))]
    cases = [row("bad_input", "case_typed", 1, "bool", 0, case="quoted", state="failed", reason="deliver: delivery"),
             row("bad_input", "case_typed", 0, "bool", 1, case="crlf", state="failed", reason="x: ValueError: y")]
    rec.record("faults", pd.DataFrame(kill + cases + [row("disk_full", "skipped", 1, "fault", reason="no mount")]))
    m = rec.measurements()
    table = views.fault_table(m).set_index("fault")
    assert table.loc["kill_serve", "acked (250)"] == 97 and table.loc["kill_serve", "duplicated"] == 1
    assert table.loc["kill_serve", "recover s"] == pytest.approx(3.5)  # the worst of the kill points
    assert table.loc["kill_serve", "senders saw"] == "250 ×97, refused ×12"
    assert table.loc["disk_full", "note"] == "skipped: no mount" and pd.isna(table.loc["disk_full", "lost"])
    outcomes = views.fault_cases(m).set_index("case")
    assert outcomes.loc["quoted", "typed"] == "yes" and outcomes.loc["crlf", "typed"] == "NO"


def test_fault_tables_are_empty_without_fault_rows(tmp_path):
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    rec.start_session("test")
    assert views.fault_table(rec.measurements()).empty and views.fault_cases(rec.measurements()).empty


# Charts a reader can use (issue 13): every axis says its unit, PDF scaling as one column of panels per document
# kind, legends outside the data. The figures are drawn from recorded rows of every charted scenario.

KINDS = ("kerned", "mixed", "text")
UNIT = re.compile(r"\([^)]*\)|\b(s|ms|MB|KiB|%|count|runs/s)\b")


@pytest.fixture(scope="module")
def recorded_for_charts(tmp_path_factory):
    """A DuckDB session with a few rows of every scenario the views chart; returns its measurement frame.

    Every chart is drawn once here: matplotlib keeps the font files it loads open for the process's life (a
    cache), and the leak check would count the first test to draw as their opener.
    """
    rec = AuditRecorder(tmp_path_factory.mktemp("charts") / "audit.duckdb")
    rec.start_session("test")
    for scenario, rows in _chart_rows().items():
        rec.record(scenario, pd.DataFrame(rows))
    m = rec.measurements()
    for fig in _figures(m).values():
        fig.canvas.draw()
    plt.close("all")
    return m


@pytest.fixture
def charted(recorded_for_charts):
    yield recorded_for_charts
    plt.close("all")


def _chart_rows():
    scaling = [row(v, metric, value * (1 + i), unit, rep, kind=kind, nominal_mb=mb, file_mb=mb, default=v == "pdfium")
               for i, kind in enumerate(KINDS) for mb in (0.5, 5) for rep in (0, 1) for v in ("pypdf", "pdfium")
               for metric, value, unit in (("ingest_seconds", mb / 2, "s"), ("pages", 10 * mb, "count"),
                                           ("workers_peak_rss_mb", 90 + mb, "MB"),
                                           ("workers_rss_before_mb", 90, "MB"))]
    burst = [row("baseline", "trigger_latency_ms", ms, "ms", i, round="rate-10") for i, ms in enumerate([3, 5, 9])]
    burst += [row("baseline", "backlog", b, "runs", i, round="rate-10", t=i * 0.5) for i, b in enumerate([0, 4, 1])]
    level = [row("baseline", metric, v * n, unit, 0, level=n) for n in (10, 50)
             for metric, v, unit in (("throughput_runs_per_s", 2.0, "1/s"), ("latency_p95_s", 0.1, "s"))]
    soak = [row("email_digest", metric, 2**20 * (100 + k), "bytes", k, runs=k * 10) for k in range(3)
            for metric in ("traced_bytes", "rss_bytes")]
    faults = [row("kill_serve", "replies", n, "replies", reply=code) for code, n in (("250", 97), ("421", 3))]
    hostile = [row("sessions", "normal_latency_ms", 10.0 * n, "ms", 0, level=n, limit=20, phase="held")
               for n in (0, 20)]
    hostile += [row("memory", metric, mb, "MB", 0, mode=mode, mails=10)
                for mode, mb in (("before", 900.0), ("after", 120.0))
                for metric in ("serve_peak_rss_mb", "workers_peak_rss_mb")]
    scale = [row(v, "throughput_runs_per_s", 3.0, "1/s", 0, concurrency=8) for v in ("sqlite_local", "pg_local")]
    scale += [row("store", q, 0.5, "ms", 0, backend=b, stat="median", runs=1000)
              for q in ("list_latest_50_of_workflow", "get_run_with_tasks") for b in ("sqlite", "postgres")]
    stages = [row("baseline", "stage_seconds", 0.01 * k, "s", k, stage=st) for k in (1, 2) for st in STAGES]
    return {"pdf_scaling": scaling, "email_burst": burst, "concurrency": level, "soak": soak, "faults": faults,
            "hostile": hostile, "scale_out": scale, "pipeline_profile": stages}


def _figures(m):
    return {"pdf_scaling": views.fig_pdf_scaling(views.pdf_scaling_table(m)),
            "stage_breakdown": views.fig_stage_breakdown(views.stage_breakdown(m)),
            "soak": views.fig_soak(views.soak_series(m), {"rss": 1024.0, "traced": 512.0}),
            "concurrency": views.fig_concurrency(views.concurrency_table(m)),
            "burst": views.fig_burst(m), "fault_replies": views.fig_fault_replies(m),
            "hostile_senders": hostileviews.fig_hostile_senders(m), "scale_out": scaleoutviews.fig_scale_out(m)}


def _categorical(axis):
    """An axis of names (stages, faults, variants) rather than of values: it has no unit to state."""
    labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
    return bool(labels) and all(re.search(r"[A-Za-z_]{2}", t) and "$" not in t for t in labels)


def test_pdf_scaling_has_a_time_and_a_memory_panel_per_document_kind_with_a_line_per_engine(charted):
    fig = views.fig_pdf_scaling(views.pdf_scaling_table(charted))
    assert len(fig.axes) == 2 * len(KINDS)
    top = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in top] == list(KINDS)  # one column per kind
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2 and all(line.get_marker() == "o" for line in ax.get_lines())
    memory = [ax for ax in fig.axes if not ax.get_title()]
    assert all("RSS" in ax.get_ylabel() for ax in memory)
    assert memory[0].get_lines()[0].get_ydata().tolist() == [90.5, 95.0]  # the workers' peak, per file size
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pdfium", "pypdf"]


def test_every_axis_of_every_chart_states_its_unit(charted):
    for name, fig in _figures(charted).items():
        fig.canvas.draw()
        for ax in fig.axes:
            for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
                if not axis.get_visible():
                    continue  # a twin's shared x axis: the axes it twins labels it
                assert label, f"{name}: an axis without a label"
                assert _categorical(axis) or UNIT.search(label), f"{name}: {label!r} has no unit"


def test_legends_lie_outside_the_data_area(charted):
    for name, fig in _figures(charted).items():
        renderer = fig.canvas.get_renderer()
        fig.canvas.draw()
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        assert legends, f"{name}: no legend"
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), f"{name}: a legend covers the data"


def test_pdf_tables_name_the_extraction_workers_memory(charted):
    table = views.pdf_scaling_table(charted).set_index(["variant", "kind", "nominal_mb"])
    assert table.loc[("pypdf", "text", 5), "workers_peak_rss_mb"] == pytest.approx(95 * 3)
    assert table.loc[("pypdf", "text", 5), "workers_rss_before_mb"] == pytest.approx(90 * 3)
    assert "peak_rss_mb" not in table


def test_markdown_tables_are_for_people():
    """No scientific notation, no all-empty columns, markdown-special text escaped, code spans kept."""
    frame = pd.DataFrame({"site": ["stdlib:re/__init__.py:12", "<frozen importlib._bootstrap>", "`a_b`", "<= 20 ms"],
                          "pages": [1560.0, 1000.0, 3.0, 2.5], "ms": [0.000123, 12.3456, float("nan"), 1.0],
                          "empty": [float("nan")] * 4, "default": [True, False, True, False]})
    table = views.markdown(frame)
    assert "e+0" not in table and "e-0" not in table and "empty" not in table
    assert "1,560" in table and "0.000123" in table and "12.3" in table and "| yes" in table
    assert r"re/\_\_init\_\_.py" in table and "&lt;frozen importlib.\\_bootstrap>" in table
    assert "`a_b`" in table and "<= 20 ms" in table


def test_capacity_lines_name_the_peak_and_the_burst_processing_rate():
    def r(scenario, metric, value, **tags):
        return {"scenario": scenario, "metric": metric, "value": value, "variant": "baseline", "unit": "",
                "tags": tags}

    m = pd.DataFrame([r("concurrency", "throughput_runs_per_s", v, level=lv) for lv, v in ((10, 20.0), (100, 43.0),
                                                                                          (500, 30.0))]
                     + [r("email_burst", "accepted", 500, mode="burst"),
                        r("email_burst", "backlog_peak", 400, mode="burst"),
                        r("email_burst", "drain_seconds", 20.0, mode="burst")])
    lines = views.capacity_lines(m)
    assert "peaks at 43 runs/s with 100 workflows" in lines[0] and "154,800 mails an hour" in lines[0]
    assert "up to 500) it is 30–30 runs/s" in lines[0]
    assert "backlog of 400 runs in 20 s" in lines[1] and "about 20 runs/s (72,000 an hour)" in lines[1]
    assert "rounds of the same kind" not in lines[1]  # no drain scenario in this session: the one burst alone

    drains = [r("small_mail_drain", "runs_per_s", v) | {"variant": variant}
              for variant, v in (("default", 30.0), ("default", 10.0), ("default", 25.0), ("stage_threads", 99.0))]
    line = views.capacity_lines(pd.concat([m, pd.DataFrame(drains)]))[1]
    assert "3 rounds of the same kind" in line and "a median of 25 runs/s (10–30), the figure the SLA reads" in line


def test_bottleneck_line_names_the_slowest_stage_and_nothing_without_stages(recorded, tmp_path):
    assert views.bottleneck_line(views.stage_breakdown(recorded)) == \
        "**Bottleneck: Ingestion**, 120.0 ms median per mail (60% of the total)."
    assert views.bottleneck_line(views.stage_breakdown(recorded.head(0))) == ""


def test_limit_lines_give_the_failure_level_the_limits_hit_and_the_slowest_shipped_extraction():
    def r(scenario, metric, value, variant="baseline", **tags):
        return {"scenario": scenario, "metric": metric, "value": value, "variant": variant, "unit": "", "rep": 0,
                "tags": tags}

    m = pd.DataFrame([r("concurrency", "throughput_runs_per_s", 10.0, level=lv) for lv in (10, 50)]
                     + [r("concurrency", "failed_runs", f, level=lv) for lv, f in ((10, 0), (50, 2))]
                     + [r("pdf_scaling", metric, value, variant, kind="text", nominal_mb=5, file_mb=5,
                          default=variant == "pdfium-2w")
                        for variant, seconds in (("pypdf", 10.0), ("pdfium-2w", 1.0))
                        for metric, value in (("ingest_seconds", seconds), ("pages", 100))]
                     + [r("pdf_scaling", "ingest_seconds", 0.1, "pdfium-2w", kind="text", nominal_mb=50,
                          file_mb=50, default=True, error="TooLarge: over max_attachment_bytes")])
    lines = views.limit_lines(m)
    assert lines[0] == "- Concurrency: no failure up to 10 workflows at once; failures from 50 on."
    assert "- text 50" in lines[1] and "TooLarge: over max_attachment_bytes" in lines[1]
    assert "shipped default (pdfium-2w): text at 100 pages/s" in lines[2] and "pypdf at 10 pages/s" in lines[2]


def test_one_percentile_for_the_whole_audit_agrees_with_numpy_and_statistics():
    import random
    import statistics

    import numpy as np

    from pipeline.audit.base.harness import percentile

    rng = random.Random(7)
    for n in (2, 3, 10, 101, 1000):
        values = [rng.expovariate(1.0) for _ in range(n)]
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        for q in (50, 95, 99):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
            assert percentile(values, q) == pytest.approx(cuts[q - 1])
    assert percentile([4.0], 99) == 4.0 and math.isnan(percentile([], 50))


def test_a_burst_rounds_drain_rate_is_its_backlog_peak_over_the_time_after_the_last_send():
    from pipeline.audit.scenarios.email_bursts import BurstRound
    from pipeline.store import Run

    def ended(at):
        return Run(1, "email_digest", "success", None, {}, 0.0, 0.0, ended_at=at)

    done = BurstRound(["a", "b"], [ended(104.0), ended(110.0)], [(0.0, 5), (1.0, 120), (2.0, 40)], 100.0, {}, 0, {})
    assert done.drain_seconds() == 10.0 and done.drain_rate() == 12.0
    idle = BurstRound(["a"], [ended(99.0)], [(0.0, 0)], 100.0, {}, 0, {})  # nothing left when the sending stopped
    assert idle.drain_rate() is None


def test_the_fault_table_leaves_out_parts_with_figures_of_their_own_and_the_wild_mail_line_reads_them(tmp_path):
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    rec.start_session("test")
    rec.record("faults", pd.DataFrame([row("bad_input", "sent", 6, "messages", 0),
                                       row("bad_input", "wild_mail_pdfs_missed", 0, "pdfs", 0, cases=8),
                                       row("bad_input", "automatic_mail_answered", 0, "digests", 0),
                                       row("mail_loop", "runs_per_mail", 2.0, "runs", 0),
                                       row("mail_loop", "runs_not_ended", 0, "runs", 0),
                                       row("mail_loop", "digests_per_mail", 1.0, "digests", 0, loop="ticket")]))
    m = rec.measurements()
    assert list(views.fault_table(m).fault) == ["bad_input"]
    line = views.wild_mail_line(m)
    assert "0 PDFs missed, 0 machine-made mails answered" in line and "2 runs per mail (0 not ended)" in line
    assert line.startswith("Mail as real clients write it (8 shapes, one PDF each")
    assert "at most 1 digest per mail" in line
    assert views.wild_mail_line(m[m.variant != "mail_loop"]) == ""


def test_cpu_by_role_is_the_extraction_workers_against_every_other_process_of_serve():
    from pipeline.audit.base.servemem import by_role

    assert by_role({"main": 1.0, "gateway": 0.5, "stage pool": 2.0, "extraction workers": 3.0}) == \
        {"serve": 3.5, "workers": 3.0}
