"""SqliteRunStore: the embedded default DAGRunStore.

One connection per store object, shared by the process's threads behind a
lock: SQLite has one writer at a time anyway, and serialising in-process means
our own threads never see "database is locked". Other processes (the CLI
reading while ``serve`` writes, serve's gateway and engine processes) are
handled by WAL and waiting up to the busy timeout: by trying again every
0.1-1 ms (``[store] lock_polling``, see ``_begin``) or by SQLite's busy handler.
Every read-then-write runs in ``BEGIN IMMEDIATE`` so it takes the write lock
up front: a deferred transaction that upgrades can fail with
SQLITE_BUSY_SNAPSHOT, which busy_timeout does not retry.

Every ``sqlite3.Error`` is translated at this class's edge into the StoreError
tree (``store_error``), so callers never see a raw driver exception. The
queries themselves, shared with PostgreSQL, are in ``pipeline.sql_store``.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .config import StoreConfig
from .errors import NotADatabaseError, StoreBusyError, StoreCorruptError, StoreError, StoreIOError
from .sql_store import SqlRunStore
from .sqlite_schema import SCHEMA_VERSION, SPOOL_TOMBSTONES_VERSION, migrate, refuse_foreign, task_name_sql
from .sqlite_schema import rollback as _rollback
from .wakeup import SUPPORTED as _BELL_SUPPORTED
from .wakeup import QueueBell

log = logging.getLogger(__name__)
T = TypeVar("T")
WAL_SIZE_LIMIT = 32 * 1024 * 1024  # bytes a reset WAL is cut back to (journal_size_limit)
LOCK_POLL_S = (0.0001, 0.001)  # first and longest pause between tries for the write lock (see ``_begin``)

# (error class, SQLite primary result codes, words of SQLite's message, hint): the first match wins.
_TRANSLATIONS: list[tuple[type[StoreError], set[int], tuple[str, ...], str]] = [
    (StoreBusyError, {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}, ("locked", "busy"),
     " (another process held it past the busy timeout; try again)"),
    (StoreCorruptError, {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}, ("malformed", "disk image", "not a database"),
     " (the file is damaged; restore it from a backup)"),
    (StoreIOError, {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN},
     ("is full", "readonly", "disk i/o", "unable to open"),
     " (check that this user may write the file and its directory, and that the disk has room and is mounted "
     "read-write)"),
]


def store_error(path: object, exc: sqlite3.Error) -> StoreError:
    """Return the StoreError subclass for a raw SQLite error: one line naming the store and SQLite's text."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None  # extended codes (SQLITE_IOERR_WRITE) keep the low byte
    text = " ".join(str(exc).split()) or type(exc).__name__
    for cls, codes, words, hint in _TRANSLATIONS:
        # the code when SQLite gave one: words alone would take "malformed JSON" for a damaged file
        if primary in codes if primary is not None else any(word in text.lower() for word in words):
            return cls(f"{path}: {text}{hint}")
    return StoreError(f"{path}: {text}")


def _busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused because another connection holds the lock (SQLITE_BUSY, extended codes too)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF == sqlite3.SQLITE_BUSY if isinstance(code, int) else "locked" in str(exc).lower()


def _busy_cause(exc: BaseException) -> bool:
    """Whether a StoreError was translated from SQLITE_BUSY (not SQLITE_LOCKED: that one no wait clears)."""
    return isinstance(exc, StoreBusyError) and isinstance(exc.__cause__, sqlite3.Error) and _busy(exc.__cause__)


def provide_math_functions(conn: sqlite3.Connection) -> None:
    """Register ln() and floor() where SQLite was built without its math functions: the triggers that keep
    the duration histograms call them (``duration_bins``)."""
    try:
        conn.execute("SELECT ln(2.0), floor(2.5)")
    except sqlite3.OperationalError:
        conn.create_function("ln", 1, math.log, deterministic=True)
        conn.create_function("floor", 1, math.floor, deterministic=True)


