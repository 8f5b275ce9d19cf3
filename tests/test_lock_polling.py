"""``[store] lock_polling``: SQLite writes wait for another connection's write lock by trying again every
0.1-1 ms instead of SQLite's busy handler, still up to the busy timeout; and the audit's contention bench."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import replace

import pytest

from pipeline.audit.scenarios import lock_wait
from pipeline.config import StoreConfig
from pipeline.errors import StoreBusyError
from pipeline.sqlite_store import SqliteRunStore

MODES = [pytest.param(True, id="polling"), pytest.param(False, id="busy-handler")]


def _store(tmp_path, polling, **options):
    return SqliteRunStore(replace(StoreConfig(path=tmp_path / "runs.sqlite3"), lock_polling=polling, **options))


def _hold_write_lock(path, seconds):
    """Another connection takes the write lock now and commits after ``seconds`` (in a thread)."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE runs SET heartbeat_at = 1 WHERE run_id = 0")

    def release():
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


@pytest.mark.parametrize("polling", MODES)
def test_a_write_waits_out_another_connections_lock_then_commits(tmp_path, polling):
    store = _store(tmp_path, polling)
    try:
        holder = _hold_write_lock(store.path, 0.4)
        t0 = time.monotonic()
        run, created = store.create_run("w", {}, dedup_key="m1")
        waited = time.monotonic() - t0
        holder.join()
        assert created and store.get_run(run.run_id).state == "queued"
        assert waited >= 0.3  # it did wait for the lock, and got it once released
    finally:
        store.close()


@pytest.mark.parametrize("polling", MODES)
def test_a_lock_held_past_the_busy_timeout_is_a_store_busy_error_at_that_timeout(tmp_path, polling):
    store = _store(tmp_path, polling, busy_timeout_ms=200)
    try:
        holder = _hold_write_lock(store.path, 2.0)
        t0 = time.monotonic()
        with pytest.raises(StoreBusyError, match="busy timeout"):
            store.create_run("w", {}, dedup_key="m1")
        waited = time.monotonic() - t0
        holder.join()
        assert 0.15 <= waited < 1.5  # the configured 0.2 s, not the holder's 2 s
        assert store.create_run("w", {}, dedup_key="m1")[1]  # usable again once the lock is free
    finally:
        store.close()


@pytest.mark.parametrize("polling", MODES)
def test_reads_go_on_while_another_connection_writes(tmp_path, polling):
    store = _store(tmp_path, polling)
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        store.create_run("w", {}, dedup_key="m1")
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE runs SET heartbeat_at = 1")
        assert [r.dedup_key for r in store.list_runs()] == ["m1"]  # WAL: read while the writer holds its lock
        assert store.count_runs_by_state() == {"queued": 1}
        other.execute("COMMIT")
    finally:
        other.close()
        store.close()


@pytest.mark.parametrize("polling", MODES)
def test_checkpoint_waits_for_a_reader_then_empties_the_wal(tmp_path, polling):
    store = _store(tmp_path, polling)
    store.create_run("w", {}, dedup_key="m1")
    reader = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM runs").fetchone()  # a read snapshot pins the WAL

    def finish():
        time.sleep(0.3)
        reader.execute("COMMIT")
        reader.close()

    thread = threading.Thread(target=finish)
    thread.start()
    try:
        store.checkpoint()
        thread.join()
        assert (tmp_path / "runs.sqlite3-wal").stat().st_size == 0
    finally:
        thread.join()
        store.close()


@pytest.mark.parametrize(("polling", "wal", "expected"),
                         [(True, True, 0), (False, True, 10_000), (True, False, 10_000)])
def test_sqlites_own_busy_wait_is_off_only_where_the_store_polls(tmp_path, polling, wal, expected):
    store = _store(tmp_path, polling, wal=wal)
    try:  # without WAL, COMMIT itself may wait for readers: there SQLite's handler stays
        assert store.query("PRAGMA busy_timeout") == [(expected,)]
    finally:
        store.close()


@pytest.mark.parametrize("polling", MODES)
def test_contended_inserts_time_every_insert_beside_a_writer_process(tmp_path, polling):
    result = lock_wait.contended_inserts(tmp_path / "lock.sqlite3", polling, inserts=20, gap_s=0.002)
    assert result["lock_polling"] is polling and len(result["insert_ms"]) == 20
    assert result["writer_commits_per_s"] > 0  # the writer committed meanwhile
    summary = lock_wait.summarize(result)
    assert summary["median_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    store = SqliteRunStore(StoreConfig(path=tmp_path / "lock.sqlite3"))
    try:
        assert store.count_runs_by_state("lock_wait_gateway") == {"queued": 20}
    finally:
        store.close()
