"""Faults on a real SqliteRunStore: the engine's loops survive them, report health, and no run stays running."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from dataclasses import replace

import pytest
from helpers import noop

from pipeline.config import RunnerConfig, StoreConfig
from pipeline.dag import DAG, Task
from pipeline.engine import WorkflowEngine
from pipeline.errors import StoreIOError
from pipeline.sqlite_store import SqliteRunStore

FAST_BACKOFF = {"backoff_base_s": 0.01, "backoff_max_s": 0.1}


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def start_engine():
    """Start engines with runner/engine overrides on a given store; all shut down after the test."""
    made: list[WorkflowEngine] = []

    def start(store, settings, *dags, runner: RunnerConfig | None = None, **engine) -> WorkflowEngine:
        settings = replace(settings, runner=runner or settings.runner,
                           engine=replace(settings.engine, **{**FAST_BACKOFF, **engine}))
        made.append(WorkflowEngine(store, settings))
        for dag in dags:
            made[-1].register(dag)
        return made[-1].start()

    yield start
    for engine in made:
        engine.shutdown(grace_s=5)


def survive_stop_signals(ctx) -> str:
    """A process task that sends itself Ctrl-C and SIGTERM, as a terminal or systemd would."""
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # a signal not ignored would have ended this process by now
    return "survived"


def test_timeout_that_fires_before_a_thread_is_free_is_final(store, settings, start_engine):
    gate, started, ran = threading.Event(), threading.Event(), []
    long = DAG("long", [Task("hold", lambda ctx: started.set() or gate.wait(10))])
    quick = DAG("quick", [Task("q", lambda ctx: ran.append(ctx.run_id), timeout_s=0.05)])
    engine = start_engine(store, settings, long, quick, DAG("after", [Task("a", noop)]),
                          runner=replace(settings.runner, thread_workers=1), max_active_runs=3)
    long_id = engine.trigger("long").run_id
    assert started.wait(10)
    run = engine.wait(engine.trigger("quick").run_id, timeout=10)  # its try waits behind "hold" for the one thread
    assert run.state == "failed" and store.get_tasks(run.run_id)[0].error_type == "timeout"
    gate.set()
    assert engine.wait(long_id, timeout=10).state == "success"
    assert engine.wait(engine.trigger("after").run_id, timeout=10).state == "success"  # the thread drained "q"
    task = store.get_tasks(run.run_id)[0]
    assert (task.state, task.error_type, task.try_number) == ("failed", "timeout", 1)
    assert ran == []  # the timed-out callable never ran


def test_unmakeable_work_dir_fails_runs_internal_and_engine_recovers(store, settings, start_engine, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    (settings.data_dir / "work").write_text("a file where the work dir should be")
    engine = start_engine(store, settings, DAG("d", [Task("a", noop)]), max_internal_requeues=2)
    runs = [engine.wait(engine.trigger("d", {"i": i}).run_id, timeout=30) for i in range(2)]
    for run in runs:
        assert run.state == "failed" and run.reason.startswith("internal: NotADirectoryError"), run.reason
    assert any("engine unhealthy: claiming runs failed" in r.getMessage() for r in caplog.records)
    assert all(t.is_alive() for t in engine._threads)  # the dispatcher survived

    (settings.data_dir / "work").unlink()
    assert engine.wait(engine.trigger("d", {"i": "fixed"}).run_id, timeout=30).state == "success"
    wait_until(lambda: engine.healthy, what="healthy again")
    assert engine.health_problem is None
    assert any("recovered" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_store_locked_by_another_process_makes_engine_unhealthy_until_released(settings, start_engine, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    settings = replace(settings, store=StoreConfig(path=settings.store.path, busy_timeout_ms=50))
    gate, started = threading.Event(), threading.Event()
    blocker = DAG("blocker", [Task("hold", lambda ctx: started.set() or gate.wait(30))])
    with SqliteRunStore(settings.store) as store:
        engine = start_engine(store, settings, blocker, DAG("d", [Task("a", noop)]), max_active_runs=1)
        ids = [engine.trigger("blocker").run_id]
        assert started.wait(10)
        ids += [engine.trigger("d", {"i": i}).run_id for i in range(3)]  # queued behind the blocker
        locker = sqlite3.connect(settings.store.path, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            wait_until(lambda: not engine.healthy, what="unhealthy from failing heartbeats")
            gate.set()  # the blocker's result cannot be written now: its run must not stay running
            wait_until(lambda: "claiming runs failed" in (engine.health_problem or ""), what="dispatcher unhealthy")
            assert engine.active_runs() == []
            assert {store.get_run(i).state for i in ids[1:]} == {"queued"}
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert [engine.wait(i, timeout=30).state for i in ids] == ["success"] * 4
        wait_until(lambda: engine.healthy, what="healthy again")
    tracebacks = [r for r in caplog.records if r.getMessage().startswith("claiming runs failed") and r.exc_info]
    assert len(tracebacks) == 1  # one traceback per streak, then one line per failure


class FlakyStore(SqliteRunStore):
    """A real store whose task writes fail on the listed calls (every call from ``always_from`` on)."""

    def __init__(self, config, fail_on=(), always_from=None) -> None:
        super().__init__(config)
        self.calls, self.fail_on, self.always_from = 0, set(fail_on), always_from
        self.lock = threading.Lock()

    def record_transitions(self, transitions) -> None:
        with self.lock:
            self.calls += 1
            call = self.calls
        if call in self.fail_on or (self.always_from is not None and call >= self.always_from):
            raise StoreIOError(f"injected: write {call} failed")
        super().record_transitions(transitions)


CHAIN = DAG("chain", [Task("a", lambda ctx: "a"), Task("b", lambda ctx: ctx.upstream["a"] + "b", deps=("a",))])


@pytest.mark.parametrize("failing_write", [1, 2, 3, 4], ids=["a-running", "a-success", "b-running", "b-success"])
def test_task_write_failing_in_a_callback_requeues_the_run_which_completes(settings, start_engine, failing_write):
    with FlakyStore(settings.store, fail_on=[failing_write]) as store:
        engine = start_engine(store, settings, CHAIN)
        run = engine.wait(engine.trigger("chain").run_id, timeout=30)
        assert (run.state, run.reason) == ("success", None)
        assert {t.task_id: t.output for t in store.get_tasks(run.run_id)} == {"a": "a", "b": "ab"}
        assert engine.active_runs() == [] and engine.healthy


def test_task_writes_that_keep_failing_fail_the_run_internal(settings, start_engine):
    with FlakyStore(settings.store, always_from=1) as store:
        engine = start_engine(store, settings, CHAIN, max_internal_requeues=2)
        run = engine.wait(engine.trigger("chain").run_id, timeout=30)
        assert run.state == "failed"
        assert run.reason == "internal: StoreIOError: injected: write 3 failed"  # requeued twice, then failed
        assert engine.active_runs() == []


def test_process_workers_ignore_ctrl_c_and_sigterm(store, settings, start_engine):
    engine = start_engine(store, settings, DAG("sig", [Task("s", survive_stop_signals, executor="process")]))
    run = engine.wait(engine.trigger("sig").run_id, timeout=60)
    assert run.state == "success" and store.get_tasks(run.run_id)[0].output == "survived"


def test_stop_past_grace_requeues_running_and_cancelled_tries_without_tracebacks(store, settings, start_engine,
                                                                                 caplog):
    caplog.set_level(logging.INFO)
    gate, started = threading.Event(), threading.Event()
    dag = DAG("hold", [Task("h", lambda ctx: started.set() or gate.wait(10))])
    engine = start_engine(store, settings, dag, runner=replace(settings.runner, thread_workers=1))
    ids = [engine.trigger("hold", {"i": i}).run_id for i in range(2)]  # the second waits for the one thread
    assert started.wait(10)
    wait_until(lambda: len(engine.active_runs()) == 2, what="both runs active")
    engine.shutdown(grace_s=0.2)  # cancels the queued try; the running one outlives the grace period
    gate.set()
    assert [store.get_run(i).state for i in ids] == ["queued", "queued"]
    assert {t.state for i in ids for t in store.get_tasks(i)} == {"queued"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], "tracebacks on a stop"
    engine2 = start_engine(store, settings, dag)
    assert [engine2.wait(i, timeout=30).state for i in ids] == ["success", "success"]
