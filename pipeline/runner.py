"""DAGRunner: executes one run's tasks, callback-driven.

No thread waits per run: ready tasks are submitted to a shared executor, and
each finished future advances the run from its done-callback. That keeps
hundreds of active runs cheap. Every transition goes to the store with its
timestamp; results reach dependents through ``TaskContext.upstream`` and are
persisted, so a resumed run reuses what already succeeded.

Callbacks are guarded. concurrent.futures only logs an exception raised in a
done-callback, so a store write failing there would leave the run running for
good. Instead every callback body runs in ``_guarded``: if it raises, the run
is abandoned (nothing more is written or submitted for it; late results of
its live tries are dropped). Its tries cannot be stopped, so the runner keeps
its slot until the last one ends (at most ``abandon_grace_s`` or the longest
task timeout), and only then hands the run to ``on_broken``, which requeues or
fails it (``WorkflowEngine`` decides): a requeued copy never runs beside them.
Every write carries the run's owner; one the store refuses because another
process took the run over abandons the run quietly (``RunTakenOver``).
What depends on a callback's store writes runs once the callback body has written them
(``_run_after_commit``): a try starts only once its RUNNING is committed, and the engine hears of a
run's end only once it is stored. If a write fails, the run breaks as above, having launched nothing.
A try interrupted by a stop (its future cancelled, its process pool broken, or
a retryable failure within the grace period) is not the task's failure: the
instance and the run go back to the queue.
A thread try runs with a ``WaitClock`` on which the extraction pool counts its
waits for a free worker; the transition that ends the try carries that figure
(``wait_s``), so a try's run time is told from its queue wait (issue 14). Tries in
a process pool or on Dask record no wait.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from . import dag as dags
from . import metrics, tracing, workdir
from . import store as s
from .dag import DAG, THREAD_EXECUTORS, Task, TaskContext, parse_instance
from .errors import (
    ClusterUnavailableError,
    IngestError,
    MachineShortError,
    StepError,
    StoreError,
    TaskTimeoutError,
    WorkerCrashedError,
    showable,
)
from .executors import Executors, call_task
from .handover import Handover
from .health import exc_text
from .stages.worker_pool import WaitClock, timing_waits
from .store import DAGRunStore, Run, RunTakenOver, Transition, encode_output
from .timers import Timers

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 2000  # of a task's stored error message
MACHINE_RETRIES = 1  # quick retries of a task failing for the machine (a full disk) before its run waits for it
# failures of the environment, not of the task: its run waits for them to pass. ClusterUnavailableError: a Dask
# scheduler that lost or cancelled the try (killed and restarted mid-burst, every document failed
# cluster_unavailable and its sender got an empty "partial" digest)
NOT_THE_TASKS = (MachineShortError, ClusterUnavailableError)


@dataclass
class _Instance:
    """In-memory state of one task instance."""

    task: Task
    index: int | None
    state: str = s.QUEUED
    try_number: int = 0
    output: Any = None
    error: tuple[str, str] | None = None
    started: float = 0.0  # monotonic start of the latest try (0: never tried), for the task duration metric
    clock: WaitClock | None = None  # the latest try's waits for a shared worker (thread tries only)


class DAGRunner:
    """Drive one run to a terminal state, or back to the queue when stopped."""

    def __init__(self, store: DAGRunStore, dag: DAG, run: Run, *, executors: Executors, timers: Timers,
                 work_dir: Path, on_finish: Callable[[int, str], None] = lambda run_id, state: None,
                 on_broken: Callable[[int, Exception], None] | None = None, abandon_grace_s: float = 10.0) -> None:
        self.store, self.dag, self.run = store, dag, run
        self.executors, self.timers, self.config = executors, timers, executors.config
        self.work_dir = work_dir
        self.on_finish = on_finish
        self.on_broken = on_broken
        self._lock = threading.RLock()
        self._instances: dict[str, _Instance] = {}
        self._by_task: dict[str, list[str]] = {}
        self._decided: set[str] = set()
        self._inflight: dict[str, int] = {}  # instance id -> try number of the live try
        self._waiting_retry: set[str] = set()
        self._terminal = 0  # instances in a terminal state
        self._stopping = False
        self._finished = False
        self._reported = False  # on_finish was called: the run's outcome is in the store
        self._abandoned = False
        self._after_commit: list[Callable[[], None]] = []  # launches and the run's report, once its writes commit
        cap = max([abandon_grace_s, *(t.timeout_s or self.config.default_timeout_s or 0.0 for t in dag.tasks)])
        self._handover = Handover(run.run_id, on_broken or (lambda run_id, exc: None), timers, cap)

    # -- public -----------------------------------------------------------------

    def start(self) -> None:
        """Load what the store knows of this run, then submit every ready task."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        workdir.clear_ended(self.work_dir)  # a run id used again (after a purge, a restored backup) runs anew
        static = [t.id for t in self.dag.tasks if t.map_over is None]
        with self._lock:
            self.store.create_tasks(self.run.run_id, static)
            for row in self.store.get_tasks(self.run.run_id):
                self._load(row)
            self._advance()
            self._run_after_commit()

    def stop(self) -> None:
        """Submit nothing more; once live tries end, the run goes back to the queue."""
        self._guarded(self._stop)

    def abandon(self) -> bool:
        """Write and submit nothing more; a broken run waiting for its tries is handed over now (True)."""
        with self._lock:
            self._abandoned = self._finished = True
            self._waiting_retry.clear()
        return self._handover.now(forced=True)

    def fail(self, exc: Exception) -> None:
        """Abandon the run for ``exc`` (``start`` raised); it is handed to ``on_broken`` once its tries end."""
        self._break(exc)

    def taken_over(self) -> None:
        """Abandon the run quietly, unless its outcome is written already: another process owns it now."""
        with self._lock:
            finished = self._finished
        if not finished:
            self._break(RunTakenOver(f"run {self.run.run_id} is no longer ours"))

    def _stop(self) -> None:
        self._stopping = True
        self._waiting_retry.clear()
        self._maybe_finish()

    def _guarded(self, body: Callable[..., None], *args: Any) -> None:
        """Run a callback body under the lock; if it raises, abandon the run (``_break``)."""
        try:
            with self._lock:
                if not self._abandoned:
                    body(*args)
                    self._run_after_commit()
        except Exception as exc:
            self._break(exc)

    def _run_after_commit(self) -> None:
        """Start the tries and report the outcome a callback decided, now that its writes are durable.

        A try starts only after its RUNNING (with its try number) is committed: a task that kills the
        process is counted, so recovery cannot retry it for ever. A launch whose future is done already
        runs its callback inline, which may queue more; a run abandoned meanwhile launches nothing more.
        """
        while self._after_commit and not self._abandoned:
            self._after_commit.pop(0)()
        self._after_commit.clear()

    def _break(self, exc: Exception) -> None:
        with self._lock:
            if self._abandoned:
                return
            self._abandoned = self._finished = True
            self._waiting_retry.clear()
            self._after_commit.clear()  # nothing more is launched: the run is requeued, its RUNNING rows reset
        if isinstance(exc, RunTakenOver):
            log.warning("run %s: taken over by another process", self.run.run_id)
        elif self._reported or self.on_broken is None:  # outcome stored already, or nobody to hand the run to
            log.error("run %s: bookkeeping failed, run abandoned: %s: %s", self.run.run_id, type(exc).__name__, exc,
                      exc_info=None if isinstance(exc, (StoreError, OSError)) else exc)
            return
        self._handover.broke(exc)

    # -- bookkeeping ----------------------------------------------------------

    def _load(self, row: s.TaskRun) -> None:
        try:
            task_id, index = parse_instance(row.task_id)
        except ValueError:
            task_id, index = "", None
        if not self.dag.has_task(task_id):
            log.warning("run %s: ignoring unknown task instance %r", self.run.run_id, row.task_id)
            return
        error = (row.error_type or "", row.error_message or "") if row.error_type else None
        self._instances[row.task_id] = _Instance(self.dag.task(task_id), index, row.state,
                                                 row.try_number, row.output, error)
        self._by_task.setdefault(task_id, []).append(row.task_id)
        self._terminal += row.state in s.TERMINAL_TASK_STATES

    def _complete(self, task_id: str) -> bool:
        return task_id in self._decided and all(
            self._instances[i].state in s.TERMINAL_TASK_STATES for i in self._by_task[task_id])

    def _succeeded(self, task_id: str) -> bool:
        return all(self._instances[i].state == s.SUCCESS for i in self._by_task[task_id])

    def _result_of(self, task_id: str) -> Any:
        task = self.dag.task(task_id)
        ids = self._by_task[task_id]
        if task.map_over is None:
            return self._instances[ids[0]].output
        if ids == [task_id]:  # mapped over nothing, or never expanded
            return []
        return [self._instances[i].output if self._instances[i].state == s.SUCCESS else None
                for i in sorted(ids, key=lambda i: self._instances[i].index or 0)]

    def _items(self, task: Task) -> Any:
        assert task.map_over is not None
        result = self._result_of(task.map_over)
        return task.map_items(result) if task.map_items is not None else result

    # -- scheduling -------------------------------------------------------------

    def _advance(self, candidates: tuple[str, ...] | None = None) -> None:
        """Decide each candidate task whose dependencies are complete; then finish if all is done."""
        work = list(self.dag.order if candidates is None else candidates)
        ready: list[str] = []
        while work and not self._stopping and not self._abandoned:  # abandoned by a callback run inline
            task_id = work.pop()
            task = self.dag.task(task_id)
            if task_id in self._decided or not all(self._complete(d) for d in task.deps):
                continue
            self._decided.add(task_id)
            if not all(self._succeeded(d) for d in task.deps if d not in task.allow_failed):
                self._mark_upstream_failed(task)
            else:
                ready += [i for i in self._instantiate(task)
                          if self._instances[i].state not in s.TERMINAL_TASK_STATES]
            if self._complete(task_id):
                work += self.dag.dependents(task_id)
        for instance_id in ready:
            self._submit(instance_id)  # submits nothing once the run is abandoned
        self._maybe_finish()

    def _instantiate(self, task: Task) -> list[str]:
        if task.map_over is None:
            return self._by_task.setdefault(task.id, [task.id])
        items = self._items(task)
        if not isinstance(items, list):
            self._new_instances(task, [(task.id, None)])
            self._finish(task.id, s.FAILED, ("bad_map", f"{task.map_over!r} must return a list to map over, "
                                              f"got {type(items).__name__}"))
            return []
        if not items:
            self._new_instances(task, [(task.id, None)])
            self._finish(task.id, s.SUCCESS, output=[])
            return []
        self._new_instances(task, [(dags.instance_id(task.id, n), n) for n in range(len(items))])
        return self._by_task[task.id]

    def _new_instances(self, task: Task, ids: list[tuple[str, int | None]]) -> None:
        fresh = [(i, n) for i, n in ids if i not in self._instances]
        self.store.create_tasks(self.run.run_id, [i for i, _ in fresh])
        for instance_id, index in fresh:
            self._instances[instance_id] = _Instance(task, index)
            self._by_task.setdefault(task.id, []).append(instance_id)

    def _mark_upstream_failed(self, task: Task) -> None:
        ids = self._by_task.get(task.id) or []
        if not ids:
            self._new_instances(task, [(task.id, None)])
            ids = self._by_task[task.id]
        for instance_id in ids:
            if self._instances[instance_id].state not in s.TERMINAL_TASK_STATES:
                self._finish(instance_id, s.UPSTREAM_FAILED, ("upstream_failed", "an upstream task did not succeed"))

    def _context(self, instance_id: str, inst: _Instance) -> TaskContext:
        task = inst.task
        upstream = {d: self._result_of(d) for d in task.deps}
        errors = {i: {"type": self._instances[i].error[0], "message": self._instances[i].error[1]}  # type: ignore[index]
                  for d in task.deps for i in self._by_task[d] if self._instances[i].error}
        item = self._items(task)[inst.index] if task.map_over and inst.index is not None else None
        return TaskContext(self.run.run_id, instance_id, self.run.payload, upstream, errors,
                           str(self.work_dir), inst.try_number, item, inst.index)

    def _submit(self, instance_id: str) -> None:
        if self._abandoned:  # a callback run inline by add_done_callback broke the run meanwhile
            return
        inst = self._instances[instance_id]
        inst.try_number += 1
        inst.state, inst.started = s.RUNNING, time.monotonic()
        attempt = inst.try_number
        self._inflight[instance_id] = attempt
        ctx = self._context(instance_id, inst)
        inst.clock = None if inst.task.executor not in THREAD_EXECUTORS else WaitClock()
        if inst.clock is None:  # a process pool or the Dask cluster
            self._write(instance_id, s.RUNNING)
        self._after_commit.append(partial(self._launch, instance_id, attempt, ctx))

    def _launch(self, instance_id: str, attempt: int, ctx: TaskContext) -> None:
        inst = self._instances[instance_id]
        if inst.clock is None:
            future = self.executors.submit_to(inst.task.executor, inst.task.fn, ctx)
        else:
            pool = self.executors.io if inst.task.executor == "io" else self.executors.thread
            future = pool.submit(self._run_in_thread, instance_id, attempt, ctx, inst.clock)
        self._handover.try_started()
        timeout = inst.task.timeout_s or self.config.default_timeout_s
        if timeout:
            self.timers.call_later(timeout, self._on_timeout, instance_id, attempt, timeout, future)
        done = partial(self._on_done, instance_id, attempt)
        if inst.clock is None:  # off the pool's result thread, which must keep moving other tries
            self.executors.on_done(future, done)
        else:
            future.add_done_callback(done)

    def _run_in_thread(self, instance_id: str, attempt: int, ctx: TaskContext, clock: WaitClock) -> Any:
        try:
            with self._lock:
                # The timeout was scheduled at submit: if it fired while this try waited for a free
                # thread, the task has failed already; neither write RUNNING over it nor run the callable.
                if self._inflight.get(instance_id) != attempt:
                    return None
                self._write(instance_id, s.RUNNING, try_number=attempt)
        except Exception as exc:
            self._break(exc)
            return None
        with timing_waits(clock):
            return call_task(self._instances[instance_id].task.fn, ctx)

    # -- completion -------------------------------------------------------------

    def _on_done(self, instance_id: str, attempt: int, future: Future[Any]) -> None:
        # a thread task's callback runs on its own pool thread: marked like the pools' completion callbacks, so
        # one stuck there (a store that does not answer) makes the engine unhealthy, as a stuck loop does
        with self.executors.completion_passes.passing():
            self._guarded(self._done, instance_id, attempt, future)
            self._handover.try_ended()  # if the run broke, this may have been its last live try

    def _done(self, instance_id: str, attempt: int, future: Future[Any]) -> None:
        if self._inflight.get(instance_id) != attempt:
            return  # this try timed out already; its late result is ignored
        del self._inflight[instance_id]
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or (self._stopping and isinstance(exc, BrokenExecutor)):
            self._interrupted(instance_id)  # the executor shut down under this try: not the task's failure
            return
        if isinstance(exc, BrokenExecutor):  # a process-pool worker killed from outside: typed, retryable
            exc = WorkerCrashedError(f"the process running {instance_id} died ({type(exc).__name__}: {exc})")
        output_json = None
        if exc is None:
            try:
                output_json = encode_output(future.result())
            except ValueError as err:
                exc = StepError(str(err), self.run.run_id, instance_id, reason="bad_output")
                exc.retryable = False  # type: ignore[attr-defined]
        if exc is None:
            self._finish(instance_id, s.SUCCESS, output=json.loads(output_json or "null"), output_json=output_json)
        else:
            self._fail_or_retry(instance_id, exc)
        self._advance(self.dag.dependents(self._instances[instance_id].task.id))

    def _interrupted(self, instance_id: str) -> None:
        """Stop the run so it goes back to the queue; the store requeues the interrupted instance."""
        log.info("run %s task %s: interrupted by shutdown, will run again", self.run.run_id, instance_id)
        self._instances[instance_id].state = s.QUEUED
        self._stop()

    def _on_timeout(self, instance_id: str, attempt: int, timeout: float, future: Future[Any]) -> None:
        self._guarded(self._timed_out, instance_id, attempt, timeout, future)

    def _timed_out(self, instance_id: str, attempt: int, timeout: float, future: Future[Any]) -> None:
        if self._inflight.get(instance_id) != attempt:
            return
        del self._inflight[instance_id]
        exc = self.executors.timeout_error(future, timeout)  # a Dask try no worker started: the cluster's fault
        self._fail_or_retry(instance_id, exc or TaskTimeoutError(f"task ran longer than {timeout:g} s",
                                                                 self.run.run_id, instance_id))
        self._advance(self.dag.dependents(self._instances[instance_id].task.id))

    def _fail_or_retry(self, instance_id: str, exc: BaseException) -> None:
        inst = self._instances[instance_id]
        reason = getattr(exc, "reason", None) or type(exc).__name__
        error = (reason, _message(exc))
        retries = inst.task.retries if inst.task.retries is not None else self.config.default_retries
        retries = max(retries, getattr(exc, "min_retries", 0))  # a permission refused: a chmod soon undone
        if inst.try_number <= retries and getattr(exc, "retryable", True) and self._stopping:
            inst.state, inst.error = s.QUEUED, error  # not the task's last word: the next start tries again
            self._write(instance_id, s.QUEUED, error=error)
            log.info("run %s task %s: try %d failed (%s) while stopping; queued again", self.run.run_id,
                     instance_id, inst.try_number, reason)
        elif isinstance(exc, NOT_THE_TASKS) and inst.try_number > min(retries, MACHINE_RETRIES):
            raise exc  # not the task's failure: _guarded breaks the run, the engine requeues it, backing off, and
            # reports unhealthy (451); deliver's 20 tries would have taken 13-26 minutes of 250s to get there
        elif inst.try_number <= retries and getattr(exc, "retryable", True):
            inst.state, inst.error = s.RETRYING, error
            self._write(instance_id, s.RETRYING, error=error)
            longest = inst.task.retry_max_delay_s or self.config.retry_max_delay_s
            delay = min(longest, self.config.retry_base_delay_s * 2 ** (inst.try_number - 1))
            self._waiting_retry.add(instance_id)
            metrics.task_retried(instance_id)
            wait_s = delay * random.uniform(0.5, 1.0)
            self.timers.call_later(wait_s, self._retry, instance_id)
            # with what went wrong: a greylisting relay and one that never greets logged the same line
            log.info("run %s task %s: try %d failed (%s), retrying in %.1f s: %s", self.run.run_id, instance_id,
                     inst.try_number, reason, wait_s, error[1][:300])
        else:
            self._finish(instance_id, s.FAILED, error)

    def _retry(self, instance_id: str) -> None:
        self._guarded(self._resubmit, instance_id)

    def _resubmit(self, instance_id: str) -> None:
        if instance_id in self._waiting_retry:
            self._waiting_retry.discard(instance_id)
            self._submit(instance_id)
        self._maybe_finish()

    def _finish(self, instance_id: str, state: str, error: tuple[str, str] | None = None,
                output: Any = None, output_json: str | None = None) -> None:
        inst = self._instances[instance_id]
        self._terminal += inst.state not in s.TERMINAL_TASK_STATES
        inst.state, inst.error, inst.output = state, error, output
        if output_json is None and output is not None:
            output_json = encode_output(output)
        if not self._write(instance_id, state, error=error, output_json=output_json):
            return  # the store had it final already: nothing happened worth a trace
        tracing.send(tracing.TASK_FINISHED, run_id=self.run.run_id, task_id=instance_id, state=state)
        if inst.started:  # an upstream_failed instance never ran
            metrics.task_finished(instance_id, time.monotonic() - inst.started)
        if state == s.FAILED and error:
            metrics.task_failed(instance_id, error[0])
        # a success is routine (four per mail): DEBUG; a failed or skipped task is worth a line at INFO, and one
        # the machine failed (a disk full, out of descriptors: task_io after its retries) a WARNING
        level = logging.DEBUG if state == s.SUCCESS else logging.WARNING if error and error[0] == "task_io" else \
            logging.INFO
        log.log(level, "run %s task %s: %s%s", self.run.run_id, instance_id, state,
                f" ({error[0]}: {error[1][:300]})" if error else "")

    def _write(self, instance_id: str, state: str, *, try_number: int | None = None,
               error: tuple[str, str] | None = None, output_json: str | None = None) -> bool:
        """Write one transition; return False if the store skipped it; raise RunTakenOver if the run is not ours.

        Every transition carries the latest try's wait so far: 0 when it starts, its whole wait when it ends.
        """
        inst = self._instances[instance_id]
        attempt = inst.try_number if try_number is None else try_number
        wait_s = inst.clock.seconds() if inst.clock is not None and state != s.RUNNING else 0.0
        applied = self.store.record_transitions([Transition(
            self.run.run_id, instance_id, state, attempt, time.time(),
            error[0] if error else None, error[1] if error else None, output_json, wait_s)], owner=self.run.owner)
        if not applied and self.run.owner is not None:
            run = self.store.get_run(self.run.run_id)
            self._owned(run.state == s.RUNNING and run.owner == self.run.owner)
        return bool(applied)

    def _owned(self, still: bool) -> None:
        if not still and self.run.owner is not None:
            raise RunTakenOver(f"run {self.run.run_id} is no longer owned by {self.run.owner}")

    def _maybe_finish(self) -> None:
        if self._finished or self._inflight or self._waiting_retry:
            return
        complete = len(self._decided) == len(self.dag.tasks) and self._terminal == len(self._instances)
        if not complete and self._stopping:  # stopped with work left: the next start resumes it
            self._finished = True
            self._owned(bool(self.store.requeue_run(self.run.run_id, owner=self.run.owner,
                                                    note="requeued: serve stopped before it ended")))
            self._after_commit.append(partial(self._report, s.QUEUED, None))
            return
        if not complete:
            return
        self._finished = True
        state, reason = self._outcome()
        self._owned(bool(self.store.finish_run(self.run.run_id, state, reason, owner=self.run.owner)))
        self._after_commit.append(partial(self._report, state, reason))

    def _report(self, state: str, reason: str | None) -> None:
        """The run's outcome is in the store: count it, log it and tell the engine."""
        self._reported = True
        if state != s.QUEUED:
            metrics.run_finished(state, reason)
            log.info("run %s (%s): %s%s", self.run.run_id, self.dag.workflow_id, state,
                     f" ({reason})" if reason else "")
        self.on_finish(self.run.run_id, state)

    def _outcome(self) -> tuple[str, str | None]:
        """A run fails when a leaf task did not succeed; the reason names the first real failure."""
        leaves = [t.id for t in self.dag.tasks if not self.dag.dependents(t.id)]
        if all(self._succeeded(leaf) for leaf in leaves):
            return s.SUCCESS, self._partial()
        for task_id in self.dag.order:
            for instance_id in self._by_task.get(task_id, []):
                inst = self._instances[instance_id]
                if inst.state == s.FAILED and inst.error:
                    return s.FAILED, f"{instance_id}: {inst.error[0]}: {inst.error[1]}"[:500]
        return s.FAILED, "a final task did not succeed"

    def _partial(self) -> str | None:
        """For a run that succeeded around failed tasks, its reason: ``partial: 1 of 2 ingest_pdf failed (corrupt)``."""
        notes = []
        for task_id in self.dag.order:
            instances = [self._instances[i] for i in self._by_task.get(task_id, [])]
            failed = [inst for inst in instances if inst.state == s.FAILED]
            if failed:
                reasons = sorted({inst.error[0] for inst in failed if inst.error} or {"failed"})
                notes.append(f"{len(failed)} of {len(instances)} {task_id} failed ({', '.join(reasons)})")
        return (s.PARTIAL_PREFIX + "; ".join(notes))[:500] if notes else None


def _message(exc: BaseException) -> str:
    """A failed try's stored message, on one line, at most MAX_ERROR_CHARS (a relay's reply of 2,000 lines was
    stored whole, 2 MB per try); an attachment's error names the attachment it is about."""
    message = showable(exc_text(exc)) or type(exc).__name__  # a relay's reply, a file's text: shown in `show`
    name = getattr(exc, "filename", "") if isinstance(exc, IngestError) else ""
    message = f"{name}: {message}" if name and name not in message else message
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS - 1] + "…"
