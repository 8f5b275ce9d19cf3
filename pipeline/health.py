"""LoopHealth: a background loop's streak of failures, its backoff and the health verdict it gives.

Guarded loops (STYLE.md section 3) log the first failure of a streak with a
traceback and each further one in one line, back off (doubling), and after
``unhealthy_after`` failures in a row report the component unhealthy.
``passes.Passes`` catches what no exception reports: a pass that never returns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .config import EngineConfig

log = logging.getLogger("pipeline.engine")  # the engine's loops: one logger for the operator to watch


def backoff_s(config: EngineConfig, failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: ``backoff_base_s`` doubling to ``backoff_max_s``."""
    return min(config.backoff_max_s, config.backoff_base_s * 2 ** min(max(failures, 1) - 1, 30))


class LoopHealth:
    """One background loop's streak of failures: its backoff, its log lines and its health verdict."""

    def __init__(self, activity: str, config: EngineConfig) -> None:
        self.activity, self.config = activity, config
        self.failures = 0
        self.problem: str | None = None  # set once the streak reaches config.unhealthy_after

    def failed(self, exc: Exception, run_ids: Iterable[int] = ()) -> float:
        """Count and log a failed iteration; return how long the loop should wait before the next (s)."""
        self.failures += 1
        ids = list(run_ids)
        where = f" (run {', '.join(map(str, ids[:20]))}{' ...' if len(ids) > 20 else ''})" if ids else ""
        what = one_line(exc)
        if self.failures == 1:  # one traceback per streak, then one line per failure
            log.error("%s failed%s: %s", self.activity, where, what, exc_info=exc)
        else:
            log.error("%s failed again (%d in a row)%s: %s", self.activity, self.failures, where, what)
        if self.failures >= self.config.unhealthy_after:
            if self.problem is None:
                log.error("engine unhealthy: %s failed %d times in a row", self.activity, self.failures)
            self.problem = f"{self.activity} failed {self.failures} times: {what}"
        return backoff_s(self.config, self.failures)

    def succeeded(self) -> None:
        """End the streak; if the loop had failed, say it recovered."""
        if self.failures:
            log.warning("%s recovered after %d failure(s)", self.activity, self.failures)
        self.failures, self.problem = 0, None


def one_line(exc: BaseException) -> str:
    """Return ``ExcType: message`` on one line (for log lines and stored reasons)."""
    return " ".join(f"{type(exc).__name__}: {exc_text(exc)}".split())


def exc_text(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder for an exception whose ``__str__`` raises: the code that reports an error
    (a guarded loop's ``except``, a run's break) must not fail on it."""
    try:
        return str(exc)
    except Exception:
        return "(its message cannot be read)"