class SqliteRunStore(SqlRunStore):
    """DAGRunStore in one SQLite file (WAL by default)."""

    BEGIN = "BEGIN IMMEDIATE"
    _wal_active = False  # set by _connect: the journal mode SQLite actually took
    TOMBSTONES_VERSION = SPOOL_TOMBSTONES_VERSION
    TASK_NAME_SQL = task_name_sql("task_id")
    WINDOW_INDEX_HINT = " INDEXED BY task_runs_success_window"
    LAST_RUN_ID_SQL = "SELECT max(seq) FROM sqlite_sequence WHERE name = 'runs'"  # AUTOINCREMENT's counter
    DRIVER_ERRORS = (sqlite3.Error,)
    queue_notifications = _BELL_SUPPORTED  # processes on this host ring each other (``pipeline.wakeup``)

    def __init__(self, config: StoreConfig | Path | str | None = None, *, create: bool = True,
                 read_only: bool = False) -> None:
        """Open (with ``create``, make) the store; ``read_only`` opens an existing one for reading only, where its
        directory cannot be written (see ``_connect_read_only``)."""
        super().__init__()
        if config is None:
            config = StoreConfig()
        self.config = config if isinstance(config, StoreConfig) else StoreConfig(path=Path(config))
        self.config.validate()
        self.path = Path(self.config.path)
        if (read_only or not create) and not self.path.exists():
            raise StoreError(f"{self.path}: no run store here (nothing has run yet?)")
        self._conn = self._connect_read_only() if read_only else self._connect()
        self._bell = QueueBell(Path(f"{self.path}-wake"))  # the registry of this store's queue watchers
        self._ring_after_commit = False

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
                # on a fresh file several openers at once (serve's gateway and engine processes) each hold a
                # shared lock while switching to WAL: SQLite refuses all but one at once, without its busy
                # handler (deadlock avoidance), so the others try again up to the busy timeout
                self._until_free(lambda: conn.execute("PRAGMA journal_mode = WAL"),
                                 lambda exc: isinstance(exc, sqlite3.OperationalError) and _busy(exc))
            conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
            # a WAL that grew (a reader held an old snapshot: a forgotten sqlite3 shell, a long backup) is cut
            # back to this once it is reused; without it, it kept its peak (857 MB after 3,000 mails) until stop
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            provide_math_functions(conn)
            migrate(conn, self.path)
            # this store waits for locks itself (``_begin``) where COMMIT needs none: in WAL mode, if SQLite
            # really took it (it may keep another journal mode on some file systems)
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            self._wal_active = str(mode).lower() == "wal"
            if self.config.lock_polling and self._wal_active:
                conn.execute("PRAGMA busy_timeout = 0")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                # at open, "not a database" means a foreign file, not a damaged store: refuse it untouched
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                    raise NotADatabaseError(self.path) from exc
                raise store_error(self.path, exc) from exc
            raise
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        """Open the file for reading only: on a read-only mount, or by a user who may not write its directory.

        A WAL store needs its ``-shm`` file to be read. Where that exists (a serve has the store open), SQLite
        reads it (``mode=ro``). Where it does not and cannot be made, the file is opened as immutable: a
        snapshot, which does not see runs still in a ``-wal`` file left beside it. Nothing is migrated: a store
        of an older schema is refused with what to do.
        """
        uri = self.path.absolute().as_uri()
        error: sqlite3.Error | None = None
        for mode in ("mode=ro", "immutable=1"):
            try:
                conn = sqlite3.connect(f"{uri}?{mode}", uri=True, isolation_level=None, check_same_thread=False,
                                       timeout=self.config.busy_timeout_ms / 1000)
            except sqlite3.Error as exc:
                error = exc
                continue
            try:
                refuse_foreign(conn, self.path)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.Error as exc:
                conn.close()
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                    raise NotADatabaseError(self.path) from exc
                error = exc
                continue
            except BaseException:
                conn.close()
                raise
            if version < SCHEMA_VERSION:
                conn.close()
                raise StoreError(f"{self.path}: written by an older version of the pipeline and opened read-only, "
                                 "so it cannot be upgraded: run any command once where its directory can be "
                                 "written")
            provide_math_functions(conn)
            wal = Path(f"{self.path}-wal")
            if mode.startswith("immutable") and wal.exists() and wal.stat().st_size:
                log.warning("%s: opened read-only as a snapshot: runs still in %s are not shown", self.path, wal)
            return conn
        assert error is not None
        raise store_error(self.path, error) from error

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """Lend the one connection, serialised: our own threads never see "database is locked".

        Rings the queue's watchers once a transaction that queued runs has committed (not before: a
        woken engine must find the run), outside the lock.
        """
        with self._lock:
            try:
                yield self._conn
                ring = self._ring_after_commit
            finally:
                self._ring_after_commit = False
        if ring:
            self._bell.ring()

    @property
    def _polling(self) -> bool:
        """Whether this store waits for locks itself (``lock_polling``, WAL only: there COMMIT needs no lock)."""
        return self.config.lock_polling and self._wal_active

    def _begin(self, conn: sqlite3.Connection, sql: str) -> None:  # type: ignore[override]
        """Take the write lock; with lock polling, by trying again every LOCK_POLL_S (up to the busy timeout)
        instead of SQLite's busy handler.

        The handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries, and SQLite queues no one: a writer in
        another process that commits again and again (serve's engine, a transition per commit) retakes the lock
        between those sleeps. Beside such a writer a run insert waited 230 ms at p99 with the handler and 11.4 ms
        polling (``scripts/bench_lock.py`` at f94ba66; README, Benchmarks). The connection's own busy timeout
        is 0 then, so the fast path costs no statement more; reads wait the same way (``_read``).
        """
        if not self._polling:
            conn.execute(sql)
            return
        self._until_free(lambda: conn.execute(sql), lambda exc: isinstance(exc, sqlite3.OperationalError)
                         and _busy(exc))

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        if not self._polling:
            return super()._read(sql, params)
        params = tuple(params)
        return self._until_free(lambda: super(SqliteRunStore, self)._read(sql, params), _busy_cause)

    def spool_names_in_use(self, names: Iterable[str]) -> set[str]:
        names = set(names)
        if not self._polling:
            return super().spool_names_in_use(names)
        return self._until_free(lambda: super(SqliteRunStore, self).spool_names_in_use(names), _busy_cause)

    def _until_free(self, attempt: Callable[[], T], busy: Callable[[BaseException], bool]) -> T:
        """``attempt()`` again after LOCK_POLL_S pauses (doubling) while it fails ``busy``, up to the busy timeout."""
        deadline, pause = None, LOCK_POLL_S[0]
        while True:
            try:
                return attempt()
            except Exception as exc:
                now = time.monotonic()
                deadline = now + self.config.busy_timeout_ms / 1000 if deadline is None else deadline
                if not busy(exc) or now >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, LOCK_POLL_S[1])

    def _queued(self, conn: sqlite3.Connection) -> None:  # type: ignore[override]
        self._ring_after_commit = True  # under the lock, inside the transaction: rung by _connection

    def watch_queue(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` when any process on this host commits queued runs to this file (``pipeline.wakeup``)."""
        return self._bell.watch(wake)

    def _store_error(self, exc: BaseException) -> StoreError:
        assert isinstance(exc, sqlite3.Error)
        return store_error(self.path, exc)

    def _rollback(self, conn: sqlite3.Connection) -> None:  # type: ignore[override]
        _rollback(conn)

    def _insert_run(self, conn: sqlite3.Connection, workflow: str, dedup_key: str | None,  # type: ignore[override]
                    payload: str, now: float) -> int | None:
        # BEGIN IMMEDIATE holds the write lock since the look-up: no other process can have inserted the key
        cur = conn.execute("INSERT INTO runs (workflow, state, dedup_key, payload, queued_at) "
                           "VALUES (?, 'queued', ?, ?, ?)", (workflow, dedup_key, payload, now))
        return cur.lastrowid or 0

    def wal_bytes(self) -> int | None:
        """The size of the store's write-ahead log (0 when there is none)."""
        try:
            return Path(f"{self.path}-wal").stat().st_size
        except FileNotFoundError:
            return 0

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it: the file alone then holds every row.
        Another connection reading or writing blocks it: it is tried again up to the busy timeout, then
        StoreBusyError (SQLite reports that as a result row, not an error)."""
        def once() -> None:
            if self.query("PRAGMA wal_checkpoint(TRUNCATE)")[0][0]:
                raise StoreBusyError(f"{self.path}: another connection blocked the WAL checkpoint")

        self._until_free(once, lambda exc: isinstance(exc, StoreBusyError))

    def close(self) -> None:
        """Close the connection and stop the queue watchers (a second close does nothing)."""
        self._bell.close()
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                raise store_error(self.path, exc) from exc
