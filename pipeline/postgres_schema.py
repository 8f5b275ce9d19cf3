"""The run store's PostgreSQL schema as named migrations, and how they are applied.

Applied in one transaction under a transaction-scoped advisory lock, so that
several processes opening a new database at once (three gateways starting)
migrate it once; a schema newer than this pipeline knows is refused, and so is
a database that already holds other tables. A new migration is appended, never
edited. The SQLite schema (``sqlite_schema``) has the same tables and meaning.
"""

from __future__ import annotations

import time
from typing import Any

from .duration_bins import bin_sql, binned_measures, hour_sql
from .errors import SchemaTooNewError, StoreError

MIGRATION_LOCK = 0x7069_7065_6C69_6E65 & 0x7FFF_FFFF_FFFF_FFFF  # "pipeline": one advisory lock key per database
DIGEST_LOCK_SPACE = 0x6469_6765  # "dige": first key of the advisory locks that serialise one address's digests
COUNTER_SLOTS = 16  # run_counts rows per (workflow, state): concurrent writers rarely share one (see below)

# The counter row a transaction adds to: its backend pid picks one of COUNTER_SLOTS rows, so gateways
# inserting runs at once do not all queue behind a single hot row (each INSERT would hold its lock until
# COMMIT, serialising every gateway's commit). Counts sum the slots: O(workflows x states x slots) rows.
_BUMP = f"""CREATE FUNCTION run_counts_bump(deltas run_count_delta[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO run_counts (workflow, state, slot, n)
    SELECT d.workflow, d.state, pg_backend_pid() % {COUNTER_SLOTS}, sum(d.n) FROM unnest(deltas) AS d
    GROUP BY d.workflow, d.state HAVING sum(d.n) <> 0
    ORDER BY d.workflow, d.state  -- one lock order for every writer: no deadlock between two slots' writers
    ON CONFLICT (workflow, state, slot) DO UPDATE SET n = run_counts.n + excluded.n $$"""

_ROW_TRIGGER = """CREATE FUNCTION run_counts_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM run_counts_bump(ARRAY[(NEW.workflow, NEW.state, 1)::run_count_delta]);
    ELSE
        PERFORM run_counts_bump(ARRAY[(OLD.workflow, OLD.state, -1)::run_count_delta,
                                      (NEW.workflow, NEW.state, 1)::run_count_delta]);
    END IF;
    RETURN NULL; END $$"""

# purge deletes a thousand runs a statement: one grouped upsert per statement, not a thousand
_DELETE_TRIGGER = """CREATE FUNCTION run_counts_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    PERFORM run_counts_bump(ARRAY(SELECT (workflow, state, -1)::run_count_delta FROM gone));
    RETURN NULL; END $$"""

# A multi-row INSERT counted a row at a time updated one counter row once per inserted row, in one
# transaction: each update must step over all the versions before it, so 20k rows took 6.5 s. Counted
# once per statement from the transition table, like the delete side: 0.76 s; one-run inserts (the
# gateway's) measured the same either way.
_INSERT_TRIGGER = """CREATE FUNCTION run_counts_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    PERFORM run_counts_bump(ARRAY(SELECT (workflow, state, 1)::run_count_delta FROM born));
    RETURN NULL; END $$"""


def task_name_sql(task_id: str) -> str:
    """SQL for the task of an instance id (``ingest_pdf[3]`` -> ``ingest_pdf``; DAG task ids hold no '[')."""
    return f"split_part({task_id}, '[', 1)"


def _measures(row: str = "") -> str:
    """FROM item ``m (measure, v)``: the histogram rows one try of ``row`` counts in (``binned_measures``)."""
    (duration_measure, duration, _), (run_measure, run_time, _) = binned_measures(row)
    return f"(VALUES ({duration_measure}, {duration}), ({run_measure}, {run_time})) AS m (measure, v)"


def _counted(row: str = "") -> str:
    """Condition on ``m``: the run-time row only for a try that waited."""
    return f"(m.measure < 2 OR {binned_measures(row)[1][2]})"


def _binned_tries(table: str) -> str:
    """SELECT of the duration-histogram rows (measure, hour, task, bin, n, lo, hi) the successful tries in
    ``table`` make."""
    return (f"SELECT m.measure, {hour_sql('ended_at')} AS hour, {task_name_sql('task_id')} AS task, "
            f"{bin_sql('m.v')} AS bin, count(*) AS n, min(m.v) AS lo, max(m.v) AS hi FROM {table}, "
            f"LATERAL {_measures()} WHERE state = 'success' AND started_at IS NOT NULL AND ended_at IS NOT NULL "
            f"AND {_counted()} GROUP BY 1, 2, 3, 4")


# rebuilt from task_runs: by the migration, and after a bulk load that ran with triggers off (the audit's fill)
REBUILD_DURATION_BINS = ["TRUNCATE task_duration_bins", "INSERT INTO task_duration_bins " + _binned_tries("task_runs")]

