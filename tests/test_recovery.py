"""A process killed with SIGKILL mid-run: a restarted engine finishes its run, no task lost or run twice."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import recovery_dag

from pipeline.engine import WorkflowEngine

CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from pipeline.config import Settings
from pipeline.engine import WorkflowEngine
from pipeline.sqlite_store import SqliteRunStore
from helpers import recovery_dag
settings = Settings.for_data_dir({data!r})
engine = WorkflowEngine(SqliteRunStore(settings.store), settings)
engine.register(recovery_dag())
engine.start()
engine.trigger("recover", {{"log": {log!r}, "gate": {gate!r}, "hold": ["b"]}}, "only-once")
time.sleep(60)
"""


def test_sigkilled_run_is_recovered_and_finished(tmp_path, store, settings):
    log, gate = tmp_path / "calls.log", tmp_path / "gate"
    gate.touch()
    code = CHILD.format(tests=str(Path(__file__).parent), data=str(settings.data_dir), log=str(log), gate=str(gate))
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not log.exists() or log.read_text().count("start") < 3):
            time.sleep(0.05)
            assert child.poll() is None, "child died early"
        assert log.read_text().count("b[") == 2  # both fan-out instances are mid-task
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    run = store.list_runs("recover")[0]
    assert run.state == "running"
    gate.unlink()

    # Same payload key: the restarted process must not make a second run, and must finish the first.
    engine = WorkflowEngine(store, settings)
    engine.register(recovery_dag())
    engine.start()
    try:
        again = engine.trigger("recover", {"log": str(log)}, "only-once")
        assert again.run_id == run.run_id
        finished = engine.wait(run.run_id, timeout=30)
    finally:
        engine.shutdown()
    assert finished.state == "success"
    lines = log.read_text().splitlines()
    assert lines.count("a done") == 1  # a succeeded before the kill: not run again
    assert lines.count("b[0] start") == 2 and lines.count("b[0] done") == 1  # interrupted, tried again
    assert lines.count("b[1] start") == 2 and lines.count("b[1] done") == 1
    assert lines.count("c done") == 1
    tries = {t.task_id: t.try_number for t in store.get_tasks(run.run_id)}
    assert tries == {"a": 1, "b[0]": 2, "b[1]": 2, "c": 1}
    assert store.count_runs_by_state("recover") == {"success": 1}
