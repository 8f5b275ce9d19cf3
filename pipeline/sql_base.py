"""SqlBase: the mechanics both SQL run stores share (huey's ``BaseSqlStorage``): connections and transactions.

A backend supplies how a connection is had (one behind a lock, or a pool), how
a transaction begins and rolls back, how a run is inserted and how driver
errors map onto the StoreError tree (the methods under "what a backend
supplies"), and sets the SQL knobs below. ``SqlRunStore`` (``pipeline.sql_store``)
writes the DAGRunStore contract on these, with the purge and spool-file family
of ``SqlPurge`` (``pipeline.sql_purge``).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ParamSpec, Protocol, TypeVar

from .errors import StoreBusyError, StoreError
from .store import DAGRunStore

RETRIES = 2  # extra tries of a write that lost a deadlock or a serialisation race

P = ParamSpec("P")
T = TypeVar("T")


class Connection(Protocol):
    """What the shared code uses of a connection: ``?`` placeholders; a DB-API cursor back, rows as tuples."""

    def execute(self, sql: str, params: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, params: Any, /) -> Any: ...


class TransientStoreError(StoreBusyError):
    """A write lost a deadlock or a serialisation race; it is retried, then surfaces as StoreBusyError."""


def retried(method: Callable[P, T]) -> Callable[P, T]:
    """Run a store write again (at most RETRIES more times) when it raised TransientStoreError."""
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        for _ in range(RETRIES):
            try:
                return method(*args, **kwargs)
            except TransientStoreError:
                time.sleep(0.01)
        return method(*args, **kwargs)
    return wrapper


class SqlBase(DAGRunStore):
    """Connections, transactions and the backend's SQL knobs, under the DAGRunStore contract in shared SQL."""

    BEGIN = "BEGIN"
    BEGIN_LAZY: str | None = None  # begins a transaction whose commit need not wait for the disk (None: BEGIN)
    CLAIM_LOCK = ""  # row lock a claim and a purge take on what they select (PostgreSQL: FOR UPDATE SKIP LOCKED)
    # row lock a transition's owner check takes on its run (PostgreSQL: FOR SHARE), so a requeue committed while
    # the transition waited is seen, not the statement's older snapshot (SQLite: one writer, nothing to lock)
    OWNER_LOCK = ""
    TOMBSTONES_VERSION = 1  # the migration from which purge tombstones every spool file it drops
    TASK_NAME_SQL = "task_id"  # SQL for the task of an instance id (``ingest_pdf[3]`` -> ``ingest_pdf``)
    LAST_RUN_ID_SQL = "SELECT max(run_id) FROM runs"  # the backend's own counter of ids handed out, where it has one
    WINDOW_INDEX_HINT = ""  # what follows ``FROM task_runs`` when reading a window's tries (SQLite: INDEXED BY)
    # serialises the digest reservations of one address, its parameter the address (PostgreSQL: an advisory
    # lock; SQLite's BEGIN IMMEDIATE already serialises every write transaction)
    DIGEST_LOCK = ""
    DRIVER_ERRORS: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # -- what a backend supplies ---------------------------------------------------

    def _connection(self) -> AbstractContextManager[Connection]:
        """Lend a connection for one transaction or query (raising driver errors is fine here)."""
        raise NotImplementedError

    def _store_error(self, exc: BaseException) -> StoreError:
        """Translate a driver error into the StoreError tree."""
        raise NotImplementedError

    def _rollback(self, conn: Connection) -> None:
        """End a failed transaction, if one is open, so the connection stays usable."""
        raise NotImplementedError

    def _insert_run(self, conn: Connection, workflow: str, dedup_key: str | None, payload: str,
                    now: float) -> int | None:
        """Insert a queued run; return its id, or None if ``(workflow, dedup_key)`` exists (inserted meanwhile)."""
        raise NotImplementedError

    def _queued(self, conn: Connection) -> None:
        """Tell other processes, at commit, that runs were queued (see ``watch_queue``); default: nothing."""

    # -- transactions ------------------------------------------------------------

    @contextmanager
    def _tx(self, lazy: bool = False) -> Iterator[Connection]:
        """Run a write transaction: begin, then commit or roll back; raise StoreError.

        A failed COMMIT (disk full, deferred constraint) leaves the transaction
        open, so it is rolled back too: the connection stays usable. ``lazy``
        marks writes that may be lost in a server crash (see BEGIN_LAZY).
        """
        from . import metrics  # here, not at the top: reading a store (`runs`, `show`) never loads prometheus_client

        try:
            with self._connection() as conn, metrics.STORE_TX[lazy].time():
                self._begin(conn, (self.BEGIN_LAZY or self.BEGIN) if lazy else self.BEGIN)
                try:
                    yield conn
                except BaseException:
                    self._rollback(conn)
                    raise
                self._commit(conn)
        except self.DRIVER_ERRORS as exc:
            raise self._store_error(exc) from exc

    def _commit(self, conn: Connection) -> None:
        """COMMIT; one that fails (disk full, deferred constraint) leaves the transaction open: roll it back."""
        try:
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    def _begin(self, conn: Connection, sql: str) -> None:
        """Begin a write transaction (SQLite overrides it: how it waits for the write lock)."""
        conn.execute(sql)

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one query and return its rows; raise StoreError."""
        try:
            with self._connection() as conn:
                return list(conn.execute(sql, tuple(params)).fetchall())
        except self.DRIVER_ERRORS as exc:
            raise self._store_error(exc) from exc

    # -- observation points for tools and the audit --------------------------

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read-only SQL statement, on the store's own connection (what a benchmark or a
        diagnosis needs beyond the API: plain-SQL baselines, row counts); raises StoreError."""
        return self._read(sql, params)

    def write_in_one_transaction(self, statements: Iterable[tuple[str, Mapping[str, Any] | Iterable[Any]]]) -> None:
        """Run ``(sql, params)`` statements in one write transaction (bulk generation of test data)."""
        with self._tx() as conn:
            for sql, params in statements:
                conn.execute(sql, params if isinstance(params, Mapping) else tuple(params))
