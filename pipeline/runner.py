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

How a try's end is judged and written, and the run's outcome, is ``runner_completion.Completion``, a part of
DAGRunner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from . import dag as dags
from . import store as s
from . import workdir
from .dag import DAG, THREAD_EXECUTORS, Task, TaskContext, parse_instance
from .errors import StoreError
from .executors import Executors, call_task
from .handover import Handover
from .runner_completion import (  # noqa: F401 - MAX_ERROR_CHARS, MACHINE_RETRIES and NOT_THE_TASKS lived here
    MACHINE_RETRIES,
    MAX_ERROR_CHARS,
    NOT_THE_TASKS,
    Completion,
    _message,
)
from .stages.worker_pool import RunShare, WaitClock, timing_waits
from .store import DAGRunStore, Run, RunTakenOver
from .timers import Timers

log = logging.getLogger(__name__)


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


class DAGRunner(Completion):
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
        self._held: list[str] = []  # ready instances over their task's max_parallel, in order (_within_limits)
        self._terminal = 0  # instances in a terminal state
        self._stopping = False
        self._finished = False
        self._reported = False  # on_finish was called: the run's outcome is in the store
        self._abandoned = False
        self._after_commit: list[Callable[[], None]] = []  # launches and the run's report, once its writes commit
        cap = max([abandon_grace_s, *(t.timeout_s or self.config.default_timeout_s or 0.0 for t in dag.tasks)])
        self._handover = Handover(run.run_id, on_broken or (lambda run_id, exc: None), timers, cap)
        self._share = RunShare()  # its tries' jobs share the extraction workers as one, under one budget

    # -- public -----------------------------------------------------------------

    def start(self) -> None:
        """Load what the store knows of this run, then submit every ready task."""
        if not self.work_dir.parent.exists() and not self.work_dir.parent.is_symlink():  # data/work (the engine
            self.work_dir.parent.mkdir(exist_ok=True)  # made it at start), never the data dir: one moved away must
        self.work_dir.mkdir(exist_ok=True)  # not be made again at its old path (a file there: NotADirectoryError)
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
        for instance_id in self._within_limits(ready):
            self._submit(instance_id)  # submits nothing once the run is abandoned
        self._maybe_finish()

    def _within_limits(self, ready: list[str]) -> list[str]:
        """``ready`` and the instances held back before, less those over their task's ``max_parallel``: these wait
        (in order) until an instance of their task ends; every end calls ``_advance``. Nothing is let go while
        stopping: held instances are queued in the store, and the next start runs them."""
        self._held += [i for i in ready if self._instances[i].task.max_parallel is not None]
        ready = [i for i in ready if self._instances[i].task.max_parallel is None]
        if not self._held or self._stopping:
            return ready
        active: dict[str, int] = {}
        for instance_id in (*self._inflight, *self._waiting_retry):
            task_id = self._instances[instance_id].task.id
            active[task_id] = active.get(task_id, 0) + 1
        held, self._held = self._held, []
        for instance_id in held:
            task = self._instances[instance_id].task
            if active.get(task.id, 0) < (task.max_parallel or 0):
                active[task.id] = active.get(task.id, 0) + 1
                ready.append(instance_id)
            else:
                self._held.append(instance_id)
        return ready

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
        inst.clock = None if inst.task.executor not in THREAD_EXECUTORS else WaitClock(owner=self._share)
        if inst.clock is None:  # a process pool or the Dask cluster
            self._write(instance_id, s.RUNNING)
        self._after_commit.append(partial(self._launch, instance_id, attempt, ctx))

    def _launch(self, instance_id: str, attempt: int, ctx: TaskContext) -> None:
        inst = self._instances[instance_id]
        if inst.clock is None:
            future = self.executors.submit_to(inst.task.executor, inst.task.fn, ctx)
        else:
            pool = self.executors.threads(inst.task.executor)
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
