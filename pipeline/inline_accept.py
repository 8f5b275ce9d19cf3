"""Which messages the gateway accepts on its SMTP event loop, and which in its thread pool (issue 17).

Accepting a message is two fsyncs, a read and a commit. For a small message, handing that to a thread can
cost its sender more than the work itself: the hand-off, and the GIL passing back and forth between the event
loop and the thread. Off by default (``[gateway] inline_accept_bytes = 0``), because it depends on the store:

- the gateway alone (``serve --gateway-only``), 8 sender processes of small mails: on the loop, more mails a
  second and a shorter p99 than in the pool (notebook 08's "inline accept of small mails" switch);
- ``serve`` with the engine working off the same mails: the engine's commits hold SQLite's write lock often,
  the gateway's commit waits for it, and on the loop that wait holds every session: a longer p99 and fewer
  mails a second than the pool (notebook 04's ``inline_accept`` variant, the sender's wait).

A large message's fsync grows with it and would stall every other session, so it always goes to the pool.

A slow inline accept (a locked store waiting out its busy timeout, a slow disk) stalls every session
too. So after one inline accept that took longer than ``slow_s`` or failed, every message goes to the pool
for ``backoff_s``, and the gateway logs it once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
SLOW_S = 0.02  # an inline accept this long held every session for as long: the pool's hand-off is cheaper
BACKOFF_S = 5.0


class InlineAccepts:
    """Decides, per message, whether to accept it on the event loop (used from the loop's thread only)."""

    def __init__(self, max_bytes: int, slow_s: float = SLOW_S, backoff_s: float = BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes, self.slow_s, self.backoff_s, self.clock = max_bytes, slow_s, backoff_s, clock
        self.pool_until = float("-inf")  # every accept goes to the pool until then

    def inline(self, size: int) -> bool:
        """Whether a message of ``size`` bytes is accepted on the loop now."""
        return size <= self.max_bytes and self.clock() >= self.pool_until

    def took(self, seconds: float, failed: bool = False) -> None:
        """Note an inline accept's time and outcome; a slow or failed one sends accepts to the pool a while."""
        if seconds > self.slow_s or failed:
            self.pool_until = self.clock() + self.backoff_s
            log.warning("accepting every message in the thread pool for %.0f s: an accept on the event loop %s "
                        "after %.0f ms", self.backoff_s, "failed" if failed else "took", seconds * 1000)
