"""The DAGRunStore contract (pipeline/store.py), run against every backend: SQLite and a real PostgreSQL.

Modelled on huey's ``StorageTests``: one suite, parametrized over the backends, each store built from a
``StoreConfig`` the way the service builds it. The multi-process tests at the end open their own stores in
real processes (forkserver), as gateways and engines on several hosts would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_until

from pipeline import liveness
from pipeline import store as s
from pipeline.config import StoreConfig
from pipeline.errors import StoreError, UnknownRunError
from pipeline.store import DAGRunStore, Transition, open_store


@pytest.fixture
def contract_store(store_config):
    st = open_store(store_config)
    yield st
    st.close()


def events(config: StoreConfig, run_id: int, task_id: str) -> list[str]:
    """The states of a task's (or, with task_id '', the run's) event history, oldest first, read directly.

    The history has no reader in the contract (only the audit reads it), so this looks at the table itself:
    in insertion order, which is SQLite's rowid and PostgreSQL's identity column ``id``.
    """
    sql = "SELECT state FROM task_events WHERE run_id = {0} AND task_id = {0} ORDER BY {1}"
    if not config.is_postgres:
        conn = sqlite3.connect(config.path)
        try:
            return [r[0] for r in conn.execute(sql.format("?", "rowid"), (run_id, task_id))]
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(config.url) as pg:
        return [r[0] for r in pg.execute(sql.format("%s", "id"), (run_id, task_id))]


def finished(st: DAGRunStore, payload: dict | None = None, ended_at: float = 10.0, workflow: str = "wf") -> int:
    run = st.create_run(workflow, payload or {})[0]
    assert st.finish_run(run.run_id, "success", now=ended_at) == 1
    return run.run_id


# -- create, dedup, ids ---------------------------------------------------------------------------------------

def test_duplicate_dedup_key_returns_the_existing_run_and_uses_up_no_id(contract_store):
    first, created = contract_store.create_run("wf", {"a": 1}, "key")
    again, created_again = contract_store.create_run("wf", {"a": 2}, "key")
    assert created and not created_again
    assert again.run_id == first.run_id and again.payload == {"a": 1}
    other, created_other = contract_store.create_run("other", {}, "key")  # keys are per workflow
    assert created_other and other.run_id == first.run_id + 1  # the duplicate burnt no id
    batch = contract_store.create_runs([("wf", {}, "key"), ("wf", {"b": 1}, "new"), ("wf", {}, None)])
    assert [(r.run_id, c) for r, c in batch] == [(first.run_id, False), (other.run_id + 1, True),
                                                 (other.run_id + 2, True)]
    assert contract_store.get_run(other.run_id + 1).payload == {"b": 1}


def test_concurrent_triggers_with_one_key_make_one_run(store_config):
    barrier = threading.Barrier(8, timeout=30)
    results, errors = [], []

    def trigger():
        try:
            with open_store(store_config) as st:  # one store per thread: real cross-connection contention
                barrier.wait()
                results.append(st.create_run("wf", {}, "same-key"))
        except Exception as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=trigger) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({run.run_id for run, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_run_ids_are_never_reused_after_purging_the_newest(store_config):
    with open_store(store_config) as st:
        ids = [finished(st) for _ in range(3)]
        assert st.purge_runs(time.time()) == 3
        assert st.create_run("wf", {})[0].run_id == max(ids) + 1
    with open_store(store_config) as reopened:  # the sequence lives in the store, not in the process
        assert reopened.create_run("wf", {})[0].run_id == max(ids) + 2
        assert reopened.get_run(max(ids) + 1).state == "queued"


def test_get_and_find_return_runs_and_create_nothing(contract_store):
    run = contract_store.create_run("wf", {"x": [1, "é"]}, "<m@x>", now=5.0)[0]
    got = contract_store.get_run(run.run_id)
    assert got == run and (got.payload, got.queued_at, got.state, got.owner) == ({"x": [1, "é"]}, 5.0, "queued", None)
    assert contract_store.find_run("wf", "<m@x>") == run
    assert contract_store.find_run("wf", "<other@x>") is None and contract_store.find_run("other", "<m@x>") is None
    with pytest.raises(UnknownRunError):
        contract_store.get_run(run.run_id + 100)
    assert contract_store.get_tasks(run.run_id) == [] and contract_store.count_runs_by_state() == {"queued": 1}


# -- queries --------------------------------------------------------------------------------------------------

def test_list_runs_keyset_pagination_newest_first_with_filters(contract_store):
    ids = [contract_store.create_run("wf", {"i": i})[0].run_id for i in range(7)]
    contract_store.create_run("other", {})
    page1 = contract_store.list_runs("wf", limit=3)
    page2 = contract_store.list_runs("wf", limit=3, before_run_id=page1[-1].run_id)
    page3 = contract_store.list_runs("wf", limit=3, before_run_id=page2[-1].run_id)
    assert [r.run_id for r in page1 + page2 + page3] == ids[::-1]
    assert contract_store.claim_next_run("me").run_id == ids[0]
    assert [r.run_id for r in contract_store.list_runs(state="running")] == [ids[0]]
    assert [r.run_id for r in contract_store.list_runs("wf", "queued", limit=2, before_run_id=ids[3])] == \
        [ids[2], ids[1]]
    assert len(contract_store.list_runs()) == 8 and contract_store.list_runs("nope") == []


def test_count_runs_by_state_all_and_per_workflow(contract_store):
    for _ in range(3):
        contract_store.create_run("wf", {})
    contract_store.create_run("other", {})
    run = contract_store.claim_next_run("me")
    contract_store.finish_run(run.run_id, "failed", "boom")
    assert contract_store.count_runs_by_state() == {"queued": 3, "failed": 1}
    assert contract_store.count_runs_by_state("wf") == {"queued": 2, "failed": 1}
    contract_store.purge_runs(older_than=time.time() + 10)
    assert contract_store.count_runs_by_state() == {"queued": 3}  # the counts follow deletes too
    assert contract_store.count_runs_by_state("nope") == {}


def test_claim_is_fifo_and_stale_runs_are_found(contract_store):
    a = contract_store.create_run("wf", {}, now=50.0)[0]
    b = contract_store.create_run("wf", {}, now=50.0)[0]
    claimed = contract_store.claim_next_run("me", now=100.0)
    assert (claimed.run_id, claimed.state, claimed.owner, claimed.started_at) == (a.run_id, "running", "me", 100.0)
    assert contract_store.claim_next_run("me", now=200.0).run_id == b.run_id
    assert contract_store.claim_next_run("me") is None
    assert [r.run_id for r in contract_store.stale_runs(heartbeat_before=150.0)] == [a.run_id]
    contract_store.heartbeat([a.run_id], now=300.0)
    assert [r.run_id for r in contract_store.stale_runs(heartbeat_before=250.0)] == [b.run_id]


def test_claim_runs_takes_a_batch_oldest_first_in_one_go(contract_store):
    ids = [contract_store.create_run("wf", {}, now=50.0)[0].run_id for _ in range(5)]
    batch = contract_store.claim_runs("me", 3, now=100.0)
    assert [r.run_id for r in batch] == ids[:3]
    assert {(r.state, r.owner, r.started_at, r.heartbeat_at) for r in batch} == {("running", "me", 100.0, 100.0)}
    assert [contract_store.get_run(i).state for i in ids] == ["running"] * 3 + ["queued"] * 2
    assert [r.run_id for r in contract_store.claim_runs("you", 10)] == ids[3:]  # fewer queued than the limit
    assert contract_store.claim_runs("me", 10) == []
    with pytest.raises(ValueError):
        contract_store.claim_runs("me", 0)


def test_claim_runs_only_some_ids_leaves_the_others_queued(contract_store):
    """``ingest`` claims only the runs it made, never a backlog a serve queued in the same store."""
    ids = [contract_store.create_run("wf", {})[0].run_id for _ in range(4)]
    assert contract_store.claim_runs("ingest", 10, only=set()) == []
    assert [r.run_id for r in contract_store.claim_runs("ingest", 10, only={ids[3], ids[1], 10_000})] == \
        [ids[1], ids[3]]
    assert [contract_store.get_run(i).state for i in ids] == ["queued", "running", "queued", "running"]
    assert contract_store.claim_runs("ingest", 10, only={ids[1]}) == []  # running already


def test_a_run_never_starts_before_it_was_queued(contract_store):
    """A claimer whose clock lags the gateway's (or read it before the lock) must not give a negative queue wait."""
    run = contract_store.create_run("wf", {}, now=500.0)[0]
    assert contract_store.claim_next_run("me", now=400.0).started_at == 500.0
    assert contract_store.get_run(run.run_id).started_at == 500.0


