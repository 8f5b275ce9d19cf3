"""The report's tables are arithmetic on recorded rows: check that arithmetic on rows with known values."""

import pandas as pd
import pytest

from pipeline.audit import views
from pipeline.audit.harness import row
from pipeline.audit.recorder import AuditRecorder


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
