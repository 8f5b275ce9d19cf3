"""SqliteRunStore at its error edge: every real SQLite failure becomes a typed StoreError, one line long,
and the connection stays usable afterwards. Each fault is provoked for real on a SQLite file."""

import sqlite3
from contextlib import closing
from dataclasses import replace

import pytest

from pipeline.errors import (
    NotADatabaseError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreIOError,
)
from pipeline.sqlite_store import SqliteRunStore, store_error


def damage_table(path, table: str) -> None:
    """Overwrite the root page of ``table`` with garbage (the store must be closed: no WAL left)."""
    with closing(sqlite3.connect(path)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def assert_translated(exc_info, cls, path, words: str) -> None:
    exc = exc_info.value
    assert type(exc) is cls
    assert isinstance(exc.__cause__, sqlite3.Error) and not isinstance(exc, sqlite3.Error)
    text = str(exc)
    assert "\n" not in text and str(path) in text and words in text.lower()


def test_store_locked_by_another_connection_is_busy_and_retryable(settings):
    with SqliteRunStore(replace(settings.store, busy_timeout_ms=50)) as store, \
            closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreBusyError) as exc_info:
            store.create_run("wf", {})
        assert_translated(exc_info, StoreBusyError, store.path, "locked")
        assert exc_info.value.retryable
        other.execute("ROLLBACK")
        assert store.create_run("wf", {})[1]  # the lock is gone: the same store works again


def test_damaged_pages_are_store_corrupt(settings):
    with SqliteRunStore(settings.store) as store:
        run = store.create_run("wf", {"pad": "x" * 500})[0]
        for _ in range(20):
            store.create_run("wf", {"pad": "x" * 500})
    damage_table(settings.store.path, "runs")
    with SqliteRunStore(settings.store) as store:  # page 1 is intact: it opens, then reads fail
        with pytest.raises(StoreCorruptError) as exc_info:
            store.list_runs()
        assert_translated(exc_info, StoreCorruptError, store.path, "malformed")
        assert not exc_info.value.retryable
        with pytest.raises(StoreCorruptError):
            store.get_run(run.run_id)


def test_full_disk_is_store_io_and_rolls_back(store):
    pages = store._read("PRAGMA page_count")[0][0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full" at this size
    with pytest.raises(StoreIOError) as exc_info:
        store.create_runs([("wf", {"pad": "x" * 4000}, str(i)) for i in range(50)])
    assert_translated(exc_info, StoreIOError, store.path, "full")
    store._conn.execute("PRAGMA max_page_count = 1073741823")
    assert store.list_runs() == []  # all or none
    assert store.create_run("wf", {})[1]


def test_read_only_store_is_store_io(store):
    store._conn.execute("PRAGMA query_only = 1")  # SQLITE_READONLY without root's disregard for chmod
    with pytest.raises(StoreIOError) as exc_info:
        store.create_run("wf", {})
    assert_translated(exc_info, StoreIOError, store.path, "readonly")


def test_failed_commit_is_rolled_back_and_the_store_stays_usable(store):
    # deferred foreign keys make SQLite refuse the COMMIT itself, leaving the transaction open
    store._conn.execute("PRAGMA foreign_keys = ON")
    store._conn.execute("PRAGMA defer_foreign_keys = ON")
    with pytest.raises(StoreError) as exc_info:
        store.create_tasks(999, ["orphan"])
    assert_translated(exc_info, StoreError, store.path, "foreign key")
    assert not store._conn.in_transaction
    run = store.create_run("wf", {})[0]
    store.create_tasks(run.run_id, ["t"])
    assert [t.task_id for t in store.get_tasks(run.run_id)] == ["t"]
    assert store.get_tasks(999) == []


def test_store_path_that_is_a_directory_cannot_be_opened(tmp_path):
    (tmp_path / "runs.sqlite3").mkdir()
    with pytest.raises(StoreIOError) as exc_info:
        SqliteRunStore(tmp_path / "runs.sqlite3")
    assert_translated(exc_info, StoreIOError, tmp_path / "runs.sqlite3", "unable to open")


def test_data_dir_that_is_a_file_is_store_io(tmp_path):
    # stands in for a read-only data dir: tests run as root, and root ignores permission bits
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(StoreIOError, match="cannot create the run store's directory") as exc_info:
        SqliteRunStore(tmp_path / "data" / "runs.sqlite3")
    assert isinstance(exc_info.value.__cause__, OSError)


def test_file_with_a_damaged_header_is_refused_as_not_a_database(settings):
    SqliteRunStore(settings.store).close()
    with open(settings.store.path, "r+b") as f:
        f.write(b"garbage header!!")
    with pytest.raises(NotADatabaseError):
        SqliteRunStore(settings.store)


def test_closed_store_raises_store_error(settings):
    store = SqliteRunStore(settings.store)
    store.close()
    with pytest.raises(StoreError) as exc_info:
        store.list_runs()
    assert_translated(exc_info, StoreError, store.path, "closed")
    with pytest.raises(StoreError):
        store.create_run("wf", {})
    store.close()  # a second close is harmless


def test_context_manager_closes_the_store(settings):
    with SqliteRunStore(settings.store) as store:
        store.create_run("wf", {})
    with pytest.raises(StoreError):
        store.list_runs()


def test_an_error_that_only_says_malformed_is_not_a_damaged_store(tmp_path):
    """SQLite's code decides: "malformed JSON" (SQLITE_ERROR) once read as damaged pages, which now makes the
    engine unhealthy until restarted."""
    with closing(sqlite3.connect(":memory:")) as conn:
        with pytest.raises(sqlite3.OperationalError) as raw:
            conn.execute("SELECT json_extract('{not json', '$.a')")
    assert "malformed" in str(raw.value)
    assert type(store_error(tmp_path / "runs.sqlite3", raw.value)) is StoreError
