"""Notebook 04's measurements: ``email_burst`` rounds on a real ``python -m pipeline serve``, paced SMTP senders in
their own processes, the backlog read from serve's run store, serve's and its workers' memory and CPU by role."""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm import tqdm

from ...sqlite_store import SqliteRunStore
from ...store import Run
from ..base.faultcheck import wait_terminal
from ..base.harness import row, save
from ..base.servemem import TreeWatch, by_role
from ..base.serveproc import serving
from ..base.smtpclients import paced_sender

if TYPE_CHECKING:
    from ..base.recorder import AuditRecorder


def paced_send(port: int, store: SqliteRunStore, count: int, rate: float, senders: int, prefix: str
               ) -> tuple[list[str], list[tuple[float, int]], float]:
    """Send ``count`` messages at ``rate`` per second (inf: all at once) from ``senders`` processes.

    Returns the Message-IDs answered 250, backlog samples ``(seconds since start, queued + running runs)``
    taken every 50 ms until the backlog is empty, and the wall time of the last send.
    """
    start = time.time() + 1.0  # give the sender processes time to start
    due = [start + (i / rate if rate != float("inf") else 0.0) for i in range(count)]
    ids = [f"<{prefix}-{i}@audit>" for i in range(count)]
    backlog: list[tuple[float, int]] = []
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=senders, mp_context=context) as pool:
        futures = [pool.submit(paced_sender, port, ids[i::senders], due[i::senders])
                   for i in range(senders)]
        while True:
            counts = store.count_runs_by_state()
            waiting = counts.get("queued", 0) + counts.get("running", 0)
            if time.time() >= start:
                backlog.append((time.time() - start, waiting))
            if all(f.done() for f in futures) and waiting == 0:
                break
            time.sleep(0.05)
        results = [f.result() for f in futures]
    accepted = [message_id for ids_ok, _ in results for message_id in ids_ok]
    return accepted, backlog, max(last for _, last in results)


@dataclass(frozen=True)
class BurstRound:
    """What one round measured: the acked Message-IDs and their runs, the backlog samples, the last send's
    wall time, and serve's tree over the round (peak RSS bytes by role, workers replaced, CPU seconds by process
    and by role)."""

    accepted: list[str]
    runs: list[Run]
    backlog: list[tuple[float, int]]
    last_sent: float
    peak_rss: dict[str, int]
    worker_restarts: int
    cpu_by_process: dict[str, float]  # servemem.PROCESSES

    @property
    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds by role (``servemem.ROLES``)."""
        return by_role(self.cpu_by_process)

    def drain_seconds(self) -> float:
        """From the last send until the last run ended (0 or less when every run had ended by then)."""
        return max((r.ended_at or 0 for r in self.runs), default=self.last_sent) - self.last_sent

    def drain_rate(self) -> float | None:
        """Runs processed per second once the sending stopped: the backlog's peak over ``drain_seconds``
        (None when there was no backlog left to time)."""
        peak, drained = max((b for _, b in self.backlog), default=0), self.drain_seconds()
        return peak / drained if peak > 0 and drained > 0 else None


def serve_round(work: Path, count: int, rate: float, senders: int, prefix: str, timeout_s: float = 600.0,
                config: dict[str, dict[str, Any]] | None = None) -> BurstRound:
    """Start a fresh serve (``config``: its TOML sections), send ``count`` mails at ``rate`` per second (inf:
    at once), wait for every acked mail's run to end; serve is killed on every path out."""
    with serving(work / "data", work, config) as serve:
        store = SqliteRunStore(serve.data_dir / "runs.sqlite3", create=False)  # serve made it before answering
        try:
            with TreeWatch(serve) as watch:
                accepted, backlog, last_sent = paced_send(serve.port, store, count, rate, senders, prefix)
                found = wait_terminal(serve.data_dir, accepted, timeout_s)
        finally:
            store.close()
    runs = [r for mid in accepted for r in found.get(mid, [])]
    return BurstRound(accepted, runs, backlog, last_sent,
                      {"serve": watch.peak_serve_rss, "workers": watch.peak_workers_rss},
                      watch.worker_restarts, watch.cpu_seconds_by_process())


