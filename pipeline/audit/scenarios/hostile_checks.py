"""What the hostile-sender scenarios observe from outside serve: idle TCP sessions held open, serve's RSS
sampled in a thread, bytes on disk, what serve's log says, and client processes that send for us.

Nothing here looks inside serve: it sees what a sender, ``ps`` and ``du`` see.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import selectors
import smtplib
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psutil

from ..base import memory
from ..base.serveproc import RECIPIENT, SENDER, ServeProcess, reply_of

T = TypeVar("T")
MB = 1024 * 1024


def in_clients(fn: Callable[..., T], jobs: list[tuple[Any, ...]], timeout_s: float = 600.0) -> list[T]:
    """Run ``fn(*job)`` for every job at once, each in its own client process; return the results in order.

    Client processes keep the audit's GIL out of the figures, as real senders are other processes."""
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=multiprocessing.get_context("forkserver")) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result(timeout=timeout_s) for f in futures]


class IdleSessions:
    """``count`` TCP connections to serve that read the first reply line and then send nothing.

    ``replies`` counts what each got first: ``220`` (a session slot), ``421`` (refused by the session
    limit), ``disconnected`` (closed without a line), ``timeout`` or ``refused`` (the connect failed).
    Every socket is closed on leaving the block, on every path.
    """

    def __init__(self, port: int, count: int, timeout_s: float = 20.0) -> None:
        self.port, self.count, self.timeout_s = port, count, timeout_s
        self.socks: list[socket.socket] = []
        self.first: dict[socket.socket, str] = {}
        self.failed: Counter[str] = Counter()  # connects that failed, by kind

    def __enter__(self) -> IdleSessions:
        _allow_open_files(self.count + 256)
        try:
            for _ in range(self.count):
                self._connect()
            self._read_first_lines()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        sock = socket.socket()
        sock.settimeout(5.0)
        try:
            sock.connect(("127.0.0.1", self.port))
        except OSError as exc:
            sock.close()
            self.failed["refused" if isinstance(exc, ConnectionRefusedError) else "timeout"] += 1
            return
        sock.setblocking(False)
        self.socks.append(sock)

    def _read_first_lines(self) -> None:
        """Read every socket's first line at once (a limit that answers late must not cost count × timeout)."""
        pending = {s: b"" for s in self.socks}
        deadline = time.monotonic() + self.timeout_s
        with selectors.DefaultSelector() as sel:
            for sock in pending:
                sel.register(sock, selectors.EVENT_READ, data=sock)
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.2):
                    conn: socket.socket = key.data
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        data = b""
                    pending[conn] += data
                    if not data or b"\n" in pending[conn]:
                        line = pending.pop(conn)
                        self.first[conn] = line[:3].decode(errors="replace") if line else "disconnected"
                        sel.unregister(conn)
        for sock in pending:
            self.first[sock] = "timeout"

    @property
    def replies(self) -> Counter[str]:
        """What the connections got first, counted."""
        return Counter(self.first.values()) + self.failed

    def release(self, count: int) -> int:
        """Close ``count`` of the connections that hold a session (got 220); return how many were closed."""
        held = [s for s in self.socks if self.first.get(s) == "220"][:count]
        for sock in held:
            sock.close()
            self.socks.remove(sock)
        return len(held)

    def close(self) -> None:
        """Close every connection."""
        for sock in self.socks:
            sock.close()
        self.socks.clear()


def _allow_open_files(needed: int) -> None:
    """Raise this process's soft open-file limit towards ``needed`` (up to the hard limit), as a load generator
    holding a thousand connections must on a machine whose default is 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard),
                                                    hard))


def connect_churn(port: int, count: int, timeout_s: float = 10.0) -> Counter[str]:
    """Connect ``count`` times one after another, read the first reply line, hang up; count the replies (``421``
    while the session slots are full). Runs in a client process."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock, \
                    sock.makefile("rb") as fh:
                line = fh.readline()
                seen[line[:3].decode(errors="replace") if line else "disconnected"] += 1
        except TimeoutError:
            seen["timeout"] += 1
        except OSError:
            seen["refused"] += 1
    return seen


def stream_file(port: int, path: str, placeholder: bytes, message_id: bytes, max_tries: int = 1,
                pause_s: float = 1.0, timeout_s: float = 600.0) -> tuple[str, str, float, int]:
    """Send the (already CRLF and dot-stuffed) message in ``path`` in 1 MB pieces, its ``placeholder``
    Message-ID replaced by ``message_id`` (same length), so a client holds 1 MB however large the message is.
    Like an MTA, try again after a 4xx or a dropped connection, up to ``max_tries``. Return the first reply,
    the last reply, the seconds from the first connect to the last reply, and the tries. Runs in a client process."""
    assert len(placeholder) == len(message_id)
    started, first, tries = time.perf_counter(), "", 0
    while True:
        tries += 1
        reply = _stream_once(port, path, placeholder, message_id, timeout_s)
        first = first or reply
        if reply == "250" or reply.startswith("5") or tries >= max_tries:
            return first, reply, time.perf_counter() - started, tries
        time.sleep(pause_s)


