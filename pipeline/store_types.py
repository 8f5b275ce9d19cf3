"""The run store's states and value types: what it returns (frozen dataclasses, STYLE.md section 2) and takes.

Run and TaskRun are what a store read returns, Transition and PurgedBatch what
a task's state change and a purge transaction carry; RunTakenOver is the
signal a write for a run another process owns raises in its runner, and
``encode_output`` checks a task's result before the store keeps it inline.
The contract that uses them is ``pipeline.store.DAGRunStore``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Run states
QUEUED, RUNNING, SUCCESS, FAILED = "queued", "running", "success", "failed"
# Extra task states
RETRYING, UPSTREAM_FAILED = "retrying", "upstream_failed"
RUN_STATES = (QUEUED, RUNNING, SUCCESS, FAILED)
# a successful run whose tolerated tasks (e.g. one attachment of two) failed: its reason starts with this
PARTIAL_PREFIX = "partial: "
TASK_STATES = (QUEUED, RUNNING, RETRYING, SUCCESS, FAILED, UPSTREAM_FAILED)
TERMINAL_TASK_STATES = frozenset({SUCCESS, FAILED, UPSTREAM_FAILED})


@dataclass(frozen=True)
class Run:
    """One execution of a workflow."""

    run_id: int
    workflow: str
    state: str
    dedup_key: str | None
    payload: Mapping[str, Any]
    queued_at: float
    started_at: float | None = None
    ended_at: float | None = None
    heartbeat_at: float | None = None
    owner: str | None = None
    reason: str | None = None

    @property
    def partial(self) -> bool:
        """Succeeded, but some of its tasks failed (the reason says which): e.g. 1 of 2 attachments unreadable."""
        return self.state == SUCCESS and (self.reason or "").startswith(PARTIAL_PREFIX)

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end, once ended."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON shape documented in the README."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "state": self.state,
            "dedup_key": self.dedup_key,
            "queued_at": self.queued_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "reason": self.reason,
            "partial": self.partial,
            "payload": dict(self.payload),
        }


@dataclass(frozen=True)
class TaskRun:
    """One task instance of a run (``ingest_pdf[2]`` for a mapped task)."""

    run_id: int
    task_id: str
    state: str
    try_number: int
    queued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    output: Any = None
    wait_s: float = 0.0  # of duration_s, seconds the last try waited for a shared worker before its work began

    @property
    def duration_s(self) -> float | None:
        """Seconds the last try took, once ended (its wait for a worker included, see ``wait_s``)."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    @property
    def run_time_s(self) -> float | None:
        """Seconds the last try worked: its duration less its wait for a worker (issue 14)."""
        duration = self.duration_s
        return None if duration is None else duration - self.wait_s

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON shape documented in the README."""
        return {
            "task_id": self.task_id,
            "state": self.state,
            "try_number": self.try_number,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "wait_s": self.wait_s,
            "error": None if self.error_type is None else {"type": self.error_type, "message": self.error_message},
        }


@dataclass(frozen=True)
class Transition:
    """A task state change to write; several may be written in one transaction."""

    run_id: int
    task_id: str
    state: str
    try_number: int
    at: float
    error_type: str | None = None
    error_message: str | None = None
    output_json: str | None = None  # the task's result, already encoded (see encode_output)
    wait_s: float = 0.0  # how long the try this transition ends waited for a shared worker (0 when starting one)


@dataclass(frozen=True)
class PurgedBatch:
    """Runs one purge transaction deleted, and the spool files no remaining run names any more."""

    run_ids: tuple[int, ...]
    spool_names: tuple[str, ...]  # tombstoned in the same transaction; the caller deletes the files


class RunTakenOver(Exception):  # noqa: N818 (a control signal, not an error: STYLE.md section 3)
    """Raised inside a runner when the store refused a write because another process owns the run now."""


MAX_INLINE_OUTPUT = 64 * 1024  # bytes of JSON; larger results belong in a file, its path inline


def encode_output(value: Any) -> str:
    """Encode a task result for the store; raise ValueError if it is not small JSON."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"task result is not JSON-serialisable: {exc}") from exc
    if len(text) > MAX_INLINE_OUTPUT:
        raise ValueError(f"task result is {len(text)} bytes of JSON, over {MAX_INLINE_OUTPUT}: "
                         "write large data to a file under ctx.work_dir and return its path")
    return text
