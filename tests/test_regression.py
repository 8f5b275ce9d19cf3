"""The regression gate on real measurements: a stage made 20 % slower is caught, a rerun passes."""

import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.audit.recorder import AuditRecorder
from pipeline.dag import DAG, Task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from check_regression import main as gate  # noqa: E402


def _stage(ctx):
    time.sleep(ctx.payload["seconds"])


def measure(make_engine, store, seconds: float, runs: int = 25) -> pd.DataFrame:
    """Run a one-stage workflow ``runs`` times and read each stage duration back from the run store."""
    engine = make_engine(DAG("staged", [Task("digest", _stage)]))
    rows = []
    for rep in range(runs):
        run = engine.wait(engine.trigger("staged", {"seconds": seconds}).run_id, timeout=30)
        task = store.get_tasks(run.run_id)[0]
        rows.append({"variant": "baseline", "metric": "stage_seconds", "value": task.duration_s, "unit": "s",
                     "rep": rep, "tags": {"stage": "Digest"}})
    return pd.DataFrame(rows)


@pytest.fixture
def sessions(tmp_path, make_engine, store):
    recorder = AuditRecorder(tmp_path / "audit.duckdb")
    ids = {}
    for name, seconds in (("baseline", 0.02), ("rerun", 0.02), ("slower", 0.024)):
        ids[name] = recorder.start_session("test")
        recorder.record("pipeline_profile", measure(make_engine, store, seconds))
    return recorder, ids


def test_twenty_percent_slowdown_is_caught(sessions, capsys):
    recorder, ids = sessions
    assert gate(["--db", str(recorder.path), "--baseline", ids["baseline"], "--candidate", ids["slower"]]) == 1
    assert "REGRESSED" in capsys.readouterr().out


def test_rerun_of_the_same_code_passes(sessions, capsys):
    recorder, ids = sessions
    assert gate(["--db", str(recorder.path), "--baseline", ids["baseline"], "--candidate", ids["rerun"]]) == 0
    assert "0 of 1 series regressed" in capsys.readouterr().out


def test_missing_database_is_an_error(tmp_path, capsys):
    assert gate(["--db", str(tmp_path / "none.duckdb"), "--baseline", "x"]) == 2
    assert "no audit database" in capsys.readouterr().err
