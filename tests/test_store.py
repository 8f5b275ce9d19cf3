"""What only SqliteRunStore has: its file, schema version, query plans and refusal of foreign files.

The backend-agnostic contract (dedup, queries, ownership, purge ...) is tests/test_store_contract.py."""

import sqlite3
from contextlib import closing

import pytest
from helpers import at_once

from pipeline.errors import NotADatabaseError, SchemaTooNewError, StoreCorruptError, StoreError
from pipeline.sqlite_schema import SCHEMA_VERSION
from pipeline.sqlite_store import WAL_SIZE_LIMIT, SqliteRunStore


def test_schema_is_versioned_and_migrations_are_named(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY version")]
    assert len(names) == SCHEMA_VERSION and all(names)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


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


@pytest.mark.parametrize("version", [3, 0])
def test_schema_version_set_back_is_refused_untouched(tmp_path, version):
    """A store whose user_version a tool set back used to re-run its migrations and fail on SQLite's
    "duplicate column name" (or, set to 0, was called a foreign file); now it is refused, naming both counts,
    and the file is left as it was."""
    path = tmp_path / "runs.sqlite3"
    SqliteRunStore(path).close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {version}")
    before = path.read_bytes()
    with pytest.raises(StoreCorruptError, match=f"records {SCHEMA_VERSION} migration.*user_version says {version}"):
        SqliteRunStore(path)
    assert path.read_bytes() == before


def test_a_wal_grown_behind_a_reader_is_cut_back_once_the_reader_is_gone(tmp_path):
    """A prober's find: a reader holding an old snapshot (an open sqlite3 shell) let the WAL grow to 857 MB
    over 3,000 mails, and it kept that size until serve stopped. It grows still (SQLite cannot reuse what a
    reader may need), but is cut back to WAL_SIZE_LIMIT when it is next reused, and the store reports its size."""
    store = SqliteRunStore(tmp_path / "runs.sqlite3")
    try:
        with closing(sqlite3.connect(tmp_path / "runs.sqlite3", isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM runs").fetchone()  # holds its snapshot until COMMIT
            while store.wal_bytes() <= WAL_SIZE_LIMIT:
                for _ in range(200):
                    store.create_run("wf", {"pad": "x" * 2000})
            reader.execute("COMMIT")
        for _ in range(3):  # the first commit's checkpoint copies the rest in; the next write reuses the WAL
            store.create_run("wf", {})
        assert store.wal_bytes() <= WAL_SIZE_LIMIT
    finally:
        store.close()


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


def test_stores_opened_at_once_on_a_fresh_file_all_open(tmp_path):
    """Several openers switching a new file to WAL at once: SQLite refuses all but one without waiting (its
    deadlock rule skips the busy handler); the others must try again, not fail serve's start."""
    failures = []
    for round_ in range(40):
        path = tmp_path / f"fresh-{round_}.sqlite3"
        failures += at_once(lambda path=path: SqliteRunStore(path).close(), 8)[1]
    assert failures == []