# One try in or out of its bins, in plpgsql (its statements' plans are cached; a SQL function's are not):
# an emptied bin goes.
_ROW_BINS = f"""CREATE FUNCTION task_duration_bins_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    IF TG_OP = 'UPDATE' AND OLD.state = 'success' AND OLD.started_at IS NOT NULL AND OLD.ended_at IS NOT NULL THEN
        UPDATE task_duration_bins b SET n = b.n - 1 FROM {_measures('OLD')} WHERE {_counted('OLD')}
        AND (b.measure, b.hour, b.task, b.bin) =
            (m.measure, {hour_sql('OLD.ended_at')}, {task_name_sql('OLD.task_id')}, {bin_sql('m.v')});
        DELETE FROM task_duration_bins WHERE n <= 0 AND measure IN (0, 1, 2)
        AND hour = {hour_sql('OLD.ended_at')} AND task = {task_name_sql('OLD.task_id')};
    END IF;
    IF NEW.state = 'success' AND NEW.started_at IS NOT NULL AND NEW.ended_at IS NOT NULL THEN
        INSERT INTO task_duration_bins AS b
        SELECT m.measure, {hour_sql('NEW.ended_at')}, {task_name_sql('NEW.task_id')}, {bin_sql('m.v')}, 1, m.v, m.v
        FROM {_measures('NEW')} WHERE {_counted('NEW')}
        ON CONFLICT (measure, hour, task, bin) DO UPDATE SET n = b.n + 1,
            lo = least(b.lo, excluded.lo), hi = greatest(b.hi, excluded.hi);
    END IF;
    RETURN NULL; END $$"""

# purge deletes thousands of tries a statement: one grouped update per statement
_DELETE_BINS = f"""CREATE FUNCTION task_duration_bins_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    UPDATE task_duration_bins b SET n = b.n - g.n FROM ({_binned_tries("gone")}) AS g
    WHERE (b.measure, b.hour, b.task, b.bin) = (g.measure, g.hour, g.task, g.bin);
    DELETE FROM task_duration_bins b USING ({_binned_tries("gone")}) AS g
    WHERE (b.measure, b.hour, b.task, b.bin) = (g.measure, g.hour, g.task, g.bin) AND b.n <= 0;
    RETURN NULL; END $$"""

