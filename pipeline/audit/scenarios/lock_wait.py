"""A gateway's insert beside a busy writer on one SQLite file (issue 17): how ``[store] lock_polling`` waits.

serve's gateway process inserts a run per mail while serve's engine, in another process and ``[serve]
engine_nice`` steps lower, commits one task transition at a time to the same file. SQLite has one writer and
queues no one: its busy handler sleeps 1, 2, 5 ... 100 ms between tries and the engine can retake the lock
during each sleep, so an insert can wait far longer than any one commit. ``contended_inserts`` reproduces
that with a real writer process committing transitions in a loop, and times each insert of this process, with one
``StoreConfig`` for both sides (lock polling on or off). ``scripts/bench_lock.py`` and notebook 08 run it
both ways, interleaved.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...config import ServeConfig, StoreConfig
from ...store import Transition, open_store
from ..base.harness import percentile

WRITER_TASKS = 5_000  # task rows the writer cycles through (its transitions rewrite them)


def _writer(config: StoreConfig, nice: int, ready: Any, stop: Any, counted: Any) -> None:
    """Commit one transition per transaction until ``stop``; put how many, and over how many seconds."""
    if nice:
        os.nice(nice)
    store = open_store(config)
    try:
        run = store.create_run("lock_wait_writer", {})[0]
        ids = [f"t{i}" for i in range(WRITER_TASKS)]
        store.create_tasks(run.run_id, ids)
        ready.set()
        done, t0 = 0, time.perf_counter()
        while not stop.is_set():
            store.record_transitions([Transition(run.run_id, ids[done % WRITER_TASKS], "running", 1, 1.0)])
            done += 1
        counted.put((done, time.perf_counter() - t0))
    finally:
        store.close()


def contended_inserts(path: Path, lock_polling: bool, inserts: int = 300, gap_s: float = 0.005,
                      writer_nice: int = ServeConfig.engine_nice) -> dict[str, Any]:
    """``inserts`` runs created one at a time (``gap_s`` apart) beside a writer process at ``writer_nice``.

    Returns ``insert_ms`` (every insert's wall time), ``writer_commits_per_s`` (the writer's rate meanwhile)
    and ``lock_polling``.
    """
    config = replace(StoreConfig(path=Path(path)), lock_polling=lock_polling)
    open_store(config).close()  # schema in place before two processes race to make it
    context = multiprocessing.get_context("spawn")  # no fork from a process with threads
    ready, stop, counted = context.Event(), context.Event(), context.Queue()
    writer = context.Process(target=_writer, args=(config, writer_nice, ready, stop, counted), daemon=True)
    writer.start()
    store = open_store(config)
    try:
        deadline = time.monotonic() + 120
        while not ready.wait(0.5):
            if not writer.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the writer process did not start (exit code {writer.exitcode})")
        times = []
        for i in range(inserts):
            t0 = time.perf_counter()
            store.create_run("lock_wait_gateway", {"i": i}, dedup_key=f"{os.getpid()}-{time.time_ns()}-{i}")
            times.append((time.perf_counter() - t0) * 1000)
            time.sleep(gap_s)
        stop.set()
        done, seconds = counted.get(timeout=60)
    finally:
        stop.set()
        store.close()
        writer.join(30)
        if writer.is_alive():
            writer.kill()
            writer.join(10)
    return {"lock_polling": lock_polling, "insert_ms": times, "writer_commits_per_s": done / seconds}


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Median, p95, p99 and max insert milliseconds, and the writer's commits/s, of one run."""
    times = result["insert_ms"]
    return {"median_ms": percentile(times, 50), "p95_ms": percentile(times, 95), "p99_ms": percentile(times, 99),
            "max_ms": max(times), "writer_commits_per_s": result["writer_commits_per_s"]}
