"""Handover: gives a broken run back to the engine once none of its tries executes any more.

A try cannot be stopped (a thread runs to its end; a process-pool task too),
so a run requeued while one still ran would be claimed again and run beside
it, both writing into the same work dir. The runner therefore counts its
live tries and hands a broken run over only after the last one ended, or
after ``cap_s`` when one never ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .timers import Timers

log = logging.getLogger("pipeline.runner")


class Handover:
    """One run's live tries, and its single hand-over to ``on_broken`` after it broke."""

    def __init__(self, run_id: int, on_broken: Callable[[int, Exception], None], timers: Timers,
                 cap_s: float) -> None:
        self.run_id, self.on_broken, self.timers, self.cap_s = run_id, on_broken, timers, cap_s
        self.live = 0  # submitted tries still executing (a timed-out thread try too)
        self._cause: Exception | None = None
        self._done = False
        self._lock = threading.Lock()

    def try_started(self) -> None:
        """Count a submitted try."""
        with self._lock:
            self.live += 1

    def try_ended(self) -> None:
        """Count a try whose future completed; hand the run over if it broke and this was the last."""
        with self._lock:
            self.live -= 1
        self.now()

    def broke(self, exc: Exception) -> None:
        """Record why the run broke; hand it over now, or once its live tries end (``cap_s`` at most)."""
        with self._lock:
            self._cause, live = exc, self.live
        if live:
            log.info("run %s: abandoned; waiting up to %g s for %d live tr(ies)", self.run_id, self.cap_s, live)
            self.timers.call_later(self.cap_s, self._force)
        self.now()

    def _force(self) -> None:
        self.now(forced=True)

    def now(self, forced: bool = False) -> bool:
        """Hand the broken run over if no try executes (or ``forced``); return True if this call did."""
        with self._lock:
            if self._done or self._cause is None or (self.live and not forced):
                return False
            self._done = True
            exc, live = self._cause, self.live
        if live:
            log.warning("run %s: %d tr(ies) still running; handing the run over anyway", self.run_id, live)
        self.on_broken(self.run_id, exc)
        return True
