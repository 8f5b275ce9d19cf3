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

A run whose bookkeeping failed is never left running: ``engine_breaks.BrokenRuns``
requeues or fails it, and ``engine_heartbeat.Heartbeat`` is the heartbeat thread;
both are parts of WorkflowEngine, and their docstrings say how. Every write for
a claimed run carries this engine's owner: a run another process took over is
left alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import liveness, tracing
from . import store as s
from .config import MAX_THREADS, Settings
from .dag import DAG
from .engine_breaks import (  # noqa: F401 - MACHINE_*, ENDED_REMEMBERED and _MachineWait lived here
    ENDED_REMEMBERED,
    MACHINE_FRESH_S,
    MACHINE_PATIENCE,
    MACHINE_WITNESSES,
    BrokenRuns,
    _MachineWait,
)
from .engine_heartbeat import Heartbeat
from .errors import UnknownWorkflowError
from .executors import Executors, init_pool_worker
from .health import LoopHealth, one_line
from .passes import Passes
from .runner import DAGRunner
from .store import DAGRunStore, Run
from .timers import Timers
from .wakeup import not_watching

log = logging.getLogger(__name__)


class WorkflowEngine(BrokenRuns, Heartbeat):
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
        self._init_breaks()
        # None: claim any queued run; a set: only these (``ingest`` runs its own runs, never a serve's backlog)
        self.claim_only: set[int] | None = None

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
        # the runs' work dirs' parent, made once here: a runner makes only its own dir, so a data dir moved away
        # while serve runs is not made again at its old path (a probe's move back landed inside the new one)
        try:
            (Path(self.settings.data_dir) / "work").mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # each run's start then breaks on it, environmental, and the engine reports it
            log.warning("cannot make the work dir %s: %s", Path(self.settings.data_dir) / "work", exc)
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
            cluster=self.settings.executor,
            extract_threads=min(MAX_THREADS, self.settings.engine.max_active_runs * self.settings.ingest.workers))
        if any(t.executor == "process" for dag in self._workflows.values() for t in dag.tasks):
            self._executors.warm_process_pool()  # the workers' imports run beside the rest of start-up
        for name, target in (("dispatcher", self._dispatch_loop), ("heartbeat", self._heartbeat_loop)):
            thread = threading.Thread(target=target, name=f"pipeline-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

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
        self._break_log.flush()  # how many breaks of each cause were not logged since the last line
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
        notified = self.store.queue_notifications and self._unwatch is not not_watching  # (a watch that failed)
        poll_s = self.settings.engine.queue_poll_s if notified else 1.0
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
