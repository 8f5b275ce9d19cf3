"""Optimizations measured both ways in one session, interleaved (A B A B): each a switch whose baseline
still works. Variant names start with ``baseline:`` or ``optimized:`` so the report can take ratios.

Store: synchronous level, WAL, batched commits, BEGIN IMMEDIATE, the count table and indexes, selecting
only needed columns, waiting for the write lock by polling. Gateway: chunked DATA reading, inotify against
polling for the drop folder.
Ingestion: worker processes against threads, streaming pages against holding the text. (Extraction
engines and page-parallel extraction are compared in ``pdf_ingestion.pdf_scaling``.) Stages: parsed mail
headers kept against parsed again at every read.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from email.headerregistry import Address
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from ...config import MB, GatewayConfig, IngestConfig, Settings, StoreConfig
from ...service import PipelineService
from ...sqlite_store import SqliteRunStore
from ...stages import deliver, digest, mailpolicy, parse
from ...stages.ingest import extract_text, ingest_pdf
from ..base import fixtures as fx
from ..base.harness import percentile, row
from ..base.memory import traced
from ..base.recorder import AuditRecorder
from ..base.serveproc import free_port
from . import client_latency, lock_wait
from .store_queries import fill_store, transitions_per_s


def _interleave(pairs: dict[str, Callable[[], float]], reps: int, metric: str, unit: str,
                scenario_tags: dict[str, Any], warm_up: bool = True) -> list[dict[str, Any]]:
    for fn in pairs.values() if warm_up else ():
        fn()
    rows = []
    for rep in range(reps):
        for variant, fn in pairs.items():
            rows.append(row(variant, metric, fn(), unit, rep, **scenario_tags))
    return rows


def _transitions_per_s(config: StoreConfig, batch: int, n: int = 2000) -> float:
    store = SqliteRunStore(config)
    try:
        return transitions_per_s(store, n, batch)
    finally:
        store.close()


def _claim_errors(path: Path, immediate: bool, threads: int = 4, attempts: int = 200) -> float:
    """Read-then-write from several connections; count the errors a deferred transaction gets."""
    errors = [0]
    lock = threading.Lock()

    def worker() -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5)
        for _ in range(attempts):
            try:
                conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                (n,) = conn.execute("SELECT count(*) FROM runs WHERE state = 'queued'").fetchone()
                conn.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = (SELECT max(run_id) FROM runs)", (n,))
                conn.execute("COMMIT")
            except sqlite3.OperationalError:
                conn.execute("ROLLBACK")
                with lock:
                    errors[0] += 1
        conn.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return float(errors[0])


def _timed(fn: Callable[[], Any], repeat: int = 20) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[len(samples) // 2] * 1000


def store_switches(runs: int = 100_000, reps: int = 5, recorder: AuditRecorder | None = None,
                   transitions: int = 2000, lock_inserts: int = 300) -> pd.DataFrame:
    """Every store switch, baseline and optimized, interleaved; returns tidy rows. ``runs``: the store the index
    and query switches read; ``transitions``: per measurement of the commit switches (one fsync each with
    journal=DELETE synchronous=FULL: 2,000 took 4 s there); ``lock_inserts``: run inserts per turn beside a
    busy writer process (``lock_wait``)."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="store-switches-") as tmp:
        tmp_path = Path(tmp)
        configs = {
            "baseline: journal=DELETE synchronous=FULL": StoreConfig(path=tmp_path / "a.db", wal=False,
                                                                     synchronous="FULL"),
            "optimized: journal=WAL synchronous=NORMAL": StoreConfig(path=tmp_path / "b.db"),
        }
        rows += _interleave({k: partial(_transitions_per_s, c, 1, transitions) for k, c in configs.items()}, reps,
                            "transitions_per_s_one_per_commit", "1/s", {"switch": "journal and synchronous"})
        wal = StoreConfig(path=tmp_path / "c.db")
        batched = {"baseline: one transition per commit": 1, "optimized: 100 transitions per commit": 100}
        rows += _interleave({k: partial(_transitions_per_s, wal, b, transitions) for k, b in batched.items()}, reps,
                            "transitions_per_s", "1/s", {"switch": "batched commits"})
        filled = tmp_path / "filled.db"
        store = SqliteRunStore(filled)
        fill_store(store, runs)
        rows += _interleave({"baseline: deferred BEGIN": lambda: _claim_errors(filled, False),
                             "optimized: BEGIN IMMEDIATE": lambda: _claim_errors(filled, True)}, reps,
                            "read_then_write_errors", "errors", {"switch": "BEGIN IMMEDIATE"})
        rows += _query_switches(store, filled, tmp_path, reps, runs)
        store.close()
        rows += _lock_polling_switch(tmp_path, reps, lock_inserts)
    if recorder is not None:
        recorder.record("optimizations", pd.DataFrame(rows))
    return pd.DataFrame(rows)


