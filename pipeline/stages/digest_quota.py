"""How many digests one address gets through a relay: at most ``[delivery] max_digests_per_hour`` in any hour.

Whoever can connect to the gateway can claim any envelope sender, so without a quota a client could have
digests mailed to a third party as fast as it sends mail (README, "Who may use the gateway"). A digest over the
quota is skipped, its run a success that says why, as for the other digests that are not sent. Counted in this
process, where relay deliveries run (``[runner] io_workers`` threads): N engine processes let N times as many
through. Only a relay's digests count: a Maildir outbox mails nobody.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from email.utils import parseaddr

WINDOW_S = 3600.0
REMEMBERED = 10_000  # addresses kept; the least recent is forgotten first (its count starts again)


class DigestQuota:
    """Digests sent per address within the last ``window_s``; thread-safe."""

    def __init__(self, per_window: int, window_s: float = WINDOW_S, remembered: int = REMEMBERED) -> None:
        self.per_window, self.window_s, self.remembered = per_window, window_s, remembered
        self._sent: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, to: object, now: float | None = None) -> bool:
        """Count one digest to ``to`` unless it had ``per_window`` within the window; whether it may be sent.
        Checked and counted at once: digests sent side by side must not all pass a check made before any count."""
        if not self.per_window:
            return True
        key, now = _key(to), time.monotonic() if now is None else now
        with self._lock:
            sent = _trimmed(self._sent.setdefault(key, deque()), self.window_s, now)
            self._sent.move_to_end(key)
            while len(self._sent) > self.remembered:
                self._sent.popitem(last=False)
            if len(sent) >= self.per_window:
                return False
            sent.append(now)
            return True

    def release(self, to: object) -> None:
        """Take back the latest reservation for ``to``: its digest was not sent after all."""
        if not self.per_window:
            return
        with self._lock:
            sent = self._sent.get(_key(to))
            if sent:
                sent.pop()


def _trimmed(sent: deque[float], window_s: float, now: float) -> deque[float]:
    """``sent`` without the times older than the window."""
    while sent and sent[0] <= now - window_s:
        sent.popleft()
    return sent


def _key(to: object) -> str:
    """The address of ``to`` (an Address, "Name <a@b>" or "a@b"), compared without case."""
    text = str(to)
    return (parseaddr(text)[1] or text).lower()


_QUOTAS: dict[int, DigestQuota] = {}  # per limit: the process's one quota (settings are the same for all runs)
_QUOTAS_LOCK = threading.Lock()


def quota_for(per_hour: int) -> DigestQuota:
    """This process's quota for ``per_hour`` digests per address an hour."""
    with _QUOTAS_LOCK:
        return _QUOTAS.setdefault(per_hour, DigestQuota(per_hour))
