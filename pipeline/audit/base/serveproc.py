"""A real ``python -m pipeline serve`` child process, and SMTP sender processes that drive it like MTAs.

The fault scenarios (``faults.py``) kill, lock and starve this process, so it
runs in its own session (a ``kill -9`` of it can be followed by sweeping the
workers it leaves behind) and logs to a file next to its data dir. Senders run
in their own processes so the audit's GIL never limits serve; each writes one
line per SMTP reply to its own log, which is both the record of what senders
saw and how the scenario follows progress while the sender runs.
"""

from __future__ import annotations

import functools
import itertools
import mailbox
import multiprocessing
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

EXTRACT_WORKER = "pipeline.stages.extract_worker"
GATEWAY_PROCESS = "pipeline.gatewaychild"  # serve's SMTP gateway child (issue 17), part of the "serve" role
STAGE_POOL = "multiprocessing.forkserver"  # the runner's process pool and its fork server (issue 16), "serve" too
ROOT = Path(__file__).resolve().parents[3]  # serve runs from the repository root, as `make` does


# ports handed out by free_port: below Linux's ephemeral range (32768 up), so no outgoing connection takes one
# between the check and the server's bind, and a block of its own per pytest-xdist worker, so two workers
# never pick the same one (the kernel's port 0 could give a port just freed by one worker to the other)
PORT_BASE, PORT_BLOCK, PORT_BLOCKS = 20_000, 1_500, 8
_next_port = itertools.count(random.SystemRandom().randrange(PORT_BLOCK))  # processes sharing a block start apart


def free_port() -> int:
    """A loopback TCP port nothing listens on now, from this process's block (``PORT_BASE``); each call moves on,
    so one process never gets the same port twice in a row (this module stays light: sender processes import
    it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    block = int(worker[2:]) % PORT_BLOCKS if worker[2:].isdigit() else 0
    for _ in range(PORT_BLOCK):
        port = PORT_BASE + block * PORT_BLOCK + next(_next_port) % PORT_BLOCK
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or lingering after a close: the next one
                continue
            return port
    with socket.socket() as sock:  # the whole block taken: whatever the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """Render ``{section: {key: value}}`` (ints, floats, bools, strings) as a TOML settings file."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f'"{v}"' if isinstance(v, str) else repr(v)

    return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in keys.items()) + "\n"
                   for name, keys in sections.items())


