"""Executors: where every run's tries go (a thread pool, two more for tasks that wait on another host or on an
extraction worker; a process pool and a Dask cluster made on first use).

A process pool whose worker died abruptly (OOM killer, kill -9) is broken for
good; ``submit_process`` replaces it so one dead worker costs one try, not the service.
Tasks with ``executor="dask"`` go to the cluster of ``[executor]`` (``dask_executor``,
imported only then, so the ``[dask]`` extra stays optional).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import tracing
from .config import ExecutorConfig, RunnerConfig
from .dag import TaskContext
from .errors import task_io_error
from .health import one_line
from .passes import Passes

if TYPE_CHECKING:
    from .dask_executor import DaskExecutor

log = logging.getLogger(__name__)


class Executors:
    """The thread pool every run shares, and a process pool and a Dask client created on first use."""

    def __init__(self, config: RunnerConfig, thread_pool: Executor, process_factory: Callable[[], Executor],
                 cluster: ExecutorConfig | None = None, extract_threads: int = 1) -> None:
        self.config = config
        self.thread = thread_pool
        # tasks that wait on another host (a relay): a hung one holds these, not the threads every run needs
        self.io = ThreadPoolExecutor(config.io_workers, thread_name_prefix="pipeline-io")
        # tasks that wait for an extraction worker (ingest_pdf): slow PDFs hold these, not the threads that parse
        self.extract = ThreadPoolExecutor(extract_threads, thread_name_prefix="pipeline-extract")
        self._completions = (ThreadPoolExecutor(config.completion_threads, thread_name_prefix="pipeline-completion")
                             if config.completion_threads else None)
        self._process_factory = process_factory
        self._process: Executor | None = None
        self._cluster_config = cluster or ExecutorConfig()
        self._cluster: DaskExecutor | None = None
        self._lock = threading.Lock()
        self.completion_passes = Passes("task completions")  # their callbacks write the store, then submit

    def threads(self, kind: str) -> Executor:
        """The thread pool of executor ``kind`` (one of ``dag.THREAD_EXECUTORS``)."""
        return self.io if kind == "io" else self.extract if kind == "extract" else self.thread

    def submit_to(self, kind: str, fn: Callable[[TaskContext], Any], ctx: TaskContext) -> Future[Any]:
        """Submit a task try to the process pool (``kind`` "process") or the Dask cluster ("dask")."""
        if kind != "dask":
            return self.submit_process(call_task, fn, ctx)
        from .dask_executor import DaskExecutor, task_key

        with self._lock:
            if self._cluster is None:
                self._cluster = DaskExecutor(self._cluster_config)
            cluster = self._cluster
        return cluster.submit(call_task, fn, ctx, key=task_key(ctx))

    def timeout_error(self, future: Future[Any], timeout_s: float) -> BaseException | None:
        """The executor's own error for a try that timed out, if the fault is not the task's (a Dask try no worker
        started); None otherwise."""
        cluster = self._cluster
        return None if cluster is None else cluster.timeout_error(future, timeout_s)

    def submit_process(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Submit to the process pool, starting it on first use and again if a worker died abruptly."""
        with self._lock:
            if self._process is None:
                self._process = self._process_factory()
            try:
                return self._process.submit(fn, *args)
            except BrokenExecutor:  # a worker was killed (OOM, kill -9): that pool takes nothing more
                log.warning("process pool broken by a worker that died; starting a new one")
                _kill_workers(self._process)  # they ignore SIGTERM: stop them before they run tries failed already
                self._process.shutdown(wait=False)
                self._process = self._process_factory()
                return self._process.submit(fn, *args)

    def on_done(self, future: Future[Any], callback: Callable[[Future[Any]], None]) -> None:
        """Call ``callback(future)`` once a process-pool or Dask try ends, on a completion thread.

        A future's own callbacks run on the thread that sets its result: for a ProcessPoolExecutor, the one
        thread that also hands every queued call to the workers. A run's callback writes to the store and
        submits the next task; run there, it held up every other result and submission (issue 16; notebook
        04's small_mail_drain measures both ways, ``[runner] completion_threads = 0`` being the old way).
        A callback that raises is logged, as ``add_done_callback`` logs it, and the thread goes on.
        """
        if self._completions is None:
            future.add_done_callback(callback)
            return
        future.add_done_callback(lambda done: self._complete(callback, done))

    def _complete(self, callback: Callable[[Future[Any]], None], future: Future[Any]) -> None:
        try:
            self._completions.submit(_logged, callback, future, self.completion_passes)  # type: ignore[union-attr]
        except RuntimeError:  # shut down already (interpreter exit): call it here rather than lose the result
            callback(future)

    def warm_process_pool(self) -> None:
        """Start the process pool's workers now, so the first task sent there does not wait for them (a worker
        starts on a submit that finds none idle: one no-op per worker). The caller waits until the fork server
        has forked them; their imports then run beside the caller."""
        for _ in range(self.config.process_workers):
            self.submit_process(os.getpid)

    def shutdown(self, wait: bool = True) -> None:
        """Shut the pools down and close the Dask client; queued work is cancelled."""
        self.thread.shutdown(wait=wait, cancel_futures=True)
        self.io.shutdown(wait=wait, cancel_futures=True)
        self.extract.shutdown(wait=wait, cancel_futures=True)
        if self._process is not None:
            self._process.shutdown(wait=wait, cancel_futures=True)
        if self._cluster is not None:
            self._cluster.close()
        if self._completions is not None:  # last: the pools' final results still reach their runs
            self._completions.shutdown(wait=wait)


