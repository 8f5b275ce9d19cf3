"""RSS of this process's PDF extraction workers, and of nothing else.

The PDF scenarios ingest in the audit's own process (a notebook kernel with DuckDB and pandas loaded, some
hundreds of MB), while the extraction itself runs in worker processes (``pipeline.stages.extract_worker``).
What a document costs in memory shows in those workers, so these figures sample only them: the processes
below this one whose command line names the extraction worker module (as ``ServeProcess.extract_workers``
recognises serve's).
"""

from __future__ import annotations

import os
import time

import psutil

from .memory import RssSampler
from .serveproc import EXTRACT_WORKER


def extraction_workers(pid: int | None = None) -> list[psutil.Process]:
    """The live extraction worker processes below ``pid`` (default: this process)."""
    try:
        children = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    workers = []
    for proc in children:
        try:
            if any(EXTRACT_WORKER in part for part in proc.cmdline()):
                workers.append(proc)
        except psutil.Error:
            continue  # exited between listing and reading
    return workers


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


class WorkerRssSampler(RssSampler):
    """Sample the summed RSS of this process's extraction workers every ``interval_s`` seconds.

    ``samples`` is [(time, bytes)] as in ``RssSampler``, so ``peak`` is the workers' peak. ``before`` is the
    workers' RSS on entering the block (what they already held: a warm worker keeps part of an earlier
    document's memory), and ``pids`` every process sampled.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        super().__init__(interval_s=interval_s)
        self.pids: set[int] = set()
        self.before = 0

    def __enter__(self) -> WorkerRssSampler:
        self.sample()  # taken here rather than by the thread: it precedes the measured work for certain
        self.before = self.samples[0][1]
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sample()  # a document shorter than the interval still has a sample after it

    def sample(self) -> None:
        """Take one sample now: the RSS of every extraction worker alive, summed (an exiting one counts 0)."""
        workers = extraction_workers()
        self.pids.update(proc.pid for proc in workers)
        self.samples.append((time.time(), sum(_rss(proc) for proc in workers)))
