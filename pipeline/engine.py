"""WorkflowEngine: the registry of workflows and the loop that runs them.

``trigger`` records a queued run (deduplicated by key) and returns at once; a
dispatcher thread claims queued runs in FIFO order (``claim_batch`` per
transaction) while fewer than ``max_active_runs`` are active, and hands each
to a DAGRunner. A heartbeat
thread keeps the engine's runs marked alive and, every ``stale_after_s``,
requeues runs whose owner is gone (a dead pid on this host, an owner of this
very pid that is not a live engine, as after a container restart as PID 1, or
a stale heartbeat), so their interrupted tasks are tried again.

Both threads are guarded like huey's consumer loop (``health.LoopHealth``):
an iteration that raises is logged, the loop backs off and goes on; after
``unhealthy_after`` failures in a row the engine reports itself unhealthy
(``healthy``, ``health_problem``: the gateway then answers 451 so senders
retry). While a run requeued for a broken start waits, only a run that starts
again makes the engine healthy: an empty queue proves nothing. Once it has
failed for good, the dispatcher's next pass does, so one poison mail does not
stop the gateway. A damaged store (``StoreCorruptError``, from any loop or
run) is different: it does not heal, so the engine stays unhealthy, saying
so, until it is restarted (after the file is restored).

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
Every write for a claimed run
carries this engine's owner: a run another process took over is left alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from . import liveness, metrics, tracing
from . import store as s
from .config import Settings
from .dag import DAG
from .errors import (
    ClusterUnavailableError,
    MachineShortError,
    PipelineError,
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    UnknownWorkflowError,
)
from .executors import Executors, init_pool_worker
from .health import LoopHealth, backoff_s, one_line
from .passes import Passes
from .runner import DAGRunner
from .store import DAGRunStore, Run, RunTakenOver
from .timers import Timers
from .workdir import shed_run_files

log = logging.getLogger(__name__)
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


class WorkflowEngine:
    """Run registered workflows concurrently, bounded, with recovery."""

    def __init__(self, store: DAGRunStore, settings: Settings | None = None) -> None:
        self.store = store
        self.settings = (settings or Settings()).validate()
        self.owner = liveness.new_owner()
        self._workflows: dict[str, DAG] = {}
        self._active: dict[int, DAGRunner] = {}
        self._cond = threading.Condition()
        self._wake = False
        self._unwatch = lambda: None  # stops the store's queue watcher (see start)
        self.queue_notices = 0  # wake-ups by the store's watcher: some process (SQLite: this one too) queued runs
        self._stopping = False
        self._started = False
        self.abandoned = 0  # runs with tasks still running when shutdown's grace ended (requeued)
        self._threads: list[threading.Thread] = []
        self._timers: Timers | None = None
        self._executors: Executors | None = None
        self._dispatch_health = LoopHealth("claiming runs", self.settings.engine)
        self._heartbeat_health = LoopHealth("heartbeat", self.settings.engine)
        self._dispatch_passes, self._heartbeat_passes = Passes("claiming runs"), Passes("heartbeat")
        self._unsettled: dict[int, str | None] = {}  # broken run -> reason to fail it with (None: requeue)
        self._requeue_notes: dict[int, str] = {}  # run to requeue -> why, for its reason in the store
        self._internal_requeues: dict[int, int] = {}  # run -> requeues for a non-environmental bookkeeping error
        self._env_breaks: dict[int, int] = {}  # run -> breaks by an environmental error (its backoff exponent)
        self._not_before: dict[int, float] = {}  # requeued broken run -> monotonic time before no run is claimed
        self._store_damage: str | None = None  # set for good once the store reports damaged pages
        self._machine_short: dict[int, _MachineWait] = {}  # run requeued for the machine -> its wait
        self._successes = 0  # runs that ended in success
        # runs whose end this engine reported: a run the stop requeues may end just before (not counted twice)
        self._ended: OrderedDict[int, None] = OrderedDict()
        # None: claim any queued run; a set: only these (``ingest`` runs its own runs, never a serve's backlog)
        self.claim_only: set[int] | None = None
        self.machine_witnesses = MACHINE_WITNESSES  # ingest: 1 (no other mail will come to show there is room)

    # -- health -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while a background loop keeps failing; see ``health_problem``."""
        return self.health_problem is None

    @property
    def health_problem(self) -> str | None:
        """One line naming the failing loop and its last error; None when healthy."""
        return (self._store_damage or self._machine_problem() or self._dispatch_health.problem
                or self._heartbeat_health.problem or self._stuck_problem())

    def _stuck_problem(self) -> str | None:
        """A loop or callback pass running past ``[engine] stuck_after_s``: a hang no exception reports."""
        after = self.settings.engine.stuck_after_s
        passes = [self._dispatch_passes, self._heartbeat_passes]
        if self._timers is not None and self._executors is not None:
            passes += [self._timers.passes, self._executors.completion_passes]
        return next((p for p in (one.problem(after) for one in passes) if p), None)

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

    # -- registry and triggering -----------------------------------------------

    def register(self, dag: DAG) -> None:
        """Make ``dag`` triggerable under its workflow id (replacing a previous one)."""
        self._workflows[dag.workflow_id] = dag

    @property
    def workflows(self) -> dict[str, DAG]:
        """Registered workflows by id."""
        return dict(self._workflows)

    def trigger(self, workflow: str, payload: dict[str, Any] | None = None, dedup_key: str | None = None) -> Run:
        """Queue a run of ``workflow``; with a ``dedup_key`` seen before, return that run instead."""
        return self.submit(workflow, payload, dedup_key)[0]

    def submit(self, workflow: str, payload: dict[str, Any] | None = None,
               dedup_key: str | None = None) -> tuple[Run, bool]:
        """Like ``trigger``, and say whether the run is new (False: ``dedup_key`` was seen before)."""
        if workflow not in self._workflows:
            raise UnknownWorkflowError(workflow, list(self._workflows))
        run, created = self.store.create_run(workflow, payload or {}, dedup_key)
        if created:
            log.info("run %s (%s): queued%s", run.run_id, workflow, f" key={dedup_key}" if dedup_key else "")
            self.wake()
        return run, created

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> WorkflowEngine:
        """Recover runs of dead processes, then start dispatching; returns self."""
        if self._started:
            return self
        recovered = self.recover()  # may raise StoreError: then nothing was started
        self._started = True
        liveness.LIVE_OWNERS.add(self.owner)
        self._unwatch = self.store.watch_queue(self._queue_noticed)
        if recovered:
            log.info("requeued %d run(s) left running by a dead process: %s", len(recovered), recovered)
        cfg = self.settings.runner
        self._timers = Timers()
        self._executors = Executors(
            cfg, ThreadPoolExecutor(cfg.thread_workers, thread_name_prefix="pipeline-task"),
            lambda: ProcessPoolExecutor(cfg.process_workers, mp_context=multiprocessing.get_context("forkserver"),
                                        initializer=init_pool_worker,
                                        initargs=(os.getpid(), logging.getLogger().getEffectiveLevel())),
            cluster=self.settings.executor)
        if any(t.executor == "process" for dag in self._workflows.values() for t in dag.tasks):
            self._executors.warm_process_pool()  # the workers' imports run beside the rest of start-up
        for name, target in (("dispatcher", self._dispatch_loop), ("heartbeat", self._heartbeat_loop)):
            thread = threading.Thread(target=target, name=f"pipeline-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def recover(self) -> list[int]:
        """Requeue running runs whose owner is gone (dead pid on this host, or a stale heartbeat), and runs in this
        engine's name that it does not run, their heartbeat stale: a claim whose COMMIT reached the store while
        its answer did not (the store's server died in between) left such a run, and nothing ran it until serve
        restarted (a prober's store_server_down: an acked mail without a run end after 240 s)."""
        stale_before = time.time() - self.settings.engine.stale_after_s
        with self._cond:
            ours = set(self._active) | set(self._unsettled)

        def dead(run: Run) -> bool:
            if run.owner == self.owner:
                return run.run_id not in ours and (run.heartbeat_at is None or run.heartbeat_at < stale_before)
            return liveness.is_dead(run, self.owner, stale_before)

        return self.store.recover_runs(dead)

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop claiming runs, let live tasks finish within the grace period, requeue the rest."""
        if not self._started or self._stopping:
            return
        grace = self.settings.engine.shutdown_grace_s if grace_s is None else grace_s
        with self._cond:
            self._stopping = True
            runners = list(self._active.values())
            self._cond.notify_all()
        for runner in runners:
            runner.stop()
        deadline = time.monotonic() + grace
        with self._cond:
            while self._active and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            leftovers = dict(self._active)
            self._active.clear()
        self.abandoned = len(leftovers)
        for thread in self._threads:
            thread.join()
        for run_id, runner in leftovers.items():  # tasks still running past the grace period: retried next start
            if runner.abandon():  # it had broken and waited for its tries: handed over (decided) just now
                continue
            log.warning("run %s: still running after %.1f s grace, requeued", run_id, grace)
            self._requeue_notes[run_id] = f"requeued: serve stopped while a task still ran ({grace:g} s grace)"
            self._unsettled.setdefault(run_id, None)
        for run_id in list(self._unsettled):
            try:
                self._settle(run_id)
            except Exception as exc:  # the next start's recovery requeues it (its owner is this dead process)
                log.error("run %s: left running, store refused: %s: %s", run_id, type(exc).__name__, exc)
        assert self._executors is not None and self._timers is not None
        self._executors.shutdown(wait=not leftovers)
        self._timers.close()
        self._unwatch()
        liveness.LIVE_OWNERS.discard(self.owner)

    def __enter__(self) -> WorkflowEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def active_runs(self) -> list[int]:
        """Ids of the runs this engine is executing now."""
        with self._cond:
            return list(self._active)

    def wait(self, run_id: int, timeout: float | None = None) -> Run:
        """Block until the run is success or failed, and return it (TimeoutError after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.store.get_run(run_id)
            if run.state in (s.SUCCESS, s.FAILED):
                return run
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"run {run_id} still {run.state} after {timeout} s")
            with self._cond:
                self._cond.wait(0.2 if remaining is None else min(0.2, remaining))

    # -- threads ----------------------------------------------------------------

    def claim_also(self, run_id: int) -> None:
        """With ``claim_only`` set: let the dispatcher claim this run too, now."""
        with self._cond:
            assert self.claim_only is not None, "claim_also is for an engine limited by claim_only"
            self.claim_only.add(run_id)
            self._wake = True
            self._cond.notify_all()

    def wake(self) -> None:
        """Look for queued runs now (after runs were queued behind the engine's back)."""
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def _queue_noticed(self) -> None:
        """Wake the dispatcher: the store's watcher saw runs queued (by any process) committed."""
        self.queue_notices += 1
        self.wake()

    def _dispatch_loop(self) -> None:
        # also poll: another process may queue runs in a shared store; a store that notifies (PostgreSQL
        # LISTEN, SQLite's datagrams on this host) wakes us at its commit, so its poll is only a fallback
        poll_s = self.settings.engine.queue_poll_s if self.store.queue_notifications else 1.0
        delay = 0.0
        while True:
            with self._cond:
                if delay:  # backing off after a failure: only a stop cuts the wait short
                    self._cond.wait_for(lambda: self._stopping, timeout=delay)
                elif not self._stopping and not self._wake:
                    self._cond.wait(poll_s)
                if self._stopping:
                    return
                self._wake = False
            with self._dispatch_passes.passing():
                delay = self._dispatch_once()

    def _dispatch_once(self) -> float:
        """Settle broken runs, then claim and start runs; return how long to wait before the next try (0: none)."""
        try:
            with self._cond:
                unsettled = list(self._unsettled)
            for run_id in unsettled:
                self._settle(run_id)
            started, broken = self._claim_runs()
        except Exception as exc:  # the store refused a claim or a settlement; so might the next try
            self._note_damage(exc)
            return self._dispatch_health.failed(exc)
        if broken is not None:
            self._note_damage(broken[1])
            return max(self._dispatch_health.failed(broken[1], [broken[0]]), self._hold_s())
        with self._cond:
            waiting = bool(self._not_before)  # a broken run waits to be tried again: no evidence the fault passed
        if started or not waiting:
            self._dispatch_health.succeeded()
        return self._hold_s()

    def _hold_s(self) -> float:
        """Seconds until the latest-due requeued broken run may be claimed again (0: claim now)."""
        with self._cond:
            return max([0.0, *(t - time.monotonic() for t in self._not_before.values())])

    def _claim_runs(self) -> tuple[bool, tuple[int, Exception] | None]:
        """Start queued runs while slots are free; return (whether one started, (run id, error) of one that broke).

        Claims up to ``claim_batch`` runs per transaction. Claims nothing while a run requeued for a
        broken start backs off: the queue is FIFO, so it would be claimed again at once, and the
        fault is the environment's; the rest of a batch goes back to the queue then.
        """
        started = False
        while True:
            with self._cond:
                free = self.settings.engine.max_active_runs - len(self._active)
                if self._stopping or free <= 0 or self._hold_s():
                    return started, None
                only = None if self.claim_only is None else set(self.claim_only)
            runs = self.store.claim_runs(self.owner, min(free, self.settings.engine.claim_batch), only=only)
            if not runs:
                with self._cond:
                    self._not_before.clear()  # all were due, and none is queued here any more
                return started, None
            for n, run in enumerate(runs):
                try:
                    started |= self._start_run(run)
                except Exception as exc:  # work dir, store, a bug: the run is requeued or failed, never left running
                    runner = self._active.get(run.run_id)
                    if runner is not None:
                        runner.fail(exc)  # hands the run to _run_broken once its live tries have ended
                    else:
                        self._run_broken(run.run_id, exc)
                    self._give_back(runs[n + 1:])
                    return started, (run.run_id, exc)

    def _give_back(self, runs: list[Run]) -> None:
        """Requeue claimed runs not started; one the store will not take back now is requeued by the dispatcher's
        guarded loop later (``_settle``), as a broken run's requeue is: no heartbeat of ours would ever go stale."""
        for run in runs:
            try:
                self.store.requeue_run(run.run_id, owner=self.owner)
            except Exception as exc:
                log.error("run %s: claimed, not started, and cannot be requeued now (%s); will retry",
                          run.run_id, one_line(exc))
                with self._cond:
                    self._unsettled.setdefault(run.run_id, None)

    def _start_run(self, run: Run) -> bool:
        """Start a claimed run; return False if it was not started (unknown workflow, or stopping)."""
        dag = self._workflows.get(run.workflow)
        if dag is None:
            self.store.finish_run(run.run_id, s.FAILED, f"unknown_workflow: {run.workflow!r} is not registered",
                                  owner=self.owner)
            return False
        assert self._executors is not None and self._timers is not None
        runner = DAGRunner(self.store, dag, run, executors=self._executors, timers=self._timers,
                           work_dir=Path(self.settings.data_dir) / "work" / str(run.run_id),
                           on_finish=self._on_run_finished, on_broken=self._run_broken,
                           abandon_grace_s=self.settings.engine.shutdown_grace_s)
        with self._cond:
            stopping = self._stopping
            if not stopping:
                self._active[run.run_id] = runner
        if stopping:  # shutdown began during the claim and will not wait for this run: do not start it
            self.store.requeue_run(run.run_id, owner=self.owner, note="requeued: serve stopped before it started")
            return False
        log.debug("run %s (%s): running", run.run_id, run.workflow)  # the queued and ended lines are at INFO
        tracing.send(tracing.RUN_STARTED, run=run)
        runner.start()
        with self._cond:
            self._not_before.pop(run.run_id, None)
        return True

    def _on_run_finished(self, run_id: int, state: str) -> None:
        with self._cond:
            self._active.pop(run_id, None)
            self._successes += state == s.SUCCESS
            if state != s.QUEUED:
                self._remember_ended(run_id)
                self._forget(run_id)
                if self.claim_only is not None:  # ended: never claimed again (every claim sends the whole set)
                    self.claim_only.discard(run_id)
            self._wake = True
            self._cond.notify_all()
        if state != s.QUEUED:
            self._shed(run_id)
        tracing.send(tracing.RUN_FINISHED, run_id=run_id, state=state)

    def _shed(self, run_id: int) -> None:
        """An ended run's attachments and text are of no more use: free their disk now, not at purge."""
        shed_run_files(Path(self.settings.data_dir) / "work" / str(run_id))

    # -- runs whose bookkeeping failed ------------------------------------------------

    def _remember_ended(self, run_id: int) -> None:
        """Note that this engine reported ``run_id``'s end (call under ``_cond``); the last ENDED_REMEMBERED."""
        self._ended[run_id] = None
        if len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)

    def _forget(self, run_id: int) -> None:
        """Drop what the engine remembers of a run's breaks (call under ``_cond``)."""
        for memory in (self._internal_requeues, self._env_breaks, self._not_before, self._machine_short):
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
        outcome, first = decided
        if isinstance(exc, (MachineShortError, ClusterUnavailableError)):  # no bookkeeping broke: the run waits
            what = "the machine" if isinstance(exc, MachineShortError) else "the Dask cluster"
            log.warning("run %s: waiting for %s: %s; %s", run_id, what, one_line(exc), outcome)
        else:
            # a bug's traceback is worth every line; a store that does not answer is no bug (a prober's lost
            # connections logged 102 tracebacks for 133 dropped answers)
            traceback = not isinstance(exc, StoreUnavailableError) and (
                first or not isinstance(exc, (StoreError, OSError)))
            log.error("run %s: bookkeeping failed: %s; %s", run_id, one_line(exc), outcome,
                      exc_info=exc if traceback else None)
        try:
            self._settle(run_id)
        except Exception as err:  # the dispatcher's guarded loop tries again, backing off
            log.error("run %s: cannot store that yet (%s); will retry", run_id, one_line(err))

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
            if alone:
                outcome = "failed (task_io: other runs succeeded while it waited, so it alone does not fit)"
            elif environmental:  # never counted: the run waits out the fault, backing off
                self._env_breaks[run_id] = breaks + 1
                delay = backoff_s(cfg, breaks + 1)
                self._not_before[run_id] = time.monotonic() + delay
                outcome = f"requeued, tried again in {delay:g} s or later (environmental, not counted)"
            elif count < cfg.max_internal_requeues:
                self._internal_requeues[run_id] = count + 1
                outcome = f"requeued ({count + 1} of {cfg.max_internal_requeues})"
            else:
                outcome = "failed (internal)"
            self._unsettled[run_id] = f"internal: {one_line(exc)}"[:500] if outcome == "failed (internal)" else \
                f"task_io: {one_line(exc)} (other runs succeeded meanwhile)"[:500] if alone else None
            if self._unsettled[run_id] is None:  # `show` says why the run waits, not just that it is queued
                self._requeue_notes[run_id] = f"{outcome}: {one_line(exc)}"
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
            if reason is None:
                changed = self.store.requeue_run(run_id, owner=self.owner, note=self._requeue_notes.get(run_id))
            else:
                changed = self.store.finish_run(run_id, s.FAILED, reason, owner=self.owner)
        except Exception:
            with self._cond:
                self._unsettled.setdefault(run_id, reason)
            raise
        with self._cond:
            self._requeue_notes.pop(run_id, None)
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

    def _heartbeat_loop(self) -> None:
        cfg = self.settings.engine
        delay, next_recovery = cfg.heartbeat_interval_s, time.monotonic() + cfg.stale_after_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=delay)
                if self._stopping:
                    return
                ids = list(self._active)
            try:
                with self._heartbeat_passes.passing():
                    self._beat(ids)
                    if time.monotonic() >= next_recovery:  # a dead process's runs, even one that died after start
                        self._recover_now()
                        next_recovery = time.monotonic() + cfg.stale_after_s
            except Exception as exc:  # retried sooner than the interval, so a short outage costs no stale runs
                self._note_damage(exc)
                delay = min(cfg.heartbeat_interval_s, self._heartbeat_health.failed(exc, ids))
            else:
                self._heartbeat_health.succeeded()
                delay = cfg.heartbeat_interval_s

    def _beat(self, ids: list[int]) -> None:
        """Refresh our runs' heartbeats; a run no longer running under our owner was taken over: let it go."""
        if not ids or self.store.heartbeat(ids, owner=self.owner) == len(ids):
            return
        for run_id in ids:
            run = self.store.get_run(run_id)
            with self._cond:
                runner = self._active.get(run_id)
            if runner is not None and (run.state != s.RUNNING or run.owner != self.owner):
                runner.taken_over()  # does nothing if the runner wrote the run's outcome itself meanwhile

    def _recover_now(self) -> None:
        recovered = self.recover()
        if recovered:
            log.warning("requeued %d run(s) left running by a dead process, or by a claim whose answer was lost: "
                        "%s", len(recovered), recovered)
            self.wake()
