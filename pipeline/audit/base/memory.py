"""Memory evidence: RSS sampling over time, leak slope, growing allocation sites.

RSS (psutil, this process plus its children such as extraction workers) is
what the machine pays; tracemalloc's traced size is what Python allocates and
is far less noisy, so the leak verdict uses the tracemalloc slope and reports
the RSS slope beside it.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil

from .paths import short_site

LEAK_THRESHOLD_BYTES_PER_RUN = 16 * 1024


def rss_bytes(include_children: bool = True, include_self: bool = True) -> int:
    """Resident set size of this process (unless ``include_self`` is off) and, by default, its live children."""
    me = psutil.Process()
    total = me.memory_info().rss if include_self else 0
    if include_children:
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass  # a child that just exited
    return total


class RssSampler:
    """Sample RSS every ``interval_s`` on a background thread; ``samples`` is [(time, bytes)]."""

    def __init__(self, interval_s: float = 0.02, include_children: bool = True, include_self: bool = True) -> None:
        self.interval_s, self.include_children, self.include_self = interval_s, include_children, include_self
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        """Take one sample now (the thread calls this every ``interval_s``)."""
        self.samples.append((time.time(), rss_bytes(self.include_children, self.include_self)))

    def peak_between(self, start: float, end: float) -> int | None:
        """Largest sample taken in [start, end]; for a span shorter than the interval, the nearest sample."""
        samples = list(self.samples)
        inside = [b for t, b in samples if start <= t <= end]
        if inside:
            return max(inside)
        return min(samples, key=lambda s: min(abs(s[0] - start), abs(s[0] - end)))[1] if samples else None

    @property
    def peak(self) -> int:
        """Largest sample overall."""
        return max((b for _, b in self.samples), default=0)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (0 with fewer than two points)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return 0.0
    return statistics.linear_regression(xs, ys).slope


@dataclass(frozen=True)
class LeakVerdict:
    """Slopes in bytes per run over the second half of the soak, whether that is a leak, and the slope
    over every sample (which a one-off step, such as a cache filling up, inflates)."""

    traced_bytes_per_run: float
    rss_bytes_per_run: float
    threshold: float
    leaking: bool
    top_growth: list[dict[str, Any]]
    traced_bytes_per_run_all: float = 0.0


def judge_leak(points: list[dict[str, float]], top_growth: list[dict[str, Any]],
               threshold: float = LEAK_THRESHOLD_BYTES_PER_RUN) -> LeakVerdict:
    """Fit traced and RSS bytes against run count over the second half of the samples; leaking if the
    traced slope exceeds ``threshold``. A leak keeps growing to the end; a bounded cache filling or a
    dict resizing once is a step early on, which the first half absorbs."""
    late = points[len(points) // 2:] if len(points) >= 6 else points
    runs = [p["runs"] for p in late]
    traced = slope(runs, [p["traced_bytes"] for p in late])
    rss = slope(runs, [p["rss_bytes"] for p in late])
    every = slope([p["runs"] for p in points], [p["traced_bytes"] for p in points])
    return LeakVerdict(traced, rss, threshold, traced > threshold, top_growth, every)


@contextmanager
def traced() -> Iterator[None]:
    """Run the block with tracemalloc on (one frame: sites by line, at the least overhead)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start(1)
    try:
        yield
    finally:
        if not was_tracing:
            tracemalloc.stop()


def sample_point(runs: int) -> dict[str, float]:
    """After a full collection: runs so far, traced bytes, RSS bytes (this process only)."""
    gc.collect()
    return {"runs": runs, "traced_bytes": tracemalloc.get_traced_memory()[0], "rss_bytes": rss_bytes(False)}


def top_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, limit: int = 10) -> list[dict[str, Any]]:
    """The allocation sites that grew most between two snapshots, named without this machine's paths
    (``stdlib:re/_compiler.py:761``, ``site-packages:…``, ``pipeline/…``)."""
    filters = [tracemalloc.Filter(False, tracemalloc.__file__),
               tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    stats = after.filter_traces(filters).compare_to(before.filter_traces(filters), "lineno")
    return [{"site": short_site(s.traceback[0].filename, s.traceback[0].lineno), "size_diff": s.size_diff,
             "count_diff": s.count_diff} for s in stats[:limit] if s.size_diff > 0]
