"""A log that writes at most one line per cause per interval, counting the rest: for faults that repeat as fast as
senders or files arrive (a refused connection, a 451, a drop-folder file that cannot be taken), where one line
per occurrence buried everything else (10,669 lines in 30 s)."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections import Counter
from typing import Any

LOG_INTERVAL_S = 10.0


class RateLimitedLog:
    """Log at most one line per cause per ``interval_s``; the next one says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.counts: Counter[str] = Counter()  # every occurrence per cause, logged or not
        self._lock = threading.Lock()  # causes come from the event loop and from the accept threads

    def report(self, cause: str, message: str, *args: object, level: int = logging.WARNING,
               exc_info: BaseException | None = None) -> bool:
        """Log ``message % args`` unless ``cause`` was logged less than an interval ago; True if logged."""
        now = time.monotonic()
        with self._lock:
            self.counts[cause] += 1
            last = self._last.get(cause)
            if last is not None and now - last < self.interval_s:
                self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
                return False
            self._last[cause] = now
            suppressed = self._suppressed.pop(cause, 0)
        if suppressed:
            message += " (and %d more like it in the last %.0f s)"
            args += (suppressed, now - (last or now))
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def flush(self) -> None:
        """Log the count of every cause still suppressed (at shutdown)."""
        with self._lock:
            pending, self._suppressed = self._suppressed, {}
        for cause, count in pending.items():
            self.logger.warning("%s: %d more not logged", cause, count)

    def loop_exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Event loop exception handler: one line per cause (message and exception type) per interval.

        A traceback is kept only for what is not an OSError (a bug, not a hostile or broken peer).
        """
        exc = context.get("exception")
        message = str(context.get("message") or "unhandled exception in the event loop")
        cause = f"{message}: {type(exc).__name__}" if exc is not None else message
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        trace = exc if isinstance(exc, BaseException) and not isinstance(exc, OSError) else None
        self.report(cause, "SMTP event loop: %s%s", message, detail, exc_info=trace)


def cause_of(exc: BaseException) -> str:
    """The kind of a failure, to count it by: its type, and the OS error behind it (a full disk and a failing one
    are both a SpoolError; one must not hide the other in the count of the first)."""
    number = getattr(exc, "errno", None) or getattr(exc.__cause__, "errno", None)
    name = errno.errorcode.get(number, str(number)) if isinstance(number, int) else ""
    return f"{type(exc).__name__} {name}".strip()
