"""Timers: one thread that calls functions later (retry backoff, task timeouts).

A thread per timer would cost a thread start per task; a heap and one
condition variable serve every run of the process.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .passes import Passes

log = logging.getLogger(__name__)


class Timers:
    """Call functions after a delay on a single daemon thread."""

    def __init__(self) -> None:
        self.passes = Passes("timer callbacks")  # a callback that never returns holds every later one
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pipeline-timers", daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the timer thread after ``delay_s`` seconds."""
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._counter), fn, args))
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread; pending calls are dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._closed:
                    return
                _, _, fn, args = heapq.heappop(self._heap)
            try:
                with self.passes.passing():
                    fn(*args)
            except Exception:  # one failing callback must not stop every later timer
                log.exception("timer callback %r failed", fn)
