"""The audit's scale-out figures (issue 12): PostgreSQL beside SQLite, Dask beside local workers, more gateways.

Five parts, each measured on real engines (one throwaway PostgreSQL server for the notebook, a fresh database
per variant; Dask LocalClusters of real worker processes; real ``python -m pipeline serve`` children):

- store: the canonical queries of notebook 06 and task transitions/s (one per commit, batched) on SQLite and
  on PostgreSQL at each size (``store_queries`` with the same query set on both backends); at the largest size,
  transitions/s one per commit from one and from several writer processes at once, beside one client's bare
  round trips: the store's capacity, as the capacity model uses it.
- pipeline: the email_digest at a given concurrency (mails with a ~1 MB text PDF), variants interleaved
  (A B C ... A B C ... after a warm-up round): throughput (runs/s) and e2e latency (DATA end -> run ended,
  read from the run store) per variant.
- ingestion: CPU-bound text extraction only, dense PDFs straight to a Dask cluster of 1 and of 2 workers,
  interleaved: pages/s per worker count; and the round trip of a no-op task through the package's executor
  (its added overhead), alternated with a bare ``client.submit`` of the same task (Dask's own floor).
- gateways: three serve processes on one PostgreSQL store, a burst where a third of the Message-IDs go to two
  gateways: duplicate and lost acked messages, counted from the store.
- capacity: ``capacity_model`` turns the measured parts into workers and gateways per mail rate.

A part whose harness fails is an ``error`` row with the reason, and the others still run.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from ... import store as s
from ...config import StoreConfig
from ...sql_store import SqlRunStore
from ...store import open_store
from ..base import fixtures as fx
from ..base.harness import frame, row
from ..base.recorder import AuditRecorder
from ..base.serveproc import ServeProcess
from ..base.smtpclients import send_concurrently
from . import store_queries
from .hostile_checks import in_clients

SCENARIO = "scale_out"
Rows = list[dict[str, Any]]
UrlMaker = Callable[[str], str]  # database name -> postgresql:// URL of a fresh database
# variant -> (backend, [executor] section, gateways); "2_gateways" is one serve and one ``serve --gateway-only``
# on one store and data dir: two SMTP gateways, one engine
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "sqlite_local": ("sqlite", {"kind": "local"}, 1),
    "pg_local": ("postgres", {"kind": "local"}, 1),
    "pg_dask_1": ("postgres", {"kind": "dask", "local_workers": 1}, 1),
    "pg_dask_2": ("postgres", {"kind": "dask", "local_workers": 2}, 1),
    "pg_2_gateways": ("postgres", {"kind": "local"}, 2),
}


# -- store: the canonical queries and transitions on both backends -----------------------------------------------


def store_backends(work: Path, pg_url: UrlMaker | None, sizes: list[int], repeat: int = 50,
                   transitions: int = 20_000, backends: tuple[str, ...] = ("sqlite", "postgres"),
                   writers: dict[str, Any] | None = None) -> Rows:
    """Grow one store per backend through ``sizes`` runs; at each size time 06's queries and transitions/s;
    at the largest, with ``writers`` (``store_writers``' parameters), the same store from several writer
    processes at once. The batch leaves SQLite out when notebook 06 measures it at the same sizes in the
    same session."""
    rows: Rows = []
    configs = {"sqlite": StoreConfig(path=work / "store-bench.sqlite3")} if "sqlite" in backends else {}
    if pg_url is not None and "postgres" in backends:
        configs["postgres"] = StoreConfig(url=pg_url("store_bench"))
    for backend, config in configs.items():
        store = open_store(config)
        try:
            have = 0
            for size in sizes:
                store_queries.fill_store(store, size - have)
                have = size
                found = list(store_queries.query_timings(store, repeat))
                found += list(store_queries.write_throughput(store, transitions))
                rows += [row("store", r["metric"], r[stat], r["unit"], 0, backend=backend, runs=size, stat=stat,
                             kind=r.get("kind")) for r in found for stat in ("median", "p95")
                         if r.get(stat) is not None]
        finally:
            store.close()
        if writers is not None and sizes:
            rows += store_writers(config, backend, max(sizes), **writers)
    return rows


def store_writers(config: StoreConfig, backend: str, runs: int, writers: tuple[int, ...] = (1, 2, 4),
                  transitions: int = 4_000, reps: int = 2, round_trips: int = 2_000) -> Rows:
    """Transitions/s one per commit from each number of writer processes in ``writers``, all at once on the
    store of ``config`` (holding ``runs`` runs), ``reps`` rounds with the counts in turn (forward, then
    backward); and per round one client's ``SELECT 1`` rate, the ceiling of what one writer alone can commit
    a round trip at a time (for SQLite a call in process, no round trip).

    One writer measures its own round trips (client and server wake each other once per commit); a store that
    several serves share is judged by what it takes from several writers, which is the capacity model's input."""
    rows: Rows = []
    tags = {"backend": backend, "runs": runs}
    for rep in range(reps):
        rows.append(row("writers", "select_1_per_s", _round_trips_per_s(config, round_trips), "1/s", rep,
                        writers=1, **tags))
        for n in writers if rep % 2 == 0 else writers[::-1]:
            rate = store_queries.concurrent_transitions_per_s(config, transitions, n)
            rows.append(row("writers", "task_transitions_per_s_one_per_commit", rate, "1/s", rep, writers=n,
                            **tags))
    return rows + _peaks(rows)


def _peaks(rows: Rows) -> Rows:
    """Per backend, the highest median transitions/s over the writer counts: the store's capacity (the
    throughput at its best concurrency), tagged with the writer count that reached it."""
    rates = [r for r in rows if r["metric"] == "task_transitions_per_s_one_per_commit"]
    found: Rows = []
    for backend in sorted({r["tags"]["backend"] for r in rates}):
        mine = [r for r in rates if r["tags"]["backend"] == backend]
        medians = {n: statistics.median(r["value"] for r in mine if r["tags"]["writers"] == n)
                   for n in {r["tags"]["writers"] for r in mine}}
        best = max(medians, key=lambda n: medians[n])
        found.append(row("writers", "task_transitions_per_s_peak", medians[best], "1/s", 0, backend=backend,
                         writers=best, runs=mine[0]["tags"].get("runs")))
    return found


def _round_trips_per_s(config: StoreConfig, count: int) -> float:
    """``SELECT 1`` through the store's own connection handling, ``count`` times in a row, after a warm-up."""
    store = open_store(config)
    try:
        if not isinstance(store, SqlRunStore):
            raise TypeError(f"{type(store).__name__} has no plain-SQL query")
        for _ in range(50):
            store.query("SELECT 1")
        t0 = time.perf_counter()
        for _ in range(count):
            store.query("SELECT 1")
        return count / (time.perf_counter() - t0)
    finally:
        store.close()


# -- pipeline: the email_digest through serve, variants interleaved ----------------------------------------------


def runs_by_message(config: StoreConfig) -> dict[str, list[s.Run]]:
    """Every run of the store by dedup key (the Message-ID)."""
    store = open_store(config)
    try:
        runs = store.list_runs(limit=10**9)
    finally:
        store.close()
    found: dict[str, list[s.Run]] = {}
    for run in runs:
        found.setdefault(run.dedup_key or "", []).append(run)
    return found


def wait_ended(config: StoreConfig, message_ids: list[str], timeout_s: float) -> dict[str, list[s.Run]]:
    """Wait until every message has a run and all its runs ended (or ``timeout_s``); return runs by Message-ID."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = runs_by_message(config)
        pending = [m for m in message_ids if not runs.get(m) or any(r.ended_at is None for r in runs[m])]
        if not pending or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


@contextmanager
def serves(work: Path, config: dict[str, dict[str, Any]], count: int,
           extra_args: tuple[str, ...] = ()) -> Iterator[list[ServeProcess]]:
    """``count`` serve processes on one data dir (shared storage on one host) and the store ``config`` names;
    every one after the first gets ``extra_args`` (e.g. ``--gateway-only``)."""
    with ExitStack() as stack:
        started = []
        for i in range(count):
            serve = ServeProcess(work / "data", work / f"serve-{i}", config, args=extra_args if i else ())
            stack.callback(serve.kill)
            started.append(serve.start())
        yield started


def pipeline_once(work: Path, variant: str, pg_url: UrlMaker | None, pdf: Path, mails: int, concurrency: int,
                  rep: int, timeout_s: float = 600.0) -> Rows:
    """One round of one variant: fresh store, serve(s) started and each warmed up by one mail run to its end
    (a Dask serve starts its cluster on first use), then ``mails`` sent at ``concurrency`` and their runs awaited."""
    backend, executor, gateways = VARIANTS[variant]
    store = StoreConfig(path=work / "data" / "runs.sqlite3")
    config: dict[str, dict[str, Any]] = {"executor": executor}
    if backend == "postgres":
        if pg_url is None:
            return [row("pipeline", "skipped", 1, "variant", rep, variant_name=variant,
                        reason="no PostgreSQL server")]
        store = StoreConfig(url=pg_url(f"{variant}_{'warmup' if rep < 0 else rep}"))
        config["store"] = {"url": store.url}
    ids = [f"<{variant}-{rep}-{i}@scaleout.audit>" for i in range(mails)]
    warm = [f"<{variant}-{rep}-warm{i}@scaleout.audit>" for i in range(gateways)]  # one per gateway
    with serves(work, config, gateways, ("--gateway-only",)) as started:
        ports = [sv.port for sv in started]
        in_clients(send_concurrently, [(ports, str(pdf), warm, gateways)], timeout_s)
        wait_ended(store, warm, timeout_s)
        sent = in_clients(send_concurrently, [(ports, str(pdf), ids, concurrency)], timeout_s)[0]
        acked = [mid for mid, reply, _, _ in sent if reply == "250"]
        runs = wait_ended(store, acked, timeout_s)
        tasks = _tasks_per_run(store, [r.run_id for m in acked[:5] for r in runs.get(m, [])])
    return _pipeline_rows(variant, rep, sent, acked, runs, tasks, mails=mails, concurrency=min(concurrency, mails),
                          gateways=gateways, backend=backend, executor=executor.get("kind"),
                          workers=executor.get("local_workers", ""), pages=pdf_pages(pdf))


def pdf_pages(pdf: Path) -> int:
    """The page count of a PDF (pypdf reads only its page tree)."""
    import pypdf

    return len(pypdf.PdfReader(pdf).pages)


def _tasks_per_run(config: StoreConfig, run_ids: list[int]) -> float:
    """The mean number of task instances of these runs (each makes two transitions: running, then its end)."""
    if not run_ids:
        return 0.0
    store = open_store(config)
    try:
        return sum(len(store.get_tasks(i)) for i in run_ids) / len(run_ids)
    finally:
        store.close()


def _pipeline_rows(variant: str, rep: int, sent: list[tuple[str, str, float, float]], acked: list[str],
                   runs: dict[str, list[s.Run]], tasks: float, **tags: Any) -> Rows:
    """Throughput, e2e latencies, accepts/s and outcome counts of one round."""
    ended = [r for m in acked for r in runs.get(m, []) if r.ended_at is not None]
    first = min(started for _, _, started, _ in sent)
    rows = [row(variant, "e2e_latency_s", r.ended_at - float(r.payload.get("data_end_at") or r.queued_at), "s", rep,
                **tags) for r in ended if r.ended_at is not None]
    if ended:
        last = max(r.ended_at or 0.0 for r in ended)
        rows.append(row(variant, "throughput_runs_per_s", len(ended) / max(1e-9, last - first), "runs/s", rep, **tags))
    if acked:
        last_ack = max(end for _, reply, _, end in sent if reply == "250")
        rows.append(row(variant, "accepts_per_s", len(acked) / max(1e-9, last_ack - first), "mails/s", rep, **tags))
    return rows + [
        row(variant, "acked", len(acked), "mails", rep, **tags),
        row(variant, "not_acked", len(sent) - len(acked), "mails", rep, **tags),
        row(variant, "runs_succeeded", sum(r.state == s.SUCCESS for r in ended), "runs", rep, **tags),
        row(variant, "runs_not_ended", sum(not runs.get(m) or any(r.ended_at is None for r in runs[m])
                                           for m in acked), "runs", rep, **tags),
        row(variant, "tasks_per_run", tasks, "tasks", rep, **tags)]


def pipeline_variants(work: Path, pg_url: UrlMaker | None, pdf: Path, variants: list[str], mails: int = 50,
                      concurrency: int = 50, reps: int = 2, warmup_mails: int = 4) -> Rows:
    """Every variant in turn, ``reps`` rounds (A B C ... A B C ...) after an unrecorded warm-up round of
    ``warmup_mails`` each (first imports, page cache, the PostgreSQL server's first databases; 0: none)."""
    rows: Rows = []
    for rep in tqdm(range(-1 if warmup_mails else 0, reps), desc="scale-out rounds", unit="round"):
        for variant in variants:
            found = _round(work, variant, pg_url, pdf, warmup_mails if rep < 0 else mails, concurrency, rep)
            rows += found if rep >= 0 else [r for r in found if r["metric"] == "error"]  # warm-up: errors only
    return rows


def _round(work: Path, variant: str, pg_url: UrlMaker | None, pdf: Path, mails: int, concurrency: int,
           rep: int) -> Rows:
    """One round of one variant in its own directory; a harness failure becomes an ``error`` row."""
    with tempfile.TemporaryDirectory(prefix=f"{variant}-", dir=work) as tmp:
        try:
            return pipeline_once(Path(tmp), variant, pg_url, pdf, mails, concurrency, rep)
        except Exception as exc:  # the harness broke (a serve that would not start): say so
            return [row(variant, "error", 1, "round", rep, reason=f"{type(exc).__name__}: {exc}"[:300])]


# -- capacity model -----------------------------------------------------------------------------------------------


def capacity_model(figures: dict[str, float], mail_rates: list[float]) -> pd.DataFrame:
    """How many ingestion workers and gateways each mail rate needs, and how much of each store's transition
    budget it uses, from measured figures: ``pages_per_s_per_worker``, ``pages_per_mail``,
    ``accepts_per_s_per_gateway``, ``transitions_per_mail``, ``pg_transitions_per_s``, ``sqlite_transitions_per_s``
    (store figures one per commit: the engine commits each transition). ``bottleneck`` names what runs out first
    for a single store when workers and gateways are added freely: the store (its budget is exceeded) or none."""
    per_mail_s = figures["pages_per_mail"] / figures["pages_per_s_per_worker"]
    out = []
    for rate in mail_rates:
        store_load = rate * figures["transitions_per_mail"]
        pg, sqlite = store_load / figures["pg_transitions_per_s"], store_load / figures["sqlite_transitions_per_s"]
        out.append({"mails_per_s": rate, "workers": math.ceil(rate * per_mail_s - 1e-9),
                    "gateways": math.ceil(rate / figures["accepts_per_s_per_gateway"] - 1e-9),
                    "store_transitions_per_s": store_load, "pg_load": pg, "sqlite_load": sqlite,
                    "bottleneck": "PostgreSQL" if pg > 1 else ("SQLite" if sqlite > 1 else "none")})
    return pd.DataFrame(out)


def store_ceiling(figures: dict[str, float]) -> dict[str, float]:
    """The mail rate at which each store's measured transitions/s are used up (mails/s)."""
    return {"pg_mails_per_s": figures["pg_transitions_per_s"] / figures["transitions_per_mail"],
            "sqlite_mails_per_s": figures["sqlite_transitions_per_s"] / figures["transitions_per_mail"]}


# -- ingestion: CPU-bound extraction through the package's Dask executor, 1 and 2 workers -----------------------


def noop_task(i: int) -> int:
    """A task that does nothing: its round trip through the executor is what Dask adds to every task."""
    return i


@contextmanager
def dask_executor(workers: int, memory_mb: int = 1024) -> Iterator[Any]:
    """The package's DaskExecutor on a LocalCluster of its own (``workers`` single-threaded worker processes,
    each under a memory cap), with every worker up; closed after."""
    from ...config import ExecutorConfig
    from ...dask_executor import DaskExecutor, wait_for_workers

    executor = DaskExecutor(ExecutorConfig(kind="dask", local_workers=workers, worker_memory_mb=memory_mb))
    try:
        wait_for_workers(executor, workers)
        yield executor
    finally:
        executor.close()


def dask_ingestion(work: Path, pdf: Path, documents: int = 8, workers: tuple[int, ...] = (1, 2), reps: int = 2,
                   roundtrips: int = 50) -> Rows:
    """``documents`` copies of a dense PDF ingested (``cluster_ingest.ingest_on_worker``, as serve submits it)
    through a fresh DaskExecutor of each size in ``workers``, rounds interleaved (1 2 1 2 ...), every worker
    warmed up first (imports, page cache): pages/s and wall seconds; on each cluster also the round trip of
    ``roundtrips`` no-op tasks one after another (what the Dask path adds per task)."""
    rows: Rows = []
    for rep in range(reps):
        for n in workers:
            with dask_executor(n) as executor:
                _ingest_all(executor, work, pdf, n, f"warm-{n}-{rep}")  # one document per worker, untimed
                rows += _dask_round(executor, work, pdf, documents, n, rep, roundtrips)
    return rows + _speedups(rows, workers)


def _ingest_all(executor: Any, work: Path, pdf: Path, documents: int, label: str) -> int:
    """Ingest ``documents`` copies of the PDF at once on the cluster; return the pages extracted."""
    from ...config import IngestConfig
    from ...stages.cluster_ingest import ingest_on_worker

    limits, per_task = IngestConfig(), executor.config.pages_per_task
    futures = [executor.submit(ingest_on_worker, pdf, work / f"{label}-{i}.txt", limits, per_task,
                               key=f"{label}-{i}-{uuid.uuid4().hex[:8]}") for i in range(documents)]
    return sum(f.result(timeout=600).pages for f in futures)


def _dask_round(executor: Any, work: Path, pdf: Path, documents: int, n: int, rep: int, roundtrips: int) -> Rows:
    """One timed batch on one cluster, then the no-op round trips."""
    tags = {"workers": n, "documents": documents, "pdf_kb": round(pdf.stat().st_size / 1024)}
    started = time.perf_counter()
    pages = _ingest_all(executor, work, pdf, documents, f"doc-{n}-{rep}")
    seconds = time.perf_counter() - started
    rows = [row("ingestion", "pages_per_s", pages / seconds, "pages/s", rep, pages=pages, **tags),
            row("ingestion", "batch_seconds", seconds, "s", rep, pages=pages, **tags)]
    # ours (the package's executor: announce, done-callback) and Dask's own (a bare client.submit), alternated
    submitters = {"dask_task_overhead_ms": executor.submit,
                  "dask_bare_round_trip_ms": lambda fn, i, key: executor.client.submit(fn, i, key=key, pure=False)}
    for i in range(5 + roundtrips):
        for metric, submit in list(submitters.items())[::1 if i % 2 else -1]:  # each first in turn
            t0 = time.perf_counter()
            submit(noop_task, i, key=f"noop-{n}-{rep}-{i}-{uuid.uuid4().hex[:8]}").result(timeout=60)
            if i >= 5:  # the first few pay for imports and connections
                rows.append(row("ingestion", metric, (time.perf_counter() - t0) * 1000, "ms", rep, **tags))
    return rows


def _speedups(rows: Rows, workers: tuple[int, ...]) -> Rows:
    """Median pages/s of each cluster size over that of the smallest: the scaling the SLA judges."""
    rates = {n: [r["value"] for r in rows if r["metric"] == "pages_per_s" and r["tags"]["workers"] == n]
             for n in workers}
    base = statistics.median(rates[min(workers)]) if rates.get(min(workers)) else 0.0
    return [row("ingestion", f"speedup_{n}_vs_{min(workers)}_workers", statistics.median(rates[n]) / base, "x", 0,
                workers=n, rounds=len(rates[n])) for n in workers if n != min(workers) and rates[n] and base]


# -- gateways: three serve processes, one PostgreSQL store, shared Message-IDs -----------------------------------


def gateway_dedup(work: Path, pg_url: UrlMaker | None, pdf: Path, mails: int = 30, gateways: int = 3,
                  concurrency: int = 4, timeout_s: float = 600.0, pdf_pages: int | None = None) -> Rows:
    """``mails`` mails per gateway, every third Message-ID also sent to the next gateway at the same time;
    duplicate runs and acked messages without an ended run, counted from the store. With ``pdf_pages`` the mails
    carry a text PDF of that many pages instead of ``pdf``: what is counted does not depend on the attachment,
    while extracting a 1 MB one takes the 2-core machine about a second a mail."""
    if pg_url is None:
        return [row("gateways", "skipped", 1, "part", 0, reason="no PostgreSQL server")]
    if pdf_pages is not None:
        pdf = work / f"text-{pdf_pages}p.pdf"
        pdf.write_bytes(fx.text_pdf(pdf_pages))
    store = StoreConfig(url=pg_url("gateways"))
    own = [[f"<gw{g}-{i}@scaleout.audit>" for i in range(mails)] for g in range(gateways)]
    sends = [own[g] + own[(g - 1) % gateways][::3] for g in range(gateways)]  # shared: also at the next one
    with serves(work, {"store": {"url": store.url}}, gateways) as started:
        sent = in_clients(send_concurrently, [([sv.port], str(pdf), ids, concurrency)
                                              for sv, ids in zip(started, sends, strict=True)], timeout_s)
        acked = sorted({mid for one in sent for mid, reply, _, _ in one if reply == "250"})
        runs = wait_ended(store, acked, timeout_s)
    tags = {"gateways": gateways, "mails": sum(map(len, sends)), "shared_ids": sum(len(o[::3]) for o in own),
            "pdf_kb": round(pdf.stat().st_size / 1024)}
    return [row("gateways", "acked", len(acked), "messages", 0, **tags),
            row("gateways", "duplicated", sum(len(runs.get(m, [])) > 1 for m in acked), "messages", 0, **tags),
            row("gateways", "lost", sum(not runs.get(m) or any(r.ended_at is None for r in runs[m]) for m in acked),
                "messages", 0, **tags),
            row("gateways", "not_acked", sum(reply != "250" for one in sent for _, reply, _, _ in one), "sends", 0,
                **tags)]


# -- all of them -------------------------------------------------------------------------------------------------


@contextmanager
def postgres_server() -> Iterator[tuple[UrlMaker | None, str]]:
    """One durable throwaway PostgreSQL server for the notebook: a maker of fresh databases, and why there is
    none (PostgreSQL not installed) when the maker is None."""
    from ..base.pgserver import TemporaryPostgres

    try:
        server = TemporaryPostgres(durable=True).start()
    except Exception as exc:  # not installed or would not start: the PostgreSQL parts say so in their rows
        yield None, f"{type(exc).__name__}: {exc}"[:300]
        return
    try:
        yield server.create_database, f"PostgreSQL {server.binaries_.version}"
    finally:
        server.stop()


def scale_out_figures(work: Path, params: dict[str, dict[str, Any]], pdf: Path, dense_pdf: Path,
                      only: tuple[str, ...] = ("store", "pipeline", "ingestion", "gateways"),
                      recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Run each part in ``only`` with its ``params`` against one PostgreSQL server; record the rows under
    scenario ``scale_out``. ``pdf`` is the mails' attachment, ``dense_pdf`` the CPU-bound ingestion document."""
    work.mkdir(parents=True, exist_ok=True)
    parts: dict[str, Callable[[Path, UrlMaker | None], Rows]] = {
        "store": lambda tmp, url: store_backends(tmp, url, **params.get("store", {})),
        "pipeline": lambda tmp, url: pipeline_variants(tmp, url, pdf, **params.get("pipeline", {})),
        "ingestion": lambda tmp, url: dask_ingestion(tmp, dense_pdf, **params.get("ingestion", {})),
        "gateways": lambda tmp, url: gateway_dedup(tmp, url, pdf, **params.get("gateways", {})),
    }
    rows: Rows = []
    with postgres_server() as (pg_url, server):
        rows.append(row("machine", "postgres_available", float(pg_url is not None), "bool", 0, server=server))
        for name in tqdm(only, desc="scale-out", unit="part"):
            with tempfile.TemporaryDirectory(prefix=f"scaleout-{name}-", dir=work) as tmp:
                try:
                    rows += parts[name](Path(tmp), pg_url)
                except Exception as exc:  # the harness broke, not the engines: say so in the report
                    rows.append(row(name, "error", 1, "part", 0, reason=f"{type(exc).__name__}: {exc}"[:300]))
    if recorder is not None:
        recorder.record(SCENARIO, pd.DataFrame(rows))
    return frame(rows)
