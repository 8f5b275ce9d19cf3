"""Notebook 05's measurements: many runs, memory sampled after each batch, the leak slope per run.

Two soaks: ``run_serve_soak`` drives a real ``python -m pipeline serve`` child over
SMTP and samples RSS and USS of serve and of its extraction workers by role (this is
the leak verdict for what production runs); ``run_soak`` runs the pipeline inside
this process under tracemalloc, which names *which* line grows (the diagnostic).
``serve_soak`` and ``soak`` record each one's points and verdicts as the notebook's rows.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from ...config import RunnerConfig, Settings
from ...dag import DAG
from ...engine import WorkflowEngine
from ...sqlite_store import SqliteRunStore
from ...store import open_store
from ..base import fixtures as fx
from ..base.harness import row, running_pipeline, save
from ..base.memory import LEAK_THRESHOLD_BYTES_PER_RUN, LeakVerdict, judge_leak, sample_point, slope, top_growth, traced
from ..base.recorder import AuditRecorder
from ..base.servemem import TreeWatch, sample_tree
from ..base.serveproc import Senders, ServeProcess, serving

# A serve soak measured RSS still rising ~1 MB per 100 runs over its first ~500 runs after a 200-run warm-up,
# then ~0.1 MB per 100: a shorter soak's slope is mostly warm-up, so its rows say it was not settled.
SETTLED_RUNS = 1000
# What the serve soak fits, per role: (series key, process role, metric of its slope).
SERVE_SERIES = (("serve_rss", "serve", "leak_rss_bytes_per_run"), ("serve_uss", "serve", "leak_uss_bytes_per_run"),
                ("workers_rss", "workers", "leak_rss_bytes_per_run"),
                ("workers_uss", "workers", "leak_uss_bytes_per_run"),
                ("workers_rss_max", "workers", "leak_max_worker_rss_bytes_per_run"))
# The series the leak SLAs judge; an early stop (below) waits for all of them.
SERVE_JUDGED = ("serve_rss", "workers_rss")
# Early stop (issue 16): past ``min_runs`` runs a soak ends as soon as every judged slope's 95 % confidence interval
# is at most ± STOP_CI_BYTES_PER_RUN wide and lies wholly on one side of the leak target: more runs would narrow
# the interval, not change a verdict. A healthy serve soak (batches of 100) measured ±0.4 KiB/run (serve) and
# ±3.9 KiB/run (workers) at 1,000 runs; the in-kernel traced slope ±0.3 KiB/run at 400 runs.
STOP_CI_BYTES_PER_RUN = 4 * 1024
# Two-sided 95 % quantiles of Student's t for 1-30 degrees of freedom (2.04 beyond, slightly conservative).
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
        2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04)


def slope_ci(points: list[dict[str, float]], key: str) -> tuple[float, float]:
    """The least-squares slope of ``key`` against runs over judge_leak's window (the second half of the points
    from six on) and the half-width of its 95 % confidence interval, both in bytes per run (inf: too few points)."""
    late = points[len(points) // 2:] if len(points) >= 6 else points
    xs, ys = [p["runs"] for p in late], [p[key] for p in late]
    if len(xs) < 3 or len(set(xs)) < 2:
        return slope(xs, ys), math.inf
    fit = statistics.linear_regression(xs, ys)
    mean = statistics.fmean(xs)
    residual = sum((y - fit.slope * x - fit.intercept) ** 2 for x, y in zip(xs, ys, strict=True)) / (len(xs) - 2)
    spread = math.sqrt(residual / sum((x - mean) ** 2 for x in xs))
    return fit.slope, _T95[min(len(xs) - 2, len(_T95)) - 1] * spread


def ci95(points: list[dict[str, float]], key: str) -> float | None:
    """The half-width of ``key``'s slope interval (``slope_ci``) in bytes per run; None with too few points."""
    half = slope_ci(points, key)[1]
    return half if math.isfinite(half) else None


def precise_enough(points: list[dict[str, float]], keys: tuple[str, ...],
                   threshold: float = LEAK_THRESHOLD_BYTES_PER_RUN) -> bool:
    """True when every ``keys`` slope's 95 % interval is within ± STOP_CI_BYTES_PER_RUN and excludes ``threshold``."""
    for key in keys:
        fitted, half = slope_ci(points, key)
        if half > STOP_CI_BYTES_PER_RUN or fitted - half <= threshold <= fitted + half:
            return False
    return True


