"""Paced SMTP senders for the email_burst scenario, in their own processes."""

from __future__ import annotations

import multiprocessing
import smtplib
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from . import fixtures as fx


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


def paced_send(service: Any, count: int, rate: float, senders: int, prefix: str
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
        futures = [pool.submit(_paced_sender, service.settings.gateway.port, ids[i::senders], due[i::senders])
                   for i in range(senders)]
        while True:
            counts = service.store.count_runs_by_state()
            waiting = counts.get("queued", 0) + counts.get("running", 0)
            if time.time() >= start:
                backlog.append((time.time() - start, waiting))
            if all(f.done() for f in futures) and waiting == 0:
                break
            time.sleep(0.05)
        results = [f.result() for f in futures]
    accepted = [message_id for ids_ok, _ in results for message_id in ids_ok]
    return accepted, backlog, max(last for _, last in results)
