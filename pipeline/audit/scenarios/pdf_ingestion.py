"""The audit's measurement scenarios. Each runs the real pipeline, shows a progress bar,
records into DuckDB (when given a recorder) and returns a tidy DataFrame.

Rows: ``variant, metric, value, unit, rep, tags`` (tags also flattened into
columns of the returned frame). Timings come from the run store (queued,
started, ended per task) and from tracing spans; memory from RSS sampling.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from ...config import MB, IngestConfig
from ...dag import DAG, task_of
from ...stages.ingest import ingest_pdf
from ...store import DAGRunStore, Run
from ..base import fixtures as fx
from ..base.harness import frame, row, running_pipeline, wait_all_done
from ..base.recorder import AuditRecorder
from ..base.workerrss import WorkerRssSampler
from . import store_queries as storebench

STAGES = ("Email", "Queue", "Ingestion", "Digest", "Delivery")


def _save(recorder: AuditRecorder | None, scenario: str, rows: list[dict[str, Any]],
          spans: list[dict[str, Any]] | None = None, variant: str = "baseline") -> pd.DataFrame:
    if recorder is not None:
        recorder.record(scenario, pd.DataFrame(rows))
        if spans:
            recorder.record_spans(scenario, variant, spans)
    return frame(rows)


def task_windows(store: DAGRunStore, run: Run) -> dict[str, list[tuple[float, float]]]:
    """Per task kind (``ingest_pdf[2]`` counts as ``ingest_pdf``), the (start, end) wall times of each
    finished task instance of ``run``."""
    windows: dict[str, list[tuple[float, float]]] = {}
    for task in store.get_tasks(run.run_id):
        if task.started_at is not None and task.ended_at is not None:
            windows.setdefault(task_of(task.task_id), []).append((task.started_at, task.ended_at))
    return windows


def stage_times(source: Any, run: Run) -> dict[str, float]:
    """Seconds spent in each of the seed's stages by one finished run.

    ``source`` is the run store the run is in, or a service holding it (``.store``): the audit reads a
    ``python -m pipeline serve``'s store from outside, and an in-process PipelineService's directly.
    """
    store = getattr(source, "store", source)
    tasks = {kind: (min(s for s, _ in spans), max(e for _, e in spans))
             for kind, spans in task_windows(store, run).items()}
    parse = tasks.get("parse_email")
    started = run.started_at or run.queued_at
    ingest_end = tasks["ingest_pdf"][1] if "ingest_pdf" in tasks else (parse[1] if parse else started)
    out = {"Email": run.queued_at - run.payload["data_end_at"], "Queue": started - run.queued_at}
    if parse:
        out["Ingestion"] = ingest_end - parse[0]
    for stage, task in (("Digest", "build_digest"), ("Delivery", "deliver")):
        if task in tasks:
            out[stage] = tasks[task][1] - tasks[task][0]
    return out


# Ingestion variants measured side by side; the one equal to IngestConfig()'s defaults is tagged default.
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "pypdf": {"engine": "pypdf", "page_workers": 1},
    "pypdf-2w": {"engine": "pypdf", "page_workers": 2},
    "pdfium": {"engine": "pdfium", "page_workers": 1},
    "pdfium-2w": {"engine": "pdfium", "page_workers": 2},
}


def pdf_scaling(pdfs: list[dict[str, Any]], reps: int = 3, recorder: AuditRecorder | None = None,
                variants: list[str] | None = None) -> pd.DataFrame:
    """Ingest each PDF with each engine variant ``reps`` times, interleaved (A B A B), in the capped workers.

    ``pdfs`` items: ``{"path", "kind", "mb"}``. Size limits are raised so that size itself is what is
    measured; time and memory caps stay. Memory is the extraction workers' alone (``workers_peak_rss_mb``: their
    RSS summed, peak of samples every 10 ms; ``workers_rss_before_mb``: what they held before the document).
    """
    base = IngestConfig(max_attachment_bytes=200 * MB, max_pages=100_000, timeout_s=900)
    defaults = IngestConfig()
    chosen = {name: replace(base, **ENGINE_VARIANTS[name]) for name in (variants or list(ENGINE_VARIANTS))}
    work = Path(pdfs[0]["path"]).parent / "scaling-text"
    for limits in chosen.values():  # warm-up: starts the workers, loads each engine
        ingest_pdf(Path(pdfs[0]["path"]), work / "warmup.txt", limits)
    rows: list[dict[str, Any]] = []
    with tqdm(total=reps * len(pdfs) * len(chosen), desc="pdf_scaling", unit="pdf") as bar:
        for rep in range(reps):
            for item in pdfs:
                for name, limits in chosen.items():
                    rows += _ingest_once(item, name, limits, work, rep,
                                         default=(limits.engine, limits.page_workers) ==
                                         (defaults.engine, defaults.page_workers))
                    bar.update()
    return _save(recorder, "pdf_scaling", rows)


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
                 row("baseline", "latency_p95_s", latencies.quantile(0.95), "s", 0, **tags),
                 row("baseline", "peak_active_runs", peak_active, "runs", 0, **tags),
                 row("baseline", "failed_runs", len(failed), "runs", 0, **tags,
                     reasons=sorted({str(r.reason)[:120] for r in failed})[:5])]
        if failed and stop_on_failure:
            break
    return _save(recorder, "concurrency", rows)


def email_burst(rates: list[float], duration_s: float = 5.0, burst: int = 200, senders: int = 4,
                recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Sustained rates, then a sudden burst, over SMTP to a fresh ``python -m pipeline serve`` per round:
    trigger latency, backlog, drain time, messages lost, and serve's and its workers' peak RSS and CPU."""
    from .email_bursts import serve_round

    rows: list[dict[str, Any]] = []
    plans = [("rate", rate, int(rate * duration_s)) for rate in rates] + [("burst", float("inf"), burst)]
    for kind, rate, count in tqdm(plans, desc="email_burst", unit="round"):
        label = f"{kind}-{rate:g}" if kind == "rate" else f"burst-{count}"
        with tempfile.TemporaryDirectory(prefix="burst-") as tmp:
            done = serve_round(Path(tmp), count, rate, senders, prefix=label)
        runs, backlog = done.runs, done.backlog
        drained = max((r.ended_at or 0 for r in runs), default=done.last_sent)
        keys = {r.dedup_key for r in runs}
        tags = {"round": label, "mode": kind, "rate_per_s": None if kind == "burst" else rate, "messages": count}
        for rep, r in enumerate(runs):
            rows.append(row("baseline", "trigger_latency_ms", (r.queued_at - r.payload["data_end_at"]) * 1000, "ms",
                            rep, **tags))
        rows += [row("baseline", "accepted", len(done.accepted), "messages", 0, **tags),
                 row("baseline", "lost", sum(mid not in keys for mid in done.accepted), "messages", 0, **tags),
                 row("baseline", "drain_seconds", drained - done.last_sent, "s", 0, **tags),
                 row("baseline", "backlog_peak", max((b for _, b in backlog), default=0), "runs", 0, **tags)]
        rows += [row("baseline", "backlog", b, "runs", i, **tags, t=t) for i, (t, b) in enumerate(backlog)]
        rows += [row("baseline", "peak_rss_bytes", done.peak_rss[p], "bytes", 0, process=p, **tags)
                 for p in ("serve", "workers")]
        rows += [row("baseline", "cpu_seconds", done.cpu_seconds[p], "s", 0, process=p, **tags)
                 for p in ("serve", "workers")]
        rows.append(row("baseline", "worker_restarts", done.worker_restarts, "workers", 0, process="workers", **tags))
    return _save(recorder, "email_burst", rows)


