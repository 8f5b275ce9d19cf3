"""The program of serve's gateway process: ``python -m pipeline.gatewaychild``, started by ``GatewayProcess``.

It reads its orders from stdin (``GatewayOrders``: settings, the listening
sockets serve bound, log levels), runs the gateway role of ``PipelineService``
on those sockets (spool reconciliation, SMTP, the drop folder), says
``ready <metrics port>`` (or ``error <message>``) on stdout, then a byte a
second from its SMTP event loop (serve kills a child that stays silent:
``[serve] gateway_hung_after_s``), and follows stdin: ``health <problem>``
lines are the engine's health, which it answers 451 by, and serve's sign of life (silent for
``gateway_hung_after_s``, it answers 451 too: ``EngineHealth``); the end of stdin
(serve stopped, or died) stops it gracefully. SIGINT and SIGTERM are
ignored: serve decides when its gateway stops.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import sys
import time

from . import metrics
from .errors import PipelineError
from .gatewayprocess import STOP_SIGNALS, GatewayOrders
from .priority import request_slice
from .service import GATEWAY, PipelineService, exit_if_stop_overruns

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the CLI's: both write to serve's stderr
ALIVE_EVERY_S = 1.0


class EngineHealth:
    """The engine's problem as serve last told it (None: healthy); the gateway's health check reads ``current``.

    Serve tells it at least every second; one silent for ``silent_after_s`` (0: never) is frozen or stuck (a
    probe's SIGSTOP on serve left this process answering 250 to mail no engine ran for as long as it lasted):
    the gateway then answers 451 until serve speaks again."""

    def __init__(self, silent_after_s: float = 0.0) -> None:
        self.problem: str | None = None
        self.silent_after_s = silent_after_s
        self.heard_at = self.ticked_at = time.monotonic()

    def tick(self) -> None:
        """Note that this process runs (the SMTP loop calls it every ALIVE_EVERY_S)."""
        self._unless_paused(time.monotonic())

    def _unless_paused(self, now: float) -> None:
        """Forget serve's silence when this process was paused through it itself (its loop did not tick)."""
        if now - self.ticked_at > 3 * ALIVE_EVERY_S:
            self.heard_at = now
        self.ticked_at = now

    def follow(self, line: bytes) -> None:
        """Take one ``health [problem]`` line."""
        word, _, problem = line.decode("utf-8", "replace").strip().partition(" ")
        if word == "health":
            self.problem, self.heard_at = problem or None, time.monotonic()

    def current(self) -> str | None:
        """The engine's problem, or serve's silence (not a silence this process was paused through itself: Ctrl-Z
        or a frozen container pauses both, and nobody was watching then)."""
        now = time.monotonic()
        self._unless_paused(now)  # (called on the SMTP loop: it runs now)
        silent = now - self.heard_at
        if self.silent_after_s and silent > self.silent_after_s:
            return f"serve has told this gateway nothing for {silent:.0f} s (frozen or stuck): its engine may not run"
        return self.problem


def say_alive(storing_fails: bool = False) -> None:
    """One byte on stdout, from the SMTP event loop: serve kills a gateway process that stays silent. "!" while
    storing mail fails (``gateway.StoringTrouble``): serve then reports itself unhealthy too."""
    try:
        os.write(sys.stdout.fileno(), b"!" if storing_fails else b".")
    except (BlockingIOError, BrokenPipeError):  # serve reads behind, or is gone (stdin's end stops us)
        pass


def main() -> int:
    """Serve SMTP for the serve process that started us until our stdin ends; return the exit code."""
    for sig in STOP_SIGNALS:  # serve stops us by closing our stdin
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked until now (``GatewayProcess._spawn``)
    stdin = sys.stdin.buffer
    orders: GatewayOrders = pickle.load(stdin)
    logging.basicConfig(level=orders.log_levels.get("", logging.INFO), format=LOG_FORMAT, stream=sys.stderr)
    for name, level in orders.log_levels.items():
        logging.getLogger(name or None).setLevel(level)
    request_slice(orders.settings.serve.gateway_slice_us)  # before any thread starts: they inherit it
    engine = EngineHealth(orders.settings.serve.gateway_hung_after_s)
    try:
        service = PipelineService(orders.settings, role=GATEWAY,
                                  sockets=[socket.socket(fileno=fd) for fd in orders.fds])
        service.gateway.health = engine.current
        service.start()
    except PipelineError as exc:  # serve fails with this one line
        print("error " + " ".join(str(exc).split()), flush=True)
        return 2
    registry = None
    try:
        registry = metrics.start_metrics_server(0) if orders.metrics else None
        print(f"ready {registry.port if registry else 0}", flush=True)
        os.set_blocking(sys.stdout.fileno(), False)  # a sign of life never blocks the loop that gives it
        service.gateway.every(ALIVE_EVERY_S, lambda: say_alive(service.gateway.storing.problem() is not None))
        service.gateway.every(ALIVE_EVERY_S, engine.tick)
        for line in stdin:  # until serve closes the pipe or dies
            engine.follow(line)
    finally:
        if registry is not None:
            registry.close()
        # bounded as serve's own stop is: it outlived serve's exit on a locked store, then committed runs for
        # mails whose senders had gone (a re-probe's find; their retries found the runs, nothing was lost)
        margin = orders.settings.serve.stop_margin_s
        exit_if_stop_overruns(orders.settings.engine.shutdown_grace_s + margin if margin else None)
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
