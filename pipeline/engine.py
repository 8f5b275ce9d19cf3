"""WorkflowEngine: the registry of workflows and the loop that runs them.

``trigger`` records a queued run (deduplicated by key) and returns at once; a
dispatcher thread claims queued runs in FIFO order while fewer than
``max_active_runs`` are active, and hands each to a DAGRunner. A heartbeat
thread keeps the engine's runs marked alive; on start, runs that a dead
process left running are requeued and their interrupted tasks tried again.

Both threads are guarded like huey's consumer loop: an iteration that raises
is logged (with a traceback for the first failure of a streak, one line for
each further one), the loop backs off (``backoff_base_s`` doubling up to
``backoff_max_s``) and goes on. After ``unhealthy_after`` failures in a row
the engine reports itself unhealthy (``healthy``, ``health_problem``: the
gateway then answers 451 so senders retry); the next iteration that succeeds
makes it healthy again.

A run whose bookkeeping failed (its work dir cannot be made, a store write
raised in a runner callback, anything unexpected) is never left running. Rule:
it is requeued, since its finished tasks are kept and the fault (a locked or
full store, a read-only dir) may pass, unless the error says retrying cannot
help (``retryable`` false, e.g. StoreCorruptError) or this process already
requeued it ``max_internal_requeues`` times; then it fails with reason
``internal: <ExcType>: <message>``. If the store refuses that write too, the
dispatcher retries it from its guarded loop until the store accepts it;
meanwhile the run holds no slot and is not heartbeated, so another process's
recovery may take it over.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import store as s
from . import tracing
from .config import EngineConfig, Settings
from .dag import DAG
from .errors import UnknownWorkflowError
from .runner import DAGRunner, Executors, ignore_stop_signals
from .store import DAGRunStore, Run
from .timers import Timers

log = logging.getLogger(__name__)
_HOST = socket.gethostname()


class WorkflowEngine:
    """Run registered workflows concurrently, bounded, with recovery."""

    def __init__(self, store: DAGRunStore, settings: Settings | None = None) -> None:
        self.store = store
        self.settings = (settings or Settings()).validate()
        self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._workflows: dict[str, DAG] = {}
        self._active: dict[int, DAGRunner] = {}
        self._cond = threading.Condition()
        self._wake = False
        self._stopping = False
        self._started = False
        self._threads: list[threading.Thread] = []
        self._timers: Timers | None = None
        self._executors: Executors | None = None
        self._dispatch_health = _LoopHealth("claiming runs", self.settings.engine)
        self._heartbeat_health = _LoopHealth("heartbeat", self.settings.engine)
        self._unsettled: dict[int, str | None] = {}  # broken run -> reason to fail it with (None: requeue)
        self._internal_requeues: dict[int, int] = {}  # run -> times requeued for a bookkeeping failure

    # -- health -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while a background loop keeps failing; see ``health_problem``."""
        return self.health_problem is None

    @property
    def health_problem(self) -> str | None:
        """One line naming the failing loop and its last error; None when healthy."""
        return self._dispatch_health.problem or self._heartbeat_health.problem

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
        if workflow not in self._workflows:
            raise UnknownWorkflowError(workflow, list(self._workflows))
        run, created = self.store.create_run(workflow, payload or {}, dedup_key)
        if created:
            log.info("run %s (%s): queued%s", run.run_id, workflow, f" key={dedup_key}" if dedup_key else "")
            self.wake()
        return run

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> WorkflowEngine:
        """Recover runs of dead processes, then start dispatching; returns self."""
        if self._started:
            return self
        recovered = self.recover()  # may raise StoreError: then nothing was started
        self._started = True
        if recovered:
            log.info("requeued %d run(s) left running by a dead process: %s", len(recovered), recovered)
        cfg = self.settings.runner
        self._timers = Timers()
        self._executors = Executors(
            cfg, ThreadPoolExecutor(cfg.thread_workers, thread_name_prefix="pipeline-task"),
            lambda: ProcessPoolExecutor(cfg.process_workers, mp_context=multiprocessing.get_context("forkserver"),
                                        initializer=ignore_stop_signals))
        for name, target in (("dispatcher", self._dispatch_loop), ("heartbeat", self._heartbeat_loop)):
            thread = threading.Thread(target=target, name=f"pipeline-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def recover(self) -> list[int]:
        """Requeue running runs whose owner is gone (dead pid on this host, or a stale heartbeat)."""
        stale_before = time.time() - self.settings.engine.stale_after_s
        return self.store.recover_runs(lambda run: self._is_dead(run, stale_before))

    def _is_dead(self, run: Run, stale_before: float) -> bool:
        if run.owner == self.owner:
            return False
        if run.owner is None or run.heartbeat_at is None or run.heartbeat_at < stale_before:
            return True
        host, _, rest = run.owner.partition(":")
        pid = rest.partition(":")[0]
        return host == _HOST and pid.isdigit() and not _pid_alive(int(pid))

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
        for thread in self._threads:
            thread.join()
        for run_id, runner in leftovers.items():  # tasks still running past the grace period: retried next start
            runner.abandon()  # their late results and cancelled futures must not write over the requeue
            log.warning("run %s: still running after %.1f s grace, requeued", run_id, grace)
            self._unsettled.setdefault(run_id, None)
        for run_id in list(self._unsettled):
            try:
                self._settle(run_id)
            except Exception as exc:  # the next start's recovery requeues it (its owner is this dead process)
                log.error("run %s: left running, store refused: %s: %s", run_id, type(exc).__name__, exc)
        assert self._executors is not None and self._timers is not None
        self._executors.shutdown(wait=not leftovers)
        self._timers.close()

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

    def wake(self) -> None:
        """Look for queued runs now (after runs were queued behind the engine's back)."""
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def _dispatch_loop(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                if delay:  # backing off after a failure: only a stop cuts the wait short
                    self._cond.wait_for(lambda: self._stopping, timeout=delay)
                elif not self._stopping and not self._wake:
                    self._cond.wait(1.0)  # also poll: another process may queue runs in a shared store
                if self._stopping:
                    return
                self._wake = False
            delay = self._dispatch_once()

    def _dispatch_once(self) -> float:
        """Settle broken runs, then claim and start runs; return the backoff before the next try (0: none)."""
        try:
            with self._cond:
                unsettled = list(self._unsettled)
            for run_id in unsettled:
                self._settle(run_id)
            broken = self._claim_runs()
        except Exception as exc:  # the store refused a claim or a settlement; so might the next try
            return self._dispatch_health.failed(exc)
        if broken is not None:
            return self._dispatch_health.failed(broken[1], [broken[0]])
        self._dispatch_health.succeeded()
        return 0.0

    def _claim_runs(self) -> tuple[int, Exception] | None:
        """Start queued runs while slots are free; return (run id, error) of a run that could not start."""
        while True:
            with self._cond:
                if self._stopping or len(self._active) >= self.settings.engine.max_active_runs:
                    return None
            run = self.store.claim_next_run(self.owner)
            if run is None:
                return None
            try:
                self._start_run(run)
            except Exception as exc:  # work dir, store, a bug: the run is requeued or failed, never left running
                self._run_broken(run.run_id, exc)
                return run.run_id, exc

    def _start_run(self, run: Run) -> None:
        dag = self._workflows.get(run.workflow)
        if dag is None:
            self.store.finish_run(run.run_id, s.FAILED, f"unknown_workflow: {run.workflow!r} is not registered")
            return
        assert self._executors is not None and self._timers is not None
        runner = DAGRunner(self.store, dag, run, executors=self._executors, timers=self._timers,
                           work_dir=Path(self.settings.data_dir) / "work" / str(run.run_id),
                           on_finish=self._on_run_finished, on_broken=self._run_broken)
        with self._cond:
            self._active[run.run_id] = runner
        log.info("run %s (%s): running", run.run_id, run.workflow)
        tracing.send(tracing.RUN_STARTED, run=run)
        runner.start()

    def _on_run_finished(self, run_id: int, state: str) -> None:
        with self._cond:
            self._active.pop(run_id, None)
            if state != s.QUEUED:
                self._internal_requeues.pop(run_id, None)
            self._wake = True
            self._cond.notify_all()
        tracing.send(tracing.RUN_FINISHED, run_id=run_id, state=state)

    # -- runs whose bookkeeping failed ------------------------------------------------

    def _run_broken(self, run_id: int, exc: Exception) -> None:
        """Free the run's slot, decide requeue or fail (module docstring), and try to store that."""
        cfg = self.settings.engine
        what = _one_line(exc)
        with self._cond:
            runner = self._active.pop(run_id, None)
            count = self._internal_requeues.get(run_id, 0)
            requeue = getattr(exc, "retryable", True) and count < cfg.max_internal_requeues
            reason = None if requeue else f"internal: {what}"[:500]
            self._internal_requeues[run_id] = count + 1
            self._unsettled[run_id] = reason  # the dispatcher settles it if the store refuses now
            self._wake = True
            self._cond.notify_all()
        if runner is not None:
            runner.abandon()
        outcome = f"requeued ({count + 1} of {cfg.max_internal_requeues})" if requeue else "failed (internal)"
        log.error("run %s: bookkeeping failed: %s; %s", run_id, what, outcome)
        try:
            self._settle(run_id)
        except Exception as err:  # the dispatcher's guarded loop tries again, backing off
            log.error("run %s: cannot store that yet (%s); will retry", run_id, _one_line(err))

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
                self.store.requeue_run(run_id)
            else:
                self.store.finish_run(run_id, s.FAILED, reason)
        except Exception:
            with self._cond:
                self._unsettled.setdefault(run_id, reason)
            raise
        with self._cond:
            if reason is not None:
                self._internal_requeues.pop(run_id, None)
            self._wake = True
            self._cond.notify_all()
        tracing.send(tracing.RUN_FINISHED, run_id=run_id, state=s.QUEUED if reason is None else s.FAILED)

    def _heartbeat_loop(self) -> None:
        interval = self.settings.engine.heartbeat_interval_s
        delay = interval
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=delay)
                if self._stopping:
                    return
                ids = list(self._active)
            try:
                if ids:
                    self.store.heartbeat(ids)
            except Exception as exc:  # retried sooner than the interval, so a short outage costs no stale runs
                delay = min(interval, self._heartbeat_health.failed(exc, ids))
            else:
                self._heartbeat_health.succeeded()
                delay = interval


class _LoopHealth:
    """One background loop's streak of failures: its backoff, its log lines and its health verdict."""

    def __init__(self, activity: str, config: EngineConfig) -> None:
        self.activity, self.config = activity, config
        self.failures = 0
        self.problem: str | None = None  # set once the streak reaches config.unhealthy_after

    def failed(self, exc: Exception, run_ids: Iterable[int] = ()) -> float:
        """Count and log a failed iteration; return how long the loop should wait before the next (s)."""
        self.failures += 1
        ids = list(run_ids)
        where = f" (run {', '.join(map(str, ids[:20]))}{' ...' if len(ids) > 20 else ''})" if ids else ""
        what = _one_line(exc)
        if self.failures == 1:  # one traceback per streak, then one line per failure
            log.error("%s failed%s: %s", self.activity, where, what, exc_info=exc)
        else:
            log.error("%s failed again (%d in a row)%s: %s", self.activity, self.failures, where, what)
        if self.failures >= self.config.unhealthy_after:
            if self.problem is None:
                log.error("engine unhealthy: %s failed %d times in a row", self.activity, self.failures)
            self.problem = f"{self.activity} failed {self.failures} times: {what}"
        return min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** min(self.failures - 1, 30))

    def succeeded(self) -> None:
        """End the streak; if the loop had failed, say it recovered."""
        if self.failures:
            log.warning("%s recovered after %d failure(s)", self.activity, self.failures)
        self.failures, self.problem = 0, None


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