def run_soak(runs: int, warmup: int, every: int, dag: DAG | None = None, min_runs: int | None = None
             ) -> tuple[list[dict[str, float]], LeakVerdict]:
    """Run ``warmup`` then up to ``runs`` runs in batches of ``every``; sample memory after each batch.

    With ``dag=None`` the real email_digest pipeline runs (a one-page PDF per mail, accepted through
    the gateway, digest delivered over SMTP); otherwise ``dag`` runs on a bare engine. With ``min_runs``, stop
    after at least that many once the traced slope is ``precise_enough`` (the last point's ``runs`` says when).
    """
    if dag is None:
        # the stages in this process (not the process pool), so tracemalloc sees every line the pipeline runs
        with running_pipeline(stage_executor="thread") as (service, _sink):
            pdf = fx.text_pdf(1)
            counter = iter(range(10**9))

            def batch(n: int) -> None:
                ids = [service.gateway.accept(fx.email_with([("a.pdf", pdf)], message_id=f"<soak-{next(counter)}@a>"),
                                              source="audit").run_id for _ in range(n)]
                for run_id in ids:
                    service.engine.wait(run_id, timeout=120)

            return _measure(batch, runs, warmup, every, min_runs)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        settings = replace(Settings.for_data_dir(Path(tmp)), runner=RunnerConfig(thread_workers=4))
        store = open_store(settings.store)
        with WorkflowEngine(store, settings) as engine:
            engine.register(dag)

            def batch(n: int) -> None:
                ids = [engine.trigger(dag.workflow_id).run_id for _ in range(n)]
                for run_id in ids:
                    engine.wait(run_id, timeout=120)

            result = _measure(batch, runs, warmup, every, min_runs)
        store.close()
        return result


def _measure(batch: Any, runs: int, warmup: int, every: int, min_runs: int | None = None
             ) -> tuple[list[dict[str, float]], LeakVerdict]:
    batch(warmup)
    points = []
    with traced():
        before = tracemalloc.take_snapshot()
        done = 0
        points.append(sample_point(done))
        with tqdm(total=runs, desc="soak", unit="run") as bar:
            while done < runs and not _may_stop(points, ("traced_bytes",), min_runs):
                n = min(every, runs - done)
                batch(n)
                done += n
                points.append(sample_point(done))
                bar.update(n)
        after = tracemalloc.take_snapshot()
    return points, judge_leak(points, top_growth(before, after))


def _may_stop(points: list[dict[str, float]], keys: tuple[str, ...], min_runs: int | None) -> bool:
    return min_runs is not None and points[-1]["runs"] >= min_runs and precise_enough(points, keys)


def run_serve_soak(work: Path, runs: int, warmup: int, every: int, senders: int = 2, timeout_s: float = 600.0,
                   min_runs: int | None = None) -> tuple[list[dict[str, float]], dict[str, LeakVerdict]]:
    """Mail ``warmup`` then up to ``runs`` one-page PDFs to a real serve in batches of ``every``; after each batch's
    runs ended, sample serve's tree by role. With ``min_runs``, stop after at least that many once the
    ``SERVE_JUDGED`` slopes are ``precise_enough`` (the last point's ``runs`` says when).

    Returns the points (``runs``, ``serve_rss``, ``serve_uss``, ``workers_rss`` (sum over live workers),
    ``workers_uss``, ``workers_rss_max``, ``live_workers``, ``worker_restarts``, ``failed``) and the leak
    verdict of each series in ``SERVE_SERIES`` (judge_leak's second-half slope, in bytes per run).
    """
    pdf = fx.text_pdf(1)
    sent = 0
    (work / "senders").mkdir(parents=True, exist_ok=True)

    def batch(serve: ServeProcess, n: int) -> int:
        nonlocal sent
        ids = [f"<soak-{i}@serve.audit>" for i in range(sent, sent + n)]
        mails = [(mid, fx.email_with([("a.pdf", pdf)], message_id=mid)) for mid in ids]
        sent += n
        with Senders(serve.port, mails, work / "senders", max(1, min(senders, n))) as sending:
            return len(sending.wait(timeout_s).acked)

    with serving(work / "data", work) as serve:
        total = batch(serve, warmup) if warmup else 0
        failed = _wait_ended(serve, total, timeout_s)
        points = []
        with TreeWatch(serve, every_s=0.25) as watch, tqdm(total=runs, desc="serve soak", unit="run") as bar:
            points.append(_serve_point(serve, 0, watch, failed))
            done = 0
            while done < runs and not _may_stop(points, SERVE_JUDGED, min_runs):
                n = min(every, runs - done)
                total += batch(serve, n)
                failed = _wait_ended(serve, total, timeout_s)
                done += n
                points.append(_serve_point(serve, done, watch, failed))
                bar.update(n)
    return points, {key: _late_slope(points, key) for key, _, _ in SERVE_SERIES}


def _serve_point(serve: ServeProcess, runs: int, watch: TreeWatch, failed: int) -> dict[str, float]:
    watch.sample()  # so the pids of this moment count towards the restarts
    now = sample_tree(serve, uss=True)
    return {"runs": runs, "serve_rss": now.serve_rss, "serve_uss": now.serve_uss, "workers_rss": now.workers_rss_sum,
            "workers_uss": now.workers_uss_sum, "workers_rss_max": now.workers_rss_max,
            "live_workers": len(now.worker_pids), "worker_restarts": watch.worker_restarts, "failed": failed,
            "wal_bytes": _file_bytes(serve.data_dir / "runs.sqlite3-wal")}


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _late_slope(points: list[dict[str, float]], key: str) -> LeakVerdict:
    """judge_leak on one series: its ``traced_bytes_per_run`` is that series' slope over the second half."""
    return judge_leak([{"runs": p["runs"], "traced_bytes": p[key], "rss_bytes": p[key]} for p in points], [])


