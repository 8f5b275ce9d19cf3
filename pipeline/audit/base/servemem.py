"""Serve's process tree by role: memory and CPU of ``serve`` (the main process) and of its extraction workers.

The audit names processes by role, never by pid: extraction workers are recycled
after ``MAX_REQUESTS_PER_WORKER`` documents (``pipeline/stages/extract_worker.py``),
so one worker's pid means nothing over a soak. The workers are reported as one
role: the sum over the live workers (what the machine pays), the largest live
worker, and how many were replaced while the audit watched.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil

from .serveproc import GATEWAY_PROCESS, ServeProcess

ROLES = ("serve", "workers")
# serve's processes one by one (``TreeWatch.cpu_seconds_by_process``): the main process runs the engine, the
# runner's bookkeeping and the run store in one interpreter, so its CPU per run bounds runs/s on its own
PROCESSES = ("main", "gateway", "stage pool", "extraction workers")


@dataclass(frozen=True)
class TreeSample:
    """One look at serve's tree: bytes per role (USS 0 when not asked for), live workers and their pids."""

    serve_rss: int
    serve_uss: int
    workers_rss_sum: int
    workers_rss_max: int
    workers_uss_sum: int
    worker_pids: frozenset[int]


def _memory(proc: psutil.Process, uss: bool) -> tuple[int, int]:
    """``(rss, uss)`` of one process; ``(0, 0)`` if it exited meanwhile (USS reads smaps: only when asked)."""
    try:
        if uss:
            info = proc.memory_full_info()
            return int(info.rss), int(info.uss)
        return int(proc.memory_info().rss), 0
    except psutil.Error:
        return 0, 0


def sample_tree(serve: ServeProcess, uss: bool = False) -> TreeSample:
    """RSS (and USS if ``uss``) of serve (its main and gateway processes, summed) and of each live extraction
    worker, by role."""
    own = [_memory(p, uss) for p in serve.serve_processes()]
    serve_rss, serve_uss = sum(r for r, _ in own), sum(u for _, u in own)
    workers = serve.extract_workers()
    sizes = [_memory(p, uss) for p in workers]
    alive = [(p, size) for p, size in zip(workers, sizes, strict=True) if size[0] > 0]
    return TreeSample(serve_rss, serve_uss, sum(r for _, (r, _) in alive), max((r for _, (r, _) in alive), default=0),
                      sum(u for _, (_, u) in alive), frozenset(p.pid for p, _ in alive))


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
        return float(times.user + times.system)
    except psutil.Error:
        return None


class TreeWatch:
    """Watch serve's tree every ``every_s`` seconds on a thread: peak RSS per role, CPU seconds per role spent
    inside the block, and every worker pid seen (so recycled workers are counted even between samples)."""

    def __init__(self, serve: ServeProcess, every_s: float = 0.05) -> None:
        self.serve, self.every_s = serve, every_s
        self.peak_serve_rss = self.peak_workers_rss = self.taken = 0
        self.worker_pids: set[int] = set()
        self.most_live_workers = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._process_of: dict[int, str] = {}  # pid -> one of PROCESSES, named when first seen (a restarted
        # gateway or a recycled worker adds its own)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-tree-watch", daemon=True)

    def __enter__(self) -> TreeWatch:
        self._cpu_start = self._cpu_now()
        self._cpu_last = dict(self._cpu_start)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def _cpu_now(self) -> dict[int, float]:
        """CPU seconds so far of serve's processes and each live worker, by pid (none includes its children's)."""
        serve_procs, workers = self.serve.serve_processes(), self.serve.extract_workers()
        for proc in serve_procs + workers:
            if proc.pid not in self._process_of:
                self._process_of[proc.pid] = self._process_name(proc, proc in workers)
        found = {p.pid: _cpu_seconds(p) for p in workers + serve_procs}
        return {pid: seconds for pid, seconds in found.items() if seconds is not None}

    def _process_name(self, proc: psutil.Process, worker: bool) -> str:
        """Which of ``PROCESSES`` ``proc`` is (the fork server and the resource tracker count as the stage pool's)."""
        if worker:
            return "extraction workers"
        if self.serve.proc is not None and proc.pid == self.serve.proc.pid:
            return "main"
        try:
            command = " ".join(proc.cmdline())
        except psutil.Error:
            command = ""
        return "gateway" if GATEWAY_PROCESS in command else "stage pool"

    def sample(self) -> None:
        """Take one sample now (the thread calls this every ``every_s``)."""
        now = sample_tree(self.serve)
        self.peak_serve_rss = max(self.peak_serve_rss, now.serve_rss)
        self.peak_workers_rss = max(self.peak_workers_rss, now.workers_rss_sum)
        self.worker_pids |= now.worker_pids
        self.most_live_workers = max(self.most_live_workers, len(now.worker_pids))
        self._cpu_last.update(self._cpu_now())
        self.taken += 1

    @property
    def worker_restarts(self) -> int:
        """Workers that replaced another while watched: pids seen beyond the most that were ever live at once."""
        return max(0, len(self.worker_pids) - self.most_live_workers)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds per role spent while watched: ``by_role`` of ``cpu_seconds_by_process``."""
        return by_role(self.cpu_seconds_by_process())

    def cpu_seconds_by_process(self) -> dict[str, float]:
        """CPU seconds spent while watched by each of ``PROCESSES``, its processes summed (a worker that exited
        counts up to its last sample)."""
        spent = dict.fromkeys(PROCESSES, 0.0)
        for pid, last in self._cpu_last.items():
            spent[self._process_of[pid]] += last - self._cpu_start.get(pid, 0.0)
        return spent


def by_role(by_process: dict[str, float]) -> dict[str, float]:
    """``ROLES`` from ``PROCESSES``: the extraction workers are *workers*, every other process is *serve*."""
    workers = by_process.get("extraction workers", 0.0)
    return {"serve": sum(by_process.values()) - workers, "workers": workers}
