"""The pipeline profile on a real ``python -m pipeline serve``: stage rows per run, per-process and per-stage
memory named by role, and py-spy's profile parsed with machine-independent sites."""

import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.audit.base import fixtures as fx
from pipeline.audit.base import servemem
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.reporting import profileviews
from pipeline.audit.scenarios import concurrency, pipeline_profile

MAILS = 6


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One small profile of serve (6 mails, text PDFs of 30 and 60 pages), recorded into DuckDB; py-spy samples
    the whole load (60 s is only its cap): the sender processes take a second or more to start on a busy
    machine, and a fixed window could end before they send (py-spy writes no flame graph from no samples)."""
    tmp = tmp_path_factory.mktemp("serve-profile")
    pdfs = []
    for i, pages in enumerate((30, 60)):
        path = tmp / f"doc-{i}.pdf"
        path.write_bytes(fx.text_pdf(pages, seed=i + 1))
        pdfs.append(path)
    recorder = AuditRecorder(tmp / "audit.duckdb")
    session = recorder.start_session("test", {})
    artefacts = profileviews.artefact_dir(tmp / "audit.duckdb", session)
    df = pipeline_profile.profile_serve(pdfs, tmp / "work", emails=MAILS, senders=2, recorder=recorder,
                                    artefacts=artefacts, pyspy_s=60.0, timeout_s=300)
    return df, recorder, artefacts


def test_every_run_has_every_stage_and_the_digest_arrived(profiled):
    df, recorder, _ = profiled
    stages = df[df.metric == "stage_seconds"]
    assert set(stages.stage) == set(concurrency.STAGES)
    assert stages.groupby("rep").stage.nunique().tolist() == [len(concurrency.STAGES)] * MAILS
    assert (stages.value >= 0).all() and (df[df.metric == "end_to_end_seconds"].value > 0).all()
    assert df[df.metric == "digests_delivered"].value.item() == MAILS
    assert df[df.metric == "runs_failed"].value.item() == 0
    assert len(recorder.measurements("pipeline_profile")) == len(df)


def test_memory_rows_name_their_process(profiled):
    df, recorder, _ = profiled
    memory = df[df.metric == "stage_memory_mb"]
    assert {"parse_email", "ingest_pdf", "build_digest", "deliver"} <= set(memory.task)
    assert set(memory.process) == {"serve", "extract workers"} and set(memory.stat) == {"peak", "increment"}
    assert (memory[memory.stat == "peak"].value > 0).all()
    processes = df[df.metric == "process_peak_rss_mb"]
    assert "serve" in set(processes.process) and "extract worker" in set(processes.process)
    assert (processes.value > 0).all() and (df[df.metric == "process_cpu_seconds"].value >= 0).all()
    table = profileviews.stage_memory_table(recorder.measurements())
    assert "serve peak MB" in table and any("extract workers" in c for c in table.columns)
    assert set(profileviews.process_table(recorder.measurements()).process) >= {"serve", "extract worker 1"}
    assert "Memory increment per task: parse_email serve" in profileviews.closing_note(recorder.measurements())


def test_pyspy_profile_is_recorded_or_its_absence_explained(profiled):
    df, recorder, artefacts = profiled
    status = df[df.metric == "pyspy_recorded"].iloc[0]
    if not status.value:  # only a missing permission to attach (ptrace) is an accepted reason
        assert "ermission" in status.reason or "ptrace" in status.reason, status.reason
        assert "could not record" in profileviews.pyspy_note(recorder.measurements())
        pytest.skip(f"py-spy could not record serve here: {status.reason}")
    top = profileviews.top_self_time(recorder.measurements(), top=5)
    assert len(top) and set(top.process) <= {"serve", "gateway", "extract worker", "stage pool", "other child"}
    assert not any(site.startswith("/") for site in df[df.metric == "self_seconds"].site)
    svg = profileviews.flamegraph_file(recorder.measurements(), artefacts)
    assert svg is not None
    text = svg.read_text()
    assert "<svg" in text and str(artefacts.parent.parent) not in text and "--data-dir" not in text


def test_speedscope_parser_on_a_real_recording(tmp_path):
    exe = pipeline_profile.pyspy_path()
    if exe is None:
        pytest.skip("py-spy is not installed")
    code = ("import json, time\nend = time.time() + 30\n"
            "while time.time() < end:\n    json.dumps([{'k': list(range(50))}] * 200)\n")
    with subprocess.Popen([sys.executable, "-c", code]) as busy:
        try:
            time.sleep(0.3)
            out = tmp_path / "busy.json"
            done = subprocess.run([exe, "record", "--pid", str(busy.pid), "--duration", "1", "--rate", "100",
                                   "--format", "speedscope", "--function", "--output", str(out)],
                                  capture_output=True, text=True, timeout=120)
        finally:
            busy.kill()
    if done.returncode != 0:
        pytest.skip(f"py-spy could not attach: {done.stderr.strip()[-300:]}")
    table = pipeline_profile.parse_speedscope(out, {busy.pid: "busy"}, busy.pid)
    assert set(table.process) == {"busy"} and table.self_s.sum() > 0
    assert (table.total_s >= table.self_s).all() and table.self_share.sum() == pytest.approx(1.0)
    stdlib = table[table.site.str.startswith("stdlib:json/")]
    assert len(stdlib) and not any(site.startswith("/") for site in table.site)


def test_stage_memory_takes_peak_and_rise_over_the_sample_before_the_task():
    samples = pd.DataFrame(
        [(r, 100.0 + r, pid, role, mb) for r, values in enumerate([(50, 10, 10), (52, 30, 10), (51, 12, 40)])
         for pid, role, mb in zip((1, 2, 3), ("serve", "extract worker", "extract worker"), values, strict=True)],
        columns=["round", "time", "pid", "role", "rss_mb"])
    for window in ((100.5, 101.0), (100.2, 100.4)):  # round 1 inside; none inside, so the next one (round 1)
        rows = pipeline_profile.stage_memory_rows(samples, {"ingest_pdf": [window]}, interval_s=1.0)
        got = {(r["tags"]["process"], r["tags"]["stat"]): r["value"] for r in rows}
        # the sample before the task is round 0: serve 50, workers 10 + 10
        assert got == {("serve", "peak"): 52, ("serve", "increment"): 2,
                       ("extract workers", "peak"): 40, ("extract workers", "increment"): 20}, window
        assert {r["tags"]["processes"] for r in rows if r["tags"]["process"] == "extract workers"} == {2}


def test_stage_times_split_ingestion_into_the_wait_for_a_lane_and_the_work(tmp_path):
    from pipeline.sqlite_store import SqliteRunStore
    from pipeline.store import Transition

    with SqliteRunStore(tmp_path / "runs.sqlite3") as store:
        run = store.create_run("email_digest", {"data_end_at": 99.0}, now=100.0)[0]
        store.create_tasks(run.run_id, ["parse_email", "ingest_pdf[0]", "ingest_pdf[1]"])
        # parse 101-103 (waited 1.5 s); two ingestions side by side: [0] 103-110 waited 6 s, [1] 103-108 waited 1 s
        for task, start, end, waited in (("parse_email", 101, 103, 1.5), ("ingest_pdf[0]", 103, 110, 6.0),
                                         ("ingest_pdf[1]", 103, 108, 1.0)):
            store.record_transitions([Transition(run.run_id, task, "running", 1, start)])
            store.record_transitions([Transition(run.run_id, task, "success", 1, end, wait_s=waited)])
        times = concurrency.stage_times(store, store.get_run(run.run_id))
    assert times["Lane wait"] == pytest.approx(1.5 + 6.0)  # the parse's and the last-ending instance's
    assert times["Ingestion"] == pytest.approx(110 - 101 - 7.5)
    assert times["Email"] == pytest.approx(1.0)


def test_closed_loop_senders_each_wait_for_their_digest_and_the_table_says_where_the_time_went(tmp_path):
    from pipeline.audit.scenarios import end_to_end

    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(fx.text_pdf(2))
    recorder = AuditRecorder(tmp_path / "audit.duckdb")
    recorder.start_session("test", {})
    df = end_to_end.end_to_end(pdf, tmp_path / "work", senders=(2,), per_sender=2, recorder=recorder)
    e2e = df[df.metric == "end_to_end_seconds"]
    assert len(e2e) == 4 and (e2e.value > 0).all() and set(e2e.run_state) == {"success"}
    assert df[df.metric == "runs_failed"].value.tolist() == [0]
    # closed loop: never more mails in the pipeline than senders
    events = sorted([(t, 1) for t in e2e.arrived] + [(t, -1) for t in e2e.ended], key=lambda e: (e[0], e[1]))
    in_flight = [sum(step for _, step in events[:i + 1]) for i in range(len(events))]
    assert max(in_flight) <= 2
    stages = df[df.metric == "stage_seconds"]
    per_mail = stages.groupby("rep").value.sum()
    assert (per_mail <= e2e.set_index("rep").value + 1e-6).all()  # the stages are parts of the whole
    table = profileviews.end_to_end_table(recorder.measurements())
    assert table.what.tolist()[0] == "end to end" and set(table.what) == {"end to end", *concurrency.STAGES}
    assert set(table.n) == {4} and (table.pdf == "doc.pdf").all() and (table.senders == 2).all()
    cpu = df[df.metric == "cpu_seconds_per_mail"].value
    floor = df[df.metric == "cpu_floor_seconds"]
    assert len(cpu) == 1 and cpu.iloc[0] > 0  # serve and its workers did parse and extract the mails
    assert floor.value.iloc[0] == pytest.approx(2 * cpu.iloc[0] / end_to_end.CORES)
    bounds = profileviews.end_to_end_floor_table(recorder.measurements())
    assert bounds.senders.tolist() == [2] and bounds["mean / floor"].iloc[0] > 0
    # by process: the extraction workers extracted the PDFs, and the parts add up to the whole
    parts = df[df.metric == "process_cpu_seconds_per_mail"]
    assert sorted(parts.process) == sorted(servemem.PROCESSES)
    assert parts.value.sum() == pytest.approx(cpu.iloc[0]) and bounds["of which extraction workers"].iloc[0] > 0


def test_the_cpu_floor_grows_with_the_mails_in_flight_and_shrinks_with_the_cores():
    from pipeline.audit.scenarios.end_to_end import cpu_floor_s

    assert cpu_floor_s(0.6, 1, 2) == pytest.approx(0.3)  # one mail may use both cores at best
    assert cpu_floor_s(0.6, 4, 2) == pytest.approx(1.2)  # four in flight share two cores
    assert cpu_floor_s(0.6, 4, 4) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        cpu_floor_s(0.6, 0, 2)