def _stream_once(port: int, path: str, placeholder: bytes, message_id: bytes, timeout_s: float) -> str:
    """One SMTP transaction streaming ``path``; the reply it ended with."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=timeout_s) as smtp, open(path, "rb") as fh:
            smtp.ehlo()
            code, text = smtp.mail(SENDER, [f"SIZE={os.path.getsize(path)}"] if smtp.has_extn("size") else [])
            if code == 250:
                code, text = smtp.rcpt(RECIPIENT)
            if code == 250:
                code, text = smtp.docmd("DATA")
            if code != 354:
                raise smtplib.SMTPResponseException(code, text)
            piece = fh.read(1 << 20).replace(placeholder, message_id, 1)
            while piece:
                smtp.send(piece)
                piece = fh.read(1 << 20)
            smtp.send(b".\r\n" if _ends_with_crlf(path) else b"\r\n.\r\n")
            code, text = smtp.getreply()
            if code != 250:
                raise smtplib.SMTPResponseException(code, text)
            return "250"
    except (OSError, smtplib.SMTPException) as exc:
        return reply_of(exc)


def _ends_with_crlf(path: str) -> bool:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - 2))
        return fh.read() == b"\r\n"


def serve_connections(serve: ServeProcess) -> int:
    """TCP connections serve holds open on its SMTP port right now (what it counts against the limit): every
    socket it still has, CLOSE_WAIT included (a client's close reaches the kernel before serve frees the slot).
    Serve's gateway process (the default, issue 17) holds the accepted sockets: serve and its children are
    searched, and a socket two processes share is counted once."""
    if serve.proc is None or serve.proc.poll() is not None:
        return 0
    held = set()
    try:
        tree = [psutil.Process(serve.proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.Error:
        return 0
    for proc in tree:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:  # a worker that exited between the listing and the read
            continue
        held |= {(c.laddr, c.raddr) for c in conns
                 if c.laddr and c.laddr.port == serve.port and c.status != psutil.CONN_LISTEN}
    return len(held)


def wait_connections_at_most(serve: ServeProcess, count: int, timeout_s: float = 60.0) -> int:
    """Wait until serve holds at most ``count`` connections on its port; return how many it holds."""
    deadline = time.monotonic() + timeout_s
    held = serve_connections(serve)
    while held > count and time.monotonic() < deadline:
        time.sleep(0.05)
        held = serve_connections(serve)
    return held


class RssSampler(memory.RssSampler):
    """``memory.RssSampler`` of another process: serve's RSS (its main and gateway processes) and its workers'
    (every other descendant, summed) every ``every_s`` seconds; the peaks are the figures, ``taken`` the number
    of samples."""

    def __init__(self, serve: ServeProcess, every_s: float = 0.05) -> None:
        super().__init__(interval_s=every_s)
        self.serve = serve
        self.peak_serve = self.peak_workers = self.peak_total = self.taken = 0

    def sample(self) -> None:
        """Take one sample now (a process that exits between listing and reading counts as 0)."""
        if self.serve.proc is None:
            return
        own = self.serve.serve_processes()
        serve = sum(_rss(p) for p in own)
        mine = {p.pid for p in own}
        workers = sum(_rss(p) for p in self.serve.descendants() if p.pid not in mine)
        self.peak_serve = max(self.peak_serve, serve)
        self.peak_workers = max(self.peak_workers, workers)
        self.peak_total = max(self.peak_total, serve + workers)
        self.taken += 1


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def tree_bytes(*dirs: Path) -> tuple[int, int]:
    """``(bytes, files)`` of every regular file under ``dirs`` (missing dirs count 0), as ``du`` would add up."""
    total = files = 0
    for directory in dirs:
        if not Path(directory).exists():
            continue
        for path in Path(directory).rglob("*"):
            try:
                if path.is_file() and not path.is_symlink():
                    total += path.stat().st_size
                    files += 1
            except OSError:  # removed while we walked: it no longer counts
                continue
    return total, files


def log_size(serve: ServeProcess) -> int:
    """Bytes in serve's current log."""
    try:
        return serve.log_path.stat().st_size
    except OSError:
        return 0


def log_since(serve: ServeProcess, offset: int) -> str:
    """What serve logged after byte ``offset`` of its current log."""
    try:
        with open(serve.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def message_template(path: Path, attachments: list[tuple[str, bytes]], placeholder: str) -> Path:
    """Write a MIME message with ``attachments`` to ``path``, CRLF and dot-stuffed for DATA, whose Message-ID is
    ``placeholder`` (client processes swap it for their own: each mail differs, the file is written once)."""
    from ..base import fixtures as fx  # heavy (fpdf): only the parent builds messages

    raw = fx.email_with(attachments, subject="Hostile sender: a large mail", message_id=placeholder)
    stuffed = b"\r\n".join((b"." + line) if line.startswith(b".") else line for line in raw.split(b"\r\n"))
    path.write_bytes(stuffed)
    return path