def test_duration_percentiles_group_mapped_instances(contract_store):
    run = contract_store.create_run("wf", {})[0]
    ids = [f"ingest[{i}]" for i in range(20)]
    contract_store.create_tasks(run.run_id, ids + ["digest"])
    transitions = []
    for i, task_id in enumerate(ids):
        transitions += [Transition(run.run_id, task_id, "running", 1, 1000.0),
                        Transition(run.run_id, task_id, "success", 1, 1000.0 + i + 1)]
    transitions += [Transition(run.run_id, "digest", "running", 1, 1000.0),
                    Transition(run.run_id, "digest", "success", 1, 1000.5)]
    contract_store.record_transitions(transitions)
    stats = contract_store.task_duration_percentiles(since=900.0, until=2000.0)
    assert stats["ingest"]["n"] == 20 and stats["ingest"]["p50"] == pytest.approx(10.5)
    assert stats["ingest"]["p95"] == pytest.approx(19.05)
    assert stats["digest"] == {"n": 1, "p50": 0.5, "p95": 0.5}
    assert contract_store.task_duration_percentiles(since=5000.0, until=6000.0) == {}


# -- tasks and transitions: terminal states are final -----------------------------------------------------------

def test_requeue_resets_unfinished_tasks_only(contract_store):
    run = contract_store.create_run("wf", {})[0]
    contract_store.claim_next_run("me")
    contract_store.create_tasks(run.run_id, ["done", "busy", "later"])
    contract_store.create_tasks(run.run_id, ["done"])  # an existing id is left untouched
    contract_store.record_transitions([Transition(run.run_id, "done", "running", 1, 1.0),
                                       Transition(run.run_id, "done", "success", 1, 2.0, output_json='{"n": 42}'),
                                       Transition(run.run_id, "busy", "running", 1, 3.0)])
    assert contract_store.recover_runs(lambda r: True) == [run.run_id]
    assert contract_store.get_run(run.run_id).state == "queued"
    tasks = contract_store.get_tasks(run.run_id)
    assert [t.task_id for t in tasks] == ["done", "busy", "later"]  # creation order
    assert (tasks[0].state, tasks[0].output, tasks[0].started_at, tasks[0].ended_at) == ("success", {"n": 42}, 1.0, 2.0)
    assert (tasks[1].state, tasks[1].try_number) == ("queued", 1) and tasks[2].state == "queued"