class ServeProcess:
    """``python -m pipeline serve`` on a free loopback port with its own data dir; restartable, killable."""

    def __init__(self, data_dir: Path, work_dir: Path, config: dict[str, dict[str, Any]] | None = None,
                 args: tuple[str, ...] = (), drop_folder: bool = False) -> None:
        self.data_dir, self.work_dir = Path(data_dir), Path(work_dir)
        self.args = tuple(args)  # extra serve flags, e.g. ("--gateway-only",)
        self.drop_folder = drop_folder  # off unless asked: a scenario's stray files must not become runs
        self.port = free_port()
        self.config_path = self.work_dir / "serve.toml"  # outside the data dir: a full disk must not hide it
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml_text(config or {}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        """The stderr log of the latest start."""
        return self.work_dir / f"serve-{self.starts}.log"

    def start(self, timeout_s: float = 120.0) -> ServeProcess:
        """Start serve and return once it answers SMTP NOOP; RuntimeError (with its log) if it exits first."""
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "--data-dir", str(self.data_dir), "--config", str(self.config_path),
                 "serve", "--port", str(self.port), *([] if self.drop_folder else ["--no-drop-folder"]), *self.args],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                # the signal follows the thread that started serve: only the main thread lives as long as we do
                preexec_fn=(functools.partial(stop_with_parent, os.getpid(), _prctl())
                            if threading.current_thread() is threading.main_thread() else None))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as smtp:
                    smtp.noop()
                return self
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"serve did not answer on port {self.port} within {timeout_s} s: {self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        """The end of the latest serve log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def descendants(self) -> list[psutil.Process]:
        """Every live process serve started (extraction workers run in process groups of their own, so by parentage)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            return []

    def serve_processes(self) -> list[psutil.Process]:
        """What the audit calls *serve*: everything of serve except the extraction workers: the main process, its
        gateway process (the default since issue 17: it accepts the mail) and the runner's process pool with its
        fork server (build_digest and deliver, issue 16)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        workers = {p.pid for p in self.extract_workers()}
        return [psutil.Process(self.proc.pid), *(p for p in self.descendants() if p.pid not in workers)]

    def extract_workers(self) -> list[psutil.Process]:
        """Serve's PDF extraction worker processes."""
        return self._descendants_running(EXTRACT_WORKER)

    def _descendants_running(self, module: str) -> list[psutil.Process]:
        """Serve's live descendants whose command line names ``module`` (one that exits meanwhile is skipped)."""
        found = []
        for proc in self.descendants():
            try:
                if any(module in part for part in proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def cli(self, *args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m pipeline <args>`` on this serve's data dir and settings (e.g. ``purge``), as a user would."""
        return subprocess.run([sys.executable, "-m", "pipeline", "--data-dir", str(self.data_dir), "--config",
                               str(self.config_path), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        """``kill -9`` serve, reap it, then SIGKILL whatever it left running (as a crash of the whole unit)."""
        if self.proc is None:
            return
        left = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._sweep(left)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM and wait for a graceful stop (SIGKILL after ``timeout_s``); return the exit code. Stopped (and
        reaped) already, it does nothing more: its process group's id may belong to another process by now."""
        if self.proc is None:
            return None
        if self.proc.returncode is not None:
            return self.proc.returncode
        left = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sweep(left)
        return self.proc.returncode

    def _sweep(self, left: list[psutil.Process]) -> None:
        """SIGKILL what serve left behind: its session and the workers it started (orphans now)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        wait_dead(left, timeout_s=5.0)


def wait_dead(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until each of ``procs`` has exited; return those still alive at the timeout.

    A zombie counts as exited: serve's workers are not our children, and where nothing reaps orphans (a
    container whose PID 1 is not an init) they stay zombies, so ``psutil.wait_procs`` waited out its whole
    timeout for them (1.2-1.9 s per serve stopped in the audit)."""
    deadline = time.monotonic() + timeout_s
    alive = list(procs)
    while alive:
        alive = [p for p in alive if _alive(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return alive


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone between the two calls
        return False


def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux (looked up before forking: no dlopen in the child), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def stop_with_parent(parent: int, prctl: Callable[..., int] | None) -> None:
    """In the child, before serve starts: SIGTERM it (a graceful stop) when ``parent``, which started it, dies.

    A serve in a session of its own does not get the terminal's Ctrl-C, and a notebook kernel that is killed
    (a cancelled CI job, a kernel restart in JupyterLab) runs no cleanup: without this its serves, workers and
    temp dirs would stay. Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing changes. Linux sends it when
    the *thread* that forked ends, so only a serve started from the main thread asks for it.
    """
    if prctl is None:
        return
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def serving(data_dir: Path, work_dir: Path, config: dict[str, dict[str, Any]] | None = None,
            args: tuple[str, ...] = ()) -> Iterator[ServeProcess]:
    """A started ServeProcess (``args``: extra serve flags) that is killed and reaped on every path out of the
    block."""
    serve = ServeProcess(data_dir, work_dir, config, args=args)
    try:
        yield serve.start()
    finally:
        serve.kill()


# -- senders ---------------------------------------------------------------------------------------------------


def _reply_of(exc: BaseException) -> str:
    """What a sender saw, as a short label: the SMTP code, ``refused`` or ``disconnected``."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return str(next(iter(exc.recipients.values()))[0])
    if isinstance(exc, smtplib.SMTPResponseException):
        return str(exc.smtp_code)
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return "disconnected"


def _sender(port: int, messages: list[tuple[str, bytes]], log_path: str, stop_path: str, pause_s: float,
            max_tries: int, gap_s: float) -> None:
    """Send each message like an MTA: retry after a 4xx or a connection error (new connection, short pause),
    give up after a 5xx or ``max_tries``. Each reply is a line ``message-id TAB reply TAB wall time``."""
    smtp: smtplib.SMTP | None = None
    with open(log_path, "a", buffering=1) as log:
        for message_id, raw in messages:
            for _ in range(max_tries):
                if os.path.exists(stop_path):
                    return
                try:
                    smtp = smtp or smtplib.SMTP("127.0.0.1", port, timeout=60)
                    smtp.sendmail("faults@example.com", ["digest@pipeline.local"], raw)
                    reply = "250"
                except (OSError, smtplib.SMTPException) as exc:
                    reply = _reply_of(exc)
                    _close(smtp)
                    smtp = None
                log.write(f"{message_id}\t{reply}\t{time.time():.6f}\n")
                if reply == "250" or reply.startswith("5"):
                    break
                time.sleep(pause_s)
            if gap_s:
                time.sleep(gap_s)
    _close(smtp)


SENDER, RECIPIENT = "faults@example.com", "digest@pipeline.local"


def reply_of(exc: BaseException) -> str:
    """What a client saw when ``exc`` ended its transaction (the SMTP code, ``refused`` or ``disconnected``)."""
    return _reply_of(exc)


def timed_sends(port: int, messages: list[bytes], timeout_s: float = 120.0) -> list[tuple[str, float]]:
    """Send each message on a new connection, as a normal client does; return ``(reply, seconds)`` per message,
    the seconds from connect to the final reply of DATA (or to the refusal). Runs in a client process."""
    out = []
    for raw in messages:
        started = time.perf_counter()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=timeout_s) as smtp:
                smtp.sendmail(SENDER, [RECIPIENT], raw)
                out.append(("250", time.perf_counter() - started))
        except (OSError, smtplib.SMTPException) as exc:
            out.append((reply_of(exc), time.perf_counter() - started))
    return out


def _close(smtp: smtplib.SMTP | None) -> None:
    if smtp is None:
        return
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


@dataclass
class Replies:
    """Every reply senders logged: ``(message_id, reply, wall time)``, in time order."""

    events: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def acked(self) -> dict[str, float]:
        """Message-ID -> wall time of its first 250."""
        out: dict[str, float] = {}
        for mid, reply, at in self.events:
            if reply == "250":
                out.setdefault(mid, at)
        return out

    @property
    def acked_events(self) -> list[float]:
        """Wall time of every 250."""
        return [at for _, reply, at in self.events if reply == "250"]

    def counts(self) -> Counter[str]:
        """How often each reply was seen."""
        return Counter(reply for _, reply, _ in self.events)

    def first_ack_after(self, when: float) -> float | None:
        """Wall time of the first 250 at or after ``when``."""
        return next((at for _, reply, at in self.events if reply == "250" and at >= when), None)


class Senders:
    """``count`` sender processes sharing a list of messages round-robin; follow them through their logs."""

    def __init__(self, port: int, messages: list[tuple[str, bytes]], work_dir: Path, count: int,
                 pause_s: float = 0.2, max_tries: int = 300, gap_s: float = 0.0) -> None:
        self.work_dir = Path(work_dir)
        self.logs = [self.work_dir / f"sender-{i}.log" for i in range(count)]
        self.stop_path = self.work_dir / "senders.stop"
        self.stop_path.unlink(missing_ok=True)
        for log in self.logs:
            log.unlink(missing_ok=True)
        self._jobs = [(port, messages[i::count], str(log), str(self.stop_path), pause_s, max_tries, gap_s)
                      for i, log in enumerate(self.logs)]
        self._pool: ProcessPoolExecutor | None = None
        self._futures: list[Future[None]] = []

    def __enter__(self) -> Senders:
        self._pool = ProcessPoolExecutor(max_workers=len(self._jobs),
                                         mp_context=multiprocessing.get_context("forkserver"))
        self._futures = [self._pool.submit(_sender, *job) for job in self._jobs]
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.stop_path.touch()  # a failing scenario must not wait out every sender's retries
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        self.stop_path.unlink(missing_ok=True)

    def done(self) -> bool:
        """True once every sender has finished (an error in a sender is raised here)."""
        finished = all(f.done() for f in self._futures)
        for f in self._futures:
            if f.done():
                f.result()
        return finished

    def wait(self, timeout_s: float = 600.0) -> Replies:
        """Wait for every sender to finish; return what they saw."""
        deadline = time.monotonic() + timeout_s
        while not self.done():
            if time.monotonic() > deadline:
                self.stop_path.touch()
                raise TimeoutError(f"senders still sending after {timeout_s} s")
            time.sleep(0.05)
        return self.replies()

    def replies(self) -> Replies:
        """What the senders have logged so far."""
        events = []
        for log in self.logs:
            if log.exists():
                for line in log.read_text().splitlines():
                    parts = line.split("\t")
                    if len(parts) == 3:  # a line being written right now is skipped until complete
                        events.append((parts[0], parts[1], float(parts[2])))
        return Replies(sorted(events, key=lambda e: e[2]))

    def wait_acked(self, count: int, timeout_s: float = 600.0) -> int:
        """Wait until ``count`` messages got their 250 (or every sender finished); return the acked count."""
        return self._wait_for(lambda replies: len(replies.acked), count, timeout_s)

    def wait_replies(self, count: int, timeout_s: float = 600.0) -> int:
        """Wait until senders logged ``count`` replies of any kind (or finished); return how many they logged."""
        return self._wait_for(lambda replies: len(replies.events), count, timeout_s)

    def wait_refused(self, timeout_s: float = 600.0) -> float | None:
        """Wait until a sender logged a reply other than 250 (or every sender finished); return its wall time."""
        self._wait_for(lambda replies: sum(reply != "250" for _, reply, _ in replies.events), 1, timeout_s)
        return next((at for _, reply, at in self.replies().events if reply != "250"), None)

    def _wait_for(self, measure: Callable[[Replies], int], count: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = measure(self.replies())
            if seen >= count or self.done():
                return seen
            time.sleep(0.02)
        raise TimeoutError(f"senders reached {measure(self.replies())} of {count} after {timeout_s} s")


def digests_by_original(outbox: Path) -> Counter[str]:
    """How many delivered digests (Maildir ``new/`` and ``cur/``) reply to each original Message-ID."""
    found: Counter[str] = Counter()
    if not (Path(outbox) / "new").is_dir():
        return found
    box = mailbox.Maildir(Path(outbox), create=False)
    try:
        for key in box.iterkeys():
            with box.get_file(key) as fh:
                headers = mailbox.Message(fh.read().split(b"\n\n", 1)[0])
            original = headers.get("In-Reply-To")
            if original:
                found[original.strip()] += 1
    finally:
        box.close()
    return found
