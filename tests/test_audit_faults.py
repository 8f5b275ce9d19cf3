"""The audit batch when things around it go wrong: a DuckDB file held by a notebook kernel, two batches at
once, an interrupted session, a fault part that errored."""

from __future__ import annotations

import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.batch import AuditBatchError, only_batch_in, open_recorder
from pipeline.audit.reporting import report


def test_a_duckdb_file_another_process_holds_is_a_one_line_error_saying_so(tmp_path):
    path = tmp_path / "audit.duckdb"
    AuditRecorder(path)
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys, time; db = duckdb.connect({str(path)!r}); "
                               "print('holding', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(AuditBatchError) as err:
            open_recorder(path)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "another process has it open" in text


def test_a_second_batch_on_one_data_dir_is_refused_naming_the_first(tmp_path):
    script = ("import time; from pathlib import Path; from pipeline.audit.batch import only_batch_in\n"
              f"with only_batch_in(Path({str(tmp_path)!r})):\n print('in', flush=True); time.sleep(120)")
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "in"
        with pytest.raises(AuditBatchError, match=f"another audit \\(pid {first.pid}\\) is running"):
            with only_batch_in(tmp_path):
                pass
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    with only_batch_in(tmp_path):  # free again once the first is gone
        pass


def _session(rec: AuditRecorder, ended: bool) -> str:
    session = rec.start_session("quick")
    rec.record("s", pd.DataFrame([{"variant": "v", "metric": "m", "value": 1.0, "unit": "x", "rep": 0, "tags": {}}]))
    if ended:
        rec.end_session()
    time.sleep(0.01)  # started_at orders them
    return session


def test_the_previous_session_is_never_an_interrupted_one(tmp_path):
    """An interrupted session whose report someone drew by hand (99 in JupyterLab stores its SLA rows) used to
    become the next report's "previous", with every figure of it missing."""
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    complete = _session(rec, ended=True)
    interrupted = _session(rec, ended=False)
    current = _session(rec, ended=True)
    for session in (complete, interrupted, current):
        report.evaluate_slas(rec, session)
    assert (rec.ended(complete), rec.ended(interrupted)) == (True, False)
    assert report.previous_session(rec, current) == complete


def test_an_older_file_counts_its_sessions_with_measured_slas_as_ended(tmp_path):
    path = tmp_path / "audit.duckdb"
    rec = AuditRecorder(path)
    measured, empty = _session(rec, ended=False), _session(rec, ended=False)
    rec.record_sla(pd.DataFrame([{"sla": "x", "target": 1.0, "observed": 0.5, "unit": "s", "comparison": "<=",
                                  "passed": True, "source": "team"}]))  # this one is ``empty``'s
    rec.session_id = measured
    rec.record_sla(pd.DataFrame([{"sla": "x", "target": 1.0, "observed": None, "unit": "s", "comparison": "<=",
                                  "passed": None, "source": "team"}]))
    with rec.connect() as db:
        db.execute("DROP TABLE session_end")  # as a file written before the table existed
    again = AuditRecorder(path)
    assert (again.ended(empty), again.ended(measured)) == (True, False)


@pytest.mark.parametrize("part", ["error", "skipped"])
def test_a_fault_that_errored_or_was_skipped_leaves_the_any_fault_slas_not_measured(tmp_path, part):
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    session = rec.start_session("quick")
    rows = [{"variant": fault, "metric": metric, "value": 0.0, "unit": "messages", "rep": 0, "tags": {}}
            for fault in ("kill_serve", "bad_input") for metric in ("lost", "untyped")]
    rows.append({"variant": "disk_full", "metric": part, "value": 1.0, "unit": "fault", "rep": 0,
                 "tags": {"reason": "cannot mount a tmpfs here"}})
    rec.record("faults", pd.DataFrame(rows))
    results = report.evaluate_slas(rec, session, save=False).set_index("sla")
    for name in ("Acked messages lost under any injected fault", "Runs ended without a typed reason under faults"):
        assert results.loc[name, "passed"] is None and pd.isna(results.loc[name, "observed"]), name
    clean = AuditRecorder(tmp_path / "clean.duckdb")
    clean_session = clean.start_session("quick")
    clean.record("faults", pd.DataFrame(rows[:-1]))
    ok = report.evaluate_slas(clean, clean_session, save=False).set_index("sla")
    assert ok.loc["Acked messages lost under any injected fault", "passed"] is True


def test_a_serve_the_audit_started_stops_when_the_kernel_that_started_it_is_killed(tmp_path):
    """A kernel killed outright (a cancelled CI job, a restart in JupyterLab) runs no cleanup; its serve, in a
    session of its own, used to stay with its workers and temp dirs."""
    script = ("import sys; from pathlib import Path; from pipeline.audit.base.serveproc import ServeProcess\n"
              f"serve = ServeProcess(Path({str(tmp_path / 'data')!r}), Path({str(tmp_path / 'serve')!r})).start()\n"
              "print(serve.proc.pid, flush=True); sys.stdin.read()")
    kernel = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        serve = psutil.Process(int(kernel.stdout.readline()))
        assert serve.is_running()
        kernel.kill()  # no cleanup runs in it
        kernel.wait()
        serve.wait(timeout=60)  # SIGTERM from the kernel's death: serve stops gracefully
    finally:
        kernel.kill()
        kernel.wait()
        kernel.stdin.close()
        kernel.stdout.close()


def test_a_stop_while_the_report_is_written_waits_until_all_three_files_are(tmp_path):
    """SIGTERM (a cancelled CI job) during the report, outbox and task card used to leave them half written."""
    import os
    import signal

    from pipeline.audit.batch import stops_deferred

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    written = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with stops_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)  # delivered now, were it not held
                written += ["report", "outbox", "task card"]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert written == ["report", "outbox", "task card"]