def test_rebuild_queues_every_task_as_never_tried_and_only_for_its_owner(contract_store, store_config):
    run = contract_store.create_run("wf", {})[0]
    contract_store.claim_next_run("me")
    contract_store.create_tasks(run.run_id, ["parse", "use"])
    contract_store.record_transitions([Transition(run.run_id, "parse", "running", 1, 1.0),
                                       Transition(run.run_id, "parse", "success", 1, 2.0, output_json='{"n": 1}'),
                                       Transition(run.run_id, "use", "running", 3, 3.0)])
    assert contract_store.rebuild_run(run.run_id, owner="someone else") == 0
    assert contract_store.rebuild_run(run.run_id, owner="me", note="its work files were lost") == 1
    after = contract_store.get_run(run.run_id)
    assert (after.state, after.reason) == ("queued", "its work files were lost")
    tasks = contract_store.get_tasks(run.run_id)
    assert [(t.state, t.try_number, t.output, t.started_at, t.ended_at) for t in tasks] == [
        ("queued", 0, None, None, None)] * 2
    assert events(store_config, run.run_id, "")[-2:] == ["queued", "rebuilt"]
    assert contract_store.rebuild_run(run.run_id, owner="me") == 0  # queued now: nothing to rebuild


def test_late_running_does_not_undo_a_timeout(contract_store, store_config):
    run = contract_store.create_run("wf", {})[0]
    contract_store.claim_next_run("me")
    contract_store.create_tasks(run.run_id, ["slow"])
    # the timeout fires while the task is still queued for a thread; the thread then writes RUNNING
    contract_store.record_transitions([Transition(run.run_id, "slow", "failed", 1, 5.0, "timeout", "ran past 1 s")])
    contract_store.record_transitions([Transition(run.run_id, "slow", "running", 1, 6.0)])
    task = contract_store.get_tasks(run.run_id)[0]
    assert (task.state, task.error_type, task.ended_at, task.started_at) == ("failed", "timeout", 5.0, None)
    assert events(store_config, run.run_id, "slow") == ["queued", "failed"]  # the refused write leaves no event


@pytest.mark.parametrize("final", ["success", "failed", "upstream_failed"])
def test_terminal_task_states_are_final_within_one_batch(contract_store, store_config, final):
    run = contract_store.create_run("wf", {})[0]
    contract_store.create_tasks(run.run_id, ["t", "other"])
    late = [Transition(run.run_id, "t", state, 2, 3.0, "late", "too late")
            for state in ("queued", "running", "retrying", "success", "failed")]
    applied = contract_store.record_transitions([Transition(run.run_id, "t", "running", 1, 1.0),
                                                 Transition(run.run_id, "t", final, 1, 2.0, output_json="1"),
                                                 *late, Transition(run.run_id, "other", "running", 1, 3.0)])
    assert applied == 3
    tasks = {t.task_id: t for t in contract_store.get_tasks(run.run_id)}
    assert (tasks["t"].state, tasks["t"].try_number, tasks["t"].ended_at, tasks["t"].output) == (final, 1, 2.0, 1)
    assert tasks["other"].state == "running"  # the rest of the batch is written
    assert events(store_config, run.run_id, "t") == ["queued", "running", final]


def test_the_event_history_keeps_why_a_retried_try_failed(contract_store, store_config):
    run, _ = contract_store.create_run("wf", {})
    contract_store.create_tasks(run.run_id, ["t"])
    contract_store.record_transitions([Transition(run.run_id, "t", s.RUNNING, 1, 1.0),
                                       Transition(run.run_id, "t", s.RETRYING, 1, 2.0, "worker_crashed", "killed"),
                                       Transition(run.run_id, "t", s.RUNNING, 2, 3.0),
                                       Transition(run.run_id, "t", s.SUCCESS, 2, 4.0)])
    task = contract_store.get_tasks(run.run_id)[0]
    assert (task.state, task.try_number, task.error_type, task.started_at) == ("success", 2, None, 3.0)
    assert events(store_config, run.run_id, "t") == ["queued", "running", "retrying", "running", "success"]


