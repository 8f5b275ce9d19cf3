"""Extraction workers: long-lived child processes that run ``extract_text`` under a memory cap.

Why not a process per PDF: starting one costs 0.25 s or more (the interpreter,
pypdf, and multiprocessing re-importing the parent's main module), more than
extracting a typical document. Why not ProcessPoolExecutor: it cannot stop one
runaway task. So each worker runs this module as ``__main__`` in a fresh interpreter
with RLIMIT_AS set at start, talking JSON lines over its pipes; a worker that
overruns its time is killed and replaced, and each is recycled after
``MAX_DOCS_PER_WORKER`` documents so no slow growth can accumulate.

Why not pebble's ProcessPool (per-task timeout, worker restart): it gives a dead
worker's exit code but not its stderr, and its workers are multiprocessing
children (forked from a threaded server, or re-importing its main module). Here
each worker is a plain interpreter in its own session, ignoring SIGINT/SIGTERM,
with RLIMIT_AS set before its first document and its stderr read by the pool:
that stderr (faulthandler's stack of a PDFium abort) is the evidence that tells a
worker killed by the memory cap (``too_large``) from any other death
(``worker_crashed``, retryable). Workers exit when their stdin closes.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import faulthandler
import gc
import json
import logging
import os
import queue
import resource
import select
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import CorruptPdfError, EncryptedPdfError, IngestError, PdfTooLargeError, WorkerCrashedError
from .pdf_text import extract_text

log = logging.getLogger(__name__)
MAX_DOCS_PER_WORKER = 200
STDERR_LINES = 40  # the last lines of a worker's stderr kept as evidence of how it died
# Stop signals are ignored before the first import (importing the package takes a second on a loaded machine);
# ``python -m`` would leave that window open to a KeyboardInterrupt traceback.
_LAUNCH = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)"
           "; import runpy, sys; runpy.run_module(sys.argv[1], run_name='__main__')")  # argv: -c, module, memory cap
# What a worker that hit its RLIMIT_AS cap leaves behind. Measured (pypdfium2 5.15, PDFium under a 300 MB cap
# on a 600 MB Flate bomb): the process dies of SIGABRT with faulthandler's "Fatal Python error: Aborted" and a
# stack inside pypdfium2; C++ code that lets std::bad_alloc escape aborts the same way.
MEMORY_EVIDENCE = ("MemoryError", "bad_alloc", "Out of memory", "out of memory", "Cannot allocate memory")
_ERRORS = {cls.__name__: cls for cls in (CorruptPdfError, EncryptedPdfError, PdfTooLargeError, IngestError)}


class _Worker:
    """One child process, its pipes, and the tail of its stderr (drained by a daemon thread so it never blocks)."""

    def __init__(self, memory_limit: int) -> None:
        path = os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        # its own session: the terminal's Ctrl-C and a process-group signal reach the parent only
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, __name__, str(memory_limit)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     text=True, errors="replace", bufsize=1, start_new_session=True)
        self.documents = 0
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

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Send one request; return the reply, or None if the worker died. TimeoutError past ``timeout_s``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError:  # a broken pipe: the worker is gone
            return None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
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
                pipe.close()


def death_error(returncode: int | None, stderr: list[str], memory_limit: int, name: str) -> IngestError:
    """The typed error for a worker that died mid-document, judged by its exit status and its last stderr lines.

    SIGABRT or an out-of-memory message means the document needed more than the cap (PdfTooLargeError);
    any other death (SIGKILL from outside, a segfault, an exit) is a WorkerCrashedError another try may cure.
    """
    code = returncode if returncode is not None else 0
    how = f"exit code {code}" + (f", {_signal_name(-code)}" if code < 0 else "")
    if code == -signal.SIGABRT or any(mark in line for line in stderr for mark in MEMORY_EVIDENCE):
        return PdfTooLargeError(f"the document needed memory over the {memory_limit:,}-byte memory cap: the "
                                f"extraction worker aborted ({how})", name)
    last = next((line.strip() for line in reversed(stderr) if line.strip()), "")
    return WorkerCrashedError(f"the extraction worker died ({how}) while reading the document"
                              + (f"; its last words: {last[:200]}" if last else ""), name, exit_code=code)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class ExtractionPool:
    """At most ``size`` workers; each call borrows one."""

    def __init__(self, size: int, memory_limit: int) -> None:
        self.size, self.memory_limit = size, memory_limit
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._slots = threading.Semaphore(size)
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()

    def extract(self, pdf_path: Path, text_path: Path, limits: IngestConfig,
                shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
        """Extract (one shard of) a PDF in a worker; return the PdfText fields or raise the worker's IngestError."""
        name = Path(pdf_path).name
        with self._slots:
            worker = self._borrow()
            keep = False
            try:
                reply = worker.request({"pdf": str(pdf_path), "text": str(text_path), "shard": list(shard),
                                        "limits": _jsonable(limits)}, limits.timeout_s + 1.0)
                keep = reply is not None and worker.documents < MAX_DOCS_PER_WORKER
            except TimeoutError:
                raise PdfTooLargeError(f"extraction took longer than {limits.timeout_s:g} s and was stopped",
                                       name) from None
            finally:
                self._give_back(worker, keep)
        if reply is None and worker.garbled is not None:
            raise WorkerCrashedError(f"the extraction worker sent an unreadable reply: {worker.garbled!r}", name)
        if reply is None:  # the worker died mid-document; close() has reaped it and read its stderr to the end
            error = death_error(worker.proc.returncode, list(worker.stderr_tail), self.memory_limit, name)
            log.warning("extraction worker %d died on %s (%s: %s); its last stderr lines:\n%s", worker.proc.pid,
                        name, error.reason, error, "\n".join(worker.stderr_tail) or "(none)")
            raise error
        if "ok" in reply:
            return reply["ok"]
        failure: dict[str, Any] = reply["error"] if isinstance(reply.get("error"), dict) else {}
        raise _ERRORS.get(str(failure.get("cls")), IngestError)(str(failure.get("message", "no message")), name)

    def _borrow(self) -> _Worker:
        """An idle worker that is still alive (one that died while idle is replaced), or a new one."""
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            if worker.proc.poll() is None:
                return worker
            self._give_back(worker, keep=False)
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
        """Stop every worker."""
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.close()


