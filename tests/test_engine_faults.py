"""Faults on a real SqliteRunStore: the engine's loops survive them, report health, and no run stays running."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import noop
from test_store_faults import damage_table

from pipeline.config import RunnerConfig, StoreConfig
from pipeline.dag import DAG, Task
from pipeline.engine import WorkflowEngine
from pipeline.errors import StoreCorruptError, StoreIOError
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


def breaks_of(caplog, run_id: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(f"run {run_id}: bookkeeping failed")]


def test_unmakeable_work_dir_keeps_runs_queued_and_engine_unhealthy_until_fixed(store, settings, start_engine,
                                                                                caplog):
    caplog.set_level(logging.DEBUG, logger="pipeline")  # each break after the first of its cause is at DEBUG
    (settings.data_dir / "work").write_text("a file where the work dir should be")
    engine = start_engine(store, settings, DAG("d", [Task("a", noop)]), max_internal_requeues=1)
    ids = [engine.trigger("d", {"i": i}).run_id for i in range(2)]
    wait_until(lambda: len(breaks_of(caplog, ids[0])) >= 6, what="the first run to break six times")
    assert {store.get_run(i).state for i in ids} <= {"queued", "running"}  # an environmental fault fails nothing
    assert "claiming runs failed" in (engine.health_problem or "")  # the queue being empty between tries proves nothing
    delays = [r.getMessage().split("tried again in ")[1].split(" s")[0] for r in breaks_of(caplog, ids[0])[:5]]
    assert delays == ["0.01", "0.02", "0.04", "0.08", "0.1"]  # backoff doubling to backoff_max_s, never counted
    assert all(t.is_alive() for t in engine._threads)  # the dispatcher survived

    (settings.data_dir / "work").unlink()
    assert [engine.wait(i, timeout=30).state for i in ids] == ["success", "success"]
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
    """A real store whose task writes raise ``error`` while ``failing(call number, transitions)`` is true."""

    def __init__(self, config, failing=lambda call, transitions: False, error=StoreIOError) -> None:
        super().__init__(config)
        self.calls, self.failing, self.error = 0, failing, error
        self.lock = threading.Lock()

    def record_transitions(self, transitions, owner=None) -> int:
        transitions = list(transitions)
        with self.lock:
            self.calls += 1
            call = self.calls
        if self.failing(call, transitions):
            raise self.error(f"injected: write {call} failed")
        return super().record_transitions(transitions, owner)


CHAIN = DAG("chain", [Task("a", lambda ctx: "a"), Task("b", lambda ctx: ctx.upstream["a"] + "b", deps=("a",))])


@pytest.mark.parametrize("failing_write", [1, 2, 3, 4], ids=["a-running", "a-success", "b-running", "b-success"])
def test_task_write_failing_in_a_callback_requeues_the_run_which_completes(settings, start_engine, failing_write):
    with FlakyStore(settings.store, lambda call, _: call == failing_write) as store:
        engine = start_engine(store, settings, CHAIN)
        run = engine.wait(engine.trigger("chain").run_id, timeout=30)
        assert (run.state, run.reason) == ("success", None)
        assert {t.task_id: t.output for t in store.get_tasks(run.run_id)} == {"a": "a", "b": "ab"}
        assert engine.active_runs() == [] and engine.healthy


def test_task_writes_failing_for_the_environment_never_fail_the_run(settings, start_engine, caplog):
    """Nor do they flood the log: an operations prober's full disk gave 32 runs a traceback each in one second.
    One cause's breaks make one line per interval (and a traceback with the first), the rest at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="pipeline")
    failing = threading.Event()
    failing.set()
    began = time.monotonic()
    with FlakyStore(settings.store, lambda call, _: failing.is_set()) as store:
        engine = start_engine(store, settings, CHAIN, max_internal_requeues=1)
        run_ids = [engine.trigger("chain").run_id for _ in range(8)]
        wait_until(lambda: len(breaks_of(caplog, run_ids[0])) >= 4, what="four breaks")
        assert store.get_run(run_ids[0]).state in ("queued", "running")  # over the budget of 1, and not failed
        failing.clear()
        assert [engine.wait(run_id, timeout=30).state for run_id in run_ids] == ["success"] * 8
    breaks = [r for r in caplog.records if "bookkeeping failed" in r.getMessage()]
    loud = [r for r in breaks if r.levelno > logging.DEBUG]
    assert len(breaks) >= 4 and len(loud) <= 1 + (time.monotonic() - began) // 10, [r.getMessage() for r in loud]
    assert len([r for r in breaks if r.exc_info]) == 1  # the traceback once, with the first line