def test_failing_a_run_mid_task_closes_its_open_tasks(contract_store, store_config):
    """The engine fails a run its runner left mid-task (bookkeeping broken past its requeues, a task short of
    disk that alone does not fit): ``show`` must not list a task of that finished run as running or queued."""
    run = contract_store.create_run("wf", {})[0]
    contract_store.claim_next_run("me")
    contract_store.create_tasks(run.run_id, ["done", "busy", "later"])
    contract_store.record_transitions([Transition(run.run_id, "done", "running", 1, 1.0),
                                       Transition(run.run_id, "done", "success", 1, 2.0),
                                       Transition(run.run_id, "busy", "running", 2, 3.0)])
    reason = "task_io: MachineShortError: [Errno 28] No space left on device"
    assert contract_store.finish_run(run.run_id, "failed", reason, now=9.0, owner="me") == 1
    tasks = {t.task_id: t for t in contract_store.get_tasks(run.run_id)}
    assert (tasks["done"].state, tasks["done"].ended_at) == ("success", 2.0)
    busy, later = tasks["busy"], tasks["later"]
    assert (busy.state, busy.try_number, busy.ended_at, busy.error_type) == ("failed", 2, 9.0, "task_io")
    assert busy.error_message == "MachineShortError: [Errno 28] No space left on device"
    assert (later.state, later.error_type, later.ended_at) == ("upstream_failed", "upstream_failed", 9.0)
    assert later.error_message == f"not run to its end: the run failed ({reason})"
    assert events(store_config, run.run_id, "busy")[-1] == "failed"
    assert events(store_config, run.run_id, "later")[-1] == "upstream_failed"


@pytest.mark.parametrize("final", ["success", "failed"])
def test_finished_run_keeps_its_state_reason_and_end(contract_store, store_config, final):
    run = contract_store.create_run("wf", {})[0]
    contract_store.claim_next_run("me")
    assert contract_store.finish_run(run.run_id, final, "first", now=10.0) == 1
    assert contract_store.finish_run(run.run_id, "failed" if final == "success" else "success", "second",
                                     now=20.0) == 0
    assert contract_store.requeue_run(run.run_id) == 0
    assert contract_store.recover_runs(lambda r: True) == []
    again = contract_store.get_run(run.run_id)
    assert (again.state, again.reason, again.ended_at) == (final, "first", 10.0)
    assert contract_store.claim_next_run("me") is None
    assert contract_store.count_runs_by_state() == {final: 1}
    assert events(store_config, run.run_id, "") == [final]
    with pytest.raises(ValueError):
        contract_store.finish_run(run.run_id, "running")


def test_requeue_moves_only_running_runs_and_keeps_their_place(contract_store, store_config):
    queued = contract_store.create_run("wf", {}, now=40.0)[0]
    assert contract_store.requeue_run(queued.run_id) == 0
    assert events(store_config, queued.run_id, "") == []  # nothing to requeue: no event, no change
    running = contract_store.claim_next_run("me", now=50.0)
    later = contract_store.create_run("wf", {})[0]
    assert contract_store.requeue_run(running.run_id, now=60.0) == 1
    back = contract_store.get_run(running.run_id)
    assert (back.state, back.owner, back.heartbeat_at, back.started_at) == ("queued", None, None, 50.0)
    assert events(store_config, running.run_id, "") == ["queued"]
    again = contract_store.claim_next_run("you", now=70.0)  # its place in the queue: before the later run
    assert (again.run_id, again.started_at) == (running.run_id, 50.0) and later.run_id > again.run_id


def test_a_requeued_run_says_why_until_it_ends(contract_store):
    run = contract_store.create_run("wf", {})[0]
    contract_store.claim_next_run("me", now=1.0)
    assert contract_store.requeue_run(run.run_id, owner="me", note="requeued: waiting for the disk") == 1
    assert contract_store.get_run(run.run_id).reason == "requeued: waiting for the disk"
    contract_store.claim_next_run("me", now=2.0)
    contract_store.requeue_run(run.run_id, owner="me")  # no note: the old one does not linger
    assert contract_store.get_run(run.run_id).reason is None
    contract_store.claim_next_run("dead:1:x", now=3.0)
    contract_store.recover_runs(lambda r: True)
    assert contract_store.get_run(run.run_id).reason == "requeued: its owner dead:1:x was gone"
    contract_store.claim_next_run("me", now=4.0)
    contract_store.finish_run(run.run_id, "success", owner="me", now=5.0)
    assert contract_store.get_run(run.run_id).reason is None  # the end's own reason (none for a success)


