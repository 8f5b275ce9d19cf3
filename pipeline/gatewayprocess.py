"""GatewayProcess: serve's SMTP gateway in a child process of its own (issue 17).

In one process, the pipeline's threads (parsing, digesting, delivering) hold
the GIL while the gateway's event loop waits its turn for every SMTP round
trip of every sender. So by default ``serve`` binds the SMTP port itself and
starts ``python -m pipeline.gatewaychild`` on those sockets: the child
accepts (spool fsync, run commit, reply), reconciles the spool and watches
the drop folder; serve's own process runs the engine, which hears of each
queued run at once through the store's wake-up (``pipeline.wakeup``).

The child's lifetime is tied to serve's:

- its stdin is a pipe from serve: first the orders (``GatewayOrders``,
  pickled), then a line whenever the engine's health changes, so the child
  answers 451 while the engine is unhealthy, as one process does. The
  pipe's end (serve stops, or dies however) makes the child stop
  gracefully. The child ignores SIGINT and SIGTERM: Ctrl-C to the process
  group reaches serve, which stops the child before its engine.
- its first stdout line says it listens (``ready <metrics port>``) or why
  it cannot (``error <message>``): a start-up error fails serve with that
  one line before any run is claimed.
- then a byte a second from its SMTP event loop: a child silent for
  ``[serve] gateway_hung_after_s`` (a hung loop answers no sender, and
  would never die by itself) is killed, and restarted as a dead one is.
- if it dies, a supervising thread logs it, reports serve unhealthy
  (``problem``) and starts another after a backoff (``[engine]
  backoff_base_s`` doubling to ``backoff_max_s``). Serve keeps the
  listening sockets open meanwhile, so a sender's connection waits in the
  backlog for the new child instead of being refused.

Metrics: with ``--metrics-port`` the child serves its own registry on a
loopback port it names in its ready line, and serve's endpoint adds those
samples to its own (``metrics.merged``): Prometheus still scrapes one target.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from .config import MetricsConfig, Settings
from .errors import StartupError
from .gateway import listen_sockets
from .health import backoff_s, one_line
from .metrics import GATEWAY_PROCESS
from .stages.worker_errors import signal_name

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 60.0  # a child that does not listen by then is killed: start-up fails (or is retried)
STABLE_S = 30.0  # a child that lived this long before it died starts the backoff afresh
HEALTH_EVERY_S = 1.0  # the engine's health is told the child at least this often: its sign that serve lives
SUPERVISE_EVERY_S = 0.2  # how often the supervisor looks at the child and the engine's health
UNWATCHED_S = 2.0  # a gap between looks longer than this: serve itself was paused, so a silence is not judged
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}  # the child ignores them: serve stops it
QUIET_LOGGERS = ("mail.log", "psycopg.pool")  # libraries whose chatter serve's CLI silences: the child follows


@dataclass(frozen=True)
class GatewayOrders:
    """What serve tells the gateway process it starts (pickled onto the child's stdin)."""

    settings: Settings
    fds: tuple[int, ...]  # the listening sockets, inherited
    log_levels: dict[str, int]  # logger name ("" for the root) -> level, as serve has them
    metrics: bool  # serve its registry on a loopback port for serve's endpoint to read


class GatewayProcess:
    """Start, supervise, restart and stop serve's gateway process."""

    def __init__(self, settings: Settings, health: Callable[[], str | None]) -> None:
        """``health``: the engine's problem (None when healthy), passed on to the child as it changes."""
        self.settings, self.health = settings, health
        self.sockets: list[socket.socket] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0  # the child's registry endpoint, 0 when it serves none
        self.problem: str | None = None  # why serve answers no SMTP now; None while the child listens
        self._look_failed = False  # the last look at the child raised (its problem is ours, not the child's)
        self.restarts = 0
        self.restart_causes: collections.Counter[str] = collections.Counter()  # "died" or "hung"
        self._started_at = 0.0
        self._told: str | None = None  # the health the child was last told
        self._told_at = 0.0  # when (monotonic)
        self._storing_fails = False  # the child's latest sign of life said storing mail fails
        self._out: IO[bytes] | None = None  # the child's stdout: its signs of life after its ready line
        self._alive_at = 0.0  # when the child last gave one (monotonic)
        self._hung = False  # the supervisor killed the child for its silence
        self._looked_at = 0.0  # when the supervisor last read the child's signs of life (monotonic)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id (None before start)."""
        return self.proc.pid if self.proc is not None else None

    def bind(self) -> GatewayProcess:
        """Bind the SMTP port (connections wait in its backlog until a child listens); ``StartupError`` if taken."""
        if not self.sockets:
            self.sockets = listen_sockets(self.settings.gateway.host, self.settings.gateway.port)
        return self

    def start(self) -> GatewayProcess:
        """Bind the SMTP port if not yet bound, start the child, return once it listens; ``StartupError``
        (one line) if it cannot."""
        self.bind()
        try:
            self._spawn()
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._supervise, name="pipeline-gateway-process", daemon=True)
        self._thread.start()
        return self

    @property
    def storing(self) -> str | None:
        """Why the child cannot store mail now (the spool or the run store refuses it), or None: its signs of
        life say so (``gatewaychild.say_alive``)."""
        return "the gateway process cannot store mail (the spool or the run store refuses it: see its log)" \
            if self._storing_fails and self.proc is not None and self.proc.poll() is None else None

    @property
    def down(self) -> str | None:
        """Why no gateway process runs now, seen directly, or None: a supervisor stuck in a call would never set
        ``problem`` (a prober blocked it and killed the child: no SMTP for 10 s, serve healthy)."""
        proc = self.proc
        if self._thread is None or self._stopping.is_set() or (proc is not None and proc.poll() is None):
            return None
        return "the gateway process is not running; serve answers no SMTP until it is restarted"

    @property
    def supervisor_thread(self) -> int | None:
        """Native id of the thread that restarts the child (its priority is the child's), once started."""
        return self._thread.native_id if self._thread is not None else None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop supervising, close the child's stdin so it stops (finishing what it accepted), close the sockets.

        A child still running after ``timeout_s`` is killed. Safe to call twice.
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        proc, self.proc = self.proc, None
        _close(self._out)
        self._out = None
        if proc is not None:
            _close(proc.stdin)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("gateway process %d still running %.0f s after stop: killed", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
        self._close_sockets()

    def exposition(self) -> str:
        """The child's metrics as Prometheus text; raises ``OSError`` while it is down or serves none."""
        import urllib.request  # here: only a scrape needs it

        port, proc = self.metrics_port, self.proc
        if not port or proc is None or proc.poll() is not None:
            raise ConnectionError("the gateway process is not running")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode("utf-8"))

    # -- the child ----------------------------------------------------------------

    def _spawn(self) -> None:
        """Start a child on the sockets and wait for its first line; ``StartupError`` (child killed) if not ready."""
        package_root = str(Path(__file__).resolve().parent.parent)  # the child imports this very package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                        os.environ.get("PYTHONPATH")]))}
        fds = tuple(sock.fileno() for sock in self.sockets)
        # started with the stop signals blocked, it ignores them once it runs (``gatewaychild.main``): a Ctrl-C in
        # the half second of its imports killed it, and serve failed to start
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen([sys.executable, "-m", GATEWAY_PROCESS], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, pass_fds=fds, env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            levels = {name: logging.getLogger(name).getEffectiveLevel() for name in ("", *QUIET_LOGGERS)}
            settings = replace(self.settings, metrics=MetricsConfig())  # serve's port is serve's
            pickle.dump(GatewayOrders(settings, fds, levels, bool(self.settings.metrics.port)), proc.stdin)
            proc.stdin.flush()
            self.metrics_port = self._await_ready(proc, proc.stdout)
        except BaseException as exc:
            proc.kill()
            proc.wait()
            _close(proc.stdin)
            _close(proc.stdout)
            if isinstance(exc, (OSError, ValueError)):  # a broken pipe: it died while starting
                raise StartupError(f"the gateway process could not start: {one_line(exc)}") from exc
            raise
        os.set_blocking(proc.stdout.fileno(), False)
        _close(self._out)  # the last child's
        self.proc, self._started_at, self._told = proc, time.monotonic(), None
        self._out, self._alive_at, self._hung, self._looked_at = proc.stdout, time.monotonic(), False, time.monotonic()
        self._storing_fails = False
        log.info("gateway process %d accepts SMTP for serve", proc.pid)

    def _await_ready(self, proc: subprocess.Popen[bytes], out: IO[bytes]) -> int:
        """Read the child's first line: its metrics port when ready; ``StartupError`` with its reason if not."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not select.select([out], [], [], SUPERVISE_EVERY_S)[0]:
            if self._stopping.is_set() or time.monotonic() > deadline:
                raise StartupError(f"the gateway process did not listen within {READY_TIMEOUT_S:.0f} s"
                                   if not self._stopping.is_set() else "serve is stopping")
        word, _, rest = out.readline().decode("utf-8", "replace").strip().partition(" ")
        if word == "ready":
            return int(rest or 0)
        if word == "error":
            raise StartupError(rest)
        code = proc.wait()
        raise StartupError(f"the gateway process exited with code {code} before it listened (see its log above)")

    # -- supervision ------------------------------------------------------------

    def _supervise(self) -> None:
        """Pass the engine's health on; when the child dies, log it, back off and start another.

        Guarded: an error of supervision itself is logged and reported as serve's problem, and supervision
        goes on, backing off; a thread that died here would leave SMTP unanswered while serve looked healthy.
        """
        failures = 0
        while not self._stopping.is_set():
            try:
                failures = self._look(failures)
            except Exception as exc:
                failures += 1
                self._look_failed = True
                if self.proc is not None and self.proc.poll() is not None:  # dead, and not restarted: next look does
                    self.proc = None
                self.problem = f"supervising the gateway process failed: {one_line(exc)}"
                log.error("supervising the gateway process failed; next look in %.1f s",
                          backoff_s(self.settings.engine, failures), exc_info=exc)
                self._stopping.wait(backoff_s(self.settings.engine, failures))

    def _look(self, failures: int) -> int:
        """One look at the child: tell it the engine's health, or restart it; return the failure count."""
        proc = self.proc
        if proc is not None and proc.poll() is None and self._silent_too_long(proc):
            self.problem = "the gateway process hangs and is being killed; serve answers no SMTP until it restarts"
            proc.kill()  # the next look that finds it dead restarts it
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # stuck in the kernel (a frozen disk): it dies when that returns
                pass
        if proc is not None and proc.poll() is None:
            self._tell_health(proc)
            if self._look_failed:  # supervision works again, and the child lives
                self._look_failed, self.problem, failures = False, None, 0
            self._stopping.wait(SUPERVISE_EVERY_S)
            return failures
        if proc is not None:
            failures = self._died(proc, failures)
        if self._stopping.wait(backoff_s(self.settings.engine, failures)):
            return failures
        try:
            self._spawn()
        except Exception as exc:  # StartupError, or the OS refused the process: try again, backing off
            self.proc = None
            if self._stopping.is_set():
                return failures
            failures += 1
            log.error("gateway process could not start again: %s; next try in %.1f s", one_line(exc),
                      backoff_s(self.settings.engine, failures))
            return failures
        log.warning("gateway process %d listening again (restart %d): serve accepts SMTP again",
                    self.pid, self.restarts)
        self._look_failed, self.problem = False, None
        return failures

    def _silent_too_long(self, proc: subprocess.Popen[bytes]) -> bool:
        """Read the child's signs of life; True (logged) once it has given none for ``gateway_hung_after_s``
        (once: a child already killed for it is waited for, not judged again)."""
        if self._hung:
            return False
        try:
            while self._out is not None and (signs := os.read(self._out.fileno(), 4096)):
                self._alive_at = time.monotonic()
                self._storing_fails = signs.endswith(b"!")  # the latest sign says whether storing mail fails
        except BlockingIOError:  # nothing more now
            pass
        now = time.monotonic()
        if now - self._looked_at > UNWATCHED_S:  # serve was paused or starved too (Ctrl-Z, a frozen cgroup):
            self._alive_at = max(self._alive_at, now)  # no verdict on a span nobody watched; the child's turn now
        self._looked_at = now
        limit = self.settings.serve.gateway_hung_after_s
        silent = now - self._alive_at
        if not limit or silent < limit:
            return False
        self._hung = True
        log.error("gateway process %d gave no sign of life for %.0f s (its event loop hangs): killing it",
                  proc.pid, silent)
        return True

    def _died(self, proc: subprocess.Popen[bytes], failures: int) -> int:
        """Log the child's death and report serve unhealthy; return the failure count its backoff follows."""
        code = proc.returncode
        how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"
        if self._hung:
            how = f"hung (silent for {self.settings.serve.gateway_hung_after_s:g} s) and was killed"
        failures = 1 if time.monotonic() - self._started_at >= STABLE_S else failures + 1
        self.restarts += 1
        self.restart_causes["hung" if self._hung else "died"] += 1
        self.problem = f"the gateway process {how}; serve answers no SMTP until it is restarted"
        log.error("gateway process %d %s: senders wait in the backlog; restarting it in %.1f s", proc.pid, how,
                  backoff_s(self.settings.engine, failures))
        _close(proc.stdin)
        return failures

    def _tell_health(self, proc: subprocess.Popen[bytes]) -> None:
        """Write the engine's health to the child when it changed, and at least every HEALTH_EVERY_S (``health``
        alone: healthy): a child that hears nothing for ``gateway_hung_after_s`` answers 451 (``EngineHealth``)."""
        problem = self.health()
        if proc.stdin is None or (problem == self._told and time.monotonic() - self._told_at < HEALTH_EVERY_S):
            return
        line = "health" if problem is None else "health " + " ".join(problem.split())
        try:
            proc.stdin.write(line.encode("utf-8", "replace") + b"\n")
            proc.stdin.flush()
        except OSError:  # it died just now: the next look sees it
            return
        self._told, self._told_at = problem, time.monotonic()

    def _close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def _close(stream: IO[bytes] | None) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except OSError:  # a pipe whose reader is gone: flushing the rest failed, nothing more to do
        pass
