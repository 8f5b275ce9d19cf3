"""The run store's SQLite schema as named migrations (``PRAGMA user_version`` counts those applied), and
how they are applied: under the write lock, all pending ones in one transaction, after refusing a file
that is not one of our stores or was written by a newer pipeline.

Kept apart from ``sqlite_store`` so the store reads as behaviour; a new migration is appended, never edited.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from .errors import SchemaTooNewError, StoreError

log = logging.getLogger(__name__)

_OLD_RUN_COLUMNS = ("run_id, workflow, state, dedup_key, payload, queued_at, started_at, ended_at, heartbeat_at, "
                    "owner, reason")


def _basename(path_sql: str) -> str:
    """SQL for the last '/'-separated component of ``path_sql`` (SQLite has no basename()).

    rtrim() strips every character that is not '/' from the right, leaving the directory part;
    substr() then takes what follows it. A path without '/' is its own name; NULL stays NULL.
    """
    return f"substr({path_sql}, length(rtrim({path_sql}, replace({path_sql}, '/', ''))) + 1)"


# Named migrations, applied in order; PRAGMA user_version counts those applied.
MIGRATIONS: list[tuple[str, list[str]]] = [
    ("create runs, task_runs and task_events", [
        """CREATE TABLE runs (
            run_id INTEGER PRIMARY KEY,
            workflow TEXT NOT NULL,
            state TEXT NOT NULL,
            dedup_key TEXT,
            payload TEXT NOT NULL DEFAULT '{}',
            queued_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            heartbeat_at REAL,
            owner TEXT,
            reason TEXT,
            UNIQUE (workflow, dedup_key))""",
        """CREATE TABLE task_runs (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs (run_id),
            task_id TEXT NOT NULL,
            state TEXT NOT NULL,
            try_number INTEGER NOT NULL DEFAULT 0,
            queued_at REAL,
            started_at REAL,
            ended_at REAL,
            error_type TEXT,
            error_message TEXT,
            output TEXT,
            UNIQUE (run_id, task_id))""",
        """CREATE TABLE task_events (
            run_id INTEGER NOT NULL,
            task_id TEXT NOT NULL,
            try_number INTEGER NOT NULL,
            state TEXT NOT NULL,
            at REAL NOT NULL)""",
    ]),
    ("indexes for the canonical queries", [
        # latest runs of a workflow, keyset-paginated on run_id (rowid rides along)
        "CREATE INDEX runs_by_workflow ON runs (workflow)",
        # list by state, FIFO claim of queued runs, count by state (covering)
        "CREATE INDEX runs_by_state ON runs (state)",
        # list and count within one workflow by state (covering)
        "CREATE INDEX runs_by_workflow_state ON runs (workflow, state)",
        # recovery: running runs with an old heartbeat
        "CREATE INDEX runs_running_heartbeat ON runs (heartbeat_at) WHERE state = 'running'",
        # purge: finished runs by end time
        "CREATE INDEX runs_by_ended ON runs (ended_at) WHERE ended_at IS NOT NULL",
        # duration percentiles over a time window (covering)
        "CREATE INDEX task_runs_success_window ON task_runs (ended_at, task_id, started_at) WHERE state = 'success'",
        "CREATE INDEX task_events_by_run ON task_events (run_id)",
    ]),
    ("run_counts kept by triggers", [
        # count-by-state over millions of runs is an index scan (~50 ms at 1M); a counter table is O(states)
        """CREATE TABLE run_counts (workflow TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,
            PRIMARY KEY (workflow, state)) WITHOUT ROWID""",
        "INSERT INTO run_counts SELECT workflow, state, count(*) FROM runs GROUP BY workflow, state",
        """CREATE TRIGGER runs_count_insert AFTER INSERT ON runs BEGIN
            INSERT INTO run_counts VALUES (NEW.workflow, NEW.state, 1)
            ON CONFLICT (workflow, state) DO UPDATE SET n = n + 1; END""",
        """CREATE TRIGGER runs_count_update AFTER UPDATE OF state ON runs WHEN OLD.state IS NOT NEW.state BEGIN
            UPDATE run_counts SET n = n - 1 WHERE workflow = OLD.workflow AND state = OLD.state;
            INSERT INTO run_counts VALUES (NEW.workflow, NEW.state, 1)
            ON CONFLICT (workflow, state) DO UPDATE SET n = n + 1; END""",
        """CREATE TRIGGER runs_count_delete AFTER DELETE ON runs BEGIN
            UPDATE run_counts SET n = n - 1 WHERE workflow = OLD.workflow AND state = OLD.state; END""",
    ]),
    ("task events keep why a try failed", [
        # a retried task that then succeeds overwrites its task_runs error; the event history keeps it
        "ALTER TABLE task_events ADD COLUMN error_type TEXT",
    ]),
    ("run ids are never reused; spool file names indexed; spool tombstones", [
        # Issue 11: INTEGER PRIMARY KEY hands out max(run_id) + 1, so purging the newest runs gave their ids to
        # the next mails. AUTOINCREMENT needs a rebuilt table (SQLite's 12-step ALTER recipe, inside this
        # migration's transaction); its indexes and triggers die with the old table and are re-created below.
        # spool_name is the last path component of payload "spool" (relative or absolute path alike), so
        # reconciliation and purge find a spool file's runs by name with one index lookup.
        f"""CREATE TABLE runs_new (
            run_id INTEGER PRIMARY KEY AUTOINCREMENT,
            workflow TEXT NOT NULL,
            state TEXT NOT NULL,
            dedup_key TEXT,
            payload TEXT NOT NULL DEFAULT '{{}}',
            queued_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            heartbeat_at REAL,
            owner TEXT,
            reason TEXT,
            spool_name TEXT GENERATED ALWAYS AS ({_basename("json_extract(payload, '$.spool')")}) VIRTUAL,
            UNIQUE (workflow, dedup_key))""",
        # explicit ids: sqlite_sequence starts at the highest id kept (ids purged earlier cannot be known)
        f"INSERT INTO runs_new ({_OLD_RUN_COLUMNS}) SELECT {_OLD_RUN_COLUMNS} FROM runs",
        "DROP TABLE runs",
        "ALTER TABLE runs_new RENAME TO runs",
        # the same indexes and triggers as migrations 2 and 3 made on the old table
        "CREATE INDEX runs_by_workflow ON runs (workflow)",
        "CREATE INDEX runs_by_state ON runs (state)",
        "CREATE INDEX runs_by_workflow_state ON runs (workflow, state)",
        "CREATE INDEX runs_running_heartbeat ON runs (heartbeat_at) WHERE state = 'running'",
        "CREATE INDEX runs_by_ended ON runs (ended_at) WHERE ended_at IS NOT NULL",
        """CREATE TRIGGER runs_count_insert AFTER INSERT ON runs BEGIN
            INSERT INTO run_counts VALUES (NEW.workflow, NEW.state, 1)
            ON CONFLICT (workflow, state) DO UPDATE SET n = n + 1; END""",
        """CREATE TRIGGER runs_count_update AFTER UPDATE OF state ON runs WHEN OLD.state IS NOT NEW.state BEGIN
            UPDATE run_counts SET n = n - 1 WHERE workflow = OLD.workflow AND state = OLD.state;
            INSERT INTO run_counts VALUES (NEW.workflow, NEW.state, 1)
            ON CONFLICT (workflow, state) DO UPDATE SET n = n + 1; END""",
        """CREATE TRIGGER runs_count_delete AFTER DELETE ON runs BEGIN
            UPDATE run_counts SET n = n - 1 WHERE workflow = OLD.workflow AND state = OLD.state; END""",
        # new: a spool file's runs by its name (reconciliation, purge)
        "CREATE INDEX runs_by_spool_name ON runs (spool_name) WHERE spool_name IS NOT NULL",
        # spool files purge dropped (committed before the file is deleted), so that reconciliation never
        # takes a purged message for a lost one; a row goes once its file is gone
        "CREATE TABLE spool_tombstones (name TEXT PRIMARY KEY, dropped_at REAL NOT NULL) WITHOUT ROWID",
    ]),
]
SCHEMA_VERSION = len(MIGRATIONS)
SPOOL_TOMBSTONES_VERSION = 5  # from this migration on, purge leaves a tombstone for every spool file it drops


def refuse_foreign(conn: sqlite3.Connection, path: Path) -> None:
    """Raise unless the file is empty or one of our stores (one snapshot: both reads agree)."""
    nested = conn.in_transaction
    if not nested:
        conn.execute("BEGIN")
    try:
        foreign = conn.execute("SELECT count(*) FROM sqlite_master WHERE name != 'schema_migrations'").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except BaseException:
        if not nested:
            rollback(conn)
        raise
    if not nested:
        conn.execute("COMMIT")
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(path, version, SCHEMA_VERSION)
    if version == 0 and foreign:
        raise StoreError(f"{path}: a SQLite file with other tables, not a run store; refusing to touch it")


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply missing migrations under the write lock, so concurrent openers migrate once."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        refuse_foreign(conn, path)  # again under the lock: another process may have migrated meanwhile
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                     "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
        for number, (name, statements) in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (number, name, time.time()))
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction, if one is open, so the connection stays usable."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:  # the original error is the one worth raising
        log.warning("rollback failed: %s", exc)