# Named migrations, applied in order; schema_migrations has one row per migration applied.
MIGRATIONS: list[tuple[str, list[str]]] = [
    ("create runs, task_runs, task_events, run_counts and spool_tombstones", [
        # run ids come from an identity (a sequence): never handed out twice, purged runs' included.
        # spool_name is the last path component of payload "spool", kept by PostgreSQL itself.
        """CREATE TABLE runs (
            run_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            workflow text NOT NULL,
            state text NOT NULL,
            dedup_key text,
            payload text NOT NULL DEFAULT '{}',
            queued_at double precision NOT NULL,
            started_at double precision,
            ended_at double precision,
            heartbeat_at double precision,
            owner text,
            reason text,
            spool_name text GENERATED ALWAYS AS (substring((payload::jsonb) ->> 'spool' from '[^/]*$')) STORED,
            UNIQUE (workflow, dedup_key))""",
        """CREATE TABLE task_runs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id bigint NOT NULL REFERENCES runs (run_id),
            task_id text NOT NULL,
            state text NOT NULL,
            try_number integer NOT NULL DEFAULT 0,
            queued_at double precision,
            started_at double precision,
            ended_at double precision,
            error_type text,
            error_message text,
            output text,
            UNIQUE (run_id, task_id))""",
        """CREATE TABLE task_events (
            id bigint GENERATED ALWAYS AS IDENTITY,
            run_id bigint NOT NULL,
            task_id text NOT NULL,
            try_number integer NOT NULL,
            state text NOT NULL,
            at double precision NOT NULL,
            error_type text)""",
        "CREATE TABLE spool_tombstones (name text PRIMARY KEY, dropped_at double precision NOT NULL)",
        # latest runs (of a workflow, in a state), keyset-paginated on run_id
        "CREATE INDEX runs_by_workflow ON runs (workflow, run_id)",
        "CREATE INDEX runs_by_state ON runs (state, run_id)",
        "CREATE INDEX runs_by_workflow_state ON runs (workflow, state, run_id)",
        # FIFO claim: the queue is small even when the table is large
        "CREATE INDEX runs_queued ON runs (run_id) WHERE state = 'queued'",
        "CREATE INDEX runs_running_heartbeat ON runs (heartbeat_at) WHERE state = 'running'",
        "CREATE INDEX runs_by_ended ON runs (ended_at) WHERE state IN ('success', 'failed')",
        "CREATE INDEX runs_by_spool_name ON runs (spool_name) WHERE spool_name IS NOT NULL",
        "CREATE INDEX task_runs_success_window ON task_runs (ended_at) INCLUDE (task_id, started_at) "
        "WHERE state = 'success'",
        "CREATE INDEX task_events_by_run ON task_events (run_id)",
        """CREATE TABLE run_counts (workflow text NOT NULL, state text NOT NULL, slot integer NOT NULL,
            n bigint NOT NULL, PRIMARY KEY (workflow, state, slot))""",
        "CREATE TYPE run_count_delta AS (workflow text, state text, n bigint)",
        _BUMP, _ROW_TRIGGER, _DELETE_TRIGGER,
        "CREATE TRIGGER runs_count_insert AFTER INSERT ON runs FOR EACH ROW EXECUTE FUNCTION run_counts_row()",
        # a heartbeat (most UPDATEs) does not even call the function
        "CREATE TRIGGER runs_count_update AFTER UPDATE OF state ON runs FOR EACH ROW "
        "WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION run_counts_row()",
        "CREATE TRIGGER runs_count_delete AFTER DELETE ON runs REFERENCING OLD TABLE AS gone "
        "FOR EACH STATEMENT EXECUTE FUNCTION run_counts_delete()",
    ]),
    ("count inserted runs once per statement", [
        _INSERT_TRIGGER,
        "DROP TRIGGER runs_count_insert ON runs",
        "CREATE TRIGGER runs_count_insert AFTER INSERT ON runs REFERENCING NEW TABLE AS born "
        "FOR EACH STATEMENT EXECUTE FUNCTION run_counts_insert()",
    ]),
    ("task instances record their wait for a worker; duration histograms per task and hour", [
        # issue 14: of a try's duration, the seconds it waited for a shared extraction worker
        "ALTER TABLE task_runs ADD COLUMN wait_s double precision NOT NULL DEFAULT 0",
        # issue 16: the partial hours at a window's edges are read from this index, run times too
        "DROP INDEX task_runs_success_window",
        "CREATE INDEX task_runs_success_window ON task_runs (ended_at) INCLUDE (task_id, started_at, wait_s) "
        "WHERE state = 'success'",
        # measure 0: tries that did not wait; 1 and 2: durations and run times of those that did
        """CREATE TABLE task_duration_bins (measure smallint NOT NULL, hour bigint NOT NULL, task text NOT NULL,
            bin integer NOT NULL, n bigint NOT NULL, lo double precision NOT NULL, hi double precision NOT NULL,
            PRIMARY KEY (measure, hour, task, bin))""",
        *REBUILD_DURATION_BINS,
        _ROW_BINS, _DELETE_BINS,
        # a transition that neither makes nor unmakes a success (most of them) does not call the function
        "CREATE TRIGGER task_bins_insert AFTER INSERT ON task_runs FOR EACH ROW WHEN (NEW.state = 'success') "
        "EXECUTE FUNCTION task_duration_bins_row()",
        "CREATE TRIGGER task_bins_update AFTER UPDATE OF state, task_id, started_at, ended_at, wait_s ON task_runs "
        "FOR EACH ROW WHEN (OLD.state = 'success' OR NEW.state = 'success') EXECUTE FUNCTION task_duration_bins_row()",
        "CREATE TRIGGER task_bins_delete AFTER DELETE ON task_runs REFERENCING OLD TABLE AS gone "
        "FOR EACH STATEMENT EXECUTE FUNCTION task_duration_bins_delete()",
    ]),
    ("digests counted per address", [
        # [delivery] max_digests_per_hour, shared by every process on the store and kept over restarts
        """CREATE TABLE digest_reservations (address text NOT NULL, digest text NOT NULL,
            at double precision NOT NULL, PRIMARY KEY (address, digest))""",
        "CREATE INDEX digest_reservations_by_at ON digest_reservations (at)",
    ]),
]
SCHEMA_VERSION = len(MIGRATIONS)
SPOOL_TOMBSTONES_VERSION = 1  # tombstones exist from the first migration on


def schema_version(conn: Any) -> int | None:
    """Return the highest migration applied, or None when the database has no schema_migrations table."""
    # a query on pg_tables, not to_regclass(): the latter reads the backend's catalog cache, which an advisory
    # lock does not refresh, so after waiting for another opener's migration it still saw no table
    if conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() "
                    "AND tablename = 'schema_migrations'").fetchone()[0] == 0:
        return None
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0])


def migrate(conn: Any, label: str, create: bool = True) -> None:
    """Apply missing migrations (``conn``: a psycopg connection in autocommit mode); raise StoreError.

    Raises SchemaTooNewError for a newer schema, StoreError for a database
    holding other tables, or, with ``create`` false, for one with no run store.
    """
    if schema_version(conn) == SCHEMA_VERSION:  # the common case: no lock, no write
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        version = schema_version(conn)  # again under the lock: another process may have migrated meanwhile
        if version is None:
            refuse_foreign(conn, label, create)
            conn.execute("CREATE TABLE schema_migrations "
                         "(version integer PRIMARY KEY, name text NOT NULL, applied_at double precision NOT NULL)")
            version = 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(label, version, SCHEMA_VERSION)
        for number, (name, statements) in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)", (number, name, time.time()))


def refuse_foreign(conn: Any, label: str, create: bool) -> None:
    """Raise unless the database's schema is empty and ``create`` is allowed."""
    if not create:
        raise StoreError(f"{label}: no run store here (nothing has run yet?)")
    tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone()[0]
    if tables:
        raise StoreError(f"{label}: a database with other tables, not a run store; refusing to touch it")
