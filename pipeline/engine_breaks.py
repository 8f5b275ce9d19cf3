"""The engine's share for runs whose bookkeeping failed: decide requeue or fail, and store that.

A run whose bookkeeping failed (its work dir cannot be made, a store write
raised in a runner callback, anything unexpected) is never left running.
Once its live tries have ended (they cannot be stopped), it is requeued, its
finished tasks kept. An environmental error (an OSError, or a retryable
PipelineError such as StoreBusyError or StoreIOError) never fails a run: it
is requeued and not claimed again before a backoff (``backoff_base_s``
doubling per break up to ``backoff_max_s``), so nothing acked is lost while a
disk is full or a store locked. Any other error (a bug, StoreCorruptError)
counts: after ``max_internal_requeues`` requeues the run fails with reason
``internal: <ExcType>: <message>``. If the store refuses that write too, the
dispatcher retries it from its guarded loop. A task whose tries failed because the
machine is short of something (``MachineShortError``: a full disk under the work
dir, no file descriptors) breaks its run the same way, as an environmental error,
and the engine reports unhealthy while two such runs (``MACHINE_WITNESSES``) wait and no other run has
succeeded since (``MACHINE_FRESH_S``). When others succeed while it waits, the
machine is not short for them: after ``MACHINE_PATIENCE`` breaks the run fails
``task_io`` (one mail too big for the room left must not stop all mail).
A run whose work files an earlier task made are gone (``WorkLostError``: the
work dir deleted under it) is rebuilt: requeued with every task queued again, so its parse reads the spool
file anew, at most ``MAX_REBUILDS`` times. Every write for a claimed run
carries this engine's owner: a run another process took over is left alone.

``BrokenRuns`` is a part of ``WorkflowEngine`` (it shares the engine's lock, active runs and store): it keeps what
the engine remembers of each run's breaks, the runs waiting for the machine, and a damaged store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from . import metrics, tracing
from . import store as s
from .config import Settings
from .errors import (
    ClusterUnavailableError,
    MachineShortError,
    PipelineError,
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    WorkLostError,
)
from .health import backoff_s, one_line
from .ratelog import RateLimitedLog, cause_of
from .runner import DAGRunner
from .store import DAGRunStore, RunTakenOver
from .workdir import shed_run_files

log = logging.getLogger("pipeline.engine")  # the engine's lines: one logger for the operator to watch
MAX_REBUILDS = 3  # a run whose work files are lost is rebuilt from its spool file this many times, then fails
MACHINE_FRESH_S = 60.0  # a run broken for the machine keeps the engine unhealthy this long unless it breaks again
MACHINE_PATIENCE = 3  # breaks for the machine a run waits out while other runs succeed, then it fails task_io
# runs waiting for the machine before it is unhealthy: one alone may just not fit (and 451 to all mail would keep
# away the runs whose success shows that, holding everything for as long as it existed: a reviewer's find)
MACHINE_WITNESSES = 2
ENDED_REMEMBERED = 10_000  # ends reported, remembered so that none is counted twice (a few hundred KB)


class _MachineWait(NamedTuple):
    """A run requeued because the machine was short of something: its last break, why, and the engine's count of
    successful runs at its first and its last break."""

    at: float
    why: str
    successes_first: int
    successes_last: int
    breaks: int


class BrokenRuns:
    """Requeue or fail the engine's broken runs, and say while the machine or the store keeps them from running."""

    store: DAGRunStore
    settings: Settings
    owner: str
    _cond: threading.Condition
    _active: dict[int, DAGRunner]
    _wake: bool

    def _init_breaks(self) -> None:
        """Start with no breaks remembered (the engine's ``__init__`` calls this)."""
        self._unsettled: dict[int, str | None] = {}  # broken run -> reason to fail it with (None: requeue)
        self._break_log = RateLimitedLog(log)  # breaks of many runs by one cause: a line per interval
        self._requeue_notes: dict[int, str] = {}  # run to requeue -> why, for its reason in the store
        self._internal_requeues: dict[int, int] = {}  # run -> requeues for a non-environmental bookkeeping error
        self._env_breaks: dict[int, int] = {}  # run -> breaks by an environmental error (its backoff exponent)
        self._rebuilds: dict[int, int] = {}  # run -> rebuilds for its work files lost (WorkLostError)
        self._to_rebuild: set[int] = set()  # broken runs to requeue as rebuilt (every task again)
        self._not_before: dict[int, float] = {}  # requeued broken run -> monotonic time before no run is claimed
        self._store_damage: str | None = None  # set for good once the store reports damaged pages
        self._machine_short: dict[int, _MachineWait] = {}  # run requeued for the machine -> its wait
        self._successes = 0  # runs that ended in success
        # runs whose end this engine reported: a run the stop requeues may end just before (not counted twice)
        self._ended: OrderedDict[int, None] = OrderedDict()
        self.machine_witnesses = MACHINE_WITNESSES  # ingest: 1 (no other mail will come to show there is room)

    def _machine_problem(self) -> str | None:
        """Why tasks cannot run on this machine now (a full disk under the work dir), while a run they broke waits;
        a break older than MACHINE_FRESH_S no longer counts (another engine may have finished that run)."""
        if not self._machine_short:
            return None
        with self._cond:
            horizon = time.monotonic() - MACHINE_FRESH_S
            for run_id in [r for r, wait in self._machine_short.items() if wait.at <= horizon]:
                del self._machine_short[run_id]  # (a run another engine finished is never forgotten otherwise)
            fresh = sorted((w.at, w.why) for w in self._machine_short.values() if w.successes_last == self._successes)
        if len(fresh) < self.machine_witnesses:
            return None
        return f"tasks fail for the machine ({len(fresh)} run(s) wait for it): {fresh[-1][1]}"

    def _note_damage(self, exc: BaseException) -> None:
        """Remember that the store reported damaged pages (``exc`` or its cause): no later success undoes that."""
        seen: BaseException | None = exc
        for _ in range(8):  # a chain of causes is short; never follow a cycle for ever
            if seen is None or isinstance(seen, StoreCorruptError):
                break
            seen = seen.__cause__ or seen.__context__
        if not isinstance(seen, StoreCorruptError):
            return
        if self._store_damage is None:
            self._store_damage = f"the run store is damaged ({one_line(seen)}): restore it and restart"
            log.error("engine unhealthy until restarted: %s", self._store_damage)

    def _shed(self, run_id: int) -> None:
        """An ended run's attachments and text are of no more use: free their disk now, not at purge."""
        shed_run_files(Path(self.settings.data_dir) / "work" / str(run_id))

    def _remember_ended(self, run_id: int) -> None:
        """Note that this engine reported ``run_id``'s end (call under ``_cond``); the last ENDED_REMEMBERED."""
        self._ended[run_id] = None
        if len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)

    def _forget(self, run_id: int) -> None:
        """Drop what the engine remembers of a run's breaks (call under ``_cond``)."""
        for memory in (self._internal_requeues, self._env_breaks, self._not_before, self._machine_short,
                       self._rebuilds):
            memory.pop(run_id, None)

    def _run_broken(self, run_id: int, exc: Exception) -> None:
        """Free the run's slot, decide requeue or fail (module docstring), and try to store that. Guarded: a run
        whose break could not be handled would stay running, heartbeated, holding its slot until serve stops."""
        try:
            self._handle_break(run_id, exc)
        except Exception as err:
            log.error("run %s: its break could not be handled (%s); requeueing it", run_id, one_line(err),
                      exc_info=err)
            with self._cond:
                self._active.pop(run_id, None)
                self._unsettled.setdefault(run_id, None)  # the dispatcher's guarded loop stores the requeue
                self._wake = True
                self._cond.notify_all()

    def _handle_break(self, run_id: int, exc: Exception) -> None:
        if isinstance(exc, RunTakenOver):  # another process runs it now: nothing of ours to store
            with self._cond:
                self._active.pop(run_id, None)
                self._forget(run_id)
                self._cond.notify_all()
            return
        self._note_damage(exc)
        decided = self._decide(run_id, exc)
        if decided is None:
            return  # decided already: this is a second report of the same break
        outcome = decided[0]
        if isinstance(exc, (MachineShortError, ClusterUnavailableError)):  # no bookkeeping broke: the run waits
            what = "the machine" if isinstance(exc, MachineShortError) else "the Dask cluster"
            # one line per cause per interval: every waiting run's every backoff logged 154 lines in 37 s
            self._log_break(f"waiting for {what}: {cause_of(exc)}", logging.WARNING, None, outcome.startswith("failed"),
                            "run %s: waiting for %s: %s; %s", run_id, what, one_line(exc), outcome)
        elif isinstance(exc, WorkLostError):  # no bug: someone deleted the work dir (one line per interval)
            self._log_break(f"work files lost: {cause_of(exc)}", logging.WARNING, None, outcome.startswith("failed"),
                            "run %s: %s; %s", run_id, one_line(exc), outcome)
        elif isinstance(exc, (StoreError, OSError)):
            # the store's or the disk's fault, shared by every run it breaks: one line per cause per interval (a
            # full disk gave 32 runs a traceback each in one second), a traceback with the first unless the store
            # does not answer, which is no bug (a prober's lost connections logged 102 tracebacks)
            self._log_break(f"bookkeeping failed: {cause_of(exc)}", logging.ERROR,
                            None if isinstance(exc, StoreUnavailableError) else exc, outcome.startswith("failed"),
                            "run %s: bookkeeping failed: %s; %s", run_id, one_line(exc), outcome)
        else:  # a bug's traceback is worth every line
            log.error("run %s: bookkeeping failed: %s; %s", run_id, one_line(exc), outcome, exc_info=exc)
        try:
            self._settle(run_id)
        except Exception as err:  # the dispatcher's guarded loop tries again, backing off
            log.error("run %s: cannot store that yet (%s); will retry", run_id, one_line(err))

    def _log_break(self, cause: str, level: int, exc_info: BaseException | None, failed: bool, message: str,
                   *args: object) -> None:
        """Log a break at ``level`` once per cause per interval, its traceback only the first time; the others
        at DEBUG, where they all are. A break that ``failed`` its run is always logged: it is the run's end."""
        first = not self._break_log.counts[cause]
        if failed:
            log.log(level, message, *args, exc_info=exc_info if first else None)
            self._break_log.counts[cause] += 1
        elif not self._break_log.report(cause, message, *args, level=level, exc_info=exc_info if first else None):
            log.debug(message, *args)

    def _decide(self, run_id: int, exc: Exception) -> tuple[str, bool] | None:
        """Record requeue or fail for a broken run; return (outcome for the log, first break), None if decided."""
        cfg = self.settings.engine
        environmental = isinstance(exc, OSError) or (isinstance(exc, PipelineError) and exc.retryable)
        with self._cond:
            if run_id in self._unsettled:
                return None
            self._active.pop(run_id, None)
            count, breaks = self._internal_requeues.get(run_id, 0), self._env_breaks.get(run_id, 0)
            alone = isinstance(exc, MachineShortError) and self._short_alone(run_id, one_line(exc))
            if isinstance(exc, ClusterUnavailableError):  # a cluster that cannot run tasks (a worker that cannot
                # import a dependency): the run waits, and two such make the engine unhealthy, as a full disk does
                self._machine_short[run_id] = _MachineWait(time.monotonic(), one_line(exc), self._successes,
                                                           self._successes, 1)
            rebuilds = self._rebuilds.get(run_id, 0)
            failure: str | None = None  # the reason the run fails with; None: it is requeued
            if alone:
                outcome = "failed (task_io: other runs succeeded while it waited, so it alone does not fit)"
                failure = f"task_io: {one_line(exc)} (other runs succeeded meanwhile)"
            elif isinstance(exc, WorkLostError) and rebuilds >= MAX_REBUILDS:
                outcome = f"failed (task_io: its work files were lost {rebuilds + 1} times)"
                failure = f"task_io: {one_line(exc)} (lost {rebuilds + 1} times)"
            elif isinstance(exc, WorkLostError):  # requeued with every task again: its parse reads the spool anew
                self._rebuilds[run_id] = rebuilds + 1
                self._to_rebuild.add(run_id)
                outcome = f"rebuilt from its spool file ({rebuilds + 1} of {MAX_REBUILDS})"
            elif environmental:  # never counted: the run waits out the fault, backing off
                self._env_breaks[run_id] = breaks + 1
                delay = backoff_s(cfg, breaks + 1)
                self._not_before[run_id] = time.monotonic() + delay
                outcome = f"requeued, tried again in {delay:g} s or later (environmental, not counted)"
            elif count < cfg.max_internal_requeues:
                self._internal_requeues[run_id] = count + 1
                outcome = f"requeued ({count + 1} of {cfg.max_internal_requeues})"
            else:
                outcome, failure = "failed (internal)", f"internal: {one_line(exc)}"
            self._unsettled[run_id] = failure and failure[:500]
            if self._unsettled[run_id] is None:  # `show` says why the run waits, not just that it is queued
                self._requeue_notes[run_id] = f"{outcome} (from {_utc_now()}): {one_line(exc)}"
            self._wake = True
            self._cond.notify_all()
        return outcome, count == 0 and breaks == 0

    def _short_alone(self, run_id: int, why: str) -> bool:
        """Record a break for the machine (under ``_cond``); True once the run has waited MACHINE_PATIENCE breaks
        while other runs succeeded: the machine has room for them, not for it."""
        seen = self._machine_short.get(run_id)
        first, breaks = (seen.successes_first, seen.breaks + 1) if seen else (self._successes, 1)
        self._machine_short[run_id] = _MachineWait(time.monotonic(), why, first, self._successes, breaks)
        return breaks >= MACHINE_PATIENCE and self._successes > first

    def _settle(self, run_id: int) -> None:
        """Store the decision for a broken run: requeue, or fail with its reason; raise if the store refuses.

        The entry is taken out first, so two threads never both write it: a slow
        requeue must not land after the dispatcher has requeued and claimed the run again.
        """
        with self._cond:
            if run_id not in self._unsettled:
                return  # another thread settled it
            reason = self._unsettled.pop(run_id)
        try:
            if reason is None and run_id in self._to_rebuild:
                changed = self.store.rebuild_run(run_id, owner=self.owner, note=self._requeue_notes.get(run_id))
            elif reason is None:
                changed = self.store.requeue_run(run_id, owner=self.owner, note=self._requeue_notes.get(run_id))
            else:
                changed = self.store.finish_run(run_id, s.FAILED, reason, owner=self.owner)
        except Exception:
            with self._cond:
                self._unsettled.setdefault(run_id, reason)
            raise
        with self._cond:
            self._requeue_notes.pop(run_id, None)
            self._to_rebuild.discard(run_id)
            if reason is not None or not changed:
                self._forget(run_id)
            self._wake = True
            self._cond.notify_all()
        if not changed:
            self._not_ours_anymore(run_id)
            return
        if reason is not None:
            metrics.run_finished(s.FAILED, reason)
            self._shed(run_id)
        tracing.send(tracing.RUN_FINISHED, run_id=run_id, state=s.QUEUED if reason is None else s.FAILED)

    def _not_ours_anymore(self, run_id: int) -> None:
        """A run to settle was no longer ours to change: ended by our own commit whose answer was lost (a
        PostgreSQL connection dropped after COMMIT: 51 of 100 successes went uncounted, logged as taken over,
        their files kept until purge; a prober's find), or recovered by another process after its heartbeat
        lapsed while the store refused us."""
        try:
            run = self.store.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - only the log line depends on it
            log.warning("run %s: no longer ours (%s)", run_id, one_line(exc))
            return
        if run.state not in (s.SUCCESS, s.FAILED) or run.owner != self.owner:
            log.warning("run %s: taken over by another process", run_id)
            return
        with self._cond:
            if run_id in self._ended:  # it ended just before the stop came to requeue it: counted then
                return
            self._remember_ended(run_id)
            self._successes += run.state == s.SUCCESS
        metrics.run_finished(run.state, run.reason)
        log.info("run %s (%s): %s%s (the answer to its commit was lost)", run_id, run.workflow, run.state,
                 f" ({run.reason})" if run.reason else "")
        self._shed(run_id)
        tracing.send(tracing.RUN_FINISHED, run_id=run_id, state=run.state)


def _utc_now() -> str:
    """The time now as ``14:05:03 UTC``: a requeue note is read long after ("tried again in 5 s" from when?)."""
    return time.strftime("%H:%M:%S UTC", time.gmtime())
