"""Which messages the gateway accepts on its SMTP event loop, and which in its thread pool (issue 17).

Accepting a message is two fsyncs, a read and a commit. For a small message, handing that to a thread can
cost its sender more than the work itself: the hand-off, and the GIL passing back and forth between the event
loop and the thread. Off by default (``[gateway] inline_accept_bytes = 0``), because it depends on the store:

- the gateway alone (``serve --gateway-only``), 8 sender processes of small mails: on the loop, more mails a
  second and a shorter p99 than in the pool (notebook 08's "inline accept of small mails" switch);
- ``serve`` with the engine working off the same mails: the engine's commits hold SQLite's write lock often,
  the gateway's commit waits for it, and on the loop that wait holds every session. Measured both ways
  (notebook 04's ``inline_accept`` variant, the sender's wait), the p99 came out better in the audit's
  session 479a33 but worse beside a 5 MB mail there, and worse in a one-off run: not a default yet.

A large message's fsync grows with it and would stall every other session, so it always goes to the pool.

An inline accept that waits (a store locked by another process, polled up to its busy timeout; a slow or
hung disk's fsync) holds every session for as long: the back-off below bounds how often, not how long. So
after an accept of a small message that took longer than ``slow_s``, or failed in the store or the spool,
every accept goes to the pool for ``backoff_s``; small messages accepted in the pool meanwhile are timed too,
and a slow one extends the back-off, so the loop takes accepts back only once they are fast again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import SpoolError, StoreError

log = logging.getLogger(__name__)
SLOW_S = 0.02  # an inline accept this long held every session for as long: the pool's hand-off is cheaper
BACKOFF_S = 5.0
T = TypeVar("T")


class InlineAccepts:
    """Decide, per message, whether to accept it on the event loop (module docstring).

    ``timed`` runs in pool threads too: its one write, ``pool_until``, is a float assignment."""

    def __init__(self, max_bytes: int, slow_s: float = SLOW_S, backoff_s: float = BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes, self.slow_s, self.backoff_s, self.clock = max_bytes, slow_s, backoff_s, clock
        self.pool_until = float("-inf")  # every accept goes to the pool until then

    def small(self, size: int) -> bool:
        """Whether a message of ``size`` bytes is small enough for the loop at all."""
        return size <= self.max_bytes

    def inline(self, size: int) -> bool:
        """Whether a message of ``size`` bytes is accepted on the loop now."""
        return self.small(size) and self.clock() >= self.pool_until

    def timed(self, accept: Callable[[], T]) -> T:
        """Run ``accept`` (a small message's, on the loop or in the pool); back off if it was slow or failed in
        the store or the spool."""
        t0 = time.perf_counter()
        try:
            result = accept()
        except (StoreError, SpoolError, OSError) as exc:
            self._back_off(f"failed after {(time.perf_counter() - t0) * 1000:.0f} ms ({type(exc).__name__})")
            raise
        seconds = time.perf_counter() - t0
        if seconds > self.slow_s:
            self._back_off(f"took {seconds * 1000:.0f} ms")
        return result

    def _back_off(self, what: str) -> None:
        first = self.clock() >= self.pool_until  # extending a back-off already under way logs nothing more
        self.pool_until = self.clock() + self.backoff_s
        if first:
            log.warning("accepting every message in the thread pool for at least %.0f s: an accept %s",
                        self.backoff_s, what)
