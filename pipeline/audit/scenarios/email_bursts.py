"""The email_burst scenario's rounds on a real ``python -m pipeline serve``: paced SMTP senders in their own
processes, the backlog read from serve's run store, serve's and its workers' memory and CPU by role."""

from __future__ import annotations

import multiprocessing
import smtplib
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ...sqlite_store import SqliteRunStore
from ...store import Run
from ..base import fixtures as fx
from ..base.faultcheck import wait_terminal
from ..base.servemem import TreeWatch
from ..base.serveproc import serving


def _paced_sender(port: int, ids: list[str], due: list[float]) -> tuple[list[str], float]:
    """Send one small message per id at its due wall time; return the ids answered 250 and the last send time."""
    accepted: list[str] = []
    last = time.time()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for message_id, at in zip(ids, due, strict=True):
            delay = at - time.time()
            if delay > 0:
                time.sleep(delay)
            try:
                smtp.sendmail("burst@example.com", ["digest@pipeline.local"], fx.email_with([], message_id=message_id))
                accepted.append(message_id)
            except smtplib.SMTPException:
                pass  # not accepted: not owed a run
            last = time.time()
    return accepted, last


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
        futures = [pool.submit(_paced_sender, port, ids[i::senders], due[i::senders])
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
    wall time, and serve's tree by role over the round (peak RSS bytes, CPU seconds, workers replaced)."""

    accepted: list[str]
    runs: list[Run]
    backlog: list[tuple[float, int]]
    last_sent: float
    peak_rss: dict[str, int]
    cpu_seconds: dict[str, float]
    worker_restarts: int


def serve_round(work: Path, count: int, rate: float, senders: int, prefix: str, timeout_s: float = 600.0
                ) -> BurstRound:
    """Start a fresh serve, send ``count`` mails at ``rate`` per second (inf: at once), wait for every acked
    mail's run to end; serve is killed on every path out."""
    with serving(work / "data", work) as serve:
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
                      watch.cpu_seconds(), watch.worker_restarts)
