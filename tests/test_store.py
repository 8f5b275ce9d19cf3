"""SqliteRunStore contract on real files: dedup, queries, recovery, purge, bad files."""

import sqlite3
import threading
import time

import pytest

from pipeline import store as s
from pipeline.errors import NotADatabaseError, SchemaTooNewError, StoreError, UnknownRunError
from pipeline.sqlite_schema import SCHEMA_VERSION
from pipeline.sqlite_store import SqliteRunStore
from pipeline.store import Transition


def test_schema_is_versioned_and_migrations_are_named(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY version")]
    assert len(names) == SCHEMA_VERSION and all(names)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_duplicate_dedup_key_returns_existing_run(store):
    first, created = store.create_run("wf", {"a": 1}, "key")
    again, created_again = store.create_run("wf", {"a": 2}, "key")
    assert created and not created_again
    assert again.run_id == first.run_id and again.payload == {"a": 1}
    other, created_other = store.create_run("other", {}, "key")  # keys are per workflow
    assert created_other and other.run_id != first.run_id


def test_concurrent_triggers_with_one_key_make_one_run(settings):
    barrier = threading.Barrier(16, timeout=30)
    results, errors = [], []

    def trigger():
        try:
            st = SqliteRunStore(settings.store)  # one connection per thread: real cross-connection contention
            barrier.wait()
            results.append(st.create_run("wf", {}, "same-key"))
            st.close()
        except Exception as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=trigger) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({run.run_id for run, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_list_runs_keyset_pagination_newest_first(store):
    ids = [store.create_run("wf", {"i": i})[0].run_id for i in range(7)]
    store.create_run("other", {})
    page1 = store.list_runs("wf", limit=3)
    page2 = store.list_runs("wf", limit=3, before_run_id=page1[-1].run_id)
    page3 = store.list_runs("wf", limit=3, before_run_id=page2[-1].run_id)
    assert [r.run_id for r in page1 + page2 + page3] == ids[::-1]


def test_count_runs_by_state_all_and_per_workflow(store):
    for _ in range(3):
        store.create_run("wf", {})
    store.create_run("other", {})
    run = store.claim_next_run("me")
    store.finish_run(run.run_id, "failed", "boom")
    assert store.count_runs_by_state() == {"queued": 3, "failed": 1}
    assert store.count_runs_by_state("wf") == {"queued": 2, "failed": 1}
    store.purge_runs(older_than=time.time() + 10)
    assert store.count_runs_by_state() == {"queued": 3}  # the counters follow deletes too


def test_claim_is_fifo_and_stale_runs_are_found(store):
    a = store.create_run("wf", {})[0]
    b = store.create_run("wf", {})[0]
    assert store.claim_next_run("me", now=100.0).run_id == a.run_id
    assert store.claim_next_run("me", now=200.0).run_id == b.run_id
    assert store.claim_next_run("me") is None
    assert [r.run_id for r in store.stale_runs(heartbeat_before=150.0)] == [a.run_id]
    store.heartbeat([a.run_id], now=300.0)
    assert [r.run_id for r in store.stale_runs(heartbeat_before=250.0)] == [b.run_id]


def test_requeue_resets_unfinished_tasks_only(store):
    run = store.create_run("wf", {})[0]
    store.claim_next_run("me")
    store.create_tasks(run.run_id, ["done", "busy"])
    store.record_transitions([Transition(run.run_id, "done", "running", 1, 1.0),
                              Transition(run.run_id, "done", "success", 1, 2.0, output_json="42"),
                              Transition(run.run_id, "busy", "running", 1, 3.0)])
    assert store.recover_runs(lambda r: True) == [run.run_id]
    assert store.get_run(run.run_id).state == "queued"
    tasks = {t.task_id: t for t in store.get_tasks(run.run_id)}
    assert tasks["done"].state == "success" and tasks["done"].output == 42
    assert tasks["busy"].state == "queued" and tasks["busy"].try_number == 1


def test_duration_percentiles_group_mapped_instances(store):
    run = store.create_run("wf", {})[0]
    ids = [f"ingest[{i}]" for i in range(20)]
    store.create_tasks(run.run_id, ids + ["digest"])
    transitions = []
    for i, task_id in enumerate(ids):
        transitions += [Transition(run.run_id, task_id, "running", 1, 1000.0),
                        Transition(run.run_id, task_id, "success", 1, 1000.0 + i + 1)]
    transitions += [Transition(run.run_id, "digest", "running", 1, 1000.0),
                    Transition(run.run_id, "digest", "success", 1, 1000.5)]
    store.record_transitions(transitions)
    stats = store.task_duration_percentiles(since=900.0, until=2000.0)
    assert stats["ingest"]["n"] == 20 and stats["ingest"]["p50"] == pytest.approx(10.5)
    assert stats["ingest"]["p95"] == pytest.approx(19.05)
    assert stats["digest"] == {"n": 1, "p50": 0.5, "p95": 0.5}
    assert store.task_duration_percentiles(since=5000.0, until=6000.0) == {}


def test_purge_deletes_old_finished_runs_in_batches(store):
    old = [store.create_run("wf", {})[0].run_id for _ in range(5)]
    for run_id in old:
        store.claim_next_run("me")
        store.create_tasks(run_id, ["t"])
        store.finish_run(run_id, "success", now=10.0)
    fresh = store.create_run("wf", {})[0].run_id
    assert store.purge_runs(older_than=100.0, batch_size=2) == 5
    assert [r.run_id for r in store.list_runs()] == [fresh]
    with pytest.raises(UnknownRunError):
        store.get_tasks(old[0]) or store.get_run(old[0])


def test_canonical_queries_use_their_indexes(store):
    plans = {
        "list": "SELECT run_id FROM runs WHERE workflow = 'w' AND run_id < 9 ORDER BY run_id DESC LIMIT 5",
        "count_wf": "SELECT state, sum(n) FROM run_counts WHERE workflow = 'w' GROUP BY state",
        "stale": "SELECT run_id FROM runs WHERE state = 'running' AND heartbeat_at < 5",
        "claim": "SELECT run_id FROM runs WHERE state = 'queued' ORDER BY run_id LIMIT 1",
    }
    conn = sqlite3.connect(store.path)
    for name, sql in plans.items():
        steps = [r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        assert all("INDEX" in step or "PRIMARY KEY" in step for step in steps), (name, steps)  # no full scan
        assert not any("TEMP B-TREE" in step for step in steps), (name, steps)  # never a sort
    conn.close()


def test_file_that_is_not_a_database_is_refused_untouched(tmp_path):
    path = tmp_path / "runs.sqlite3"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(NotADatabaseError, match="not a SQLite database"):
        SqliteRunStore(path)
    assert path.read_bytes() == b"this is not sqlite at all" * 100


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "runs.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(SchemaTooNewError, match="newer than this pipeline supports"):
        SqliteRunStore(path)


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="other tables"):
        SqliteRunStore(path)


def test_missing_store_is_an_error_when_not_creating(tmp_path):
    with pytest.raises(StoreError, match="no run store here"):
        SqliteRunStore(tmp_path / "absent.sqlite3", create=False)


def test_reopen_keeps_data(settings):
    st = SqliteRunStore(settings.store)
    run = st.create_run("wf", {"x": 1})[0]
    st.close()
    st = SqliteRunStore(settings.store)
    assert st.get_run(run.run_id).payload == {"x": 1}
    st.close()
    assert time.time() >= run.queued_at


def _events(store, run_id, task_id):
    return [r[0] for r in store._read("SELECT state FROM task_events WHERE run_id = ? AND task_id = ? ORDER BY rowid",
                                      (run_id, task_id))]


def test_late_running_does_not_undo_a_timeout(store):
    run = store.create_run("wf", {})[0]
    store.claim_next_run("me")
    store.create_tasks(run.run_id, ["slow"])
    # the timeout fires while the task is still queued for a thread; the thread then writes RUNNING
    store.record_transitions([Transition(run.run_id, "slow", "failed", 1, 5.0, "timeout", "ran past 1 s")])
    store.record_transitions([Transition(run.run_id, "slow", "running", 1, 6.0)])
    task = store.get_tasks(run.run_id)[0]
    assert (task.state, task.error_type, task.ended_at, task.started_at) == ("failed", "timeout", 5.0, None)
    assert _events(store, run.run_id, "slow") == ["queued", "failed"]  # the refused write leaves no event


@pytest.mark.parametrize("final", ["success", "failed", "upstream_failed"])
@pytest.mark.parametrize("late", ["queued", "running", "retrying", "success", "failed"])
def test_terminal_task_states_are_final_within_one_batch(store, final, late):
    run = store.create_run("wf", {})[0]
    store.create_tasks(run.run_id, ["t", "other"])
    store.record_transitions([Transition(run.run_id, "t", "running", 1, 1.0),
                              Transition(run.run_id, "t", final, 1, 2.0, output_json="1"),
                              Transition(run.run_id, "t", late, 2, 3.0, "late", "too late"),
                              Transition(run.run_id, "other", "running", 1, 3.0)])
    tasks = {t.task_id: t for t in store.get_tasks(run.run_id)}
    assert (tasks["t"].state, tasks["t"].try_number, tasks["t"].ended_at) == (final, 1, 2.0)
    assert tasks["other"].state == "running"  # the rest of the batch is written
    assert _events(store, run.run_id, "t") == ["queued", "running", final]


@pytest.mark.parametrize("final", ["success", "failed"])
def test_finished_run_keeps_its_state_reason_and_end(store, final):
    run = store.create_run("wf", {})[0]
    store.claim_next_run("me")
    store.finish_run(run.run_id, final, "first", now=10.0)
    store.finish_run(run.run_id, "failed" if final == "success" else "success", "second", now=20.0)
    store.requeue_run(run.run_id)
    assert store.recover_runs(lambda r: True) == []
    again = store.get_run(run.run_id)
    assert (again.state, again.reason, again.ended_at) == (final, "first", 10.0)
    assert store.claim_next_run("me") is None
    assert store.count_runs_by_state() == {final: 1}
    assert _events(store, run.run_id, "") == [final]


def test_requeue_moves_only_running_runs(store):
    queued = store.create_run("wf", {})[0]
    store.requeue_run(queued.run_id)
    assert _events(store, queued.run_id, "") == []  # nothing to requeue: no event, no change
    running = store.claim_next_run("me", now=50.0)
    store.requeue_run(running.run_id, now=60.0)
    back = store.get_run(running.run_id)
    assert (back.state, back.owner, back.heartbeat_at) == ("queued", None, None)
    assert _events(store, running.run_id, "") == ["queued"]


def test_heartbeat_touches_only_running_runs(store):
    run = store.create_run("wf", {})[0]
    store.heartbeat([run.run_id], now=5.0)
    assert store.get_run(run.run_id).heartbeat_at is None
    store.claim_next_run("me", now=1.0)
    store.finish_run(run.run_id, "success", now=2.0)
    store.heartbeat([run.run_id], now=9.0)
    assert store.get_run(run.run_id).heartbeat_at == 1.0


def test_writes_with_an_owner_change_nothing_once_another_process_took_the_run_over(store):
    run = store.create_run("wf", {})[0]
    store.claim_next_run("hostA:1:aaaa", now=1.0)
    store.create_tasks(run.run_id, ["t"])
    assert store.recover_runs(lambda r: r.owner.startswith("hostA"), now=50.0) == [run.run_id]  # A went stale
    store.claim_next_run("hostB:2:bbbb", now=60.0)
    running = Transition(run.run_id, "t", "running", 1, 61.0)
    # A comes back and writes as if the run were still its own: every write is refused and says so
    assert store.record_transitions([running], owner="hostA:1:aaaa") == 0
    assert store.heartbeat([run.run_id], now=62.0, owner="hostA:1:aaaa") == 0
    assert store.requeue_run(run.run_id, owner="hostA:1:aaaa") == 0
    assert store.finish_run(run.run_id, "failed", "internal: A's view", owner="hostA:1:aaaa") == 0
    now = store.get_run(run.run_id)
    assert (now.state, now.owner, now.heartbeat_at, now.reason) == ("running", "hostB:2:bbbb", 60.0, None)
    assert store.get_tasks(run.run_id)[0].state == "queued"
    # B, the owner, is obeyed
    assert store.record_transitions([running], owner="hostB:2:bbbb") == 1
    assert store.heartbeat([run.run_id], now=63.0, owner="hostB:2:bbbb") == 1
    assert store.finish_run(run.run_id, "success", owner="hostB:2:bbbb", now=64.0) == 1
    assert store.finish_run(run.run_id, "failed", "late", owner="hostB:2:bbbb") == 0  # terminal is final


def test_finish_with_an_owner_only_ends_a_running_run(store):
    run = store.create_run("wf", {})[0]
    assert store.finish_run(run.run_id, "failed", "x", owner="me") == 0  # queued: not ours to end
    assert store.finish_run(run.run_id, "failed", "unknown_workflow") == 1  # without an owner it may
    other = store.create_run("wf", {})[0]
    store.claim_next_run("me")
    assert store.requeue_run(other.run_id, owner="me") == 1 and store.requeue_run(other.run_id, owner="me") == 0


def test_transition_counts_skip_final_tasks(store):
    run = store.create_run("wf", {})[0]
    store.create_tasks(run.run_id, ["a", "b"])
    assert store.record_transitions([Transition(run.run_id, "a", "failed", 1, 1.0, "timeout", "late")]) == 1
    assert store.record_transitions([Transition(run.run_id, "a", "running", 1, 2.0),
                                     Transition(run.run_id, "b", "running", 1, 2.0)]) == 1


def test_the_event_history_keeps_why_a_retried_try_failed(store):
    run, _ = store.create_run("wf", {})
    store.create_tasks(run.run_id, ["t"])
    store.record_transitions([Transition(run.run_id, "t", s.RUNNING, 1, 1.0),
                              Transition(run.run_id, "t", s.RETRYING, 1, 2.0, "worker_crashed", "killed"),
                              Transition(run.run_id, "t", s.RUNNING, 2, 3.0),
                              Transition(run.run_id, "t", s.SUCCESS, 2, 4.0)])
    assert store.get_tasks(run.run_id)[0].error_type is None  # the task's row shows the last try
    events = store._read("SELECT state, try_number, error_type FROM task_events WHERE task_id = 't' ORDER BY rowid")
    assert events[-3:] == [("retrying", 1, "worker_crashed"), ("running", 2, None), ("success", 2, None)]