def store_queries(sizes: list[int], directory: Path, repeat: int = 100,
                  recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Grow one store through ``sizes`` runs (5 task instances each); time the canonical queries at each."""
    from ...sqlite_store import SqliteRunStore

    rows: list[dict[str, Any]] = []
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "store-queries.sqlite3"
    path.unlink(missing_ok=True)
    store = SqliteRunStore(path)
    try:
        have = 0
        for size in tqdm(sizes, desc="store_queries", unit="size"):
            storebench.fill_store(store, size - have)
            have = size
            for result in list(storebench.query_timings(store, repeat)) + list(storebench.write_throughput(store)):
                for stat in ("median", "p95"):
                    if result.get(stat) is not None:
                        rows.append(row("baseline", result["metric"], result[stat], result["unit"], 0,
                                        runs=size, stat=stat, kind=result.get("kind")))
    finally:
        store.close()
    return _save(recorder, "store_queries", rows)


def runner_overhead(directory: Path, tasks: int = 1000, repeat: int = 10,
                    recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Milliseconds the runner and store spend per no-op task: a wide DAG and a long chain."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="runner-", dir=directory) as tmp:
        samples = storebench.runner_overhead_samples(Path(tmp), tasks, repeat)
    rows = [row("baseline", "ms_per_task", seconds * 1000, "ms", i, dag=name)
            for name, values in samples.items() for i, seconds in enumerate(values)]
    return _save(recorder, "runner_overhead", rows)


def soak(runs: int = 1000, warmup: int = 100, every: int = 50, dag: DAG | None = None,
         recorder: AuditRecorder | None = None, variant: str = "email_digest") -> pd.DataFrame:
    """Thousands of runs with memory sampled after gc; the leak slope per run after warm-up."""
    from .memory_soak import run_soak

    points, verdict = run_soak(runs, warmup, every, dag)
    rows = [row(variant, "traced_bytes", p["traced_bytes"], "bytes", i, runs=p["runs"]) for i, p in enumerate(points)]
    rows += [row(variant, "rss_bytes", p["rss_bytes"], "bytes", i, runs=p["runs"]) for i, p in enumerate(points)]
    rows += [row(variant, "leak_traced_bytes_per_run", verdict.traced_bytes_per_run, "bytes/run", 0),
             row(variant, "leak_rss_bytes_per_run", verdict.rss_bytes_per_run, "bytes/run", 0),
             row(variant, "traced_bytes_per_run_all_samples", verdict.traced_bytes_per_run_all, "bytes/run", 0),
             row(variant, "leaking", float(verdict.leaking), "bool", 0, threshold=verdict.threshold)]
    rows += [row(variant, "top_growth_bytes", g["size_diff"], "bytes", i, site=g["site"], count_diff=g["count_diff"])
             for i, g in enumerate(verdict.top_growth)]
    return _save(recorder, "soak", rows)


def serve_soak(runs: int = 1000, warmup: int = 100, every: int = 100, senders: int = 2,
               recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Mail one-page PDFs to a real ``python -m pipeline serve`` in batches; after each batch's runs ended,
    RSS and USS of serve and of its extraction workers (by role); the leak slope per role and series, tagged
    ``settled`` when the soak ran at least ``SETTLED_RUNS`` runs (the leak SLAs judge only those)."""
    from .memory_soak import SERVE_SERIES, SETTLED_RUNS, run_serve_soak

    with tempfile.TemporaryDirectory(prefix="serve-soak-") as tmp:
        points, verdicts = run_serve_soak(Path(tmp), runs, warmup, every, senders)
    rows: list[dict[str, Any]] = []
    for key, process, metric in SERVE_SERIES:
        series = metric.removeprefix("leak_").removesuffix("_per_run")  # rss_bytes, uss_bytes, max_worker_rss_bytes
        rows += [row("serve", series, p[key], "bytes", i, runs=p["runs"], process=process)
                 for i, p in enumerate(points)]
        rows.append(row("serve", metric, verdicts[key].traced_bytes_per_run, "bytes/run", 0, process=process,
                        runs=runs, every=every, warmup=warmup, settled=runs >= SETTLED_RUNS))
    rows += [row("serve", "live_workers", p["live_workers"], "workers", i, runs=p["runs"], process="workers")
             for i, p in enumerate(points)]
    rows += [row("serve", "worker_restarts", points[-1]["worker_restarts"], "workers", 0, process="workers"),
             row("serve", "runs_failed", points[-1]["failed"], "runs", 0, process="serve")]
    return _save(recorder, "soak", rows, variant="serve")


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
    return _save(recorder, "hostile_inputs", rows)
