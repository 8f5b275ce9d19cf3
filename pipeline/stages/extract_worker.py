"""Extraction workers: long-lived child processes that run ``extract_text`` under a memory cap.

Why not a process per PDF: starting one costs 0.25 s or more (the interpreter,
pypdf, and multiprocessing re-importing the parent's main module), more than
extracting a typical document. Why not ProcessPoolExecutor: it cannot stop one
runaway task. So each worker is ``python -m pipeline.stages.extract_worker``
with RLIMIT_AS set at start, talking JSON lines over its pipes; a worker that
overruns its time is killed and replaced, and each is recycled after
``MAX_DOCS_PER_WORKER`` documents so no slow growth can accumulate.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import json
import os
import queue
import resource
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import CorruptPdfError, EncryptedPdfError, IngestError, PdfTooLargeError

MAX_DOCS_PER_WORKER = 200
_ERRORS = {cls.__name__: cls for cls in (CorruptPdfError, EncryptedPdfError, PdfTooLargeError, IngestError)}


class _Worker:
    """One child process and its pipes."""

    def __init__(self, memory_limit: int) -> None:
        path = os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.stages.extract_worker", str(memory_limit)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self.documents = 0

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Send one request; return the reply, or None if the worker died. TimeoutError past ``timeout_s``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        self.documents += 1
        return json.loads(line) if line else None

    def close(self) -> None:
        """Stop the process and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


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
        if reply is None:  # the worker died mid-document: PDFium aborts when the memory cap refuses it
            raise PdfTooLargeError(f"extraction worker died (exit code {worker.proc.returncode}); most likely the "
                                   f"document needed more than the {self.memory_limit:,}-byte memory cap", name)
        if "ok" in reply:
            return reply["ok"]
        raise _ERRORS.get(reply["error"]["cls"], IngestError)(reply["error"]["message"], name)

    def _borrow(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            worker = _Worker(self.memory_limit)
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
            return {pipe.fileno() for w in self._all for pipe in (w.proc.stdin, w.proc.stdout)
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
    """Worker main loop: one JSON request per line in, one JSON reply per line out."""
    from .ingest import extract_text  # imported here: the worker pays pypdf's import once, at start

    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol
    for line in sys.stdin:
        request = json.loads(line)
        limits = IngestConfig(**request["limits"])
        try:
            result = extract_text(Path(request["pdf"]), Path(request["text"]), limits, tuple(request["shard"]))
            reply: dict[str, Any] = {"ok": dataclasses.asdict(result)}
        except IngestError as exc:
            reply = {"error": {"cls": type(exc).__name__, "message": str(exc)}}
        except MemoryError:
            reply = {"error": {"cls": "PdfTooLargeError",
                               "message": f"extraction needed more than {memory_limit:,} bytes of memory"}}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        gc.collect()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