def _lock_polling_switch(tmp_path: Path, reps: int, inserts: int) -> list[dict[str, Any]]:
    """``[store] lock_polling`` off and on (``lock_wait``): a run insert's p99 beside a writer process committing
    a transition at a time, and that writer's commits/s meanwhile (what polling costs the other side)."""
    variants = {"baseline: SQLite's busy handler": False, "optimized: lock polling": True}
    rows: list[dict[str, Any]] = []
    for rep in range(-1, reps):  # -1: warm-up, not recorded
        for variant, polling in variants.items() if rep % 2 else reversed(variants.items()):
            result = lock_wait.summarize(lock_wait.contended_inserts(tmp_path / f"lock-{rep}-{polling}.db", polling,
                                                                     inserts))
            if rep >= 0:
                rows += [row(variant, "insert_p99_ms_beside_writer", result["p99_ms"], "ms", rep,
                             switch="lock polling"),
                         row(variant, "writer_commits_per_s", result["writer_commits_per_s"], "1/s", rep,
                             switch="lock polling")]
    return rows


def _query_switches(store: SqliteRunStore, filled: Path, tmp_path: Path, reps: int, runs: int) -> list[dict[str, Any]]:
    bare = tmp_path / "no-indexes.db"
    store.checkpoint()
    shutil.copy(filled, bare)
    plain = sqlite3.connect(bare)
    for (name,) in plain.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").fetchall():
        plain.execute(f"DROP INDEX {name}")
    tags = {"runs": runs}
    out = _interleave({
        "baseline: no index (scan and sort)": lambda: _timed(lambda: plain.execute(
            "SELECT * FROM runs WHERE workflow = 'wf1' ORDER BY run_id DESC LIMIT 50").fetchall(), 5),
        "optimized: index on workflow": lambda: _timed(lambda: store.list_runs("wf1", limit=50)),
    }, reps, "list_latest_50_ms", "ms", {**tags, "switch": "indexes"})
    out += _interleave({
        "baseline: GROUP BY over an index": lambda: _timed(lambda: store.query(
            "SELECT state, count(*) FROM runs GROUP BY state"), 5),
        "optimized: counter table kept by triggers": lambda: _timed(lambda: store.count_runs_by_state()),
    }, reps, "count_by_state_ms", "ms", {**tags, "switch": "run_counts table"})
    out += _interleave({
        "baseline: SELECT * (payload too)": lambda: _timed(lambda: store.query(
            "SELECT * FROM runs WHERE state = 'success' ORDER BY run_id DESC LIMIT 2000")),
        "optimized: only the columns needed": lambda: _timed(lambda: store.query(
            "SELECT run_id, state, ended_at FROM runs WHERE state = 'success' ORDER BY run_id DESC LIMIT 2000")),
    }, reps, "select_2000_runs_ms", "ms", {**tags, "switch": "select only needed columns"})
    plain.close()
    return out


def gateway_switches(reps: int = 2, recorder: AuditRecorder | None = None, message_mb: float = 5.0,
                     rounds: int = 3, concurrent: int = 4, small_mails: int = 150, drop_messages: int = 10,
                     cache_dir: Path | None = None, session_senders: int = 8, session_mails: int = 50
                     ) -> pd.DataFrame:
    """Chunked DATA reading against aiosmtpd's line reader, accepting off the event loop against on it
    (both with ``concurrent`` messages of ``message_mb`` MB arriving at once, ``rounds`` times, while two senders
    send ``small_mails`` small ones each); inotify against polling (``drop_messages`` files per variant and rep);
    LeanSMTP's sessions against aiosmtpd's, and small mails accepted on the event loop against in the pool
    (``session_switches``: ``session_senders`` sender processes, ``session_mails`` each). The large messages'
    PDF is generated once (cached in ``cache_dir`` when given)."""
    from .gateway_bench import large_messages, large_pdf

    pdf = large_pdf(message_mb, cache_dir)
    rows: list[dict[str, Any]] = []
    switches = {
        "chunked DATA": {"baseline: aiosmtpd line reader": {"bulk_data": False},
                         "optimized: chunked DATA (BulkDataSMTP)": {}},
        "accept off the event loop": {"baseline: spool fsync and commit on the event loop": {"accept_off_loop": False},
                                      "optimized: in the gateway's thread pool": {}},
    }
    for rep in tqdm(range(reps), desc="gateway switches", unit="rep"):
        for switch, variants in switches.items():
            for variant, settings in variants.items():
                with tempfile.TemporaryDirectory(prefix="gw-") as tmp:
                    for r in large_messages(Path(tmp), message_mb, concurrent, rounds, small_mails=small_mails,
                                            pdf=pdf, **settings):
                        if r["metric"] in ("large_client_latency", "small_client_latency_during_large"):
                            rows.append(row(variant, f"{r['metric']}_p95_ms", r["p95"], "ms", rep, switch=switch))
    for rep in range(reps):
        for variant, mode in {"baseline: polling (1 s)": "poll", "optimized: inotify (watchdog)": "inotify"}.items():
            for seconds in drop_folder_latency(mode, messages=drop_messages):
                rows.append(row(variant, "drop_to_queued_ms", seconds * 1000, "ms", rep, switch="drop folder watch"))
    rows += session_switches(reps, session_senders, session_mails)
    if recorder is not None:
        recorder.record("optimizations", pd.DataFrame(rows))
    return pd.DataFrame(rows)


