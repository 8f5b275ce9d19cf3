"""PostgresRunStore: the run store in PostgreSQL, shared by several gateways and engines.

psycopg 3 with a ``psycopg_pool.ConnectionPool`` (at most ``StoreConfig.pool_size``
connections), imported only when a store is opened (extra ``[postgres]``).
The queries are the shared ones of ``pipeline.sql_store``; what is particular:

- concurrency is PostgreSQL's: READ COMMITTED transactions, a claim takes its
  row with ``FOR UPDATE SKIP LOCKED`` (two engines never claim one run, never
  wait for each other), a run insert is ``ON CONFLICT DO NOTHING RETURNING``
  after a look-up (two gateways receiving one Message-ID make one run);
- creating and requeueing runs sends ``NOTIFY`` in the same transaction, and
  ``watch_queue`` listens on a dedicated connection, so an idle engine is woken
  at commit instead of polling;
- every driver error is translated here into the StoreError tree (``store_error``).
  A server that cannot be reached, went away or shut down, or a pool with no free
  connection in time, is ``StoreUnavailableError`` (a retryable StoreBusyError:
  the gateway answers 451, the engine requeues and backs off); the pool then
  drops its dead connections, so the same store object works again once the
  server is back.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .config import StoreConfig
from .errors import (
    ConfigurationError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreIOError,
    StoreUnavailableError,
)
from .postgres_schema import DIGEST_LOCK_SPACE, SPOOL_TOMBSTONES_VERSION, migrate, task_name_sql
from .sql_store import EVENT, FINAL_TASK, Connection, SqlRunStore, TransientStoreError, retried
from .store import RUNNING, TERMINAL_TASK_STATES, Transition

log = logging.getLogger(__name__)

CHANNEL = "pipeline_runs_queued"
IDLE_CHECK_S = 2.0  # a pooled connection idle this long is checked before it is lent (the server may be gone)
# what the server answers a connection it refuses for its settings (libpq gives no SQLSTATE at connect): a wrong
# user or password, no such database, no pg_hba.conf line for it; no retry mends them
_REFUSED_FOR_SETTINGS = ("password authentication failed", "authentication failed", "does not exist",
                         "no pg_hba.conf entry", "is not permitted to log in", "permission denied for database")
WATCH_POLL_S = 0.5  # how often the listening thread looks up from its socket to see whether it must stop

# (error class, SQLSTATEs or their two-character classes, hint): the first match wins.
_TRANSLATIONS: list[tuple[type[StoreError], tuple[str, ...], str]] = [
    (TransientStoreError, ("40001", "40P01"), " (lost a race with another writer; try again)"),
    (StoreUnavailableError, ("08", "57P01", "57P02", "57P03", "53300"), " (the server is unreachable; try again)"),
    (StoreBusyError, ("55P03", "57014"), " (waited too long for a lock; try again)"),
    (StoreIOError, ("53100", "58030", "25006", "53200"), ""),
    (StoreCorruptError, ("XX001", "XX002"), " (the database is damaged; restore it from a backup)"),
]


def _driver() -> tuple[Any, Any]:
    """Import psycopg and psycopg_pool, or raise ConfigurationError naming the extra."""
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise ConfigurationError(f"a postgresql:// store needs psycopg ({exc.name} is missing): "
                                 "pip install 'email-digest-pipeline[postgres]'") from exc
    return psycopg, psycopg_pool


def redact(url: str) -> str:
    """The URL without its password, for messages and logs (an '@' in the password, no user name: still hidden)."""
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}{slash}{tail}"


def connection_options(busy_timeout_ms: int) -> dict[str, Any]:
    """psycopg connect options that bound every wait on the server or the network.

    Without them a database host gone from the network blocks a query for minutes (TCP retransmission), and
    a peer that died inside a transaction holds its row locks until the server notices (hours of keepalive):
    a lock wait or an idle transaction past its limit ends in an error the store translates (StoreBusyError,
    retryable), and a dead connection is noticed within about 30 s.
    """
    wait_ms = max(int(busy_timeout_ms), 100)
    # client_encoding: text comes back as str whatever PGCLIENTENCODING says (a database not encoded UTF8, whose
    # text came back as bytes, is refused at open: refuse_non_utf8)
    return {"autocommit": True, "client_encoding": "UTF8", "connect_timeout": max(2, -(-wait_ms // 1000)),
            "keepalives": 1,
            "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30_000,
            "options": f"-c lock_timeout={wait_ms} -c idle_in_transaction_session_timeout=60000 "
                       f"-c statement_timeout={max(wait_ms, 60_000)}"}


def refuse_non_utf8(conn: Any, label: str) -> None:
    """Raise ConfigurationError, one line, for a database not encoded UTF8 (a prober's SQL_ASCII database, initdb's
    default under a C locale: text came back as bytes and every acked mail failed; jsonb cannot even hold a
    non-ASCII subject there)."""
    encoding = conn.execute("SHOW server_encoding").fetchone()[0]
    if str(encoding).upper() not in ("UTF8", "UTF-8"):
        raise ConfigurationError(f"{label}: the database is encoded {encoding}, and the run store needs UTF8: "
                                 "create it with createdb --encoding=UTF8 --template=template0")


def store_error(label: str, exc: BaseException) -> StoreError:
    """Return the StoreError subclass for a psycopg (or pool) error: one line naming the store."""
    psycopg, psycopg_pool = _driver()
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, psycopg_pool.PoolClosed):
        return StoreError(f"{label}: the store is closed")
    state = getattr(exc, "sqlstate", None) or ""
    for cls, codes, hint in _TRANSLATIONS:
        if state in codes or state[:2] in codes:
            return cls(f"{label}: {text}{hint}")
    if isinstance(exc, psycopg.OperationalError):  # refused, reset, pool timeout: no SQLSTATE, no server
        return StoreUnavailableError(f"{label}: {text} (the server is unreachable; try again)")
    return StoreError(f"{label}: {text}")


def _noting_connects(base: Any, note: Callable[[BaseException | None], None]) -> Any:
    """A connection class for the pool that reports how each of its connects ended. The pool only logs why it could
    not connect (a role without LOGIN, too many clients), and a call then fails "couldn't get a connection after
    1.0 sec", which serve logged as "the server is unreachable" beside its 451."""

    class NotingConnection(base):  # type: ignore[misc,valid-type]
        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                conn = super().connect(*args, **kwargs)
            except Exception as exc:
                note(exc)
                raise
            note(None)
            return conn

    return NotingConnection