_POOLS: dict[tuple[int, int], ExtractionPool] = {}
_POOLS_LOCK = threading.Lock()


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


def _jsonable(limits: IngestConfig) -> dict[str, Any]:
    return dataclasses.asdict(limits)


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


def serve(memory_limit: int) -> None:
    """Worker main loop: one JSON request per line in, one JSON reply per line out, until stdin closes.

    SIGINT and SIGTERM are ignored (systemd signals the whole cgroup, and a document in flight should end
    with its real outcome); the parent stops a worker by closing its stdin or killing it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.enable()  # a fatal signal (PDFium aborting under the cap) leaves its stack on stderr as evidence
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol
    for line in sys.stdin:
        reply = _answer(line, memory_limit)
        try:
            out.write(json.dumps(reply) + "\n")
            out.flush()
        except BrokenPipeError:  # the parent is gone; point stdout at /dev/null so exiting cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            return
        gc.collect()


def _answer(line: str, memory_limit: int) -> dict[str, Any]:
    """Extract one request's document; every exception becomes a typed error reply, none ends the worker."""
    try:
        request = json.loads(line)
        limits = IngestConfig(**request["limits"])
        result = extract_text(Path(request["pdf"]), Path(request["text"]), limits, tuple(request["shard"]))
        return {"ok": dataclasses.asdict(result)}
    except IngestError as exc:
        return _error_reply(type(exc).__name__, str(exc))
    except MemoryError:
        return _error_reply("PdfTooLargeError", f"extraction needed more than {memory_limit:,} bytes of memory")
    except Exception as exc:  # engine errors are CorruptPdfError already; this is a bug or the disk (the text file)
        traceback.print_exc()
        return _error_reply("IngestError", f"extraction failed: {type(exc).__name__}: {exc}"[:500])


def _error_reply(cls: str, message: str) -> dict[str, Any]:
    return {"error": {"cls": cls, "message": message}}


if __name__ == "__main__":
    serve(int(sys.argv[-1]))