def test_heartbeat_touches_only_running_runs(contract_store):
    run = contract_store.create_run("wf", {})[0]
    assert contract_store.heartbeat([run.run_id], now=5.0) == 0
    assert contract_store.get_run(run.run_id).heartbeat_at is None
    contract_store.claim_next_run("me", now=1.0)
    assert contract_store.heartbeat([run.run_id, run.run_id + 50], now=2.0) == 1
    contract_store.finish_run(run.run_id, "success", now=3.0)
    assert contract_store.heartbeat([run.run_id], now=9.0) == 0
    assert contract_store.get_run(run.run_id).heartbeat_at == 2.0


def test_writes_with_an_owner_change_nothing_once_another_process_took_the_run_over(contract_store):
    run = contract_store.create_run("wf", {})[0]
    contract_store.claim_next_run("hostA:1:aaaa", now=1.0)
    contract_store.create_tasks(run.run_id, ["t"])
    assert contract_store.recover_runs(lambda r: r.owner.startswith("hostA"), now=50.0) == [run.run_id]
    contract_store.claim_next_run("hostB:2:bbbb", now=60.0)
    running = Transition(run.run_id, "t", "running", 1, 61.0)
    # A comes back and writes as if the run were still its own: every write is refused and says so
    assert contract_store.record_transitions([running], owner="hostA:1:aaaa") == 0
    assert contract_store.heartbeat([run.run_id], now=62.0, owner="hostA:1:aaaa") == 0
    assert contract_store.requeue_run(run.run_id, owner="hostA:1:aaaa") == 0
    assert contract_store.finish_run(run.run_id, "failed", "internal: A's view", owner="hostA:1:aaaa") == 0
    now = contract_store.get_run(run.run_id)
    assert (now.state, now.owner, now.heartbeat_at) == ("running", "hostB:2:bbbb", 60.0)
    assert now.reason == "requeued: its owner hostA:1:aaaa was gone"  # the recovery's note, not A's reason
    assert contract_store.get_tasks(run.run_id)[0].state == "queued"
    # B, the owner, is obeyed
    assert contract_store.record_transitions([running], owner="hostB:2:bbbb") == 1
    assert contract_store.heartbeat([run.run_id], now=63.0, owner="hostB:2:bbbb") == 1
    assert contract_store.finish_run(run.run_id, "success", owner="hostB:2:bbbb", now=64.0) == 1
    assert contract_store.finish_run(run.run_id, "failed", "late", owner="hostB:2:bbbb") == 0  # terminal is final


def test_finish_with_an_owner_only_ends_a_running_run(contract_store):
    run = contract_store.create_run("wf", {})[0]
    assert contract_store.finish_run(run.run_id, "failed", "x", owner="me") == 0  # queued: not ours to end
    assert contract_store.finish_run(run.run_id, "failed", "unknown_workflow") == 1  # without an owner it may
    other = contract_store.create_run("wf", {})[0]
    contract_store.claim_next_run("me")
    assert contract_store.requeue_run(other.run_id, owner="you") == 0
    assert contract_store.requeue_run(other.run_id, owner="me") == 1
    assert contract_store.requeue_run(other.run_id, owner="me") == 0


def test_transition_counts_skip_final_tasks(contract_store):
    run = contract_store.create_run("wf", {})[0]
    contract_store.create_tasks(run.run_id, ["a", "b"])
    assert contract_store.record_transitions([Transition(run.run_id, "a", "failed", 1, 1.0, "timeout", "late")]) == 1
    assert contract_store.record_transitions([Transition(run.run_id, "a", "running", 1, 2.0),
                                              Transition(run.run_id, "b", "running", 1, 2.0)]) == 1


def test_recover_runs_requeues_only_the_dead_owners_runs(contract_store):
    runs = [contract_store.create_run("wf", {})[0] for _ in range(3)]
    contract_store.claim_next_run("dead:1:x", now=1.0)
    contract_store.claim_next_run("alive:2:y", now=1.0)
    seen = []
    assert contract_store.recover_runs(lambda r: seen.append(r.run_id) or r.owner.startswith("dead")) == \
        [runs[0].run_id]
    assert sorted(seen) == [runs[0].run_id, runs[1].run_id]  # only running runs are judged
    assert [r.state for r in map(contract_store.get_run, (r.run_id for r in runs))] == ["queued", "running", "queued"]


# -- purge, tombstones and spool names ------------------------------------------------------------------------

def test_purge_deletes_old_finished_runs_in_batches_and_never_live_ones(contract_store):
    old = [finished(contract_store) for _ in range(5)]
    contract_store.create_tasks(old[0], ["t"])
    contract_store.record_transitions([Transition(old[0], "t", "running", 1, 1.0)])
    queued = contract_store.create_run("wf", {}, now=1.0)[0].run_id  # old, but not finished
    running = contract_store.create_run("wf", {}, now=1.0)[0].run_id
    assert contract_store.claim_next_run("me", now=1.0).run_id == queued
    fresh = finished(contract_store, ended_at=time.time() + 1000)
    assert contract_store.count_purgeable(older_than=100.0) == 5  # what purge --dry-run says, deleting nothing
    batches = list(contract_store.purge_batches(older_than=100.0, batch_size=2))
    assert [len(b.run_ids) for b in batches] == [2, 2, 1]
    assert sorted(i for b in batches for i in b.run_ids) == old
    assert [r.run_id for r in contract_store.list_runs()] == [fresh, running, queued]
    with pytest.raises(UnknownRunError):
        contract_store.get_run(old[0])
    assert contract_store.get_tasks(old[0]) == []
    assert contract_store.purge_runs(older_than=100.0) == 0
    assert contract_store.count_purgeable(older_than=100.0) == 0


