"""SqliteRunStore: the embedded default DAGRunStore.

One connection per store object, shared by the process's threads behind a
lock: SQLite has one writer at a time anyway, and serialising in-process means
our own threads never see "database is locked". Other processes (the CLI
reading while ``serve`` writes) are handled by WAL and the busy timeout.
Every read-then-write runs in ``BEGIN IMMEDIATE`` so it takes the write lock
up front: a deferred transaction that upgrades can fail with
SQLITE_BUSY_SNAPSHOT, which busy_timeout does not retry.

Every ``sqlite3.Error`` is translated at this class's edge into the StoreError
tree (``store_error``), so callers never see a raw driver exception. Terminal
states are final: the UPDATEs that end or requeue runs and tasks carry the
state they expect in their WHERE clause (compare-and-set), so a late write
(a task's RUNNING after its timeout FAILED) changes nothing. Given an owner,
they also carry ``owner = ?``: a process whose run was taken over changes nothing.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import store as s
from .config import StoreConfig
from .errors import (
    NotADatabaseError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreIOError,
    UnknownRunError,
)
from .sqlite_schema import SPOOL_TOMBSTONES_VERSION, migrate, refuse_foreign
from .sqlite_schema import rollback as _rollback
from .store import DAGRunStore, Run, TaskRun, Transition

log = logging.getLogger(__name__)

_RUN_COLUMNS = ("run_id, workflow, state, dedup_key, payload, queued_at, started_at, ended_at, heartbeat_at, owner, "
                "reason")
_TASK_COLUMNS = "run_id, task_id, state, try_number, queued_at, started_at, ended_at, error_type, error_message, output"
# named columns: task_events grew error_type in a later migration
_EVENT = "INSERT INTO task_events (run_id, task_id, try_number, state, at"
_MAPPED_SUFFIX = re.compile(r"\[\d+\]$")
_FINAL_TASK = "state NOT IN ('success', 'failed', 'upstream_failed')"
# (error class, SQLite primary result codes, words of SQLite's message, hint): the first match wins.
_TRANSLATIONS: list[tuple[type[StoreError], set[int], tuple[str, ...], str]] = [
    (StoreBusyError, {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}, ("locked", "busy"),
     " (another process held it past the busy timeout; try again)"),
    (StoreCorruptError, {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}, ("malformed", "disk image", "not a database"),
     " (the file is damaged; restore it from a backup)"),
    (StoreIOError, {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN},
     ("is full", "readonly", "disk i/o", "unable to open"), ""),
]


def store_error(path: object, exc: sqlite3.Error) -> StoreError:
    """Return the StoreError subclass for a raw SQLite error: one line naming the store and SQLite's text."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None  # extended codes (SQLITE_IOERR_WRITE) keep the low byte
    text = " ".join(str(exc).split()) or type(exc).__name__
    for cls, codes, words, hint in _TRANSLATIONS:
        if primary in codes or any(word in text.lower() for word in words):
            return cls(f"{path}: {text}{hint}")
    return StoreError(f"{path}: {text}")


