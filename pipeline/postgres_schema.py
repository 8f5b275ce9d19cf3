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

from .errors import SchemaTooNewError, StoreError

MIGRATION_LOCK = 0x7069_7065_6C69_6E65 & 0x7FFF_FFFF_FFFF_FFFF  # "pipeline": one advisory lock key per database
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
