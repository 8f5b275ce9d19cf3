"""Extraction workers: long-lived child processes that run ``extract_text`` (and the MIME parse) under a memory cap.

Why not a process per PDF: starting one costs 0.25 s or more (the interpreter,
pypdf, and multiprocessing re-importing the parent's main module), more than
extracting a typical document. Why not ProcessPoolExecutor: it cannot stop one
runaway task. So each worker runs this module as ``__main__`` in a fresh interpreter
with RLIMIT_AS set at start, talking JSON lines over its pipes; a worker that
overruns its time is killed and replaced, and each is recycled after
``MAX_REQUESTS_PER_WORKER`` requests so no slow growth can accumulate.

Why not pebble's ProcessPool (per-task timeout, worker restart): it gives a dead
worker's exit code but not its stderr, and its workers are multiprocessing
children (forked from a threaded server, or re-importing its main module). Here
each worker is a plain interpreter in its own process group, ignoring SIGINT/SIGTERM,
with RLIMIT_AS set before its first document and its stderr read by the pool:
that stderr (faulthandler's stack of a PDFium abort) is the evidence that tells a
worker killed by the memory cap (``too_large``) from any other death
(``worker_crashed``, retryable). Workers exit when their stdin closes.

Which document a free worker serves next is decided by ``worker_pool``
(fair sharing, time budgets); a request is one page chunk, one whole shard,
or one email to parse (``op`` "parse": the worker reads the spool file itself,
so a big message never sits in the serve process's memory). A parse cannot be
sliced, so with more than one worker parses hold at most ``workers - 1`` of
them at once: one always stays for PDF chunks, however long hostile mails take
to parse (with one worker, parses and chunks simply take turns, parses first).

A job is queued and its lanes are started as one step under the pool's lock,
and ``close`` (which stops the lanes) makes that step wait until it is done:
a queued job always has live lanes, or ``close`` fails it (WorkerCrashedError).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import ParseError, PdfTooLargeError, PipelineError, WorkerCrashedError
from .worker_errors import MEMORY_EVIDENCE as MEMORY_EVIDENCE
from .worker_errors import death_error, typed_error
from .worker_main import _settle_heap as _settle_heap  # noqa: F401 - re-exported: tests call it here
from .worker_main import serve
from .worker_pool import PRIORITY_EXTRACT, PRIORITY_PARSE, FairQueue, Job

log = logging.getLogger(__name__)
MAX_REQUESTS_PER_WORKER = 200  # then the worker is replaced, so no slow growth can accumulate
POLL_S = 0.5  # how often a lane waiting for a reply looks at the document's budget again
GRACE_S = 1.0  # past its budget a worker may finish its page and stop itself; after this it is killed
STDERR_LINES = 40  # the last lines of a worker's stderr kept as evidence of how it died
# Stop signals are ignored before the first import (importing the package takes a second on a loaded machine);
# ``python -m`` would leave that window open to a KeyboardInterrupt traceback.
_LAUNCH = ("import signal; [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]"
           "; import runpy, sys; runpy.run_module(sys.argv[1], run_name='__main__')")  # argv: -c, module, memory cap


class _Worker:
    """One child process, its pipes, and the tail of its stderr (drained by a daemon thread so it never blocks)."""

    def __init__(self, memory_limit: int) -> None:
        path = os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        # its own process group: the terminal's Ctrl-C and a process-group signal reach the parent only. Not its
        # own session: with the kernel's session autogroups each session is scheduled as one group, and nice
        # values rank threads only within a group, so [serve] engine_nice could not put a worker below the
        # gateway process (issue 17)
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, __name__, str(memory_limit)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     text=True, errors="replace", bufsize=1, process_group=0)
        self.documents = 0  # requests answered (documents, shards or page chunks)
        self.garbled: str | None = None  # the start of an unreadable reply, if one came
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._drainer = threading.Thread(target=self._drain, name=f"extract-worker-{self.proc.pid}-stderr",
                                         daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip("\n"))
            log.debug("extraction worker %d: %s", self.proc.pid, line.rstrip("\n"))

    def request(self, message: dict[str, Any], allowed_s: Callable[[], float]) -> dict[str, Any] | None:
        """Send one request; return the reply, or None if the worker died. TimeoutError once ``allowed_s()``
        (asked again every ``POLL_S``: a sibling chunk ending early leaves this one more) is no longer > 0."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError:  # a broken pipe: the worker is gone
            return None
        try:
            while not select.select([self.proc.stdout], [], [], min(POLL_S, max(0.0, allowed_s())))[0]:
                if allowed_s() <= 0:
                    raise TimeoutError
            line = self.proc.stdout.readline()
        except ValueError:  # its pipe closed under us: a stop ended the worker (it logged a traceback per lane)
            return None
        self.documents += 1
        try:
            reply = json.loads(line) if line else None
        except ValueError:  # a reply cut short (the worker died mid-write) or corrupted: treat it as a death
            self.garbled = line[:200]
            return None
        return reply if isinstance(reply, dict) else None

    def close(self) -> None:
        """Stop the process, wait for its stderr to be read to the end, and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._drainer.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # stdin flushing what a dead worker never read: the fd is released all the same
                    pass


class ExtractionPool:
    """``size`` lanes, each running one chunk at a time in a worker process; jobs share the lanes fairly.

    Lanes are daemon threads started on first use; each borrows a live worker for a chunk and gives it
    back (or replaces it) after. ``close`` stops lanes and workers; the pool starts them again when used.
    """

    def __init__(self, size: int, memory_limit: int) -> None:
        self.size, self.memory_limit = size, memory_limit
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._spawning = threading.Lock()  # held while starting workers, so lanes and start_workers() start no extra
        self._closed_done = threading.Condition(self._lock)  # notified when a close() ends
        self._closing = 0  # close() calls under way: no job is queued and no lane started meanwhile
        self._queue = FairQueue(size)
        self._lanes: list[threading.Thread] = []

    def run(self, job: Job) -> None:
        """Run every chunk of ``job`` on the lanes; return once it is done or raise its typed error."""
        self._submit(job)
        self._queue.wait(job)

    def _submit(self, job: Job) -> None:
        """Queue ``job`` and make sure the lanes run, as one step (after any close() under way).

        Apart, a close() between the two steps could stop the lanes just started and leave the job queued
        with none to run it, its caller waiting for ever.
        """
        self.start_workers()  # every missing worker at once, not one by one as lanes find none idle (issue 16)
        with self._closed_done:
            self._closed_done.wait_for(lambda: not self._closing)
            self._queue.submit(job)
            self._start_lanes()

    def start_workers(self) -> None:
        """Start worker processes up to ``size`` now, without waiting for them to be ready.

        A worker's interpreter takes a few hundred milliseconds to start; started together (and early, by a
        caller that knows documents are coming), they start while the caller works, and a document's second
        shard does not wait for a second worker to start after the first one answered (issue 16).
        Raises WorkerCrashedError when no process can be started.
        """
        with self._spawning:
            with self._lock:
                missing = self.size - len(self._all)
            for _ in range(missing):
                self._idle.put(self._start_worker())

    def extract(self, pdf_path: Path, text_path: Path, limits: IngestConfig,
                shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
        """Extract (one shard of) a PDF in one request, holding a lane to the end (the baseline fair
        extraction replaced); return the PdfText fields or raise the worker's IngestError."""
        name = Path(pdf_path).name
        job = _OneRequest(name, {"op": "extract", "pdf": str(pdf_path), "text": str(text_path),
                                 "shard": list(shard), "limits": jsonable(limits)}, limits.timeout_s,
                          PdfTooLargeError(f"extraction took longer than {limits.timeout_s:g} s and was stopped",
                                           name), by_run=limits.fair_by_mail)
        self.run(job)
        return job.result

    def parse(self, spool_path: Path, work_dir: Path, limits: IngestConfig) -> dict[str, Any]:
        """Parse the spooled email in a worker (which reads the file): ``parse.summarize_message``'s result.

        Raises ParseError as the worker raised it, PdfTooLargeError when the worker hit its memory cap,
        WorkerCrashedError (retryable) when it died otherwise. A parse goes before extraction chunks.
        """
        job = _OneRequest(Path(spool_path).name, {"op": "parse", "spool": str(spool_path),
                                                  "work_dir": str(work_dir), "limits": jsonable(limits)},
                          limits.timeout_s, ParseError(f"parsing took longer than {limits.timeout_s:g} s"),
                          PRIORITY_PARSE, by_run=limits.fair_by_mail)
        job.what = "email"
        self.run(job)
        return job.result

    def _start_lanes(self) -> None:
        """Start lanes up to ``size`` (the pool's lock held): a lane alive now ends only after a close()."""
        self._lanes = [lane for lane in self._lanes if lane.is_alive()]
        while len(self._lanes) < self.size:
            lane = threading.Thread(target=self._lane, name=f"extract-lane-{len(self._lanes)}", daemon=True)
            lane.start()
            self._lanes.append(lane)

    def _lane(self) -> None:
        """Run chunks until the queue closes; any error ends that chunk's job, never the lane."""
        while (picked := self._queue.take()) is not None:
            job, chunk, remaining_s = picked
            started = time.monotonic()
            try:
                reply = self._request(job, job.request(chunk, remaining_s))
            except Exception as exc:  # a typed error is the job's outcome; anything else is a bug, logged
                if not isinstance(exc, PipelineError):
                    log.exception("extraction lane: unexpected error on %s", job.name)
                self._queue.finish(job, chunk, time.monotonic() - started, error=exc)
            else:
                self._queue.finish(job, chunk, time.monotonic() - started, reply=reply)

    def _request(self, job: Job, message: dict[str, Any]) -> dict[str, Any]:
        """One request in a borrowed worker: its "ok" reply, or the typed error of its failure or death."""
        worker = self._borrow()
        keep = False
        try:
            # until the document's budget, its chunks running beside this one counted, is GRACE_S overspent
            reply = worker.request(message, lambda: (self._queue.left(job) + GRACE_S) / max(1, job.running))
            keep = reply is not None and worker.documents < MAX_REQUESTS_PER_WORKER
        except TimeoutError:
            _count_restart("timeout")
            raise job.timeout_error() from None
        finally:
            self._give_back(worker, keep)
        if reply is None and worker.garbled is not None:
            raise WorkerCrashedError(f"the extraction worker sent an unreadable reply: {worker.garbled!r}", job.name)
        if reply is None:  # the worker died mid-request; close() has reaped it and read its stderr to the end
            error = death_error(worker.proc.returncode, list(worker.stderr_tail), self.memory_limit, job.name,
                                job.what)
            tail = "\n".join(worker.stderr_tail)
            log.warning("extraction worker %d died on %s (%s: %s); %s", worker.proc.pid, job.name, error.reason,
                        error, f"its last stderr lines:\n{tail}" if tail else "it wrote nothing to stderr")
            _count_restart(error.reason)
            raise error
        if "ok" in reply:
            return dict(reply["ok"])
        failure: dict[str, Any] = reply["error"] if isinstance(reply.get("error"), dict) else {}
        raise typed_error(str(failure.get("cls")), str(failure.get("message", "no message")), job.name)

    def _borrow(self) -> _Worker:
        """An idle worker that is still alive (one that died while idle is replaced), or a new one."""
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                with self._spawning:  # a start_workers() under way may have just made one idle: look again
                    if self._idle.empty():
                        return self._start_worker()
                continue
            if worker.proc.poll() is None:
                return worker
            self._give_back(worker, keep=False)

    def _start_worker(self) -> _Worker:
        try:
            worker = _Worker(self.memory_limit)
        except OSError as exc:  # out of processes, memory or file descriptors: the next try may find them
            raise WorkerCrashedError(f"cannot start an extraction worker: {exc}") from exc
        with self._lock:
            self._all.add(worker)
        return worker

    def _give_back(self, worker: _Worker, keep: bool) -> None:
        if keep:
            self._idle.put(worker)
            return
        worker.close()
        with self._lock:
            self._all.discard(worker)

    def pipe_fds(self) -> set[int]:
        """The file descriptors of the live workers' pipes: held on purpose between documents."""
        with self._lock:
            return {pipe.fileno() for w in self._all for pipe in (w.proc.stdin, w.proc.stdout, w.proc.stderr)
                    if pipe is not None and not pipe.closed}

    def close(self) -> None:
        """Stop every lane and worker; jobs still waiting fail with WorkerCrashedError (retryable).

        A ``run`` called meanwhile waits for the close to end, then starts new lanes.
        """
        with self._lock:
            self._closing += 1
            lanes, self._lanes = self._lanes, []
        try:
            self._queue.close(WorkerCrashedError("the extraction pool was closed"))
            self._close_workers()  # a lane in the middle of a request sees its worker die
            for lane in lanes:
                lane.join(timeout=30)
            self._close_workers()  # one a lane started meanwhile
        finally:
            with self._closed_done:
                self._closing -= 1
                if not self._closing:
                    self._queue.reopen()
                self._closed_done.notify_all()

    def _close_workers(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.close()


class _OneRequest(Job):
    """A job of one request: a whole shard of a PDF (the baseline fair extraction replaced) or a MIME parse."""

    def __init__(self, name: str, message: dict[str, Any], budget_s: float, timeout: PipelineError,
                 priority: int = PRIORITY_EXTRACT, by_run: bool = True) -> None:
        super().__init__(name, budget_s, [None], priority=priority, by_run=by_run)
        self.message, self._timeout = message, timeout
        self.result: dict[str, Any] = {}

    def request(self, chunk: Any, remaining_s: float) -> dict[str, Any]:
        return self.message

    def absorb(self, chunk: Any, reply: dict[str, Any]) -> list[Any]:
        self.result = reply
        return []

    def timeout_error(self) -> PipelineError:
        return self._timeout


_POOLS: dict[tuple[int, int], ExtractionPool] = {}
_POOLS_LOCK = threading.Lock()


def _count_restart(cause: str) -> None:
    """Count a worker lost mid-request; imported here so worker processes never load prometheus_client."""
    from .. import metrics

    metrics.worker_restarted(cause)


def pool_for(limits: IngestConfig) -> ExtractionPool:
    """The process-wide pool for these limits (created on first use, closed at exit)."""
    key = (limits.workers, limits.memory_limit_bytes)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ExtractionPool(*key)
        return _POOLS[key]


def pool_pipe_fds() -> set[int]:
    """File descriptors held by every pool's idle or busy workers (tests tell them from leaks)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    return set().union(*(pool.pipe_fds() for pool in pools))


@atexit.register
def close_pools() -> None:
    """Stop all workers of all pools."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def jsonable(limits: IngestConfig) -> dict[str, Any]:
    """The limits as a request carries them (a worker rebuilds the IngestConfig)."""
    return dataclasses.asdict(limits)


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


if __name__ == "__main__":
    serve(int(sys.argv[-1]))