class SqliteRunStore(DAGRunStore):
    """DAGRunStore in one SQLite file (WAL by default)."""

    def __init__(self, config: StoreConfig | Path | str | None = None, *, create: bool = True) -> None:
        if config is None:
            config = StoreConfig()
        self.config = config if isinstance(config, StoreConfig) else StoreConfig(path=Path(config))
        self.config.validate()
        self.path = Path(self.config.path)
        if not create and not self.path.exists():
            raise StoreError(f"{self.path}: no run store here (nothing has run yet?)")
        self._lock = threading.RLock()
        self._conn = self._connect()

    # -- connection and transactions ---------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the data dir is a file, read-only, on a full disk ...
            raise StoreIOError(f"{self.path}: cannot create the run store's directory: {exc}") from exc
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.config.busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout_ms)}")
            refuse_foreign(conn, self.path)  # before any pragma that writes to the file
            if self.config.wal:
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
            migrate(conn, self.path)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                # at open, "not a database" means a foreign file, not a damaged store: refuse it untouched
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                    raise NotADatabaseError(self.path) from exc
                raise store_error(self.path, exc) from exc
            raise
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Run a write transaction: BEGIN IMMEDIATE, then COMMIT or ROLLBACK; raise StoreError.

        A failed COMMIT (disk full, deferred constraint) leaves the transaction
        open, so it is rolled back too: the connection stays usable.
        """
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    _rollback(self._conn)
                    raise
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from exc

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one query and return its rows; raise StoreError."""
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from exc

    def close(self) -> None:
        """Close the connection (a second close does nothing)."""
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from exc

    # -- runs -----------------------------------------------------------------

    def create_run(self, workflow: str, payload: Mapping[str, Any], dedup_key: str | None = None,
                   now: float | None = None) -> tuple[Run, bool]:
        return self.create_runs([(workflow, payload, dedup_key)], now)[0]

    def create_runs(self, items: Iterable[tuple[str, Mapping[str, Any], str | None]],
                    now: float | None = None) -> list[tuple[Run, bool]]:
        now = time.time() if now is None else now
        results = []
        with self._tx() as conn:
            for workflow, payload, dedup_key in items:
                # look first: with AUTOINCREMENT an INSERT that hits the key still burns an id (a gap per duplicate)
                row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE workflow = ? AND dedup_key = ?",
                                   (workflow, dedup_key)).fetchone() if dedup_key is not None else None
                if row is not None:
                    results.append((_run(row), False))
                    continue
                cur = conn.execute("INSERT INTO runs (workflow, state, dedup_key, payload, queued_at) "
                                   "VALUES (?, 'queued', ?, ?, ?)", (workflow, dedup_key, json.dumps(payload), now))
                results.append((Run(cur.lastrowid or 0, workflow, s.QUEUED, dedup_key, dict(payload), now), True))
        return results

    def get_run(self, run_id: int) -> Run:
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise UnknownRunError(run_id)
        return _run(rows[0])

    def find_run(self, workflow: str, dedup_key: str) -> Run | None:
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE workflow = ? AND dedup_key = ?",
                          (workflow, dedup_key))
        return _run(rows[0]) if rows else None

    def list_runs(self, workflow: str | None = None, state: str | None = None, limit: int = 50,
                  before_run_id: int | None = None) -> list[Run]:
        where, params = _filters(workflow=workflow, state=state)
        if before_run_id is not None:
            where.append("run_id < ?")
            params.append(before_run_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs {clause} ORDER BY run_id DESC LIMIT ?",
                          [*params, limit])
        return [_run(r) for r in rows]

    def count_runs_by_state(self, workflow: str | None = None) -> dict[str, int]:
        where, params = _filters(workflow=workflow)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return dict(self._read(f"SELECT state, sum(n) FROM run_counts {clause} GROUP BY state HAVING sum(n) > 0",
                               params))

    def stale_runs(self, heartbeat_before: float) -> list[Run]:
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE state = 'running' "
                          "AND (heartbeat_at < ? OR heartbeat_at IS NULL) ORDER BY run_id", (heartbeat_before,))
        return [_run(r) for r in rows]

    def claim_next_run(self, owner: str, now: float | None = None) -> Run | None:
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE state = 'queued' "
                               "ORDER BY run_id LIMIT 1").fetchone()
            if row is None:
                return None
            run = _run(row)
            started = run.started_at if run.started_at is not None else now  # keep first start across requeues
            conn.execute("UPDATE runs SET state = 'running', started_at = ?, heartbeat_at = ?, owner = ? "
                         "WHERE run_id = ?", (started, now, owner, run.run_id))
        return Run(**{**run.__dict__, "state": s.RUNNING, "started_at": started, "heartbeat_at": now, "owner": owner})

    def heartbeat(self, run_ids: Iterable[int], now: float | None = None, owner: str | None = None) -> int:
        now = time.time() if now is None else now
        where, extra = _owned(owner)
        with self._tx() as conn:
            cur = conn.executemany(f"UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND {where}",
                                   [(now, r, *extra) for r in run_ids])
            return max(cur.rowcount, 0)

    def finish_run(self, run_id: int, state: str, reason: str | None = None, now: float | None = None,
                   owner: str | None = None) -> int:
        if state not in (s.SUCCESS, s.FAILED):
            raise ValueError(f"finish_run takes success or failed, not {state!r}")
        now = time.time() if now is None else now
        where, extra = _owned(owner) if owner is not None else ("state NOT IN ('success', 'failed')", ())
        with self._tx() as conn:
            cur = conn.execute(f"UPDATE runs SET state = ?, reason = ?, ended_at = ? WHERE run_id = ? AND {where}",
                               (state, reason, now, run_id, *extra))
            if cur.rowcount:
                conn.execute(_EVENT + ") VALUES (?, '', 0, ?, ?)", (run_id, state, now))
            return cur.rowcount

    def requeue_run(self, run_id: int, now: float | None = None, owner: str | None = None) -> int:
        now = time.time() if now is None else now
        with self._tx() as conn:
            return self._requeue(conn, run_id, now, owner)

    def recover_runs(self, is_dead: Callable[[Run], bool], now: float | None = None) -> list[int]:
        now = time.time() if now is None else now
        with self._tx() as conn:
            rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE state = 'running'").fetchall()
            dead = [r.run_id for r in map(_run, rows) if is_dead(r)]
            for run_id in dead:
                self._requeue(conn, run_id, now)
        return dead

    @staticmethod
    def _requeue(conn: sqlite3.Connection, run_id: int, now: float, owner: str | None = None) -> int:
        where, extra = _owned(owner)
        cur = conn.execute(f"UPDATE runs SET state = 'queued', owner = NULL, heartbeat_at = NULL "
                           f"WHERE run_id = ? AND {where}", (run_id, *extra))
        if not cur.rowcount:  # finished, queued or taken over meanwhile: a requeue must not resurrect it
            return 0
        conn.execute(_EVENT + ") SELECT run_id, task_id, try_number, 'queued', ? FROM task_runs "
                     "WHERE run_id = ? AND state IN ('running', 'retrying')", (now, run_id))
        conn.execute("UPDATE task_runs SET state = 'queued' WHERE run_id = ? AND state IN ('running', 'retrying')",
                     (run_id,))
        conn.execute(_EVENT + ") VALUES (?, '', 0, 'queued', ?)", (run_id, now))
        return 1

    # -- tasks ----------------------------------------------------------------

    def get_tasks(self, run_id: int) -> list[TaskRun]:
        rows = self._read(f"SELECT {_TASK_COLUMNS} FROM task_runs WHERE run_id = ? ORDER BY id", (run_id,))
        return [_task(r) for r in rows]

    def create_tasks(self, run_id: int, task_ids: Iterable[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        ids = list(task_ids)
        with self._tx() as conn:
            conn.executemany("INSERT INTO task_runs (run_id, task_id, state, queued_at) VALUES (?, ?, 'queued', ?) "
                             "ON CONFLICT (run_id, task_id) DO NOTHING", [(run_id, t, now) for t in ids])
            conn.executemany(_EVENT + ") VALUES (?, ?, 0, 'queued', ?)",
                             [(run_id, t, now) for t in ids])

    def record_transitions(self, transitions: Iterable[Transition], owner: str | None = None) -> int:
        owned = "" if owner is None else \
            " AND EXISTS (SELECT 1 FROM runs WHERE runs.run_id = ? AND state = 'running' AND runs.owner = ?)"
        applied = 0
        with self._tx() as conn:
            for t in transitions:
                started = t.at if t.state == s.RUNNING else None
                ended = t.at if t.state in s.TERMINAL_TASK_STATES else None
                cur = conn.execute(
                    "UPDATE task_runs SET state = ?, try_number = ?, started_at = coalesce(?, started_at), "
                    "ended_at = ?, error_type = ?, error_message = ?, output = coalesce(?, output) "
                    f"WHERE run_id = ? AND task_id = ? AND {_FINAL_TASK}{owned}",
                    (t.state, t.try_number, started, ended, t.error_type, t.error_message, t.output_json,
                     t.run_id, t.task_id, *(() if owner is None else (t.run_id, owner))))
                if cur.rowcount:  # skipped when already final: a late RUNNING must not undo a timeout
                    conn.execute(_EVENT + ", error_type) VALUES (?, ?, ?, ?, ?, ?)",
                                 (t.run_id, t.task_id, t.try_number, t.state, t.at, t.error_type))
                    applied += 1
        return applied

    def task_duration_percentiles(self, since: float, until: float | None = None) -> dict[str, dict[str, float]]:
        until = time.time() if until is None else until
        rows = self._read("SELECT task_id, ended_at - started_at FROM task_runs INDEXED BY task_runs_success_window "
                          "WHERE state = 'success' AND ended_at >= ? AND ended_at < ?", (since, until))
        by_instance: dict[str, list[float]] = {}
        for task_id, duration in rows:
            by_instance.setdefault(task_id, []).append(duration)
        groups: dict[str, list[float]] = {}
        for task_id, durations in by_instance.items():  # strip "[n]" once per instance id, not per row
            groups.setdefault(_MAPPED_SUFFIX.sub("", task_id), []).extend(durations)
        return {task: _percentiles(values) for task, values in sorted(groups.items())}

    # -- purge and the spool files of runs ---------------------------------------

    def purge_batches(self, older_than: float, batch_size: int = 1000) -> Iterator[s.PurgedBatch]:
        while True:
            with self._tx() as conn:
                ids = [r[0] for r in conn.execute(
                    "SELECT run_id FROM runs WHERE ended_at < ? AND state IN ('success', 'failed') LIMIT ?",
                    (older_than, batch_size))]
                if not ids:
                    return
                marks = ",".join("?" * len(ids))
                names = {r[0] for r in conn.execute(
                    f"SELECT DISTINCT spool_name FROM runs WHERE run_id IN ({marks}) AND spool_name IS NOT NULL", ids)}
                conn.execute(f"DELETE FROM task_events WHERE run_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM task_runs WHERE run_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM runs WHERE run_id IN ({marks})", ids)
                dropped = sorted(names - _in_use(conn, names))
                conn.executemany("INSERT INTO spool_tombstones VALUES (?, ?) "
                                 "ON CONFLICT (name) DO UPDATE SET dropped_at = excluded.dropped_at",
                                 [(name, time.time()) for name in dropped])
            yield s.PurgedBatch(tuple(ids), tuple(dropped))  # after the commit: the caller deletes files now

    def spool_names_in_use(self, names: Iterable[str]) -> set[str]:
        with self._lock:
            try:
                return _in_use(self._conn, set(names))
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from exc

    def spool_names_known(self, names: Iterable[str]) -> set[str]:
        wanted = set(names)
        if not wanted:
            return set()
        marks = ",".join("?" * len(wanted))
        rows = self._read(f"SELECT spool_name FROM runs WHERE spool_name IN ({marks}) "
                          f"UNION SELECT name FROM spool_tombstones WHERE name IN ({marks})", [*wanted, *wanted])
        return {r[0] for r in rows}

    def list_spool_tombstones(self, after: str = "", limit: int = 1000) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM spool_tombstones WHERE name > ? ORDER BY name LIMIT ?",
                                         (after, limit))]

    def drop_spool_tombstones(self, names: Iterable[str]) -> int:
        with self._tx() as conn:
            cur = conn.executemany("DELETE FROM spool_tombstones WHERE name = ?", [(n,) for n in set(names)])
            return max(cur.rowcount, 0)

    def spool_tracked_since(self) -> float:
        rows = self._read("SELECT applied_at FROM schema_migrations WHERE version = ?", (SPOOL_TOMBSTONES_VERSION,))
        return float(rows[0][0])


def _in_use(conn: sqlite3.Connection, names: set[str]) -> set[str]:
    """Those of ``names`` some run names (the caller holds the lock, or a transaction)."""
    if not names:
        return set()
    marks = ",".join("?" * len(names))
    return {r[0] for r in conn.execute(f"SELECT DISTINCT spool_name FROM runs WHERE spool_name IN ({marks})",
                                       list(names))}


def _owned(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """WHERE condition (and its parameters) for a run that is running, under ``owner`` when given."""
    return ("state = 'running'", ()) if owner is None else ("state = 'running' AND owner = ?", (owner,))


def _filters(**columns: Any) -> tuple[list[str], list[Any]]:
    present = {k: v for k, v in columns.items() if v is not None}
    return [f"{k} = ?" for k in present], list(present.values())


def _run(row: tuple[Any, ...]) -> Run:
    return Run(row[0], row[1], row[2], row[3], json.loads(row[4]), *row[5:])


def _task(row: tuple[Any, ...]) -> TaskRun:
    output = json.loads(row[9]) if row[9] is not None else None
    return TaskRun(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], output)


def _percentiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"n": 1, "p50": values[0], "p95": values[0]}
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"n": len(values), "p50": statistics.median(values), "p95": cuts[18]}