# The gateway alone, three ways: the shipped settings, and each switch turned the other way.
_GATEWAY_SETTINGS: dict[str, dict[str, Any]] = {
    "shipped": {}, "aiosmtpd sessions": {"lean_sessions": False},
    "inline accepts": {"inline_accept_bytes": client_latency.INLINE_BYTES}}
# switch -> (baseline label, its settings), (optimized label, its settings)
_SESSION_SWITCHES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "lean SMTP sessions": (("baseline: aiosmtpd's SMTP session", "aiosmtpd sessions"),
                           ("optimized: LeanSMTP session (shipped)", "shipped")),
    "inline accept of small mails": (("baseline: every accept in the thread pool (shipped)", "shipped"),
                                     ("optimized: small mails accepted on the event loop", "inline accepts")),
}


def session_switches(reps: int, senders: int, per_sender: int) -> list[dict[str, Any]]:
    """``[gateway] lean_sessions`` and ``inline_accept_bytes``, each both ways: the gateway alone (``serve
    --gateway-only``) accepting small mails from ``senders`` closed-loop sender processes, a new connection per
    mail, as ``client_latency`` sends them (interleaved, after a warm-up): per rep, mails accepted per second, the
    senders' p99 wait (both of accepted mails) and how many were refused. The shipped settings' rounds serve
    both switches. (How inline accepts fare beside a busy engine: ``client_latency``'s ``inline_accept``
    variant, notebook 04.)"""
    variants: dict[str, client_latency.Variant] = {
        name: ({"gateway": settings}, ("--gateway-only",)) for name, settings in _GATEWAY_SETTINGS.items()}
    with tempfile.TemporaryDirectory(prefix="gateway-sessions-") as tmp:
        measured = client_latency.client_latency(Path(tmp), senders=(senders,), per_sender=per_sender, reps=reps,
                                                 large_mb=None, warmup_mails=4 * senders, variants=variants)
    rows = []
    for switch, sides in _SESSION_SWITCHES.items():
        for label, serve in sides:
            for rep, group in measured[measured.variant == serve].groupby("rep"):
                rate, wait = group[group.metric == "accepted_per_s"].value, group[group.metric == "client_txn_ms"].value
                refused = group[group.metric == "refused"].value.sum()  # rate and wait count the 250s alone
                rows += [row(label, "accepted_per_s", rate.iloc[0], "1/s", int(rep), switch=switch),
                         row(label, "client_txn_p99_ms", percentile(wait, 99), "ms", int(rep), switch=switch),
                         row(label, "refused", refused, "mails", int(rep), switch=switch)]
    return rows


def drop_folder_latency(mode: str, messages: int = 10) -> list[float]:
    """Seconds from a file's rename into inbox/new to its run being queued."""
    with tempfile.TemporaryDirectory(prefix="drop-") as tmp:
        settings = replace(Settings.for_data_dir(Path(tmp)), gateway=GatewayConfig(port=free_port(), watch_mode=mode))
        service = PipelineService(settings).start(run_workers=False)
        inbox, latencies = Path(tmp) / "inbox", []
        try:
            for i in range(messages):
                (inbox / "tmp" / f"{i}.eml").write_bytes(fx.email_with([], message_id=f"<drop-{i}@audit>"))
                t0 = time.time()
                (inbox / "tmp" / f"{i}.eml").rename(inbox / "new" / f"{i}.eml")
                while sum(service.store.count_runs_by_state().values()) <= i:
                    time.sleep(0.002)
                latencies.append(service.store.list_runs(limit=1)[0].queued_at - t0)
        finally:
            service.stop(grace_s=0)
    return latencies


def _extract_peak_mb(pdf: Path, limits: IngestConfig) -> float:
    """Peak Python heap (tracemalloc) while extracting ``pdf`` in this process, in MB."""
    with tempfile.TemporaryDirectory(prefix="stream-") as tmp, traced():
        tracemalloc.reset_peak()
        extract_text(pdf, Path(tmp) / "out.txt", limits)
        return tracemalloc.get_traced_memory()[1] / MB