def test_purge_tombstones_only_names_no_remaining_run_names(contract_store, tmp_path):
    def spool(name: str) -> dict:
        return {"spool": str(tmp_path / "spool" / name)}

    finished(contract_store, spool("a.eml"))
    finished(contract_store, spool("b.eml"))
    finished(contract_store, {"spool": "b.eml"}, ended_at=time.time() + 1000)  # a bare name counts as well
    queued = contract_store.create_run("wf", {"spool": "/elsewhere/c.eml"}, now=1.0)[0]
    finished(contract_store, {"spool": "relative/c.eml"})
    finished(contract_store, {"other": "x"})
    batches = list(contract_store.purge_batches(older_than=100.0, batch_size=10))
    assert [b.spool_names for b in batches] == [("a.eml",)]
    assert contract_store.list_spool_tombstones() == ["a.eml"]
    assert contract_store.spool_names_in_use(["a.eml", "b.eml", "c.eml", "d.eml"]) == {"b.eml", "c.eml"}
    assert contract_store.spool_names_known(["a.eml", "b.eml", "c.eml", "d.eml"]) == {"a.eml", "b.eml", "c.eml"}
    assert contract_store.spool_names_in_use([]) == set() and contract_store.spool_names_known([]) == set()
    contract_store.finish_run(queued.run_id, "failed", "x", now=1.0)
    assert [b.spool_names for b in contract_store.purge_batches(older_than=100.0)] == [("c.eml",)]


def test_tombstones_list_in_keyset_pages_and_drop(contract_store):
    names = [f"{i:02d}.eml" for i in range(7)]
    for name in names:
        finished(contract_store, {"spool": name})
    assert sum(len(b.spool_names) for b in contract_store.purge_batches(older_than=100.0, batch_size=3)) == 7
    page1 = contract_store.list_spool_tombstones(limit=3)
    page2 = contract_store.list_spool_tombstones(after=page1[-1], limit=3)
    page3 = contract_store.list_spool_tombstones(after=page2[-1], limit=3)
    assert page1 + page2 + page3 == names
    assert contract_store.drop_spool_tombstones(["00.eml", "03.eml", "nope.eml"]) == 2
    assert contract_store.list_spool_tombstones() == [n for n in names if n not in ("00.eml", "03.eml")]
    assert contract_store.spool_names_known(["00.eml", "01.eml"]) == {"01.eml"}
    assert contract_store.spool_tracked_since() <= time.time()


# -- lifecycle and errors -------------------------------------------------------------------------------------

def test_reopen_keeps_data(store_config):
    with open_store(store_config) as st:
        run = st.create_run("wf", {"x": 1}, "k")[0]
    with open_store(store_config) as st:
        assert st.get_run(run.run_id).payload == {"x": 1}
        assert st.create_run("wf", {}, "k") == (run, False)


def test_closed_store_raises_store_error_from_every_method(store_config):
    st = open_store(store_config)
    run = st.create_run("wf", {})[0]
    st.close()
    calls = [lambda: st.list_runs(), lambda: st.create_run("wf", {}), lambda: st.get_run(run.run_id),
             lambda: st.claim_next_run("me"), lambda: st.count_runs_by_state(),
             lambda: st.record_transitions([Transition(run.run_id, "t", "running", 1, 1.0)]),
             lambda: list(st.purge_batches(1.0)), lambda: st.spool_names_known(["a.eml"])]
    for call in calls:
        with pytest.raises(StoreError):
            call()
    st.close()  # a second close is harmless


def test_the_store_is_a_context_manager(store_config):
    with open_store(store_config) as st:
        st.create_run("wf", {})
    with pytest.raises(StoreError):
        st.list_runs()


# -- several processes on one store -----------------------------------------------------------------------------
# Each worker opens its own store from the config (as a gateway or engine on another host would), waits for a
# "go" file so they start together, and writes what it saw to a JSON file: no queues, no shared memory.

def _write_json(path: str | Path, value: object) -> None:
    """Write JSON whole or not at all (the test polls for the file while it is written)."""
    Path(f"{path}.tmp").write_text(json.dumps(value))
    os.replace(f"{path}.tmp", path)


def _await(path: str, timeout_s: float = 60.0) -> None:
    if not wait_until(lambda: os.path.exists(path), timeout_s):
        raise TimeoutError(f"{path} never appeared")


