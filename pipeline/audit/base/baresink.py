"""A bare SMTP sink: the floor under the sender's wait (issue 17).

aiosmtpd and the durable minimum our gateway does before its 250, nothing else: each message is written to a
temporary file, fsynced, renamed, its directory fsynced, and one row is committed to a SQLite file (WAL,
synchronous NORMAL, as the run store ships), off the event loop, then 250. No parsing, no limits, no metrics,
no pipeline behind it.
Timed by the same sender processes as serve (``client_latency``'s ``bare_sink`` variant), it shows what this
machine, aiosmtpd and smtplib clients cost by themselves: the part of the sender's wait no gateway change removes.

Run as ``python -m pipeline.audit.base.baresink PORT DIR``; it prints ``ready`` once listening, and stops on
SIGTERM or SIGINT. ``BareSink`` starts and stops it like ``ServeProcess`` does serve.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from .serveproc import free_port

READY = "ready"


class DurableSinkHandler:
    """Store each message durably (file and row), then answer 250; a failure answers 451."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(directory, os.O_RDONLY)
        self._db = sqlite3.connect(directory / "sink.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")  # as the run store ships ([store] synchronous)
        self._db.execute("CREATE TABLE IF NOT EXISTS mails (name TEXT PRIMARY KEY, size INTEGER)")
        self._lock = threading.Lock()  # one writer on the connection at a time

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        try:
            await asyncio.to_thread(self._store, bytes(envelope.original_content or b""))
        except (OSError, sqlite3.Error) as exc:
            return f"451 4.3.0 not stored: {type(exc).__name__}"
        return "250 2.0.0 stored"

    def _store(self, raw: bytes) -> None:
        name = uuid.uuid4().hex
        temp, final = self.directory / f"{name}.tmp", self.directory / f"{name}.eml"
        with open(temp, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, final)
        os.fsync(self._dir_fd)
        with self._lock:
            self._db.execute("INSERT INTO mails VALUES (?, ?)", (name, len(raw)))

    def close(self) -> None:
        self._db.close()
        os.close(self._dir_fd)


def main(argv: list[str]) -> int:
    """Listen on 127.0.0.1:PORT, store into DIR, until SIGTERM or SIGINT."""
    from aiosmtpd.controller import Controller

    port, directory = int(argv[0]), Path(argv[1])
    handler = DurableSinkHandler(directory)
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    stopping = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)  # the controller's thread inherits the mask
    controller.start()
    try:
        print(READY, flush=True)
        signal.sigwait(stopping)
    finally:
        controller.stop()
        handler.close()
    return 0


class BareSink:
    """The sink as a child process, with ServeProcess's ``port``, ``data_dir``, ``start`` and ``stop``."""

    def __init__(self, data_dir: Path, work_dir: Path) -> None:
        self.data_dir, self.work_dir = Path(data_dir), Path(work_dir)
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout_s: float = 60.0) -> BareSink:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = self.work_dir / "baresink.log"
        with open(log, "wb") as errors:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(self.port), str(self.data_dir)],
                                         stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout_s)
        if line.strip() != READY:
            self.stop()
            raise RuntimeError(f"the bare SMTP sink did not start: {log.read_text(errors='replace')[-500:]}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def _readline(stream: Any, timeout_s: float) -> str:
    """One line from ``stream``, or "" after ``timeout_s`` (a reader thread: pipes have no read timeout)."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return got[0] if got else ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