class _Cursor:
    """A psycopg connection speaking the shared code's ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Any = None, /) -> Any:
        return self.conn.execute(sql if params is None else _placeholders(sql), params)

    def executemany(self, sql: str, params: Any, /) -> Any:
        cur = self.conn.cursor()
        cur.executemany(_placeholders(sql), params)
        return cur


@functools.lru_cache(maxsize=1024)
def _placeholders(sql: str) -> str:
    """``?`` to ``%s`` (the shared SQL has no literal ``?``; a literal ``%`` is doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresRunStore(SqlRunStore):
    """DAGRunStore in a PostgreSQL database, for several processes on several hosts."""

    CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"
    OWNER_LOCK = " FOR SHARE"
    # held to the reservation's commit; the two-key form keeps clear of the migrations' one-key lock
    DIGEST_LOCK = f"SELECT pg_advisory_xact_lock({DIGEST_LOCK_SPACE}, hashtext(?))"
    # Task transitions and heartbeats commit without waiting for the WAL flush (one statement, one round
    # trip: psycopg sends both in one simple query; a transition sets it itself, see _transition_text).
    # Losing the last ~0.6 s of them in a server crash is safe: the run stays running under a dead owner,
    # recovery requeues it, and the task runs again from its last durable state (tasks are retried from
    # scratch anyway; delivery is idempotent per run). Runs are created and finished synchronously, and
    # such a commit flushes every earlier lazy one too.
    BEGIN_LAZY = "BEGIN; SET LOCAL synchronous_commit TO off"
    TOMBSTONES_VERSION = SPOOL_TOMBSTONES_VERSION
    TASK_NAME_SQL = task_name_sql("task_id")
    LAST_RUN_ID_SQL = "SELECT pg_sequence_last_value(pg_get_serial_sequence('runs', 'run_id'))"  # the identity's
    queue_notifications = True

    def __init__(self, config: StoreConfig | str, *, create: bool = True) -> None:
        super().__init__()
        self.config = config if isinstance(config, StoreConfig) else StoreConfig(url=config)
        self.config.validate()
        if not self.config.url:
            raise ConfigurationError("PostgresRunStore needs store.url = 'postgresql://...'")
        self._psycopg, pool_module = _driver()
        self._pool_timeout = pool_module.PoolTimeout
        self.DRIVER_ERRORS = (self._psycopg.Error,)
        self.url, self.label = self.config.url, redact(self.config.url)
        self._watchers: list[_QueueWatcher] = []
        self._returned: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._connect_once()
        self._connect_failure: str | None = None  # why the pool's last connect failed; None once one succeeds
        # how long a call waits for a pooled connection (or a reconnect) before StoreUnavailableError
        timeout_s = max(self.config.busy_timeout_ms / 1000, 0.1)
        self._pool = pool_module.ConnectionPool(
            self.url, min_size=1, max_size=self.config.pool_size, open=False, timeout=timeout_s,
            kwargs=connection_options(self.config.busy_timeout_ms), name="pipeline-store",
            check=self._check_if_idle, reset=self._returned_now,
            connection_class=_noting_connects(self._psycopg.Connection, self._note_connect))
        try:
            self._pool.open(wait=True, timeout=timeout_s)
            with self._pool.connection() as conn:
                refuse_non_utf8(conn, self.label)
                migrate(conn, self.label, create)
        except self._psycopg.Error as exc:
            self._pool.close()
            raise self._store_error(exc) from exc
        except BaseException:
            self._pool.close()
            raise

    def _connect_once(self) -> None:
        """Connect once, outside the pool, so that a refusal is reported as itself: the pool only retries and
        ends in "pool initialization incomplete after 10 s", whatever the server said. A wrong password or
        database name, or a malformed URL, is a ConfigurationError (no retry mends it)."""
        try:
            self._psycopg.connect(self.url, **connection_options(self.config.busy_timeout_ms)).close()
        except self._psycopg.Error as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            if isinstance(exc, self._psycopg.ProgrammingError) or any(w in text for w in _REFUSED_FOR_SETTINGS):
                raise ConfigurationError(f"{self.label}: {text} (check [store] url: user, password, "
                                         "database)") from exc
            raise store_error(self.label, exc) from exc

    def _check_if_idle(self, conn: Any) -> None:
        """The pool's check before it lends ``conn``: one idle for ``IDLE_CHECK_S`` must still answer (a server
        restarted, or its backends ended, meanwhile: the pool then takes another), so the first write after a
        quiet spell does not fail (a 451 for a sender). A busy connection is lent unchecked. When one is found
        dead, the other idle ones are checked at once: the pool would otherwise try them one by one, backing off
        1, 2, 4 s between them, past its timeout with five dead."""
        if time.monotonic() - self._returned.get(conn, 0.0) < IDLE_CHECK_S:
            return
        try:
            self._pool.check_connection(conn)
        except Exception:
            self._pool.check()
            raise

    def _returned_now(self, conn: Any) -> None:
        """The pool's reset callback, on every return (also of the connections writes borrow directly)."""
        self._returned[conn] = time.monotonic()

    # -- connection and transactions ---------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """Lend a pooled connection; one the server dropped is discarded by the pool on return."""
        with self._pool.connection() as conn:
            yield _Cursor(conn)

    def _note_connect(self, failure: BaseException | None) -> None:
        self._connect_failure = None if failure is None else " ".join(str(failure).split()) or type(failure).__name__

    def _store_error(self, exc: BaseException) -> StoreError:
        failure = self._connect_failure
        if failure and isinstance(exc, self._pool_timeout):  # "couldn't get a connection": say why, not only that
            error: StoreError = StoreUnavailableError(f"{self.label}: {' '.join(str(exc).split())}; the last "
                                                      f"connect failed: {failure} (try again)")
        else:
            error = store_error(self.label, exc)
        if isinstance(error, StoreUnavailableError):
            try:  # drop the idle connections the server lost too, so that the next call reconnects
                self._pool.check()
            except self._psycopg.Error as exc:
                log.debug("%s: pool check failed: %s", self.label, exc)
        return error

    def _rollback(self, conn: Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except self._psycopg.Error as exc:  # the original error is the one worth raising
            log.debug("rollback failed: %s", exc)

    def _insert_run(self, conn: Connection, workflow: str, dedup_key: str | None, payload: str,
                    now: float) -> int | None:
        row = conn.execute("INSERT INTO runs (workflow, state, dedup_key, payload, queued_at) "
                           "VALUES (?, 'queued', ?, ?, ?) ON CONFLICT (workflow, dedup_key) DO NOTHING "
                           "RETURNING run_id", (workflow, dedup_key, payload, now)).fetchone()
        return None if row is None else int(row[0])

    def _queued(self, conn: Connection) -> None:
        conn.execute(f"NOTIFY {CHANNEL}")  # delivered at COMMIT, not at all on ROLLBACK

    @retried
    def record_transitions(self, transitions: Iterable[Transition], owner: str | None = None) -> int:
        """Apply one transition as one autocommitted statement, several in one pipelined transaction.

        The engine writes one transition per commit, many per run, and a round trip
        between two processes on a loaded host costs more than the server's work: one
        statement (no BEGIN, no COMMIT) doubled the rate of one client over a pipeline
        of four, and the statement itself turns the commit lazy (see BEGIN_LAZY).
        Several transitions (perhaps of one task: running, then success) keep their
        order and all-or-none in a transaction, sent in one round trip.
        """
        statements = [_transition_sql(t, owner) for t in transitions]
        if not statements:
            return 0
        try:
            with self._pool.connection() as conn:
                if len(statements) == 1:
                    return max(conn.execute(*statements[0]).rowcount, 0)
                return self._pipelined(conn, statements)
        except self._psycopg.Error as exc:
            raise self._store_error(exc) from exc

    def _pipelined(self, conn: Any, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
        """Run ``statements`` in one transaction sent as one pipeline; return the rows they changed."""
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                cursors = [conn.execute(sql, params) for sql, params in statements]
                conn.execute("COMMIT")
        except BaseException:
            self._rollback(_Cursor(conn))
            raise
        return sum(max(cur.rowcount, 0) for cur in cursors)

    # -- wake-ups ----------------------------------------------------------------

    def watch_queue(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` whenever another process commits queued runs (LISTEN on a dedicated connection)."""
        with self._lock:
            if self._pool.closed:  # a watcher of a closed store would reconnect for ever
                raise StoreError(f"{self.label}: the run store is closed")
            watcher = _QueueWatcher(self._psycopg, self.url, self.label, wake)
            self._watchers.append(watcher)

        def stop() -> None:
            watcher.stop()
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
        return stop

    def close(self) -> None:
        """Stop the watchers and close the pool (a second close does nothing)."""
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.stop()
        self._pool.close()


class _QueueWatcher:
    """One daemon thread LISTENing on CHANNEL; reconnects with back-off and never dies silently."""

    def __init__(self, psycopg: Any, url: str, label: str, wake: Callable[[], None]) -> None:
        self._psycopg, self._url, self._label, self._wake = psycopg, url, label, wake
        self._stopping = threading.Event()
        self.notices = 0
        self._thread = threading.Thread(target=self._loop, name="pipeline-queue-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and wait for the thread (it looks up every WATCH_POLL_S)."""
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        self._failures = 0  # of this streak; LISTEN succeeding ends it, so the next outage is logged again
        while not self._stopping.is_set():
            try:
                self._listen()
                self._failures = 0
            except Exception as exc:  # guarded: log the first of a streak, back off, reconnect, go on
                self._failures += 1
                failures = self._failures
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "%s: queue notifications lost (%s: %s); polling until reconnected",
                        self._label, type(exc).__name__, " ".join(str(exc).split()))
                self._stopping.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))

    def _listen(self) -> None:
        with self._psycopg.connect(self._url, **connection_options(10_000)) as conn:  # keepalives: a dead server
            conn.execute(f"LISTEN {CHANNEL}")
            self._failures = 0
            self._call_wake()  # runs queued while nobody listened (start, reconnect) are found now
            while not self._stopping.is_set():
                for _ in conn.notifies(timeout=WATCH_POLL_S):
                    self.notices += 1
                    self._call_wake()

    def _call_wake(self) -> None:
        try:
            self._wake()
        except Exception:  # a broken callback must not end the listening
            log.exception("%s: queue wake-up callback failed", self._label)


def _transition_sql(t: Transition, owner: str | None) -> tuple[str, tuple[Any, ...]]:
    """One statement per transition, in psycopg's placeholders; the event is inserted from the UPDATE's
    RETURNING (nothing if skipped), and ``lazy`` makes the transaction's commit asynchronous."""
    started = t.at if t.state == RUNNING else None
    ended = t.at if t.state in TERMINAL_TASK_STATES else None
    return (_TRANSITION if owner is None else _OWNED_TRANSITION,
            (t.state, t.try_number, started, ended, t.error_type, t.error_message, t.output_json, t.wait_s,
             t.run_id, t.task_id, *(() if owner is None else (t.run_id, owner)), t.at))


def _transition_text(owned_run: str) -> str:
    # set_config(..., true) is SET LOCAL: it lasts until this statement's (implicit) transaction commits
    return _placeholders(
        "WITH lazy AS (SELECT set_config('synchronous_commit', 'off', true)), "
        "changed AS (UPDATE task_runs SET state = ?, try_number = ?, "
        "started_at = coalesce(?::float8, started_at), ended_at = ?, error_type = ?, error_message = ?, "
        "output = coalesce(?::text, output), wait_s = ? "
        f"FROM lazy WHERE run_id = ? AND task_id = ? AND {FINAL_TASK}{owned_run} "
        "RETURNING run_id, task_id, try_number, state, error_type) "
        f"{EVENT}, error_type) SELECT run_id, task_id, try_number, state, ?, error_type FROM changed")


# constant texts: psycopg prepares a statement on the server once it has run it prepare_threshold times
_TRANSITION = _transition_text("")
_OWNED_TRANSITION = _transition_text(  # FOR SHARE: see SqlRunStore.OWNER_LOCK
    " AND EXISTS (SELECT 1 FROM runs WHERE runs.run_id = ? AND state = 'running' AND runs.owner = ? FOR SHARE)")