def _claim_until_empty(config: StoreConfig, owner: str, go: str, out: str) -> None:
    with open_store(config) as st:
        _await(go)
        claimed = []
        while (run := st.claim_next_run(owner)) is not None:
            claimed.append(run.run_id)
    _write_json(out, claimed)


def _create_keys(config: StoreConfig, keys: list[str], go: str, out: str) -> None:
    with open_store(config) as st:
        _await(go)
        made = {key: st.create_run("email_digest", {"k": key}, key) for key in keys}
    _write_json(out, {key: [run.run_id, created] for key, (run, created) in made.items()})


def _claim_and_hang(config: StoreConfig, count: int, out: str) -> None:
    st = open_store(config)
    owner = liveness.new_owner()
    liveness.LIVE_OWNERS.add(owner)
    ids = [st.claim_next_run(owner).run_id for _ in range(count)]
    for run_id in ids:
        st.record_transitions([Transition(run_id, "t", "running", 1, time.time())], owner=owner)
    st.heartbeat(ids, owner=owner)
    _write_json(out, {"owner": owner, "ids": ids})
    time.sleep(120)  # SIGKILLed long before


def _recover_and_claim(config: StoreConfig, out: str) -> None:
    me = liveness.new_owner()
    liveness.LIVE_OWNERS.add(me)
    with open_store(config) as st:
        stale_before = time.time() - 3600  # every heartbeat is fresh: only a dead pid makes a run dead
        recovered = st.recover_runs(lambda run: liveness.is_dead(run, me, stale_before))
        claimed = []
        while (run := st.claim_next_run(me)) is not None:
            claimed.append(run.run_id)
        tasks = {run_id: st.get_tasks(run_id)[0].state for run_id in claimed}
    _write_json(out, {"owner": me, "recovered": recovered, "claimed": claimed, "tasks": tasks})


def _create_while_purged(config: StoreConfig, count: int, reuse: list[str], started: str, out: str) -> None:
    made = []
    with open_store(config) as st:
        for i in range(count):
            name = reuse[i] if i < len(reuse) else f"new-{i}.eml"
            made.append(st.create_run("wf", {"spool": f"spool/{name}"}, f"<new{i}@x>")[0].run_id)
            if i == 0:
                Path(started).touch()
    _write_json(out, made)


def run_processes(*targets: tuple) -> list:
    """Start one forkserver process per ``(function, *args)``; return them started (use ``join_all``)."""
    ctx = multiprocessing.get_context("forkserver")
    procs = [ctx.Process(target=fn, args=args) for fn, *args in targets]
    for proc in procs:
        proc.start()
    return procs


def join_all(procs: list, timeout_s: float = 120.0) -> list[int | None]:
    """Wait for the processes (killing any still running after ``timeout_s``); return their exit codes."""
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        codes.append(proc.exitcode)
        proc.close()
    return codes


def test_concurrent_claims_from_four_processes_take_every_run_exactly_once(store_config, tmp_path):
    with open_store(store_config) as st:
        created = [run.run_id for run, _ in st.create_runs([("wf", {"i": i}, None) for i in range(200)])]
    go = str(tmp_path / "go")
    procs = run_processes(*[(_claim_until_empty, store_config, f"p{i}", go, str(tmp_path / f"p{i}.json"))
                            for i in range(4)])
    Path(go).touch()
    assert join_all(procs) == [0, 0, 0, 0]
    claims = {f"p{i}": json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(4)}
    every = [run_id for ids in claims.values() for run_id in ids]
    assert sorted(every) == created  # each run claimed once, by exactly one process
    with open_store(store_config) as st:
        assert st.count_runs_by_state() == {"running": 200}
        for owner, ids in claims.items():
            assert ids == sorted(ids)  # each process saw the queue in FIFO order
            assert {st.get_run(run_id).owner for run_id in ids} <= {owner}


def test_dedup_race_between_four_processes_makes_one_run_per_key(store_config, tmp_path):
    keys = [f"<m{i}@x>" for i in range(100)]
    go = str(tmp_path / "go")
    orders = [keys, keys[::-1], keys[50:] + keys[:50], keys]
    procs = run_processes(*[(_create_keys, store_config, order, go, str(tmp_path / f"p{i}.json"))
                            for i, order in enumerate(orders)])
    Path(go).touch()
    assert join_all(procs) == [0, 0, 0, 0]
    seen = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(4)]
    ids = {key: {s[key][0] for s in seen} for key in keys}
    assert all(len(one) == 1 for one in ids.values()), "a key got two runs"
    assert sum(s[key][1] for s in seen for key in keys) == 100  # exactly one creator per key
    with open_store(store_config) as st:
        assert st.count_runs_by_state() == {"queued": 100}
        assert {st.find_run("email_digest", key).run_id for key in keys} == {one.pop() for one in ids.values()}