def _batch_seconds(pdf: Path, documents: int, limits: IngestConfig) -> float:
    """Wall seconds to ingest ``documents`` copies of ``pdf`` at once, one thread each submitting work."""
    with tempfile.TemporaryDirectory(prefix="executor-") as tmp, ThreadPoolExecutor(documents) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda i: ingest_pdf(pdf, Path(tmp) / f"{i}.txt", limits), range(documents)))
        return time.perf_counter() - t0


def ingestion_switches(dense_pdf: Path, batch_pdf: Path, documents: int = 4, reps: int = 3,
                       recorder: AuditRecorder | None = None, memory_reps: int | None = None) -> pd.DataFrame:
    """Executor kind for CPU-bound extraction (threads in the pipeline process, where the GIL serialises
    pypdf, against the extraction worker processes) and streaming pages against holding the text.

    The streaming switch's figure, tracemalloc's peak, does not vary with machine load, while tracing makes each
    extraction slow (15-20 s for the 5 MB text fixture on a loaded 2-core machine): it runs ``memory_reps`` times
    (default ``reps``) after a warm-up on ``batch_pdf``, which loads the same code as the dense document would."""
    threads = IngestConfig(engine="pypdf", page_workers=1, isolate=False)
    processes = replace(threads, isolate=True)
    rows = _interleave({"baseline: threads in the pipeline process": lambda: _batch_seconds(
                            batch_pdf, documents, threads),
                        "optimized: extraction worker processes": lambda: _batch_seconds(
                            batch_pdf, documents, processes)}, reps, "batch_seconds", "s",
                       {"switch": f"executor for CPU-bound ingestion ({documents} PDFs at once, pypdf)"})
    # in this process, so tracemalloc sees the text; PDFium's own buffers are C memory, the same in both
    inline = IngestConfig(engine="pdfium", page_workers=1, isolate=False)
    hold = replace(inline, stream_text=False)
    for limits in (hold, inline):  # the warm-up: engine loaded, first-call allocations made
        _extract_peak_mb(batch_pdf, limits)
    rows += _interleave({"baseline: hold the document's text, then write": lambda: _extract_peak_mb(dense_pdf, hold),
                         "optimized: stream pages to the file": lambda: _extract_peak_mb(dense_pdf, inline)},
                        reps if memory_reps is None else memory_reps, "peak_python_heap_mb", "MB",
                        {"switch": f"streaming pages ({dense_pdf.name})"}, warm_up=False)
    if recorder is not None:
        recorder.record("optimizations", pd.DataFrame(rows))
    return pd.DataFrame(rows)


READER = Address(addr_spec="reader@example.org")


def _small_mails(count: int) -> list[bytes]:
    """``count`` small mails, no two with the same From, Subject or Message-ID; every other one has a PDF part."""
    return [fx.email_with([("r.pdf", fx.text_pdf(1))] if i % 2 else [], subject=f"Report {i}",
                          sender=f"user{i}@example{i}.org", message_id=f"<small-{i}@audit>") for i in range(count)]


def _stage_cpu_ms(mails: list[bytes], work: Path, settings: Settings) -> float:
    """CPU ms per mail to parse it, render its digest and compose the reply: the stages' share of a small run."""
    started = time.process_time()
    for raw in mails:
        email = parse.summarize_message(raw, work, settings.ingest)
        rendered = digest.render_digest(email, digest.describe_documents(email["attachments"], [], {}, 3))
        deliver.compose_reply(rendered, email, settings.delivery, to=READER, message_id="<audit@x>").as_bytes()
    return 1000 * (time.process_time() - started) / len(mails)


def stage_switches(reps: int = 5, mails: int = 200, recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Parsed headers kept (``mailpolicy.CACHED_HEADERS``) against parsed at every read, as the email package
    does: CPU ms per small mail through parse, digest and compose, in this process, interleaved."""
    batch, settings = _small_mails(mails), Settings()

    def measured(keep: bool) -> float:
        kept = mailpolicy.CACHED_HEADER_CHARS
        mailpolicy.CACHED_HEADER_CHARS = kept if keep else -1  # no header is that short: every read parses
        try:
            with tempfile.TemporaryDirectory(prefix="stages-") as tmp:
                return _stage_cpu_ms(batch, Path(tmp), settings)
        finally:
            mailpolicy.CACHED_HEADER_CHARS = kept

    rows = _interleave({"baseline: every read parses the header": lambda: measured(False),
                        "optimized: parsed headers kept": lambda: measured(True)}, reps, "cpu_ms_per_small_mail",
                       "ms", {"switch": f"parsed headers kept ({mails} distinct small mails)"})
    if recorder is not None:
        recorder.record("optimizations", pd.DataFrame(rows))
    return pd.DataFrame(rows)
