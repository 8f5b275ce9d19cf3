"""The runner's share for a try's end: judge it (success, retry, fail, interrupted, timed out), write it, end the run.

A try interrupted by a stop (its future cancelled, its process pool broken, or
a retryable failure within the grace period) is not the task's failure: the
instance and the run go back to the queue. A try that failed because the machine
is short of something, or the Dask cluster lost it (``NOT_THE_TASKS``), breaks
the run after at most ``MACHINE_RETRIES`` quick retries: the engine requeues it, backing
off. Every transition carries the run's owner; a write the store refuses
because another process took the run over raises ``RunTakenOver``.

``Completion`` is a part of ``DAGRunner`` (it shares the runner's lock, its task instances and its store).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Future
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import metrics, tracing
from . import store as s
from .config import RunnerConfig
from .dag import DAG
from .errors import (
    ClusterUnavailableError,
    FileGoneError,
    IngestError,
    MachineShortError,
    StepError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkLostError,
    showable,
)
from .executors import Executors
from .handover import Handover
from .health import exc_text
from .store import DAGRunStore, Run, RunTakenOver, Transition, encode_output
from .timers import Timers

if TYPE_CHECKING:
    from .runner import _Instance

log = logging.getLogger("pipeline.runner")  # the runner's lines: one logger, as handover.py's
MAX_ERROR_CHARS = 2000  # of a task's stored error message
MACHINE_RETRIES = 1  # quick retries of a task failing for the machine (a full disk) before its run waits for it
# failures of the environment, not of the task: its run waits for them to pass. ClusterUnavailableError: a Dask
# scheduler that lost or cancelled the try (killed and restarted mid-burst, every document failed
# cluster_unavailable and its sender got an empty "partial" digest)
NOT_THE_TASKS = (MachineShortError, ClusterUnavailableError)


class Completion:
    """End tries and runs: retry or fail a task by its error, write its transition, and report the run's outcome."""

    store: DAGRunStore
    dag: DAG
    run: Run
    config: RunnerConfig
    executors: Executors
    timers: Timers
    work_dir: Path
    on_finish: Callable[[int, str], None]
    _instances: dict[str, _Instance]
    _by_task: dict[str, list[str]]
    _decided: set[str]
    _inflight: dict[str, int]
    _waiting_retry: set[str]
    _terminal: int
    _stopping: bool
    _finished: bool
    _reported: bool
    _after_commit: list[Callable[[], None]]
    _handover: Handover
    _guarded: Callable[..., None]
    _advance: Callable[..., None]
    _stop: Callable[[], None]
    _submit: Callable[[str], None]
    _succeeded: Callable[[str], bool]

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
        elif isinstance(exc, FileGoneError) and self._made_files_gone():
            raise WorkLostError(f"{instance_id}: files its run's earlier tasks made are gone ({error[1][:300]}); "
                                "the run starts again from its spool file")  # _guarded breaks it: rebuilt
        else:
            self._finish(instance_id, s.FAILED, error)

    def _made_files_gone(self) -> bool:
        """Whether a file a finished task of this run made in its work dir (an attachment, a text) is gone."""
        work = os.path.join(self.work_dir, "")
        return any(isinstance(path, str) and path.startswith(work) and not os.path.exists(path)
                   for inst in self._instances.values() if inst.state == s.SUCCESS
                   for path in _paths(inst.output))

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


def _paths(output: Any, depth: int = 0) -> list[Any]:
    """The values of ``path`` and ``text_path`` keys anywhere in a task's output (the files it made)."""
    if depth > 4:
        return []
    if isinstance(output, dict):
        return [output[k] for k in ("path", "text_path") if k in output] + [
            p for v in output.values() if isinstance(v, (dict, list)) for p in _paths(v, depth + 1)]
    if isinstance(output, list):
        return [p for v in output if isinstance(v, (dict, list)) for p in _paths(v, depth + 1)]
    return []


def _message(exc: BaseException) -> str:
    """A failed try's stored message, on one line, at most MAX_ERROR_CHARS (a relay's reply of 2,000 lines was
    stored whole, 2 MB per try); an attachment's error names the attachment it is about."""
    message = showable(exc_text(exc)) or type(exc).__name__  # a relay's reply, a file's text: shown in `show`
    name = getattr(exc, "filename", "") if isinstance(exc, IngestError) else ""
    message = f"{name}: {message}" if name and name not in message else message
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS - 1] + "…"
