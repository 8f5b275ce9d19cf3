"""Notebook 02's measurements: text extraction time and the extraction workers' memory per engine variant,
for PDFs of growing size (``pdf_scaling``) and for the hostile fixtures under the default limits (``hostile_inputs``).

Each scenario runs the real ingestion, shows a progress bar, records into DuckDB (when given a recorder) and
returns a tidy DataFrame: ``variant, metric, value, unit, rep, tags`` (tags also flattened into columns).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from ...config import MB, IngestConfig
from ...stages.ingest import ingest_pdf
from ..base import fixtures as fx
from ..base.harness import row, save
from ..base.recorder import AuditRecorder
from ..base.workerrss import WorkerRssSampler

# Ingestion variants measured side by side; the one equal to IngestConfig()'s defaults is tagged default.
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "pypdf": {"engine": "pypdf", "page_workers": 1},
    "pypdf-2w": {"engine": "pypdf", "page_workers": 2},
    "pdfium": {"engine": "pdfium", "page_workers": 1},
    "pdfium-2w": {"engine": "pdfium", "page_workers": 2},
}


def pdf_scaling(pdfs: list[dict[str, Any]], reps: int = 3, recorder: AuditRecorder | None = None,
                variants: list[str] | None = None, once_above_mb: float | None = None,
                others_max_mb: float | None = None) -> pd.DataFrame:
    """Ingest each PDF with each engine variant ``reps`` times, interleaved (A B A B), in the capped workers.

    ``pdfs`` items: ``{"path", "kind", "mb"}``. Size limits are raised so that size itself is what is
    measured; time and memory caps stay. Memory is the extraction workers' alone (``workers_peak_rss_mb``: their
    RSS summed, peak of samples every 10 ms; ``workers_rss_before_mb``: what they held before the document).
    Documents over ``once_above_mb`` MB get every rep with the default engine and one (the first, still
    interleaved) with the other engines: single-worker pypdf took 85 s a rep on 25 MB at load 5. Documents over
    ``others_max_mb`` MB are measured with the default engine only: the others' time grows linearly with the
    text (single-worker pypdf 15, 51 and 213 s on the 5, 10 and 25 MB text fixtures in the report committed at
    3e5ed37; its pypdf rows over 5 MB, one worker and two, took 413 of that notebook's 610 s), so their big rows
    repeat the slope the smaller rows already show.
    """
    if reps < 1:
        raise ValueError(f"reps must be 1 or more, not {reps}")
    base = IngestConfig(max_attachment_bytes=200 * MB, max_pages=100_000, timeout_s=900)
    defaults = IngestConfig()
    chosen = {name: replace(base, **ENGINE_VARIANTS[name]) for name in (variants or list(ENGINE_VARIANTS))}
    work = Path(pdfs[0]["path"]).parent / "scaling-text"
    for limits in chosen.values():  # warm-up: starts the workers, loads each engine
        ingest_pdf(Path(pdfs[0]["path"]), work / "warmup.txt", limits)
    plan = [(rep, item, name, limits) for rep in range(reps) for item in pdfs for name, limits in chosen.items()
            if _planned(rep, item["mb"], _is_default(limits, defaults), once_above_mb, others_max_mb)]
    rows: list[dict[str, Any]] = []
    for rep, item, name, limits in tqdm(plan, desc="pdf_scaling", unit="pdf"):
        rows += _ingest_once(item, name, limits, work, rep, default=_is_default(limits, defaults))
    return save(recorder, "pdf_scaling", rows)


def _planned(rep: int, mb: float, default: bool, once_above_mb: float | None, others_max_mb: float | None) -> bool:
    """Whether a (rep, document, variant) cell is measured: the default engine always; the others on documents up
    to ``others_max_mb``, and only in the first rep above ``once_above_mb``."""
    if default:
        return True
    if others_max_mb is not None and mb > others_max_mb:
        return False
    return rep == 0 or once_above_mb is None or mb <= once_above_mb


def _is_default(limits: IngestConfig, defaults: IngestConfig) -> bool:
    return (limits.engine, limits.page_workers) == (defaults.engine, defaults.page_workers)


def _ingest_once(item: dict[str, Any], variant: str, limits: IngestConfig, work: Path, rep: int,
                 default: bool) -> list[dict[str, Any]]:
    tags = {"kind": item["kind"], "nominal_mb": item["mb"], "file_mb": round(Path(item["path"]).stat().st_size / MB, 2),
            "default": default}
    # the extraction workers' memory only: the notebook kernel's own RSS says nothing about ingestion
    with WorkerRssSampler(interval_s=0.01) as sampler:
        t0 = time.perf_counter()
        try:
            result = ingest_pdf(Path(item["path"]), work / f"{item['kind']}.txt", limits)
            error = None
        except Exception as exc:  # a limit breach is a result of this scenario, recorded as such
            result, error = None, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
    rows = [row(variant, "ingest_seconds", seconds, "s", rep, **tags, error=error)]
    if limits.isolate:  # without workers the extraction ran in this process: no worker figure to give
        rows += _worker_memory_rows(sampler, variant, rep, tags)
    if result:
        rows += [row(variant, "pages", result.pages, "count", rep, **tags),
                 row(variant, "pages_per_second", result.pages / seconds, "1/s", rep, **tags)]
    return rows


def _worker_memory_rows(sampler: WorkerRssSampler, variant: str, rep: int,
                        tags: dict[str, Any]) -> list[dict[str, Any]]:
    """The extraction workers' peak RSS during one document, and what they held before it (MB), tagged with how
    many worker processes were summed."""
    tags = {**tags, "workers": len(sampler.pids)}
    return [row(variant, "workers_peak_rss_mb", sampler.peak / MB, "MB", rep, **tags),
            row(variant, "workers_rss_before_mb", sampler.before / MB, "MB", rep, **tags)]


def hostile_inputs(items: list[dict[str, Any]], recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Ingest each hostile fixture with the default limits: what happens, how fast, at what memory (the
    extraction workers' peak RSS and what they held before the file: this process's own RSS is not the file's)."""
    rows: list[dict[str, Any]] = []
    work = Path(items[0]["path"]).parent / "hostile-text"
    work.mkdir(parents=True, exist_ok=True)
    warmup = work / "warmup.pdf"
    warmup.write_bytes(fx.text_pdf(2))
    ingest_pdf(warmup, work / "warmup.txt", IngestConfig())  # starts the workers: the first file's figures are its own
    for item in tqdm(items, desc="hostile_inputs", unit="pdf"):
        with WorkerRssSampler(interval_s=0.01) as sampler:
            t0 = time.perf_counter()
            try:
                result = ingest_pdf(Path(item["path"]), work / "out.txt", IngestConfig())
                outcome, message = "ok", f"{result.pages} pages, {result.words} words"
            except Exception as exc:  # the outcome is the measurement
                outcome, message = getattr(exc, "reason", type(exc).__name__), str(exc)[:200]
            seconds = time.perf_counter() - t0
        tags = {"name": item["name"], "outcome": outcome, "message": message}
        rows += [row("baseline", "seconds", seconds, "s", 0, **tags),
                 *_worker_memory_rows(sampler, "baseline", 0, tags)]
    return save(recorder, "hostile_inputs", rows)
