"""A process killed with SIGKILL mid-run: a restarted engine finishes its run, no task lost or run twice."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import recovery_dag, wait_until

from pipeline.engine import WorkflowEngine

CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from pipeline.config import Settings
from pipeline.engine import WorkflowEngine
from pipeline.sqlite_store import SqliteRunStore
from helpers import recovery_dag, wait_until
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
    assert tries == {"a": 1, "b[0]": 2, "b[1]": 2, "c": 1}  # a try a crash cut short counts (see test_commit_order)
    assert store.count_runs_by_state("recover") == {"success": 1}


def test_a_try_cut_short_by_a_stop_costs_the_task_no_retry(tmp_path, store, settings):
    """b has one retry. A stop whose grace ended while b ran, then one real failure of b: b is retried and the
    run succeeds (the stop used to count as b's first try, so the failure was its last word: a restart mid-PDF,
    then one worker death, failed a good PDF). A crash still counts: test_commit_order."""
    log, gate = tmp_path / "calls.log", tmp_path / "gate"
    gate.touch()
    engine = WorkflowEngine(store, settings)
    engine.register(recovery_dag())
    engine.start()
    run = engine.trigger("recover", {"log": str(log), "gate": str(gate), "hold": ["b"]}, "stopped")
    try:
        assert wait_until(lambda: log.exists() and log.read_text().count("b[") == 2, timeout_s=30)
    finally:
        engine.shutdown(grace_s=0)  # b's tries still running: the run is requeued with their numbers given back
    assert {t.task_id: (t.state, t.try_number) for t in store.get_tasks(run.run_id) if t.task_id.startswith("b")} \
        == {"b[0]": ("queued", 0), "b[1]": ("queued", 0)}
    gate.unlink()
    engine = WorkflowEngine(store, settings)
    engine.register(recovery_dag(flaky_b=True))
    engine.start()
    try:
        finished = engine.wait(run.run_id, timeout=60)
    finally:
        engine.shutdown()
    assert finished.state == "success", finished.reason
    tries = {t.task_id: t.try_number for t in store.get_tasks(run.run_id)}
    assert tries == {"a": 1, "b[0]": 2, "b[1]": 2, "c": 1}  # the stopped try again as 1, the failed one's retry 2


def test_run_of_an_earlier_process_with_our_pid_is_recovered_even_after_start(store, settings, make_engine):
    """A container restarted as PID 1 gets the dead process's pid back; its runs must still be recovered."""
    from helpers import noop

    from pipeline.dag import DAG, Task
    from pipeline.liveness import HOST

    dag = DAG("w", [Task("a", noop)])
    early = store.create_run("w", {}, "early")[0]
    store.claim_next_run(f"{HOST}:{os.getpid()}:deadbeef")  # heartbeat fresh: only the owner tells
    engine = make_engine(dag)
    assert engine.wait(early.run_id, timeout=30).state == "success"  # recovered at start

    # an owner with our pid that died after this engine started: the periodic recovery takes it
    engine.shutdown()
    gate, started = threading.Event(), threading.Event()
    hold = DAG("hold", [Task("h", lambda ctx: started.set() or gate.wait(30))])
    engine = make_engine(dag, hold, max_active_runs=1)
    holding = engine.trigger("hold").run_id
    assert started.wait(10)  # the one slot is taken: the dispatcher claims nothing more for now
    late = store.create_run("w", {}, "late")[0]
    assert store.claim_next_run(f"{HOST}:{os.getpid()}:cafe0001").run_id == late.run_id
    gate.set()
    assert engine.wait(holding, timeout=30).state == "success"
    assert engine.wait(late.run_id, timeout=30).state == "success"


def test_a_run_claimed_in_our_name_whose_claim_answer_was_lost_is_recovered(store, settings):
    """A prober's find under store_server_down: the claim's COMMIT reached PostgreSQL, its answer did not (the
    server was killed in between), so the run stood 'running' in this engine's name and nothing ran it until
    serve restarted: the acked mail had no run end after 240 s. Recovery never took our own runs; now it takes
    those we do not run whose heartbeat is stale."""
    from helpers import noop

    from pipeline.dag import DAG, Task

    orphan = store.create_run("w", {}, "in-doubt")[0]
    engine = WorkflowEngine(store, settings)
    engine.register(DAG("w", [Task("a", noop)]))
    assert store.claim_runs(engine.owner, 1, now=time.time() - 60)[0].run_id == orphan.run_id  # in our name
    engine.start()  # its recovery (at start, then every stale_after_s) takes it
    try:
        assert engine.wait(orphan.run_id, timeout=60).state == "success"
    finally:
        engine.shutdown(grace_s=5)


def test_a_live_engine_of_this_process_is_not_taken_for_dead(store, settings, make_engine):
    from pipeline.dag import DAG, Task

    gate, started = threading.Event(), threading.Event()
    first = make_engine(DAG("hold", [Task("h", lambda ctx: started.set() or gate.wait(30))]))
    run_id = first.trigger("hold").run_id
    assert started.wait(10)
    second = make_engine(DAG("hold", [Task("h", lambda ctx: None)]))
    assert second.recover() == []
    assert store.get_run(run_id).owner == first.owner
    gate.set()
    assert first.wait(run_id, timeout=30).state == "success"


INGEST_CHILD = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from pipeline.config import Settings
from pipeline.ingest_command import ingest_files
fifo = Path({fifo!r})
os.mkfifo(fifo)
try:
    ingest_files(Settings.for_data_dir({data!r}), [fifo])  # blocks reading the fifo, the engine started
except KeyboardInterrupt as exc:
    print("stopped:", exc, flush=True)
    sys.exit(130)
"""


def open_writer_when_read(fifo: Path, child: subprocess.Popen) -> int:
    """Open the fifo's write end once the child opened it for reading (ENXIO until then)."""
    deadline = time.monotonic() + 60
    while True:
        assert child.poll() is None and time.monotonic() < deadline, "child never read the fifo"
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except (FileNotFoundError, OSError):
            time.sleep(0.05)


def test_ingest_stops_the_service_on_sigterm(tmp_path, settings):
    fifo = tmp_path / "message.eml"
    code = INGEST_CHILD.format(tests=str(Path(__file__).parent), fifo=str(fifo), data=str(settings.data_dir))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        writer = open_writer_when_read(fifo, child)  # the child is inside ingest_files, the engine started
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
    finally:
        if writer is not None:
            os.close(writer)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert "stopped: signal SIGTERM" in out and "Traceback" not in err


def test_an_owner_killed_and_not_yet_reaped_is_dead_not_alive(store):
    from pipeline.liveness import HOST, is_dead, pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        run = store.create_run("w", {}, "zombie-owner")[0]
        claimed = store.claim_next_run(f"{HOST}:{child.pid}:cafe0002")  # heartbeat fresh: only the owner tells
        assert claimed.run_id == run.run_id and pid_alive(child.pid)
        assert not is_dead(claimed, me="someone-else", stale_before=0.0)
        child.send_signal(signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(child.pid)), "a zombie counted as a live owner"
        assert is_dead(claimed, me="someone-else", stale_before=0.0)
        assert os.path.exists(f"/proc/{child.pid}")  # still a zombie: nobody has waited for it yet
    finally:
        child.kill()
        child.wait(timeout=30)
