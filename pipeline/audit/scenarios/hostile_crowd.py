"""The audit's crowd of hostile mails (a hostile-senders part): ``mails`` mails of ``pdfs`` slow PDFs each, sent at
once, then a mail of one normal one-page PDF ``gap_s`` after most of them are being extracted; its end-to-end time
(DATA end → run ended) on a serve of its own per mode.

Before: ``[runner] extract_pool`` off (the crowd's PDFs wait for a worker on the runner's ``thread_workers``, which
the next mail's parse needs too) and ``[ingest] newcomer_s`` 0 (each earlier mail has ``LONG_JOB_S`` of worker time
before a newer one goes ahead of it). After: both at their defaults. The crowd's runs are not waited for: serve is
killed once the normal mail's run has ended.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ... import store as s
from ..base import fixtures as fx
from ..base.faultcheck import Rows, task_instances, wait_terminal
from ..base.harness import row
from ..base.serveproc import serving, timed_sends
from .hostile_checks import in_clients

MODES: dict[str, dict[str, dict[str, Any]]] = {
    "before": {"runner": {"extract_pool": False}, "ingest": {"newcomer_s": 0.0}},
    "after": {"runner": {}, "ingest": {}},
}


def head_of_line_crowd(work: Path, mails: int = 10, pdfs: int = 3, timeout_s: float = 2.0, slow_pages: int = 1200,
                       gap_s: float = 1.0, reps: int = 1, wait_s: float = 300.0) -> Rows:
    """Each rep, both modes in turn (before first): the normal mail's latency and outcome, and how many of the
    crowd's mails were being extracted when it was sent."""
    slow = fx.slow_pdf(slow_pages, draws=2000)
    normal = fx.text_pdf(1, seed=9)
    rows: Rows = []
    for rep in range(reps):
        for mode, config in MODES.items():
            tags = {"mode": mode, "mails": mails, "pdfs": pdfs, "timeout_s": timeout_s, "slow_pages": slow_pages,
                    "extract_pool": config["runner"].get("extract_pool", True),
                    "newcomer_s": config["ingest"].get("newcomer_s", "default")}
            here = work / f"{mode}-{rep}"
            here.mkdir(parents=True, exist_ok=True)
            serve_config = {"runner": config["runner"], "ingest": {"timeout_s": timeout_s, **config["ingest"]}}
            rows += _crowd_once(here, serve_config, slow, normal, mails, pdfs, gap_s, rep, wait_s, tags)
    return rows


def _crowd_once(work: Path, config: dict[str, dict[str, Any]], slow: bytes, normal: bytes, mails: int, pdfs: int,
                gap_s: float, rep: int, wait_s: float, tags: dict[str, Any]) -> Rows:
    crowd = [f"<crowd-{rep}-{i}@hostile.audit>" for i in range(mails)]
    normal_id = f"<crowd-normal-{rep}@hostile.audit>"
    with serving(work / "data", work, config) as serve:
        slow_pdfs = [(f"slow{j}.pdf", fx.distinct(slow, j)) for j in range(pdfs)]  # copies would be read once
        in_clients(timed_sends, [(serve.port, [fx.email_with(slow_pdfs, message_id=mid)]) for mid in crowd])
        extracting = _wait_extracting(serve.data_dir, crowd, min(mails, 8), 60.0)
        time.sleep(gap_s)
        reply = in_clients(timed_sends, [(serve.port, [fx.email_with([("normal.pdf", normal)],
                                                                      message_id=normal_id)])])[0][0][0]
        runs = wait_terminal(serve.data_dir, [normal_id], wait_s).get(normal_id) or []
    run = runs[-1] if runs else None
    tags = {**tags, "crowd_extracting": extracting, "replies": reply}
    outcome = {"state": run.state if run else "no run", "reason": ((run.reason or "") if run else "")[:200]}
    rows = [row("head_of_line_crowd", "normal_run_succeeded", float(run is not None and run.state == s.SUCCESS),
                "bool", rep, **outcome, **tags)]
    if run is not None and run.ended_at is not None:
        since = float(run.payload.get("data_end_at") or run.queued_at)
        rows.append(row("head_of_line_crowd", "normal_latency_s", run.ended_at - since, "s", rep, **outcome, **tags))
    return rows


def _wait_extracting(data_dir: Path, crowd: list[str], enough: int, timeout_s: float) -> int:
    """Wait until ``enough`` of the crowd's mails have a PDF past queued (extracting, or waiting for a worker on a
    thread), or ``timeout_s``; return how many have."""
    deadline, busy = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        busy = sum(any(t["state"] != s.QUEUED for t in task_instances(data_dir, mid, "ingest_pdf")[1]) for mid in crowd)
        if busy >= enough:
            break
        time.sleep(0.05)
    return busy
