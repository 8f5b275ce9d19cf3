"""Each optimization switch runs both ways on real stores, PDFs and watchers, and the report's table
of them is computed from what was recorded."""

import pandas as pd
import pytest

from pipeline.audit.base import fixtures as fx
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import optimizations
from pipeline.stages import mailpolicy


@pytest.fixture
def recorder(tmp_path):
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    rec.start_session("test")
    return rec


def _variants_by_switch(frame: pd.DataFrame) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in frame.itertuples():
        out.setdefault(r.tags["switch"], set()).add(r.variant.split(":")[0])
    return out


def test_store_switches_measure_baseline_and_optimized_and_the_table_takes_their_ratio(recorder):
    df = optimizations.store_switches(runs=2000, reps=2, recorder=recorder, lock_inserts=20)
    assert _variants_by_switch(df) == {s: {"baseline", "optimized"} for s in (
        "journal and synchronous", "batched commits", "BEGIN IMMEDIATE", "indexes", "run_counts table",
        "select only needed columns", "lock polling")}
    immediate = df[df.variant == "optimized: BEGIN IMMEDIATE"]
    assert len(immediate) == 2 and (immediate.value == 0).all()  # writers wait their turn instead of failing

    table = views.optimization_table(recorder.measurements()).set_index("switch")
    assert len(table) == 8 and (table.reps == 2).all()  # lock polling: the insert's p99 and the writer's rate
    assert set(table.loc["lock polling"].metric) == {"insert_p99_ms_beside_writer", "writer_commits_per_s"}
    row = table.loc["indexes"]
    measured = df[df.tags.map(lambda t: t["switch"]) == "indexes"].groupby("variant").value.median()
    assert row["before median"] == pytest.approx(measured["baseline: no index (scan and sort)"])
    assert row["after/before"] == pytest.approx(measured["optimized: index on workflow"] /
                                                measured["baseline: no index (scan and sort)"])


def test_ingestion_switches_stream_in_constant_memory(tmp_path, recorder):
    dense, small = tmp_path / "dense.pdf", tmp_path / "small.pdf"
    dense.write_bytes(fx.text_pdf(40))
    small.write_bytes(fx.text_pdf(2))
    df = optimizations.ingestion_switches(dense, small, documents=2, reps=1, recorder=recorder)
    assert _variants_by_switch(df) == {
        "executor for CPU-bound ingestion (2 PDFs at once, pypdf)": {"baseline", "optimized"},
        "streaming pages (dense.pdf)": {"baseline", "optimized"}}
    heap = df[df.metric == "peak_python_heap_mb"].set_index("variant").value
    # 40 pages of text held at once against one page at a time
    assert heap["baseline: hold the document's text, then write"] > 5 * heap["optimized: stream pages to the file"]
    assert (df[df.metric == "batch_seconds"].value > 0).all()


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_both_drop_folder_watch_modes_queue_every_file(mode):
    latencies = optimizations.drop_folder_latency(mode, messages=2)
    assert len(latencies) == 2 and all(0 <= s < 30 for s in latencies)


def test_gateway_switches_measure_both_ways_with_one_generated_attachment(recorder, tmp_path):
    df = optimizations.gateway_switches(reps=1, recorder=recorder, message_mb=0.3, rounds=1, concurrent=1,
                                        small_mails=2, drop_messages=1, cache_dir=tmp_path, session_senders=2,
                                        session_mails=3)
    assert _variants_by_switch(df) == {s: {"baseline", "optimized"} for s in (
        "chunked DATA", "accept off the event loop", "drop folder watch", "lean SMTP sessions",
        "inline accept of small mails")}
    assert set(df.metric) == {"large_client_latency_p95_ms", "small_client_latency_during_large_p95_ms",
                              "drop_to_queued_ms", "accepted_per_s", "client_txn_p99_ms", "refused"}
    assert (df[df.metric != "refused"].value > 0).all() and (df[df.metric == "refused"].value == 0).all()
    for switch in ("lean SMTP sessions", "inline accept of small mails"):
        rows = df[df.tags.map(lambda tags, switch=switch: tags["switch"]) == switch]
        assert len(rows) == 6  # per variant: its rate, its senders' p99 and its refusals
    assert len(list(tmp_path.glob("gateway-large-*.pdf"))) == 1  # generated once, reused by every variant


def test_stage_switches_measure_parsed_headers_kept_both_ways(recorder):
    df = optimizations.stage_switches(reps=2, mails=10, recorder=recorder)
    assert set(df.variant) == {"baseline: every read parses the header", "optimized: parsed headers kept"}
    assert (df.value > 0).all() and len(df) == 4
    assert mailpolicy.CACHED_HEADER_CHARS > 0  # the switch is back on after the measurement
    table = views.optimization_table(recorder.measurements())
    assert "cpu_ms_per_small_mail" in set(table.metric)
