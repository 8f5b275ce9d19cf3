"""Shared pieces of the scenarios: a running pipeline with a real SMTP sink, tidy rows, waiting.

Every scenario runs the real thing: the PipelineService with its gateway on a
free loopback port and its digests delivered over SMTP to an aiosmtpd sink in
this process.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from aiosmtpd.controller import Controller

from ...config import DeliveryConfig, EngineConfig, GatewayConfig, IngestConfig, RunnerConfig, Settings
from ...service import PipelineService
from ...store import Run
from .serveproc import free_port

if TYPE_CHECKING:  # duckdb stays out of the processes that only send mail (they import this module)
    from .recorder import AuditRecorder


class CountingSink:
    """aiosmtpd handler that counts delivered digests."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.count += 1
        return "250 OK"


@contextmanager
def running_pipeline(data_dir: Path | None = None, *, workers: bool = True, max_active_runs: int = 32,
                     thread_workers: int = 16, ingest: IngestConfig | None = None,
                     stage_executor: str = "auto") -> Iterator[tuple[PipelineService, CountingSink]]:
    """A started PipelineService delivering to a local SMTP sink; stopped (and temp data removed) after."""
    with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
        root = Path(data_dir or tmp)
        sink = CountingSink()
        sink_port = free_port()
        controller = Controller(sink, hostname="127.0.0.1", port=sink_port)
        controller.start()
        settings = replace(Settings.for_data_dir(root),
                           gateway=GatewayConfig(port=free_port(), drop_folder=False),
                           # every mail is alice's: no hourly quota, so every run delivers as the audit measured
                           delivery=DeliveryConfig(relay=f"smtp://127.0.0.1:{sink_port}", outbox=root / "outbox",
                                                   max_digests_per_hour=0),
                           engine=EngineConfig(max_active_runs=max_active_runs),
                           runner=RunnerConfig(thread_workers=thread_workers, stage_executor=stage_executor),
                           ingest=ingest or IngestConfig())
        service = PipelineService(settings).start(run_workers=workers)
        try:
            yield service, sink
        finally:
            service.stop(grace_s=30)
            controller.stop()


def wait_all_done(service: PipelineService, expected: int, timeout_s: float = 600.0,
                  poll_s: float = 0.05) -> list[Run]:
    """Wait until ``expected`` runs exist and none is queued or running; return them, oldest first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = service.store.count_runs_by_state()
        if sum(counts.values()) >= expected and not counts.get("queued") and not counts.get("running"):
            break
        time.sleep(poll_s)
    else:
        raise TimeoutError(f"runs not done after {timeout_s} s: {service.store.count_runs_by_state()}")
    return service.store.list_runs(limit=10**9)[::-1]


def row(variant: str, metric: str, value: float, unit: str, rep: int = 0, **tags: Any) -> dict[str, Any]:
    """One tidy measurement row."""
    return {"variant": variant, "metric": metric, "value": float(value), "unit": unit, "rep": rep, "tags": tags}


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics, as numpy, pandas,
    ``statistics.quantiles(method="inclusive")`` and PostgreSQL's percentile_cont compute it: the audit's one
    definition. NaN for no values; a single value is every percentile of itself."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with the recorder's columns, tags flattened into columns for convenience."""
    df = pd.DataFrame(rows, columns=["variant", "metric", "value", "unit", "rep", "tags"])
    tags = pd.json_normalize(df["tags"].tolist()) if len(df) else pd.DataFrame()
    for column in tags.columns:
        df[column] = tags[column].values
    return df


def run_parts(parts: dict[str, Callable[..., list[dict[str, Any]]]], only: Iterable[str],
              params: dict[str, dict[str, Any]], work: Path, unit: str, desc: str) -> list[dict[str, Any]]:
    """Run each of ``only`` (``parts[name](directory, **params[name])``) in a temp directory of its own under
    ``work``, with a progress bar; a part whose harness raises becomes one ``error`` row (variant: its name,
    ``reason``: the exception) and the others still run. Notebooks 09 and 10 inject faults and hostile senders
    this way."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    for name in tqdm(list(only), desc=desc, unit=unit):
        with tempfile.TemporaryDirectory(prefix=f"{unit}-{name}-", dir=work) as tmp:
            try:
                rows += parts[name](Path(tmp), **params.get(name, {}))
            except Exception as exc:  # the harness broke, not the server: say so in the report
                rows.append(row(name, "error", 1, unit, 0, reason=f"{type(exc).__name__}: {exc}"[:300]))
    return rows


def save(recorder: AuditRecorder | None, scenario: str, rows: list[dict[str, Any]],
          spans: list[dict[str, Any]] | None = None, variant: str = "baseline") -> pd.DataFrame:
    """Record a scenario's rows (and spans) when given a recorder; return them as a frame either way."""
    if recorder is not None:
        recorder.record(scenario, pd.DataFrame(rows))
        if spans:
            recorder.record_spans(scenario, variant, spans)
    return frame(rows)
