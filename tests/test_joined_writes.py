"""One transaction per runner callback (issue 16): what a joined block keeps, and what waits for its commit."""

import sqlite3
import threading
from dataclasses import replace

import pytest
from helpers import own_row_in_process, own_row_logged_in_process, square_in_process

from pipeline import tracing
from pipeline.dag import DAG, Task
from pipeline.engine import WorkflowEngine
from pipeline.errors import StoreError, StoreIOError
from pipeline.sqlite_store import SqliteRunStore
from pipeline.store import Transition


def peek(store: SqliteRunStore, sql: str, params=()) -> list:
    """Rows as another process sees them: a fresh connection, only committed data."""
    with sqlite3.connect(store.path) as conn:
        return conn.execute(sql, params).fetchall()


def test_another_connection_sees_a_joined_block_only_when_it_ends(store):
    run = store.create_run("wf", {})[0]
    store.claim_next_run("me")
    with store.joined():
        store.create_tasks(run.run_id, ["a", "b"])
        store.record_transitions([Transition(run.run_id, "a", "success", 1, 2.0)], owner="me")
        assert peek(store, "SELECT count(*) FROM task_runs") == [(0,)]
    assert peek(store, "SELECT task_id, state FROM task_runs ORDER BY id") == [("a", "success"), ("b", "queued")]


def test_a_block_that_raises_leaves_none_of_its_writes(store):
    run = store.create_run("wf", {})[0]
    with pytest.raises(RuntimeError), store.joined():
        store.create_tasks(run.run_id, ["a"])
        raise RuntimeError("the callback broke")
    assert store.get_tasks(run.run_id) == []
    store.create_tasks(run.run_id, ["b"])  # the connection is free and usable again
    assert [t.task_id for t in store.get_tasks(run.run_id)] == ["b"]


def test_a_failed_write_takes_the_blocks_writes_with_it_and_nothing_later_in_the_block_is_stored(store):
    run = store.create_run("wf", {})[0]
    with pytest.raises(StoreError, match="nothing of the block was stored"), store.joined():
        store.create_tasks(run.run_id, ["a"])
        with pytest.raises(StoreError):
            store.write_in_one_transaction([("INSERT INTO no_such_table VALUES (1)", ())])
        assert store.get_tasks(run.run_id) == []  # rolled back with the failed write
        with pytest.raises(StoreError, match="took the block's writes with it"):
            store.create_tasks(run.run_id, ["b"])  # would be stored without "a": refused
    assert store.get_tasks(run.run_id) == []
    with store.joined():  # the next block starts clean
        store.create_tasks(run.run_id, ["c"])
    assert [t.task_id for t in store.get_tasks(run.run_id)] == ["c"]


def test_other_threads_wait_for_the_block_and_then_see_all_of_it(store):
    run = store.create_run("wf", {})[0]
    seen: list = []
    reading = threading.Event()

    def read() -> None:
        reading.set()
        seen.append([t.task_id for t in store.get_tasks(run.run_id)])

    with store.joined():
        store.create_tasks(run.run_id, ["a"])
        reader = threading.Thread(target=read)
        reader.start()
        assert reading.wait(10)
        reader.join(0.2)
        assert seen == []  # the block holds the one connection until it ends
        store.create_tasks(run.run_id, ["b"])
    reader.join(10)
    assert seen == [["a", "b"]]


