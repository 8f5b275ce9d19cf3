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

from .duration_bins import bin_sql, binned_measures, hour_sql, value_sql
from .errors import SchemaTooNewError, StoreCorruptError, StoreError

log = logging.getLogger(__name__)

_OLD_RUN_COLUMNS = ("run_id, workflow, state, dedup_key, payload, queued_at, started_at, ended_at, heartbeat_at, "
                    "owner, reason")


def _basename(path_sql: str) -> str:
    """SQL for the last '/'-separated component of ``path_sql`` (SQLite has no basename()).

    rtrim() strips every character that is not '/' from the right, leaving the directory part;
    substr() then takes what follows it. A path without '/' is its own name; NULL stays NULL.
    """
    return f"substr({path_sql}, length(rtrim({path_sql}, replace({path_sql}, '/', ''))) + 1)"


def task_name_sql(task_id: str) -> str:
    """SQL for the task of an instance id (``ingest_pdf[3]`` -> ``ingest_pdf``; DAG task ids hold no '[')."""
    cut = f"instr({task_id}, '[')"
    return f"CASE WHEN {cut} > 0 THEN substr({task_id}, 1, {cut} - 1) ELSE {task_id} END"


def _binned(row: str) -> str:
    """Trigger condition: the task instance ``row`` (NEW or OLD) is a successful try with a duration."""
    return f"{row}.state = 'success' AND {row}.started_at IS NOT NULL AND {row}.ended_at IS NOT NULL"


def _key(row: str, measure: str, value: str) -> str:
    """measure, hour, task and bin of ``row``'s try, as the key columns of task_duration_bins."""
    return f"{measure}, {hour_sql(f'{row}.ended_at')}, {task_name_sql(f'{row}.task_id')}, {bin_sql(value)}"


def _count_new() -> str:
    """Trigger statements counting NEW's try in its bins (``duration_bins.binned_measures``)."""
    return " ".join(
        f"INSERT INTO task_duration_bins SELECT {_key('NEW', measure, value)}, 1, {value}, {value} WHERE {when} "
        "ON CONFLICT (measure, hour, task, bin) DO UPDATE SET n = n + 1, lo = min(lo, excluded.lo), "
        "hi = max(hi, excluded.hi);" for measure, value, when in binned_measures("NEW"))


def _uncount_old() -> str:
    """Trigger statements uncounting OLD's try; an emptied bin goes (the extremes of one a purge thinned
    stay as they were: inside the bin, so the error bound holds)."""
    return " ".join(
        f"UPDATE task_duration_bins SET n = n - 1 WHERE {when} AND (measure, hour, task, bin) = "
        f"({_key('OLD', measure, value)}); DELETE FROM task_duration_bins WHERE {when} AND "
        f"(measure, hour, task, bin) = ({_key('OLD', measure, value)}) AND n <= 0;"
        for measure, value, when in binned_measures("OLD"))


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
    ("task instances record their wait for a worker; duration histograms per task and hour", [
        # issue 14: of a try's duration, the seconds it waited for a shared extraction worker
        "ALTER TABLE task_runs ADD COLUMN wait_s REAL NOT NULL DEFAULT 0",
        # issue 16: the partial hours at a window's edges are read from this index, run times too
        "DROP INDEX task_runs_success_window",
        "CREATE INDEX task_runs_success_window ON task_runs (ended_at, task_id, started_at, wait_s) "
        "WHERE state = 'success'",
        # the whole hours from these rows (see pipeline.duration_bins)
        """CREATE TABLE task_duration_bins (
            measure INTEGER NOT NULL,  -- 0: tries that did not wait; 1, 2: durations, run times of those that did
            hour INTEGER NOT NULL,  -- of the try's end, counted from the epoch
            task TEXT NOT NULL,  -- instances of a mapped task count as their task
            bin INTEGER NOT NULL,
            n INTEGER NOT NULL,
            lo REAL NOT NULL,  -- the smallest and largest value counted here
            hi REAL NOT NULL,
            PRIMARY KEY (measure, hour, task, bin)) WITHOUT ROWID""",
        # every wait_s is 0 yet (its column is new): all tries are in measure 0
        f"""INSERT INTO task_duration_bins SELECT 0, {hour_sql('ended_at')}, {task_name_sql('task_id')},
            {bin_sql(value_sql(False))}, count(*), min({value_sql(False)}), max({value_sql(False)}) FROM task_runs
            WHERE state = 'success' AND started_at IS NOT NULL AND ended_at IS NOT NULL GROUP BY 2, 3, 4""",
        f"CREATE TRIGGER task_bins_insert AFTER INSERT ON task_runs WHEN {_binned('NEW')} BEGIN {_count_new()} END",
        # an update that makes a try successful counts it (the usual way in); one that changes a counted try
        # (none does today: success is final) uncounts it first
        f"CREATE TRIGGER task_bins_update_old AFTER UPDATE OF state, task_id, started_at, ended_at, wait_s "
        f"ON task_runs WHEN {_binned('OLD')} BEGIN {_uncount_old()} END",
        f"CREATE TRIGGER task_bins_update_new AFTER UPDATE OF state, task_id, started_at, ended_at, wait_s "
        f"ON task_runs WHEN {_binned('NEW')} BEGIN {_count_new()} END",
        f"CREATE TRIGGER task_bins_delete AFTER DELETE ON task_runs WHEN {_binned('OLD')} BEGIN {_uncount_old()} END",
    ]),
    ("digests counted per address", [
        # [delivery] max_digests_per_hour, shared by every process on the store and kept over restarts
        """CREATE TABLE digest_reservations (address TEXT NOT NULL, digest TEXT NOT NULL, at REAL NOT NULL,
            PRIMARY KEY (address, digest)) WITHOUT ROWID""",
        "CREATE INDEX digest_reservations_by_at ON digest_reservations (at)",
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
        if conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'schema_migrations'").fetchone()[0]:
            refuse_rewound(conn, path, version)  # our store, its user_version set back to 0
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
        refuse_rewound(conn, path, version)
        for number, (name, statements) in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (number, name, time.time()))
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def refuse_rewound(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Raise if the store records more migrations than its ``user_version`` says (a tool set it back, or the
    file was stitched from two copies): applying them again would fail half-way on SQLite's "duplicate
    column name", which names neither the cause nor the fix."""
    applied = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
    if applied > version:
        raise StoreCorruptError(f"{path}: its schema_migrations table records {applied} migration(s) applied but "
                                f"PRAGMA user_version says {version}: the file was changed by hand or restored "
                                "from mixed copies; restore it from a backup (or set user_version back to "
                                f"{applied} if only that was changed)")


def rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction, if one is open, so the connection stays usable."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:  # the original error is the one worth raising
        log.warning("rollback failed: %s", exc)