def _logged(callback: Callable[[Future[Any]], None], future: Future[Any], passes: Passes) -> None:
    """Call a completion callback; log what it raises (its Future is never read, so it would vanish)."""
    try:
        with passes.passing():
            callback(future)
    except Exception:
        log.exception("completion callback %r failed", callback)


def _kill_workers(pool: Executor) -> None:
    """SIGKILL the processes of a broken ProcessPoolExecutor (its ``_processes``: CPython's, stable since 3.2)."""
    processes = getattr(pool, "_processes", None) or {}
    for proc in list(processes.values()):
        try:
            proc.kill()
        except (OSError, ValueError):  # gone already, or closed
            continue


def init_pool_worker(owner_pid: int, log_level: int = logging.INFO) -> None:
    """Initialize a process-pool worker: ignore SIGINT/SIGTERM, and exit once ``owner_pid`` is gone.

    Ctrl-C in a terminal and systemd's SIGTERM reach the whole process group; a worker
    killed by them would fail its task with a made-up reason while the service stops gracefully.
    It exits when the pool shuts down, or, if its owner was killed outright (SIGKILL, OOM killer),
    within a second: a pool worker holds both ends of its own task queue, so it never reads EOF,
    and the fork server it came from lives as long as any of its children does.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # serve decides when its workers stop
        signal.signal(sig, signal.SIG_IGN)
    # the tasks' log lines go to serve's stderr as the engine's do (a fresh interpreter has no handler)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    threading.Thread(target=_exit_without, args=(owner_pid,), name="owner-watch", daemon=True).start()


def _exit_without(owner_pid: int, every_s: float = 0.5) -> None:
    """Exit this process once ``owner_pid`` is gone (checked every ``every_s``): no such process, a zombie its
    parent has not reaped yet (killed outright, under a harness that waits later), or a new process that took
    its pid."""
    import psutil  # here: only pool workers need it, and the CLI's start-up imports this module

    try:
        owner = psutil.Process(owner_pid)
        while owner.is_running() and owner.status() != psutil.STATUS_ZOMBIE:  # is_running: same pid, same start
            time.sleep(every_s)
    except psutil.Error:  # NoSuchProcess: gone between two looks
        pass
    os._exit(1)


def call_task(fn: Callable[[TaskContext], Any], ctx: TaskContext) -> Any:
    """Run a task callable inside a span (module-level so process pools can pickle it). An OS error it lets
    through is typed here, where it leaves the task: ``TaskIOError``, its reason ``task_io``."""
    with tracing.span("task", task_id=ctx.task_id, run_id=ctx.run_id):
        try:
            return fn(ctx)
        except OSError as exc:
            raise task_io_error(f"{ctx.task_id}: {one_line(exc)}", exc) from exc