class CountingStore(SqliteRunStore):
    """A real store that counts the write transactions runners begin (the engine's claims, heartbeats and
    recovery passes left out: how many there are depends on timing)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.begins = 0

    def _begin(self, conn, sql):
        self.begins += 1  # under the store's lock
        super()._begin(conn, sql)

    def claim_runs(self, owner, limit, now=None):
        with self._lock:
            runs = super().claim_runs(owner, limit, now)
            self.begins -= 1
        return runs

    def heartbeat(self, run_ids, now=None, owner=None):
        with self._lock:
            changed = super().heartbeat(run_ids, now, owner)
            self.begins -= 1
        return changed

    def recover_runs(self, is_dead, now=None):
        with self._lock:
            recovered = super().recover_runs(is_dead, now)
            self.begins -= 1
        return recovered


PROCESS_CHAIN = DAG("cpu", [Task("a", square_in_process, executor="process"),
                            Task("b", square_in_process, deps=("a",), executor="process")])


@pytest.mark.parametrize(("join", "per_run"), [(True, 3), (False, 6)], ids=["joined", "one-per-write-baseline"])
def test_a_two_task_run_commits_once_per_callback(settings, join, per_run):
    """Joined: start (tasks, a's RUNNING), a's end (a's SUCCESS, b's RUNNING), b's end (b's SUCCESS, the run's)."""
    settings = replace(settings, runner=replace(settings.runner, join_writes=join))
    with CountingStore(settings.store) as store:
        runs = [store.create_run("cpu", {"n": n})[0].run_id for n in range(4)]
        engine = WorkflowEngine(store, settings)
        engine.register(PROCESS_CHAIN)
        store.begins = 0
        engine.start()
        try:
            assert [engine.wait(r, timeout=60).state for r in runs] == ["success"] * 4
        finally:
            engine.shutdown(grace_s=5)
        begins = store.begins
    assert begins == per_run * len(runs)


@pytest.mark.parametrize("join", [True, False], ids=["joined", "one-per-write-baseline"])
def test_a_process_try_starts_only_once_its_running_is_committed(store, settings, join):
    """Otherwise a task that kills the engine would not count as tried, and recovery could run it for ever."""
    settings = replace(settings, runner=replace(settings.runner, join_writes=join))
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


@pytest.mark.parametrize("join", [True, False], ids=["joined", "one-per-write-baseline"])
def test_the_engine_hears_of_a_runs_end_only_once_it_is_committed(store, settings, join):
    settings = replace(settings, runner=replace(settings.runner, join_writes=join))
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

    def requeue_run(self, run_id, now=None, owner=None):
        if run_id != self.broken and not self.requeue_failed:
            self.requeue_failed = True
            raise StoreIOError("injected: disk full at a requeue")
        return super().requeue_run(run_id, now, owner)


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
    """A real store whose ``fail_at``-th COMMIT at the end of a joined block fails, as a disk that errs at the sync."""

    def __init__(self, config, fail_at: int) -> None:
        super().__init__(config)
        self.fail_at, self.commits, self.injected = fail_at, 0, 0
        self._armed = threading.local()
        self._count = threading.Lock()

    def _end_joined(self, commit):
        if commit and getattr(self._join, "open", None) is not None:
            with self._count:
                self.commits += 1
                self._armed.on = self.commits == self.fail_at
        super()._end_joined(commit)

    def _commit(self, conn):
        if getattr(self._armed, "on", False):
            self._armed.on = False
            self.injected += 1
            self._rollback(conn)
            raise sqlite3.OperationalError("disk I/O error")  # injected at the block's COMMIT
        super()._commit(conn)


# the 1st block is the run's start (its tasks, first's RUNNING), the 2nd first's end with second's RUNNING;
# launched: each try that ran, in order (the rolled-back one never among them)
@pytest.mark.parametrize(("fail_at", "launched", "rows"),
                         [(1, ["first 1", "second 1"], [1, 1]),
                          (2, ["first 1", "first 2", "second 1"], [2, 1])], ids=["at-start", "at-a-tasks-end"])
def test_a_joined_block_whose_commit_fails_launches_nothing_and_the_run_still_ends(settings, tmp_path, caplog,
                                                                                 fail_at, launched, rows):
    """The block is rolled back whole, its try is never launched, and the run, requeued, ends."""
    settings = replace(settings, runner=replace(settings.runner, join_writes=True))
    log = tmp_path / "launched.log"
    with FailingCommitStore(settings.store, fail_at) as store:
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
        assert log.read_text().split("\n")[:-1] == launched
        # every try that ran saw its own RUNNING committed; at a task's end, first's success was rolled back
        # with the block, so first ran again (try 2) and second's rolled-back try 1 was never launched
        assert [t.output for t in store.get_tasks(run.run_id)] == [{"state": "running", "try": n} for n in rows]
    assert [r.getMessage().split(";")[1].strip()[:8] for r in caplog.records
            if "bookkeeping failed" in r.getMessage()] == ["requeued"]
