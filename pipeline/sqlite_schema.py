"""The run store's SQLite schema as named migrations (``PRAGMA user_version`` counts those applied).

Kept apart from ``sqlite_store`` so the store reads as behaviour; a new migration is appended, never edited.
"""

from __future__ import annotations

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
]
SCHEMA_VERSION = len(MIGRATIONS)
