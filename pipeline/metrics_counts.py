"""The Prometheus figures the core counts as it goes, on a registry of our own (``REGISTRY``).

The hooks (``smtp_reply``, ``task_finished`` ...) are called on the hot path: each costs a dict lookup and a
locked add, with label children bound once and cached. ``pipeline.metrics`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import errors
from .dag import task_of

REGISTRY = CollectorRegistry(auto_describe=True)

_MS_TO_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

SMTP_REPLIES = Counter("pipeline_smtp_replies", "SMTP replies to MAIL, RCPT and DATA by reply code",
                       ["command", "code"], registry=REGISTRY)
ACCEPTED_BYTES = Counter("pipeline_accepted_bytes", "Bytes of messages spooled and queued as runs",
                         registry=REGISTRY)
TRIGGER_SECONDS = Histogram("pipeline_trigger_seconds", "From the end of a message's DATA to its run being queued",
                            buckets=_MS_TO_S, registry=REGISTRY)
ACCEPTS_IN_PROGRESS = Gauge("pipeline_gateway_accepts_in_progress", "Messages received whose spooling and queueing "
                            "has not finished (the spool backlog of the gateway)", registry=REGISTRY)
RUN_OUTCOMES = Counter("pipeline_run_outcomes", "Runs that ended, by state and typed reason", ["state", "reason"],
                       registry=REGISTRY)
TASK_SECONDS = Histogram("pipeline_task_duration_seconds", "Duration of a task instance's last try, by task name",
                         ["task"], buckets=_TASK_BUCKETS, registry=REGISTRY)
TASK_RETRIES = Counter("pipeline_task_retries", "Task tries that failed and are tried again", ["task"],
                       registry=REGISTRY)
WORKER_RESTARTS = Counter("pipeline_extract_worker_restarts", "Extraction worker processes that died or were "
                          "killed mid-request, by cause", ["cause"], registry=REGISTRY)
TASK_FAILURES = Counter("pipeline_task_failures", "Task instances that failed for good, by task name and typed "
                        "reason (a run that digested around them still ends a partial success)", ["task", "reason"],
                        registry=REGISTRY)
STORE_TX_SECONDS = Histogram("pipeline_store_transaction_seconds", "Run store write transactions, BEGIN to COMMIT",
                             ["kind"], buckets=_MS_TO_S, registry=REGISTRY)
STORE_TX = {False: STORE_TX_SECONDS.labels("write"), True: STORE_TX_SECONDS.labels("lazy")}

_RUN_FAMILIES = ("pipeline_runs", "pipeline_queue_depth")
_children: dict[tuple[Any, ...], Any] = {}  # label children bound once; a plain dict: reads take no lock


def reason_codes() -> frozenset[str]:
    """The typed reason codes of the error tree, plus the runner's and engine's own."""
    found, todo = set(), [errors.PipelineError]
    while todo:
        cls = todo.pop()
        found.add(str(cls.reason))
        todo.extend(cls.__subclasses__())
    return frozenset(found | {"internal", "bad_output", "upstream_failed"})


REASONS = reason_codes()


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def smtp_reply(command: str, reply: str) -> str:
    """Count ``reply`` (its three-digit code) as the answer to ``command``; return it unchanged."""
    _child(SMTP_REPLIES, command, reply[:3]).inc()
    return reply


def message_accepted(size: int, trigger_s: float) -> None:
    """Count one message spooled and queued: its bytes and its DATA-end to queued latency."""
    ACCEPTED_BYTES.inc(size)
    TRIGGER_SECONDS.observe(max(trigger_s, 0.0))


def task_name(instance_id: str) -> str:
    """The task of a task instance: ``ingest_pdf[3]`` is ``ingest_pdf``."""
    return task_of(instance_id)


def task_finished(instance_id: str, duration_s: float) -> None:
    """Observe the duration of a task instance's last try."""
    _child(TASK_SECONDS, task_name(instance_id)).observe(duration_s)


def task_retried(instance_id: str) -> None:
    """Count a failed try that will be tried again."""
    _child(TASK_RETRIES, task_name(instance_id)).inc()


def task_failed(instance_id: str, reason: str) -> None:
    """Count a task instance that failed for good with the typed ``reason`` of its last try."""
    _child(TASK_FAILURES, task_name(instance_id), reason if reason in REASONS else "other").inc()


def reason_code(reason: str | None) -> str:
    """The bounded reason label of a run's stored reason (``"ingest_pdf[0]: encrypted: ..."`` is ``encrypted``)."""
    if not reason:
        return "none"
    parts = reason.split(": ", 2)
    if parts[0] in ("internal", "partial"):  # the engine's "internal: ...", a success's "partial: 1 of 2 ..."
        return parts[0]
    return parts[1] if len(parts) > 1 and parts[1] in REASONS else "other"


def run_finished(state: str, reason: str | None) -> None:
    """Count a run that ended in ``state`` (success or failed) with its stored reason."""
    _child(RUN_OUTCOMES, state, reason_code(reason)).inc()


GATEWAY_RESTART_CAUSES = ("died", "hung")
WORKER_RESTART_CAUSES = ("timeout", "too_large", "worker_crashed", "other")


def zero_alerted_series(tasks: Iterable[str] = (), smtp: bool = False) -> None:
    """Create at 0 the labelled series the alert rules count with ``increase()`` (docs/performance/alerts.yml):
    of the tasks named (those this process runs) and, with ``smtp``, of the gateway's refusals. A series born
    at its first event starts at 1, and Prometheus's increase() sees no rise before it: the first gateway
    restart, task_io failure or untyped run paged no one (a prober's finding)."""
    tasks = list(tasks)
    if tasks:
        for reason in ("other", "internal"):
            _child(RUN_OUTCOMES, "failed", reason)
        for cause in WORKER_RESTART_CAUSES:
            _child(WORKER_RESTARTS, cause)
    if smtp:
        for code in ("421", "451", "452"):
            _child(SMTP_REPLIES, "DATA", code)
    for task in tasks:
        _child(TASK_FAILURES, task, "task_io")
        _child(TASK_RETRIES, task)


def worker_restarted(cause: str) -> None:
    """Count an extraction worker lost mid-request (``timeout``, ``too_large``, ``worker_crashed``)."""
    _child(WORKER_RESTARTS, cause if cause in REASONS else "other").inc()