def _wait_ended(serve: ServeProcess, total: int, timeout_s: float) -> int:
    """Wait until serve's store holds ``total`` runs, all ended (read-only); return how many failed."""
    deadline = time.monotonic() + timeout_s
    path = serve.data_dir / "runs.sqlite3"
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    store = SqliteRunStore(path, create=False)
    try:
        while True:
            counts = store.count_runs_by_state()
            ended = counts.get("success", 0) + counts.get("failed", 0)
            if ended >= total and not counts.get("queued") and not counts.get("running"):
                return counts.get("failed", 0)
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve soak: {ended} of {total} runs ended after {timeout_s} s: {counts}")
            time.sleep(0.05)
    finally:
        store.close()


def soak(runs: int = 1000, warmup: int = 100, every: int = 50, dag: DAG | None = None,
         recorder: AuditRecorder | None = None, variant: str = "email_digest", min_runs: int | None = None
         ) -> pd.DataFrame:
    """Up to ``runs`` runs with memory sampled after gc; the leak slope per run after warm-up. With ``min_runs``
    the soak may stop from there once the traced slope is precise (``precise_enough``); the slope rows say how
    many runs it took (``runs``) and the traced slope's 95 % interval (``ci95_bytes_per_run``)."""
    points, verdict = run_soak(runs, warmup, every, dag, min_runs)
    done = {"runs": points[-1]["runs"], "planned_runs": runs, "ci95_bytes_per_run": ci95(points, "traced_bytes")}
    rows = [row(variant, "traced_bytes", p["traced_bytes"], "bytes", i, runs=p["runs"]) for i, p in enumerate(points)]
    rows += [row(variant, "rss_bytes", p["rss_bytes"], "bytes", i, runs=p["runs"]) for i, p in enumerate(points)]
    rows += [row(variant, "leak_traced_bytes_per_run", verdict.traced_bytes_per_run, "bytes/run", 0, **done),
             row(variant, "leak_rss_bytes_per_run", verdict.rss_bytes_per_run, "bytes/run", 0),
             row(variant, "traced_bytes_per_run_all_samples", verdict.traced_bytes_per_run_all, "bytes/run", 0),
             row(variant, "leaking", float(verdict.leaking), "bool", 0, threshold=verdict.threshold)]
    rows += [row(variant, "top_growth_bytes", g["size_diff"], "bytes", i, site=g["site"], count_diff=g["count_diff"])
             for i, g in enumerate(verdict.top_growth)]
    return save(recorder, "soak", rows)


def serve_soak(runs: int = 1000, warmup: int = 100, every: int = 100, senders: int = 2,
               recorder: AuditRecorder | None = None, min_runs: int | None = None) -> pd.DataFrame:
    """Mail one-page PDFs to a real ``python -m pipeline serve`` in batches; after each batch's runs ended,
    RSS and USS of serve and of its extraction workers (by role); the leak slope per role and series, tagged
    ``settled`` when the soak ran at least ``SETTLED_RUNS`` runs (the leak SLAs judge only those). With
    ``min_runs`` the soak may stop from there, before ``runs``, once the judged slopes are precise
    (``precise_enough``); the slope rows say how many runs it took and each slope's 95 % interval."""
    with tempfile.TemporaryDirectory(prefix="serve-soak-") as tmp:
        points, verdicts = run_serve_soak(Path(tmp), runs, warmup, every, senders, min_runs=min_runs)
    done = points[-1]["runs"]
    rows: list[dict[str, Any]] = []
    for key, process, metric in SERVE_SERIES:
        series = metric.removeprefix("leak_").removesuffix("_per_run")  # rss_bytes, uss_bytes, max_worker_rss_bytes
        rows += [row("serve", series, p[key], "bytes", i, runs=p["runs"], process=process)
                 for i, p in enumerate(points)]
        rows.append(row("serve", metric, verdicts[key].traced_bytes_per_run, "bytes/run", 0, process=process,
                        runs=done, planned_runs=runs, every=every, warmup=warmup, settled=done >= SETTLED_RUNS,
                        ci95_bytes_per_run=ci95(points, key)))
    rows += [row("serve", "live_workers", p["live_workers"], "workers", i, runs=p["runs"], process="workers")
             for i, p in enumerate(points)]
    rows += [row("serve", "worker_restarts", points[-1]["worker_restarts"], "workers", 0, process="workers"),
             row("serve", "runs_failed", points[-1]["failed"], "runs", 0, process="serve")]
    rows += [row("serve", "store_wal_bytes", p["wal_bytes"], "bytes", i, runs=p["runs"], process="store")
             for i, p in enumerate(points)]
    return save(recorder, "soak", rows, variant="serve")