def test_a_bug_in_bookkeeping_fails_the_run_internal_after_the_budget_with_tracebacks(settings, start_engine, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    with FlakyStore(settings.store, lambda call, _: True, error=RuntimeError) as store:
        engine = start_engine(store, settings, CHAIN, max_internal_requeues=2)
        run = engine.wait(engine.trigger("chain").run_id, timeout=30)
        assert run.state == "failed"
        assert run.reason == "internal: RuntimeError: injected: write 3 failed"  # requeued twice, then failed
        assert engine.active_runs() == []
        # no task is left queued in a finished run ("a" never got as far as running: that write failed)
        tasks = {t.task_id: (t.state, t.error_message) for t in store.get_tasks(run.run_id)}
        why = "not run to its end: the run failed (internal: RuntimeError: injected: write 3 failed)"
        assert tasks == {"a": ("upstream_failed", why), "b": ("upstream_failed", why)}, tasks
    assert [bool(r.exc_info) for r in breaks_of(caplog, run.run_id)] == [True] * 3


def test_corrupt_store_error_counts_toward_the_budget(settings, start_engine):
    with FlakyStore(settings.store, lambda call, _: True, error=StoreCorruptError) as store:
        engine = start_engine(store, settings, CHAIN, max_internal_requeues=1)
        run = engine.wait(engine.trigger("chain").run_id, timeout=30)
        assert (run.state, run.reason) == ("failed", "internal: StoreCorruptError: injected: write 2 failed")


def test_a_damaged_store_keeps_the_engine_unhealthy_after_the_broken_run_failed(settings, start_engine, caplog):
    """Real damaged pages in the task table: runs are still queued, but none can start. Once the broken run has
    failed for good, the dispatcher's next empty claim must not make the engine healthy again: the gateway
    would answer 250 for every mail while each run failed at once (a mail lost per retry)."""
    caplog.set_level(logging.INFO, logger="pipeline")
    with SqliteRunStore(settings.store):  # the schema, then closed: no WAL left
        pass
    damage_table(settings.store.path, "task_runs")
    with SqliteRunStore(settings.store) as store:
        engine = start_engine(store, settings, CHAIN, max_internal_requeues=1, queue_poll_s=0.05)
        run = engine.wait(engine.trigger("chain").run_id, timeout=30)
        assert run.state == "failed" and "StoreCorruptError" in run.reason, run.reason
        wait_until(lambda: any("claiming runs recovered" in r.getMessage() for r in caplog.records),
                   what="the dispatcher's next pass after the failed run")  # which used to end the unhealth
        assert engine.health_problem is not None and "run store is damaged" in engine.health_problem
        assert "restore it" in engine.health_problem and not engine.healthy


def test_broken_run_is_not_requeued_while_its_live_try_still_runs(settings, start_engine):
    gate, started, lock = threading.Event(), threading.Event(), threading.Lock()
    copies = {"now": 0, "max": 0, "runs": 0}

    def slow(ctx):
        with lock:
            copies["now"] += 1
            copies["max"], copies["runs"] = max(copies["max"], copies["now"]), copies["runs"] + 1
        started.set()
        gate.wait(30)
        with lock:
            copies["now"] -= 1
        return "slow"

    dag = DAG("pair", [Task("slow", slow), Task("quick", lambda ctx: "quick")])
    quick_success = [False]

    def failing(call, transitions):  # the first "quick: success" write fails: the run breaks while "slow" runs
        if not quick_success[0] and any(t.task_id == "quick" and t.state == "success" for t in transitions):
            quick_success[0] = True
            return True
        return False

    with FlakyStore(settings.store, failing) as store:
        engine = start_engine(store, settings, dag)
        run_id = engine.trigger("pair").run_id
        assert started.wait(10)
        wait_until(lambda: quick_success[0], what="the failing write")
        time.sleep(0.5)  # time enough for a requeue and a second claim, were they to happen
        assert engine.active_runs() == [run_id]  # the broken run keeps its slot (and its heartbeat)
        assert store.get_run(run_id).state == "running" and copies["runs"] == 1
        gate.set()
        assert engine.wait(run_id, timeout=30).state == "success"
    assert copies["max"] == 1 and copies["runs"] == 2  # tried again only after the first copy ended


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


def test_run_taken_over_by_another_process_is_left_alone_quietly(store, settings, start_engine, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    gate, started = threading.Event(), threading.Event()
    engine = start_engine(store, settings, DAG("hold", [Task("h", lambda ctx: started.set() or gate.wait(30))]))
    run_id = engine.trigger("hold").run_id
    assert started.wait(10)
    # what another process's recovery and claim do when our heartbeat looked stale; done back to back under the
    # store's lock, as that process would between its own commits: the requeue wakes our engine at once
    # (pipeline.wakeup), and it must not win the run back before the other process claims it
    with store._lock:
        store.requeue_run(run_id)
        assert store.claim_next_run("otherhost:1:other").run_id == run_id
    gate.set()
    wait_until(lambda: engine.active_runs() == [], what="the runner to let the run go")
    run = store.get_run(run_id)
    assert (run.state, run.owner) == ("running", "otherhost:1:other")
    assert store.get_tasks(run_id)[0].state == "queued"  # our late success was refused
    messages = [r.getMessage() for r in caplog.records]
    assert f"run {run_id}: taken over by another process" in messages
    assert not [m for m in messages if "success" in m or "bookkeeping failed" in m or "requeued" in m]
    assert engine.healthy


class SlowClaimStore(SqliteRunStore):
    """A real store whose claims hold on, after claiming, until ``release`` is set (a lock wait, say)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.claimed, self.release = threading.Event(), threading.Event()

    def claim_runs(self, owner, limit, now=None, only=None):
        runs = super().claim_runs(owner, limit, now, only)
        if runs:
            self.claimed.set()
            self.release.wait(30)
        return runs


def test_run_claimed_while_shutting_down_is_requeued_not_started(settings, start_engine):
    ran = []
    with SlowClaimStore(settings.store) as store:
        engine = start_engine(store, settings, DAG("d", [Task("a", lambda ctx: ran.append(1))]))
        run_id = engine.trigger("d").run_id
        assert store.claimed.wait(10)
        stopper = threading.Thread(target=engine.shutdown, kwargs={"grace_s": 0.1})
        stopper.start()
        wait_until(lambda: engine._stopping, what="shutdown to begin")
        store.release.set()
        stopper.join(30)
        assert not stopper.is_alive()
        run = store.get_run(run_id)
        assert (run.state, run.owner, ran) == ("queued", None, [])


def fail_first_try(ctx) -> str:
    if ctx.try_number == 1:
        Path(ctx.payload["started"]).touch()
        while not Path(ctx.payload["go"]).exists():
            time.sleep(0.01)
        raise RuntimeError("flaky")
    return "second"


def test_retryable_failure_while_stopping_requeues_instead_of_failing(store, settings, start_engine, tmp_path):
    started, go = tmp_path / "started", tmp_path / "go"
    dag = DAG("flaky", [Task("f", fail_first_try, retries=2)])
    engine = start_engine(store, settings, dag)
    run_id = engine.trigger("flaky", {"started": str(started), "go": str(go)}).run_id
    wait_until(started.exists, what="the first try")
    stopper = threading.Thread(target=engine.shutdown, kwargs={"grace_s": 10})
    stopper.start()
    wait_until(lambda: engine._stopping, what="shutdown to begin")
    go.touch()  # the try fails inside the grace period: a retry is due, but we are stopping
    stopper.join(30)
    task = store.get_tasks(run_id)[0]
    assert store.get_run(run_id).state == "queued"
    assert (task.state, task.try_number, task.error_message) == ("queued", 1, "flaky")
    engine2 = start_engine(store, settings, dag)
    assert engine2.wait(run_id, timeout=30).state == "success"
    assert store.get_tasks(run_id)[0].output == "second"


def _write_over_a_directory(ctx):
    with open(ctx.work_dir, "wb"):  # EISDIR: the OS refuses this task's own file
        pass


def test_a_task_the_os_failed_is_logged_as_a_warning_with_its_cause(store, settings, start_engine, caplog):
    """A task's file the OS refuses (a file gone, a directory in its place, permissions) fails task_io after its
    retries: an operator must see it above INFO. (A machine short of space or descriptors is not a failure: the
    run waits for it, test_engine.py.)"""
    from pipeline import metrics

    caplog.set_level(logging.INFO, logger="pipeline")
    counted = lambda: metrics.REGISTRY.get_sample_value(  # noqa: E731
        "pipeline_task_failures_total", {"task": "write", "reason": "task_io"}) or 0.0
    before = counted()
    engine = start_engine(store, settings, DAG("full", [Task("write", _write_over_a_directory, retries=0)]))
    run = engine.wait(engine.trigger("full").run_id, timeout=30)
    assert run.state == "failed"
    assert counted() == before + 1  # the metric an alert reads (PipelineTasksFailingForTheMachine)
    [line] = [r for r in caplog.records if r.getMessage().startswith(f"run {run.run_id} task write: failed")]
    assert line.levelno == logging.WARNING and "task_io" in line.getMessage() and "Is a directory" in line.getMessage()


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("this error cannot say what it is")


def _raise_unprintable(ctx):
    raise Unprintable()


def test_an_error_that_cannot_be_printed_fails_its_task_not_the_bookkeeping(store, make_engine):
    """A prober's find: the code that reports errors called ``str()`` on them, so an exception whose ``__str__``
    raises broke the run's bookkeeping instead (three requeues, then ``internal``), and the same call in the
    engine's break handling could leave a run running, heartbeated, until serve stopped."""
    engine = make_engine(DAG("weird", [Task("t", _raise_unprintable, retries=0)]))
    run = engine.wait(engine.trigger("weird").run_id, timeout=20)
    [task] = store.get_tasks(run.run_id)
    assert (run.state, task.state, task.error_type) == ("failed", "failed", "Unprintable"), run.reason
    assert task.error_message == "(its message cannot be read)" and engine.active_runs() == [] and engine.healthy


def test_a_dispatcher_stuck_in_the_store_makes_the_engine_unhealthy_until_it_returns(settings, start_engine):
    """A prober's find: a dispatcher pass that never returned (no exception, so no failure streak) left the
    gateway answering 250 for 80 mails while no run advanced, serve saying it was healthy. A pass past
    ``[engine] stuck_after_s`` now makes it unhealthy (451), and healthy again once the pass returns."""
    with SlowClaimStore(settings.store) as store:
        engine = start_engine(store, settings, DAG("d", [Task("a", noop)]), stuck_after_s=0.5)
        run_id = engine.trigger("d").run_id
        assert store.claimed.wait(10)
        wait_until(lambda: "claiming runs stuck for" in (engine.health_problem or ""), 10, "unhealthy")
        store.release.set()
        assert engine.wait(run_id, timeout=30).state == "success"
        wait_until(lambda: engine.healthy, 10, "healthy again")


def test_a_timer_callback_that_never_returns_makes_the_engine_unhealthy(settings, start_engine):
    """Retries and task timeouts share one timer thread: a callback stuck there holds them all."""
    gate = threading.Event()
    with SqliteRunStore(settings.store) as store:
        engine = start_engine(store, settings, DAG("d", [Task("a", noop)]), stuck_after_s=0.3)
        engine._timers.call_later(0, gate.wait, 30)
        try:
            wait_until(lambda: "timer callbacks stuck for" in (engine.health_problem or ""), 10, "unhealthy")
        finally:
            gate.set()
        wait_until(lambda: engine.healthy, 10, "healthy again")


def test_a_thread_tasks_completion_stuck_makes_the_engine_unhealthy(settings, start_engine):
    """A thread task's completion callback (it writes the store, then submits the next task) runs on the task's
    own pool thread, which no watch covered: stuck there, the engine said it was healthy. Here a receiver of
    the task's end that never returns stands in for a store that does not answer."""
    from pipeline import tracing

    gate = threading.Event()

    def hold(task_id, **_):
        if task_id == "a":
            gate.wait(30)

    tracing.connect(tracing.TASK_FINISHED, hold)
    try:
        with SqliteRunStore(settings.store) as store:
            engine = start_engine(store, settings, DAG("d", [Task("a", noop)]), stuck_after_s=0.3)
            run_id = engine.trigger("d").run_id
            try:
                wait_until(lambda: "task completions stuck for" in (engine.health_problem or ""), 10, "unhealthy")
            finally:
                gate.set()
            assert engine.wait(run_id, timeout=30).state == "success"
            wait_until(lambda: engine.healthy, 10, "healthy again")
    finally:
        tracing.disconnect(tracing.TASK_FINISHED, hold)


class LostFinishAnswerStore(SqliteRunStore):
    """A real store whose first successful run finish commits, then loses its answer, as a PostgreSQL
    connection that drops after COMMIT does (a prober's proxy did it to half of the finishes)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.lost = 0

    def finish_run(self, run_id, state, reason=None, now=None, owner=None):
        changed = super().finish_run(run_id, state, reason, now, owner)
        if state == "success" and not self.lost:
            self.lost += 1
            from pipeline.errors import StoreUnavailableError

            raise StoreUnavailableError("the connection dropped after COMMIT")
        return changed


def _write_bulk(ctx):
    (Path(ctx.work_dir) / "text").mkdir(parents=True, exist_ok=True)
    (Path(ctx.work_dir) / "text" / "000-a.txt").write_text("words")


def test_a_finish_whose_answer_was_lost_is_counted_logged_and_shed_as_ended(settings, start_engine, caplog):
    """The run had ended (success, in the store), but the engine took the lost answer for a break, found the run
    no longer its own to requeue, and logged "taken over by another process": the success went uncounted in
    the metrics and its attachments and text stayed until purge."""
    from pipeline import metrics

    def successes() -> float:
        return metrics.REGISTRY.get_sample_value("pipeline_run_outcomes_total",
                                                 {"state": "success", "reason": "none"}) or 0.0

    before = successes()
    with LostFinishAnswerStore(settings.store) as store, caplog.at_level(logging.INFO, logger="pipeline.engine"):
        engine = start_engine(store, settings, DAG("d", [Task("a", _write_bulk)]))
        run_id = engine.trigger("d").run_id
        assert engine.wait(run_id, timeout=30).state == "success" and store.lost == 1
        work = Path(settings.data_dir) / "work" / str(run_id)
        wait_until(lambda: not (work / "text").exists(), 10, "shed")
        wait_until(lambda: engine.active_runs() == [] and engine.healthy, 10, "settled")
    assert successes() == before + 1
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"run {run_id} (d): success (the answer to its commit was lost)" in line for line in lines), lines
    assert not any("taken over" in line for line in lines)
    assert not any(r.exc_info for r in caplog.records)  # a store that did not answer is no bug: no traceback


def test_a_run_that_ended_just_before_the_stop_settles_it_is_counted_once(settings, start_engine, caplog):
    """A reviewer's find: a run left over after the grace can end (counted) just before the stop's settling
    requeues it; the requeue then changes nothing, and the run was counted again as "the answer to its commit was
    lost". Here the settling the stop would do is done by hand once the run has ended."""
    from pipeline import metrics

    def successes() -> float:
        return metrics.REGISTRY.get_sample_value("pipeline_run_outcomes_total",
                                                 {"state": "success", "reason": "none"}) or 0.0

    with SqliteRunStore(settings.store) as store, caplog.at_level(logging.INFO, logger="pipeline.engine"):
        engine = start_engine(store, settings, DAG("d", [Task("a", noop)]))
        run_id = engine.trigger("d").run_id
        assert engine.wait(run_id, timeout=30).state == "success"
        wait_until(lambda: engine.active_runs() == [], 10, "ended")
        before = successes()
        with engine._cond:
            engine._unsettled[run_id] = None  # as shutdown marks a runner left over after the grace
        engine._settle(run_id)
    assert successes() == before
    assert not any("the answer to its commit was lost" in r.getMessage() for r in caplog.records)
