"""How the command line shows runs: one run with its tasks in DAG order, as text or as JSON.

``pipeline.cli`` re-exports ``format_run`` and its helpers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from . import store as s
from .config import Settings
from .dag import parse_instance


def format_run(store: s.DAGRunStore, run_id: int, as_json: bool) -> str:
    """Render one run with its tasks as JSON (the README's shape) or text."""
    run = store.get_run(run_id)
    tasks = in_dag_order(store.get_tasks(run_id), workflow_order(run.workflow))
    if as_json:
        return json.dumps({**run.as_dict(), "tasks": [t.as_dict() for t in tasks]}, indent=2)
    lines = [f"run {run.run_id}  {run.workflow}  {run.state}" + (f"  ({run.reason})" if run.reason else ""),
             f"  dedup key: {run.dedup_key}", f"  queued: {utc_text(run.queued_at)}"]
    for t in tasks:
        took = f"{t.duration_s:.3f}s" if t.duration_s is not None else "-"
        waited = f"wait {t.wait_s:.3f}s" if t.duration_s is not None else ""  # of the duration, for a free worker
        err = f"  {t.error_type}: {t.error_message}" if t.error_type else ""
        if not err and isinstance(t.output, dict) and t.output.get("skipped"):  # a digest not sent, and why
            err = f"  skipped: {t.output['skipped']}"
        lines.append(f"  {t.task_id:<20} {t.state:<16} try {t.try_number}  {took:>9} {waited:<12}{err}".rstrip())
    return "\n".join(lines)


def workflow_order(workflow: str) -> tuple[str, ...]:
    """The topological task order of a workflow this package defines (empty for others)."""
    from .workflows import EMAIL_DIGEST, email_digest_dag

    return email_digest_dag(Settings()).order if workflow == EMAIL_DIGEST else ()


def in_dag_order(tasks: list[s.TaskRun], order: Sequence[str]) -> list[s.TaskRun]:
    """Tasks in the DAG's order, mapped instances (``ingest_pdf[3]``) by start time, then index; unknown last."""
    rank = {task_id: i for i, task_id in enumerate(order)}

    def key(task: s.TaskRun) -> tuple[int, float, int, str]:
        try:
            base, number = parse_instance(task.task_id)
        except ValueError:
            base, number = task.task_id, None
        number = number or 0
        started = task.started_at if task.started_at is not None else math.inf
        return rank.get(base, len(rank)), started, number, task.task_id
    return sorted(tasks, key=key)


def utc_text(ts: float | None) -> str:
    """``ts`` (a Unix time) as ``YYYY-MM-DD HH:MM:SS`` in UTC; "" for None."""
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
