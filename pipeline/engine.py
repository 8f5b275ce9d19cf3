"""WorkflowEngine: the registry of workflows and the loop that runs them.

``trigger`` records a queued run (deduplicated by key) and returns at once; a
dispatcher thread claims queued runs in FIFO order while fewer than
``max_active_runs`` are active, and hands each to a DAGRunner. A heartbeat
thread keeps the engine's runs marked alive; on start, runs that a dead
process left running are requeued and their interrupted tasks tried again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import store as s
from . import tracing
from .config import Settings
from .dag import DAG
from .errors import PipelineError, UnknownWorkflowError
from .runner import DAGRunner, Executors
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
        self._started = True
        recovered = self.recover()
        if recovered:
            log.info("requeued %d run(s) left running by a dead process: %s", len(recovered), recovered)
        cfg = self.settings.runner
        self._timers = Timers()
        self._executors = Executors(
            cfg, ThreadPoolExecutor(cfg.thread_workers, thread_name_prefix="pipeline-task"),
            lambda: ProcessPoolExecutor(cfg.process_workers, mp_context=multiprocessing.get_context("forkserver")))
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
            leftovers = list(self._active)
        for run_id in leftovers:  # tasks still running past the grace period: their run is retried next start
            log.warning("run %s: still running after %.1f s grace, requeued", run_id, grace)
            self.store.requeue_run(run_id)
        for thread in self._threads:
            thread.join()
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
        while True:
            with self._cond:
                if not self._stopping and not self._wake:
                    self._cond.wait(1.0)  # also poll: another process may queue runs in a shared store
                if self._stopping:
                    return
                self._wake = False
            self._claim_runs()

    def _claim_runs(self) -> None:
        while True:
            with self._cond:
                if self._stopping or len(self._active) >= self.settings.engine.max_active_runs:
                    return
            run = self.store.claim_next_run(self.owner)
            if run is None:
                return
            self._start_run(run)

    def _start_run(self, run: Run) -> None:
        dag = self._workflows.get(run.workflow)
        if dag is None:
            self.store.finish_run(run.run_id, s.FAILED, f"unknown_workflow: {run.workflow!r} is not registered")
            return
        assert self._executors is not None and self._timers is not None
        runner = DAGRunner(self.store, dag, run, executors=self._executors, timers=self._timers,
                           work_dir=Path(self.settings.data_dir) / "work" / str(run.run_id),
                           on_finish=self._on_run_finished)
        with self._cond:
            self._active[run.run_id] = runner
        log.info("run %s (%s): running", run.run_id, run.workflow)
        tracing.send(tracing.RUN_STARTED, run=run)
        try:
            runner.start()
        except PipelineError as exc:
            log.error("run %s: cannot start: %s", run.run_id, exc)
            self.store.finish_run(run.run_id, s.FAILED, f"{exc.reason}: {exc}")
            self._on_run_finished(run.run_id, s.FAILED)

    def _on_run_finished(self, run_id: int, state: str) -> None:
        with self._cond:
            self._active.pop(run_id, None)
            self._wake = True
            self._cond.notify_all()
        tracing.send(tracing.RUN_FINISHED, run_id=run_id, state=state)

    def _heartbeat_loop(self) -> None:
        interval = self.settings.engine.heartbeat_interval_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=interval)
                if self._stopping:
                    return
                ids = list(self._active)
            if ids:
                self.store.heartbeat(ids)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
