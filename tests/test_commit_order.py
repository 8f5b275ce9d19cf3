"""What waits for the runner's store writes to commit (a try's launch, the engine hearing of a run's end), and
what a failed commit or a broken start in a batch of claims leaves behind."""

import sqlite3
import threading
from dataclasses import replace

import pytest
from helpers import own_row_in_process, own_row_logged_in_process, square_in_process

from pipeline import tracing
from pipeline.dag import DAG, Task
from pipeline.engine import WorkflowEngine
from pipeline.errors import StoreIOError
from pipeline.sqlite_store import SqliteRunStore


def peek(store: SqliteRunStore, sql: str, params=()) -> list:
    """Rows as another process sees them: a fresh connection, only committed data."""
    with sqlite3.connect(store.path) as conn:
        return conn.execute(sql, params).fetchall()


PROCESS_CHAIN = DAG("cpu", [Task("a", square_in_process, executor="process"),
                            Task("b", square_in_process, deps=("a",), executor="process")])


def test_a_process_try_starts_only_once_its_running_is_committed(store, settings):
    """Otherwise a task that kills the engine would not count as tried, and recovery could run it for ever."""
    engine = WorkflowEngine(store, settings)
    engine.register(DAG("peek", [Task("first", own_row_in_process, executor="process"),
                                 Task("second", own_row_in_process, deps=("first",), executor="process")]))
    engine.start()
    try:
        run = engine.wait(engine.trigger("peek", {"db": str(store.path)}).run_id, timeout=60)
    finally:
        engine.shutdown(grace_s=5)
    assert run.state == "success"
    assert [t.output for t in store.get_tasks(run.run_id)] == [{"state": "running", "try": 1}] * 2


def test_the_engine_hears_of_a_runs_end_only_once_it_is_committed(store, settings):
    seen: list = []

    def finished(run_id, state, **_):
        seen.append((state, peek(store, "SELECT state FROM runs WHERE run_id = ?", (run_id,))[0][0]))

    engine = WorkflowEngine(store, settings)
    engine.register(PROCESS_CHAIN)
    tracing.connect(tracing.RUN_FINISHED, finished)
    engine.start()
    try:
        run_id = engine.trigger("cpu", {"n": 3}).run_id
        assert engine.wait(run_id, timeout=60).state == "success"
    finally:
        engine.shutdown(grace_s=5)
        tracing.disconnect(tracing.RUN_FINISHED, finished)
    assert seen == [("success", "success")]


class FailingStartStore(SqliteRunStore):
    """A real store whose first ``create_tasks`` (a run's start) fails, and then the first requeue of another
    run (one handed back unstarted), as a disk that fills."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.broken: int | None = None
        self.requeue_failed = False

    def create_tasks(self, run_id, task_ids, now=None):
        if self.broken is None:
            self.broken = run_id
            raise StoreIOError("injected: disk full at a run's start")
        return super().create_tasks(run_id, task_ids, now)

    def requeue_run(self, run_id, now=None, owner=None, note=None):
        if run_id != self.broken and not self.requeue_failed:
            self.requeue_failed = True
            raise StoreIOError("injected: disk full at a requeue")
        return super().requeue_run(run_id, now, owner, note)


def test_a_batch_whose_first_start_breaks_gives_the_rest_back_and_every_run_ends(settings, caplog):
    """The first run's start fails and so does the first hand-back: nothing stays running under a live owner."""
    settings = replace(settings, engine=replace(settings.engine, claim_batch=8))
    with FailingStartStore(settings.store) as store:
        runs = [store.create_run("cpu", {"n": n})[0].run_id for n in range(3)]
        engine = WorkflowEngine(store, settings)
        engine.register(PROCESS_CHAIN)
        engine.start()
        try:
            assert [engine.wait(r, timeout=60).state for r in runs] == ["success"] * 3
        finally:
            engine.shutdown(grace_s=5)
    assert any("claimed, not started, and cannot be requeued now" in r.getMessage() for r in caplog.records)


class FailingCommitStore(SqliteRunStore):
    """A real store whose COMMIT of the first write of ``task``'s RUNNING fails, as a disk that errs at the sync."""

    def __init__(self, config, task: str) -> None:
        super().__init__(config)
        self.task, self.injected = task, 0
        self._armed = threading.local()

    def record_transitions(self, transitions, owner=None):
        transitions = list(transitions)
        self._armed.on = not self.injected and any(t.task_id == self.task and t.state == "running"
                                                   for t in transitions)
        try:
            return super().record_transitions(transitions, owner)
        finally:
            self._armed.on = False

    def _commit(self, conn):
        if getattr(self._armed, "on", False):
            self._armed.on = False
            self.injected += 1
            self._rollback(conn)
            raise sqlite3.OperationalError("disk I/O error")  # injected at the RUNNING write's COMMIT
        super()._commit(conn)


@pytest.mark.parametrize("task", ["first", "second"], ids=["at-the-first-try", "after-a-task-succeeded"])
def test_a_running_write_whose_commit_fails_launches_nothing_and_the_run_still_ends(settings, tmp_path, caplog,
                                                                                  task):
    """The RUNNING is rolled back, its try is never launched, and the run, requeued once, ends; a task that
    succeeded before keeps its success (it is not run again)."""
    log = tmp_path / "launched.log"
    with FailingCommitStore(settings.store, task) as store:
        engine = WorkflowEngine(store, settings)
        engine.register(DAG("peek", [Task("first", own_row_logged_in_process, executor="process"),
                                     Task("second", own_row_logged_in_process, deps=("first",), executor="process")]))
        engine.start()
        try:
            run = engine.wait(engine.trigger("peek", {"db": str(store.path), "log": str(log)}).run_id, timeout=60)
        finally:
            engine.shutdown(grace_s=5)
        assert store.injected == 1
        assert run.state == "success"
        assert log.read_text().split("\n")[:-1] == ["first 1", "second 1"]
        # every try that ran saw its own RUNNING committed, numbered 1: the rolled-back RUNNING counted no try
        assert [t.output for t in store.get_tasks(run.run_id)] == [{"state": "running", "try": 1}] * 2
    assert [r.getMessage().split(";")[1].strip()[:8] for r in caplog.records
            if "bookkeeping failed" in r.getMessage()] == ["requeued"]