def email_burst(rates: list[float], duration_s: float = 5.0, burst: int = 200, senders: int = 4,
                recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Sustained rates, then a sudden burst, over SMTP to a fresh ``python -m pipeline serve`` per round:
    trigger latency, backlog, drain time, messages lost, and serve's and its workers' peak RSS and CPU."""
    rows: list[dict[str, Any]] = []
    plans = [("rate", rate, int(rate * duration_s)) for rate in rates] + [("burst", float("inf"), burst)]
    for kind, rate, count in tqdm(plans, desc="email_burst", unit="round"):
        label = f"{kind}-{rate:g}" if kind == "rate" else f"burst-{count}"
        with tempfile.TemporaryDirectory(prefix="burst-") as tmp:
            done = serve_round(Path(tmp), count, rate, senders, prefix=label)
        runs, backlog = done.runs, done.backlog
        keys = {r.dedup_key for r in runs}
        tags = {"round": label, "mode": kind, "rate_per_s": None if kind == "burst" else rate, "messages": count}
        for rep, r in enumerate(runs):
            rows.append(row("baseline", "trigger_latency_ms", (r.queued_at - r.payload["data_end_at"]) * 1000, "ms",
                            rep, **tags))
        rows += [row("baseline", "accepted", len(done.accepted), "messages", 0, **tags),
                 row("baseline", "lost", sum(mid not in keys for mid in done.accepted), "messages", 0, **tags),
                 row("baseline", "drain_seconds", done.drain_seconds(), "s", 0, **tags),
                 row("baseline", "backlog_peak", max((b for _, b in backlog), default=0), "runs", 0, **tags)]
        rows += [row("baseline", "backlog", b, "runs", i, **tags, t=t) for i, (t, b) in enumerate(backlog)]
        rows += [row("baseline", "peak_rss_bytes", done.peak_rss[p], "bytes", 0, process=p, **tags)
                 for p in ("serve", "workers")]
        rows += [row("baseline", "cpu_seconds", done.cpu_seconds[p], "s", 0, process=p, **tags)
                 for p in ("serve", "workers")]
        rows.append(row("baseline", "worker_restarts", done.worker_restarts, "workers", 0, process="workers", **tags))
    return save(recorder, "email_burst", rows)


# where build_digest and deliver run (issue 16): the shipped default against the engine's own threads; where
# their results reach their runs: completion threads against the process pool's own result thread
DRAIN_VARIANTS: dict[str, dict[str, dict[str, Any]] | None] = {
    "default": None, "stage_threads": {"runner": {"stage_executor": "thread"}},
    "results_on_pool_thread": {"runner": {"completion_threads": 0}}}


def small_mail_drain(burst: int = 400, reps: int = 2, senders: int = 4,
                     variants: dict[str, dict[str, dict[str, Any]] | None] | None = None,
                     recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Small mails processed per second: ``burst`` small mails at once to a fresh serve per round, its backlog's
    peak over the time from the last send until every run ended; each variant (a serve config) ``reps`` times,
    interleaved, the order alternating round by round.

    Rows ``runs_per_s`` (``backlog_peak / drain_seconds``), ``cpu_ms_per_run`` (serve and its workers) and
    ``process_cpu_ms_per_run`` (tag ``process``: ``servemem.PROCESSES``) tagged ``variant``; a round whose
    backlog was gone by the last send has no rate to give and is left out.
    """
    variants = DRAIN_VARIANTS if variants is None else variants
    rows: list[dict[str, Any]] = []
    turns = [(rep, name) for rep in range(reps) for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1])]
    for rep, name in tqdm(turns, desc="small_mail_drain", unit="round"):
        with tempfile.TemporaryDirectory(prefix="drain-") as tmp:
            done = serve_round(Path(tmp), burst, float("inf"), senders, f"drain-{name}-{rep}", config=variants[name])
        tags = {"messages": burst, "senders": senders}
        rate = done.drain_rate()
        if rate is not None:
            rows.append(row(name, "runs_per_s", rate, "1/s", rep, **tags))
        cpu_ms = 1000 * sum(done.cpu_seconds.values()) / max(1, len(done.runs))
        rows.append(row(name, "cpu_ms_per_run", cpu_ms, "ms", rep, **tags))
        rows += [row(name, "process_cpu_ms_per_run", 1000 * seconds / max(1, len(done.runs)), "ms", rep,
                     process=process, **tags) for process, seconds in done.cpu_by_process.items()]
    return save(recorder, "small_mail_drain", rows)
