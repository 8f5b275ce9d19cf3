"""SMTP clients that the scenarios run in sender processes of their own.

A sender process imports the module its function lives in. This one imports only the standard library,
the audit's fixtures (for ``email_with``) and ``serveproc``'s reply labels, so a sender starts in a fraction
of a second. Started from a scenario module (pandas, the service, the scenario's own imports), a sender took
3-6 s to start on a loaded 2-core machine: longer than a paced round's head start, so "paced" mails went
out in one burst, and every round paid those seconds again.
"""

from __future__ import annotations

import smtplib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import fixtures as fx
from .serveproc import RECIPIENT, SENDER, reply_of


def paced_sender(port: int, ids: list[str], due: list[float]) -> tuple[list[str], float]:
    """Send one small message per id at its due wall time; return the ids answered 250 and the last send time."""
    accepted: list[str] = []
    last = time.time()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for message_id, at in zip(ids, due, strict=True):
            delay = at - time.time()
            if delay > 0:
                time.sleep(delay)
            try:
                smtp.sendmail("burst@example.com", [RECIPIENT], fx.email_with([], message_id=message_id))
                accepted.append(message_id)
            except smtplib.SMTPException:
                pass  # not accepted: not owed a run
            last = time.time()
    return accepted, last


def send_batch(port: int, batch: list[bytes]) -> list[float]:
    """Send a batch over one SMTP connection; return each message's seconds-to-250."""
    latencies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for raw in batch:
            t0 = time.perf_counter()
            smtp.sendmail("bench@example.com", [RECIPIENT], raw)
            latencies.append(time.perf_counter() - t0)
    return latencies


def send_concurrently(ports: list[int], pdf_path: str, message_ids: list[str], concurrency: int,
                      timeout_s: float = 300.0) -> list[tuple[str, str, float, float]]:
    """Send one mail with the PDF per Message-ID, ``concurrency`` at once, round-robin over ``ports``; return
    ``(message_id, reply, started, ended)`` (wall times)."""
    pdf = Path(pdf_path).read_bytes()

    def send(i: int) -> tuple[str, str, float, float]:
        mid, raw = message_ids[i], fx.email_with([("report.pdf", pdf)], message_id=message_ids[i])
        started = time.time()
        try:
            with smtplib.SMTP("127.0.0.1", ports[i % len(ports)], timeout=timeout_s) as smtp:
                smtp.sendmail(SENDER, [RECIPIENT], raw)
            return mid, "250", started, time.time()
        except (OSError, smtplib.SMTPException) as exc:
            return mid, reply_of(exc), started, time.time()

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(send, range(len(message_ids))))
