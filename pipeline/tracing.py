"""Observation points: spans and named events, no-ops until someone listens.

The core calls ``span("ingest.page", page=i)`` and ``send(RUN_FINISHED, run=...)``;
the audit installs a recorder with ``set_recorder`` and receivers with
``connect``. Receivers run inside a guard that logs and swallows their errors,
so a broken probe can never fail a run. Without a recorder, ``span`` costs one
global read and returns a shared null context manager.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Event names sent by the core.
MESSAGE_ACCEPTED = "message_accepted"  # gateway: run_id, data_end_at, accepted_at, size
RUN_STARTED = "run_started"  # engine: run
RUN_FINISHED = "run_finished"  # engine: run_id, state, reason
TASK_FINISHED = "task_finished"  # runner: run_id, task_id, state, duration_s


class SpanRecorder(Protocol):
    """Receives finished spans."""

    def record_span(self, name: str, start_s: float, duration_s: float, attrs: dict[str, Any]) -> None: ...


_recorder: SpanRecorder | None = None
_receivers: dict[str, list[Callable[..., None]]] = {}
_receivers_lock = threading.Lock()
_NULL = contextlib.nullcontext()


def set_recorder(recorder: SpanRecorder | None) -> None:
    """Install (or with None remove) the process-wide span recorder."""
    global _recorder
    _recorder = recorder


def span(name: str, **attrs: Any) -> AbstractContextManager[Any]:
    """Time the enclosed block as a span named ``name`` if a recorder is installed."""
    if _recorder is None:
        return _NULL
    return _timed(_recorder, name, attrs)


@contextlib.contextmanager
def _timed(recorder: SpanRecorder, name: str, attrs: dict[str, Any]) -> Iterator[None]:
    start = time.perf_counter()
    wall = time.time()
    try:
        yield
    finally:
        duration = time.perf_counter() - start
        _guard(recorder.record_span, name, wall, duration, attrs)


def connect(event: str, receiver: Callable[..., None]) -> None:
    """Call ``receiver(**data)`` whenever ``event`` is sent."""
    with _receivers_lock:
        _receivers.setdefault(event, []).append(receiver)


def disconnect(event: str, receiver: Callable[..., None]) -> None:
    """Stop calling ``receiver`` for ``event`` (no error if it was not connected)."""
    with _receivers_lock:
        if receiver in _receivers.get(event, []):
            _receivers[event].remove(receiver)


def send(event: str, **data: Any) -> None:
    """Deliver ``event`` to its receivers; their errors are logged, never raised."""
    for receiver in tuple(_receivers.get(event, ())):
        _guard(receiver, **data)


def _guard(fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:  # a probe must never break the pipeline
        log.exception("observer %r failed", fn)
