"""One transaction per runner callback (issue 16): what a joined block keeps, and what waits for its commit."""

import sqlite3
import threading
from dataclasses import replace

import pytest
from helpers import own_row_in_process, square_in_process

from pipeline import tracing
from pipeline.dag import DAG, Task
from pipeline.engine import WorkflowEngine
from pipeline.errors import StoreError
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


def test_a_failed_write_takes_the_blocks_earlier_writes_with_it_and_a_later_one_begins_anew(store):
    run = store.create_run("wf", {})[0]
    with store.joined():
        store.create_tasks(run.run_id, ["a"])
        with pytest.raises(StoreError):
            store.write_in_one_transaction([("INSERT INTO no_such_table VALUES (1)", ())])
        assert store.get_tasks(run.run_id) == []  # rolled back with the failed write
        store.create_tasks(run.run_id, ["b"])
    assert [t.task_id for t in store.get_tasks(run.run_id)] == ["b"]


def test_other_threads_wait_for_the_block_and_then_see_all_of_it(store):
    run = store.create_run("wf", {})[0]
    seen: list = []
    with store.joined():
        store.create_tasks(run.run_id, ["a"])
        reader = threading.Thread(target=lambda: seen.append([t.task_id for t in store.get_tasks(run.run_id)]))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()  # the block holds the one connection until it ends
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
