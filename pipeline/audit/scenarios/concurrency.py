"""Notebook 03's measurements: many workflows at once, and where a run's time goes by stage.

``concurrency`` runs that many workflows in an in-process pipeline per level; ``stage_times`` and
``task_windows`` read a finished run's per-stage and per-task times from its store (notebook 01's profile
uses them on serve's store too).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from ...dag import task_of
from ...store import DAGRunStore, Run
from ..base import fixtures as fx
from ..base.harness import percentile, row, running_pipeline, save, wait_all_done
from ..base.recorder import AuditRecorder

# "Lane wait" is the part of ingestion spent waiting for a free extraction worker (the tasks' recorded wait_s),
# so that "Ingestion" is the work itself (issue 14)
STAGES = ("Email", "Queue", "Lane wait", "Ingestion", "Digest", "Delivery")


def task_windows(store: DAGRunStore, run: Run) -> dict[str, list[tuple[float, float]]]:
    """Per task kind (``ingest_pdf[2]`` counts as ``ingest_pdf``), the (start, end) wall times of each
    finished task instance of ``run``."""
    windows: dict[str, list[tuple[float, float]]] = {}
    for task in store.get_tasks(run.run_id):
        if task.started_at is not None and task.ended_at is not None:
            windows.setdefault(task_of(task.task_id), []).append((task.started_at, task.ended_at))
    return windows


def stage_times(source: Any, run: Run) -> dict[str, float]:
    """Seconds spent in each of the seed's stages by one finished run, ingestion split into the wait for an
    extraction lane and the work.

    ``source`` is the run store the run is in, or a service holding it (``.store``): the audit reads a
    ``python -m pipeline serve``'s store from outside, and an in-process PipelineService's directly. The lane
    wait is what the parse waited plus what the ingestion instance that ended last waited (the critical path:
    instances run side by side).
    """
    store = getattr(source, "store", source)
    finished = [t for t in store.get_tasks(run.run_id) if t.started_at is not None and t.ended_at is not None]
    tasks = {kind: (min(s for s, _ in spans), max(e for _, e in spans))
             for kind, spans in task_windows(store, run).items()}
    parse = tasks.get("parse_email")
    started = run.started_at or run.queued_at
    ingest_end = tasks["ingest_pdf"][1] if "ingest_pdf" in tasks else (parse[1] if parse else started)
    out = {"Email": run.queued_at - run.payload["data_end_at"], "Queue": started - run.queued_at}
    if parse:
        waits = [t.wait_s for t in finished if task_of(t.task_id) == "parse_email"]
        last = max((t for t in finished if task_of(t.task_id) == "ingest_pdf"), key=lambda t: t.ended_at or 0.0,
                   default=None)
        lane_wait = max(waits, default=0.0) + (last.wait_s if last is not None else 0.0)
        out["Lane wait"] = lane_wait
        out["Ingestion"] = ingest_end - parse[0] - lane_wait
    for stage, task in (("Digest", "build_digest"), ("Delivery", "deliver")):
        if task in tasks:
            out[stage] = tasks[task][1] - tasks[task][0]
    return out


def concurrency(levels: list[int], pdf: Path, recorder: AuditRecorder | None = None,
                stop_on_failure: bool = False, time_budget_s: float = 600.0) -> pd.DataFrame:
    """For each level, that many workflows at once (max_active_runs = level): throughput, p50/p95, failures."""
    rows: list[dict[str, Any]] = []
    raw_pdf = Path(pdf).read_bytes()
    started = time.monotonic()
    for level in tqdm(levels, desc="concurrency", unit="level"):
        if time.monotonic() - started > time_budget_s:
            rows.append(row("baseline", "skipped_level", level, "runs", 0, reason="time budget"))
            continue
        with running_pipeline(max_active_runs=level, thread_workers=min(level, 64)) as (service, sink):
            messages = [fx.email_with([("doc.pdf", raw_pdf)], message_id=f"<c{level}-{i}@audit>") for i in range(level)]
            t0 = time.time()
            for raw in messages:
                service.gateway.accept(raw, source="audit")
            peak_active = 0
            while len(service.engine.active_runs()) < level and time.time() - t0 < 5:
                peak_active = max(peak_active, len(service.engine.active_runs()))
                time.sleep(0.005)
            peak_active = max(peak_active, len(service.engine.active_runs()))
            runs = wait_all_done(service, level)
            wall = max(r.ended_at or 0 for r in runs) - t0
        failed = [r for r in runs if r.state != "success"]
        latencies = pd.Series([(r.ended_at or 0) - r.queued_at for r in runs])
        tags = {"level": level}
        rows += [row("baseline", "throughput_runs_per_s", level / wall, "1/s", 0, **tags),
                 row("baseline", "latency_p50_s", latencies.median(), "s", 0, **tags),
                 row("baseline", "latency_p95_s", percentile(latencies, 95), "s", 0, **tags),
                 row("baseline", "peak_active_runs", peak_active, "runs", 0, **tags),
                 row("baseline", "failed_runs", len(failed), "runs", 0, **tags,
                     reasons=sorted({str(r.reason)[:120] for r in failed})[:5])]
        if failed and stop_on_failure:
            break
    return save(recorder, "concurrency", rows)
