"""Passes: which passes of a background loop (or its pool's callbacks) are under way, and since when.

A pass that never returns (a store or a disk that does not answer, a deadlock) raises nothing, so no failure
streak reports it; the engine reports one running past ``[engine] stuck_after_s`` instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Passes:
    """The passes of a loop or a pool's callbacks under way now, and since when (one per thread).

    A pass running longer than ``[engine] stuck_after_s`` is a hang: a prober blocked the dispatcher, and the
    gateway answered 250 for 80 mails while no run advanced and serve said it was healthy."""

    def __init__(self, activity: str) -> None:
        self.activity = activity
        self._since: dict[int, float] = {}  # thread id -> monotonic start of its pass

    @contextmanager
    def passing(self) -> Iterator[None]:
        """Mark one pass of the calling thread (a pass inside another counts from the outer one's start)."""
        key = threading.get_ident()
        outer = key in self._since
        if not outer:
            self._since[key] = time.monotonic()
        try:
            yield
        finally:
            if not outer:
                self._since.pop(key, None)

    def problem(self, after_s: float) -> str | None:
        """One line if a pass has run longer than ``after_s`` (0: never a problem), else None."""
        started = min(list(self._since.values()), default=None)
        if not after_s or started is None or time.monotonic() - started <= after_s:
            return None
        return f"{self.activity} stuck for {time.monotonic() - started:.0f} s (a store or a disk that does not answer?)"