def test_a_live_process_recovers_and_claims_the_runs_of_a_sigkilled_one(store_config, tmp_path):
    mine = liveness.new_owner()  # this test process: alive, so its run must not be taken
    with open_store(store_config) as st:
        runs = [run.run_id for run, _ in st.create_runs([("wf", {}, None)] * 4)]
        for run_id in runs:
            st.create_tasks(run_id, ["t"])
        assert st.claim_next_run(mine).run_id == runs[0]
    claimed_file = tmp_path / "claimed.json"
    [victim] = run_processes((_claim_and_hang, store_config, 3, str(claimed_file)))
    try:
        assert wait_until(claimed_file.exists, 60), "the victim never claimed its runs"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        assert join_all([victim], 30) == [-signal.SIGKILL]
    victim_claims = json.loads(claimed_file.read_text())
    assert victim_claims["ids"] == runs[1:]
    rescuer = run_processes((_recover_and_claim, store_config, str(tmp_path / "rescued.json")))
    assert join_all(rescuer) == [0]
    rescued = json.loads((tmp_path / "rescued.json").read_text())
    assert rescued["recovered"] == runs[1:] and rescued["claimed"] == runs[1:]
    assert set(rescued["tasks"].values()) == {"queued"}  # the dead owner's running task is to run again
    with open_store(store_config) as st:
        assert (st.get_run(runs[0]).state, st.get_run(runs[0]).owner) == ("running", mine)
        assert {st.get_run(r).owner for r in runs[1:]} == {rescued["owner"]} != {victim_claims["owner"]}
        assert st.count_runs_by_state() == {"running": 4}


def test_purge_while_another_process_creates_runs_deletes_nothing_live(store_config, tmp_path):
    old_names = [f"old-{i}.eml" for i in range(40)]
    reused = old_names[::4]  # the same bytes arrive again while their old runs are being purged
    with open_store(store_config) as st:
        old = [finished(st, {"spool": f"spool/{name}"}) for name in old_names]
        keep = [st.create_run("wf", {"spool": "spool/keep-q.eml"}, now=1.0)[0].run_id,
                st.create_run("wf", {"spool": "spool/keep-r.eml"}, now=1.0)[0].run_id]
        st.claim_next_run("me", now=1.0)
        started, out = tmp_path / "started", tmp_path / "made.json"
        [writer] = run_processes((_create_while_purged, store_config, 60, reused, str(started), str(out)))
        try:
            assert wait_until(started.exists, 60), "the writer never started"
            purged = [run_id for batch in st.purge_batches(older_than=100.0, batch_size=3) for run_id in batch.run_ids]
        finally:
            assert join_all([writer]) == [0]
        purged += [run_id for batch in st.purge_batches(older_than=100.0) for run_id in batch.run_ids]
        made = json.loads(out.read_text())
        assert sorted(purged) == old
        assert [st.get_run(run_id).state for run_id in made] == ["queued"] * 60
        assert st.count_runs_by_state() == {"queued": 61, "running": 1}
        assert [st.get_run(run_id).state for run_id in keep] == ["running", "queued"]
        tombstones = set(st.list_spool_tombstones())
        assert set(old_names) - set(reused) <= tombstones <= set(old_names)
        assert st.spool_names_in_use(old_names) == set(reused)
        assert st.spool_names_known(old_names) == set(old_names)


# -- the PostgreSQL server these tests use ----------------------------------------------------------------------

def test_the_test_server_runs_unprivileged_and_keeps_data_over_a_restart(pg_server, pg_url):
    import psutil

    postmaster = psutil.Process(pg_server.pid)
    assert postmaster.username() != "root" and postmaster.uids().effective != 0
    with open_store(StoreConfig(url=pg_url, pool_size=1)) as st:
        run = st.create_run("wf", {"x": 1}, "k")[0]
    pg_server.pg_ctl("restart", "-m", "immediate")  # a crash: what was committed survives (fsync=off or not)
    assert pg_server.pid != postmaster.pid
    with open_store(StoreConfig(url=pg_url, pool_size=1)) as st:
        assert st.find_run("wf", "k") == run


def test_query_is_a_read_only_view_for_tools(contract_store):
    """The audit's plain-SQL baselines use this, never the store's private connection."""
    contract_store.create_run("wf", {})
    contract_store.create_run("wf", {})
    assert contract_store.query("SELECT count(*) FROM runs") == [(2,)]
    contract_store.write_in_one_transaction([("DELETE FROM task_runs", ())])
    assert contract_store.query("SELECT count(*) FROM task_runs") == [(0,)]


def test_the_last_run_id_counts_purged_runs_and_existing_ids_are_found(contract_store):
    """What purge's sweep of orphaned work dirs relies on: the highest id handed out, purged or not."""
    assert contract_store.last_run_id() == 0
    ids = [finished(contract_store) for _ in range(3)]
    list(contract_store.purge_batches(time.time(), 1000))
    kept = contract_store.create_run("wf", {})[0].run_id
    assert contract_store.last_run_id() == kept == ids[-1] + 1
    assert contract_store.existing_run_ids([*ids, kept, kept + 5]) == {kept}
    assert contract_store.existing_run_ids([]) == set()
