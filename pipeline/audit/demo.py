"""A demo workload: many small fan-out runs through a real engine and store, summarised."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from ..config import Settings
from ..dag import DAG, Task, TaskContext
from ..engine import WorkflowEngine
from ..sqlite_store import SqliteRunStore


def _split(ctx: TaskContext) -> list[int]:
    return list(range(ctx.payload["width"]))


def _work(ctx: TaskContext) -> int:
    return sum(i * i for i in range(20_000 + ctx.item))


def _join(ctx: TaskContext) -> int:
    return sum(ctx.upstream["work"])


DEMO = DAG("demo_fanout", [Task("split", _split), Task("work", _work, deps=("split",), map_over="split"),
                           Task("join", _join, deps=("work",))])


def run_demo(data_dir: Path, runs: int) -> list[str]:
    """Trigger ``runs`` demo runs, wait for all, and return summary lines with the store's figures."""
    settings = Settings.for_data_dir(data_dir)
    store = SqliteRunStore(settings.store)
    started = time.time()
    with WorkflowEngine(store, settings) as engine:
        engine.register(DEMO)
        ids = [engine.trigger(DEMO.workflow_id, {"width": 4}).run_id for _ in range(runs)]
        for run_id in tqdm(ids, desc="demo runs", unit="run"):
            engine.wait(run_id, timeout=600)
    elapsed = time.time() - started
    counts = store.count_runs_by_state(DEMO.workflow_id)
    stats = store.task_duration_percentiles(started, time.time())
    store.close()
    lines = [f"{runs} demo runs in {elapsed:.2f} s ({runs / elapsed:.0f} runs/s); states: {counts}"]
    lines += [f"  {task:<8} n={v['n']:<5} p50={v['p50'] * 1000:.2f} ms  p95={v['p95'] * 1000:.2f} ms"
              for task, v in stats.items()]
    lines.append(f"run store: {settings.store.path}  (python -m pipeline runs --workflow {DEMO.workflow_id})")
    return lines
