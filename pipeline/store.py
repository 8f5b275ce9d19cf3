"""DAGRunStore: the contract every run-store backend keeps (its states and value types are in ``store_types``).

Implementations: ``pipeline.sqlite_store.SqliteRunStore`` (the embedded
default) and ``pipeline.postgres_store.PostgresRunStore`` (several processes on
several hosts), both on the shared SQL of ``pipeline.sql_store`` and passing
the same contract tests; ``open_store`` picks one from a StoreConfig.
Timestamps are Unix seconds (float); run ids are integers in trigger order,
never handed out twice (not even after the newest runs were purged: a digest
or a log line naming run 7 must never be mistaken for another mail's).

Spool files: a run whose payload has a "spool" path refers to the spool file
named by that path's last component (``<sha256>.eml``; the path may be
relative or absolute, only the name counts). Several runs may share one
file. When purge deletes the last run naming a file it leaves a tombstone
for the name in the same transaction; the caller deletes the file after the
commit and then drops the tombstone. A spool file no run names and no
tombstone covers is a message whose run was never committed (see
``spool_names_known``).

Errors: every method raises only ``StoreError`` subclasses (never a driver's
exception): ``StoreBusyError`` when another process holds the store past the
busy timeout (retryable), ``StoreCorruptError`` when its pages are damaged,
``StoreIOError`` when the disk under it fails (full, read-only, I/O error),
``StoreUnavailableError`` (a StoreBusyError) when its server cannot be reached,
plain ``StoreError`` otherwise. A transaction that raises is rolled back.
Terminal states are final: a run in success/failed and a task instance in
success/failed/upstream_failed is never moved out of it by a later write.
Ownership is compare-and-set too: the writes an engine makes for a run it
claimed (``heartbeat``, ``finish_run``, ``requeue_run``, ``record_transitions``)
take its ``owner`` and change nothing once another process has taken the run
over; they return how many rows they changed, so the caller can tell.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

from .config import StoreConfig

# the states and value types lived here: every caller still imports them from here (``store.QUEUED``, ``store.Run``)
from .store_types import (  # noqa: F401
    FAILED,
    MAX_INLINE_OUTPUT,
    PARTIAL_PREFIX,
    QUEUED,
    RETRYING,
    RUN_STATES,
    RUNNING,
    SUCCESS,
    TASK_STATES,
    TERMINAL_TASK_STATES,
    UPSTREAM_FAILED,
    PurgedBatch,
    Run,
    RunTakenOver,
    TaskRun,
    Transition,
    encode_output,
)

# Duration percentiles come from histograms of log-spaced bins, each this ratio wide ([r^b, r^(b+1)) seconds);
# a bin's value is its smallest if all its values are equal, else the geometric mean of its smallest and
# largest, so an order statistic read from it is off by less than sqrt(r) - 1 (relative). Values below
# 1 microsecond (and negative ones, from a clock step) share one bin, read as the mean of its extremes.
DURATION_BIN_RATIO = 1.005
DURATION_ERROR_BOUND = DURATION_BIN_RATIO ** 0.5 - 1  # 0.2497 %


class DAGRunStore:
    """Persistent record of runs, task instances and their transitions.

    Implementations must be safe to call from many threads of one process,
    and safe against other processes using the same store. Every method may
    raise the StoreError subclasses listed in the module docstring; the
    docstrings below name only the errors particular to a method. Used as a
    context manager, the store is closed on leaving the block.
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def create_run(self, workflow: str, payload: Mapping[str, Any], dedup_key: str | None = None,
                   now: float | None = None) -> tuple[Run, bool]:
        """Insert a queued run and return ``(run, True)``.

        If ``(workflow, dedup_key)`` exists, insert nothing (using up no run
        id; on PostgreSQL, two inserts of one new key racing each other may skip one) and return
        ``(existing_run, False)``. A new run's id is greater than
        every id handed out before, purged runs' included. Atomic: concurrent callers with one key
        get one run between them. Raises StoreBusyError, StoreIOError, StoreCorruptError.
        """
        raise NotImplementedError

    def create_runs(self, items: Iterable[tuple[str, Mapping[str, Any], str | None]],
                    now: float | None = None) -> list[tuple[Run, bool]]:
        """Like ``create_run`` for many ``(workflow, payload, dedup_key)`` in one transaction (all or none)."""
        raise NotImplementedError

    def get_run(self, run_id: int) -> Run:
        """Return the run; raise ``UnknownRunError`` if there is none, StoreCorruptError if its page is damaged."""
        raise NotImplementedError

    def find_run(self, workflow: str, dedup_key: str) -> Run | None:
        """Return the run of ``workflow`` that carries ``dedup_key``, or None; creates nothing."""
        raise NotImplementedError

    def get_tasks(self, run_id: int) -> list[TaskRun]:
        """Return the run's task instances in creation order (empty if none)."""
        raise NotImplementedError

    def list_runs(self, workflow: str | None = None, state: str | None = None, limit: int = 50,
                  before_run_id: int | None = None) -> list[Run]:
        """Return up to ``limit`` runs, newest first, with ``run_id < before_run_id``.

        Keyset pagination: pass the last run id of one page to get the next.
        """
        raise NotImplementedError

    def count_runs_by_state(self, workflow: str | None = None) -> dict[str, int]:
        """Return ``{state: count}`` over all runs or one workflow's."""
        raise NotImplementedError

    def stale_runs(self, heartbeat_before: float) -> list[Run]:
        """Return running runs whose heartbeat is older than ``heartbeat_before``."""
        raise NotImplementedError

    def task_duration_percentiles(self, since: float, until: float | None = None,
                                  run_time: bool = False) -> dict[str, dict[str, float]]:
        """Return ``{task_id: {"n", "p50", "p95"}}`` for the successful tries that ended in ``[since, until)``.

        Mapped instances are grouped under their task id (``ingest_pdf``); a try
        with no start (a mapped task over nothing) is not counted. A value is a
        try's duration, or with ``run_time`` its duration less its ``wait_s``.
        ``n`` is exact; p50 and p95 interpolate like percentile_cont between order
        statistics read from duration histograms (``DURATION_BIN_RATIO``): each is
        within ``DURATION_ERROR_BOUND`` (relative) of the exact value, and exact
        where the values of a bin are all equal.
        """
        raise NotImplementedError

    def claim_next_run(self, owner: str, now: float | None = None) -> Run | None:
        """Atomically move the oldest queued run to running for ``owner``; None if none is queued.

        Raises StoreBusyError (retryable) when another process holds the write lock too long.
        """
        runs = self.claim_runs(owner, 1, now)
        return runs[0] if runs else None

    def claim_runs(self, owner: str, limit: int, now: float | None = None,
                   only: Collection[int] | None = None) -> list[Run]:
        """Atomically move up to ``limit`` of the oldest queued runs to running for ``owner``, in one
        transaction; return them oldest first (empty if none is queued). With ``only``, only runs of those
        ids are claimed (``ingest`` runs its own runs, never a backlog some serve queued).

        One claim per run cost the engine a transaction per run (issue 16); a batch keeps FIFO order.
        Raises ValueError for ``limit`` < 1, StoreBusyError as ``claim_next_run``.
        """
        raise NotImplementedError

    def heartbeat(self, run_ids: Iterable[int], now: float | None = None, owner: str | None = None) -> int:
        """Refresh the heartbeat of these runs in one transaction; return how many were refreshed.

        Runs not running are left alone; with ``owner``, so are runs another process owns now
        (a count below ``len(run_ids)`` tells the caller it lost some).
        """
        raise NotImplementedError

    def finish_run(self, run_id: int, state: str, reason: str | None = None, now: float | None = None,
                   owner: str | None = None) -> int:
        """Set a run's terminal state (success or failed), reason and end time; return 1 if set, else 0.

        Compare-and-set: a run already success or failed keeps its state,
        reason and end time (the call does nothing and returns 0). With
        ``owner``, only a running run owned by ``owner`` is finished: a process
        whose run was taken over by another must not end it. A run failed with
        task rows still open ends them in the same transaction: a running or
        retrying one ``failed`` with the reason's code and message, a queued one
        ``upstream_failed``. Raises ValueError for another state.
        """
        raise NotImplementedError

    def rebuild_run(self, run_id: int, now: float | None = None, owner: str | None = None,
                    note: str | None = None) -> int:
        """``requeue_run``, with every task of the run queued again as never tried (outputs and errors cleared):
        its files are gone (``errors.WorkLostError``), so it starts again from its parse. Return 1 if it was
        rebuilt, 0 if the call did nothing; an event of state ``rebuilt`` (task "") records it."""
        raise NotImplementedError

    def requeue_run(self, run_id: int, now: float | None = None, owner: str | None = None,
                    note: str | None = None) -> int:
        """Put a running run back in the queue, keeping its position; unfinished tasks become queued.

        Only a run in state running (and, with ``owner``, owned by ``owner``) is
        requeued; return 1 if it was, 0 if the call did nothing. A task still running gets its try number
        back (its try was cut short by the caller, not failed): the next start is that try again. ``note``
        (why, e.g. the fault the run waits out) becomes the run's ``reason`` until the run ends and
        ``finish_run`` sets its own; None clears an earlier note.
        """
        raise NotImplementedError

    def recover_runs(self, is_dead: Callable[[Run], bool], now: float | None = None) -> list[int]:
        """Requeue every running run for which ``is_dead(run)`` is true; return their ids. Each one's ``reason``
        says that its owner was gone (see ``requeue_run``)."""
        raise NotImplementedError

    def create_tasks(self, run_id: int, task_ids: Iterable[str], now: float | None = None) -> None:
        """Insert queued task instances; ids that exist already are left untouched."""
        raise NotImplementedError

    def record_transitions(self, transitions: Iterable[Transition], owner: str | None = None) -> int:
        """Write task transitions, in order, in one transaction (all or none); return how many were applied.

        A transition for a task instance already in success, failed or
        upstream_failed is skipped (no state change and no event): a late
        RUNNING cannot undo a timeout's FAILED. With ``owner``, a transition
        of a run that is not running under ``owner`` is skipped too: a process
        that lost its run writes nothing into it.
        """
        raise NotImplementedError

    def purge_runs(self, older_than: float, batch_size: int = 1000) -> int:
        """Delete finished runs that ended before ``older_than`` with their tasks; return the count.

        Deletes in batches of ``batch_size`` runs, one short transaction each,
        so that other writers never wait long. Same effect as draining ``purge_batches``
        (tombstones included): the caller that wants the files deleted uses that.
        """
        return sum(len(batch.run_ids) for batch in self.purge_batches(older_than, batch_size))

    def wal_bytes(self) -> int | None:
        """The size of the store's write-ahead log on this host, where it has one here (None: PostgreSQL's is the
        server's business)."""
        return None

    def count_purgeable(self, older_than: float) -> int:
        """How many runs ``purge_batches(older_than)`` would delete now (``purge --dry-run``, its progress)."""
        raise NotImplementedError

    def purge_batches(self, older_than: float, batch_size: int = 1000) -> Iterator[PurgedBatch]:
        """Delete finished runs that ended before ``older_than``, one batch per step; yield each batch.

        Each step is one transaction (all or none) that deletes up to ``batch_size``
        runs in state success or failed with their task instances and events,
        and upserts a tombstone (name, now) for every spool name those runs had
        that no remaining run (in any state) names; it yields the committed
        batch. Nothing is held open while the caller handles a batch, so the
        caller deletes files between steps. Queued and running runs are never
        deleted. Stops when no run is left to purge; ids of purged runs are not reused.
        """
        raise NotImplementedError

    def spool_names_in_use(self, names: Iterable[str]) -> set[str]:
        """Return those of ``names`` (spool file names, not paths) that at least one run names, in any state.

        One indexed lookup per name; callers pass a few hundred names at a time.
        """
        raise NotImplementedError

    def spool_names_known(self, names: Iterable[str]) -> set[str]:
        """Return those of ``names`` that a run names or a tombstone covers (one consistent read).

        A spool file whose name is not returned has neither: its message was
        spooled but its run never committed (a crash in between), so it is
        to be queued now, unless it predates ``spool_tracked_since()`` (see there).
        """
        raise NotImplementedError

    def list_spool_tombstones(self, after: str = "", limit: int = 1000) -> list[str]:
        """Return up to ``limit`` tombstoned spool names greater than ``after``, in name order (keyset pages).

        Tombstones outlive a purge only for files that could not be deleted (or
        a purge that died between commit and delete): the next purge retries them.
        """
        raise NotImplementedError

    def drop_spool_tombstones(self, names: Iterable[str]) -> int:
        """Delete the tombstones of ``names`` in one transaction; return how many existed.

        Call it once a file is gone, or when a run names it again (it is live then).
        """
        raise NotImplementedError

    def last_run_id(self) -> int:
        """The highest run id ever handed out (0 before the first): ids are never reused, so a work directory
        numbered up to it without a run belongs to a purged run."""
        raise NotImplementedError

    def existing_run_ids(self, run_ids: Iterable[int]) -> set[int]:
        """Those of ``run_ids`` that have a run (a few hundred at a time)."""
        raise NotImplementedError

    def spool_tracked_since(self) -> float:
        """Return the time from which this store tombstones every spool file purge drops.

        That is when the store was created or upgraded to do so. An unnamed,
        untombstoned spool file older than this may be the leftover of an older
        purge that deleted runs but no files, not a lost message.
        """
        raise NotImplementedError

    def reserve_digest(self, address: str, digest: str, limit: int, window_s: float,
                       now: float | None = None) -> bool:
        """Count ``digest`` (a name, one per run) as sent to ``address`` unless ``limit`` digests to it were counted
        within the last ``window_s`` seconds; return whether it may be sent (``[delivery] max_digests_per_hour``).

        Addresses are compared by ``addresses.address_key`` (no case, the domain in punycode). Checked and
        counted in one transaction, serialised per address across threads and processes: reservations
        racing for one address never pass the limit between them. A digest already counted for the
        address passes without counting again (a try retried after a crash). ``now`` (Unix seconds)
        defaults to the store's clock at the reservation; reservations older than the window are deleted
        (any address's). Raises ValueError for ``limit`` < 1.
        """
        raise NotImplementedError

    def release_digest(self, address: str, digest: str) -> None:
        """Take back the reservation of ``digest`` to ``address``: it was not sent after all (the relay refused
        it), so it does not count against the address; no reservation is no error."""
        raise NotImplementedError

    # True when watch_queue really calls back (PostgreSQL LISTEN/NOTIFY); the engine then polls rarely
    queue_notifications = False

    def watch_queue(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` when runs may have been queued by another process; return a function that stops watching.

        ``wake`` runs on a background thread and must be quick. The base
        store cannot watch (``queue_notifications`` is False): it returns a
        no-op and the caller keeps polling. A watcher that loses its
        connection calls ``wake`` again once it listens anew.
        """
        return _no_op

    def close(self) -> None:
        """Release connections; the store may not be used afterwards (its methods then raise StoreError)."""
        raise NotImplementedError


def _no_op() -> None:
    """Stop watching nothing."""


# The run-store backends, by URL scheme: a plug-in point (STYLE.md section 1), imported on first use so
# that ``import pipeline`` never loads a database driver and this contract module imports no backend.
BACKENDS = {"sqlite": "pipeline.sqlite_store:SqliteRunStore",
            "postgresql": "pipeline.postgres_store:PostgresRunStore"}


def open_store(config: StoreConfig, *, create: bool = True) -> DAGRunStore:
    """Open the run store ``config`` names: PostgreSQL for ``url``, else the SQLite file at ``path``.

    With ``create`` false a store that does not exist yet raises StoreError
    instead of being made. Raises ConfigurationError when the backend's driver
    is missing (naming the pip extra), StoreError subclasses as the store does.
    """
    config.validate()
    module, _, name = BACKENDS["postgresql" if config.is_postgres else "sqlite"].partition(":")
    backend: type[Any] = getattr(importlib.import_module(module), name)
    store: DAGRunStore = backend(config, create=create)
    return store
