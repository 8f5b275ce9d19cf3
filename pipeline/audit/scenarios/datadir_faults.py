"""The audit's data-dir faults: serve's spool directory replaced under it, and a stop that overruns because the
run store does not answer (both fixes of a session's probers; ``pipeline.datadir_watch``, ``[serve]
stop_margin_s``).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from ..base.faultcheck import Rows, burst_messages, figures, judge
from ..base.harness import row
from ..base.serveproc import Senders, ServeProcess, serving


def spool_replaced(work: Path, messages: int = 120, senders: int = 4, down_s: float = 8.0, margin_s: float = 2.0,
                   timeout_s: float = 300.0) -> Rows:
    """Move serve's spool directory away and make an empty one in its place (a mistaken ``mv``, a restore) while
    senders keep sending; after ``down_s``, move what landed in the new one back and put the old one back.
    Serve's handle still leads to the old directory, so each accept's fsync went there: it must answer 451
    meanwhile (*4xx after s*: from the swap), and every acked mail still ends in one run."""
    gap = (down_s + 2 * margin_s) * senders / messages  # sending spans the swap with a margin either side
    with serving(work / "data", work) as serve:
        spool = serve.data_dir / "spool"
        old = spool.with_name("spool.old")
        with Senders(serve.port, burst_messages("spool", messages), work, senders, gap_s=gap) as sending:
            sending.wait_acked(max(1, messages // 10), timeout_s)
            spool.rename(old)
            spool.mkdir()
            replaced = time.time()
            time.sleep(down_s)
            _put_back(spool, old)
            restored = time.time()
            replies = sending.wait(timeout_s)
        verdict = judge(serve.data_dir, replies, messages, timeout_s)
    refused = next((at for _, reply, at in replies.events if reply != "250" and at >= replaced), None)
    acked = sum(replaced <= at < restored for at in replies.acked_events)  # into the new directory, unsynced
    return figures("spool_replaced", verdict, replies, restored, down_s=down_s) + [
        row("spool_replaced", "acked_while_replaced", acked, "messages", 0)] + (
        [row("spool_replaced", "refused_after_s", refused - replaced, "s", 0, to="first refusal")] if refused else [])


def _put_back(spool: Path, old: Path) -> None:
    """Move every file the new ``spool`` took into ``old``, then put ``old`` back in its place."""
    while True:
        for path in list(spool.iterdir()):
            path.rename(old / path.name)
        try:
            spool.rmdir()
            break
        except OSError:  # a mail landed meanwhile
            continue
    old.rename(spool)


def stop_overrun(work: Path, messages: int = 40, senders: int = 2, grace_s: float = 1.0, margin_s: float = 3.0,
                 lock_s: float = 20.0, timeout_s: float = 300.0) -> Rows:
    """Lock serve's run store from another process (a 60 s busy timeout: serve waits on it) while mails arrive,
    then stop serve: the stop must end after the grace and ``[serve] stop_margin_s`` (exit 1), not when the lock
    goes. Once the lock is released serve starts again; every acked mail must end in exactly one run. *stop s*:
    SIGTERM → exit; *recover s*: restart → first 250."""
    config: dict[str, dict[str, Any]] = {"store": {"busy_timeout_ms": 60_000},
                                         "engine": {"shutdown_grace_s": grace_s}, "serve": {"stop_margin_s": margin_s}}
    serve = ServeProcess(work / "data", work, config)
    try:
        serve.start()
        with Senders(serve.port, burst_messages("overrun", messages), work, senders, gap_s=0.1) as sending:
            sending.wait_acked(max(1, messages // 4), timeout_s)
            holder = sqlite3.connect(serve.data_dir / "runs.sqlite3", timeout=30, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            locked = time.time()
            time.sleep(1.0)  # mails arrive into the lock
            stopped = time.time()
            code = serve.stop(timeout_s=grace_s + margin_s + 60)
            stop_s = time.time() - stopped
            time.sleep(max(0.0, locked + lock_s - time.time()))
            holder.rollback()
            holder.close()
            serve.start()
            answering = time.time()
            replies = sending.wait(timeout_s)
        verdict = judge(serve.data_dir, replies, messages, timeout_s)
    finally:
        serve.kill()
    return figures("stop_overrun", verdict, replies, answering, grace_s=grace_s, margin_s=margin_s) + [
        row("stop_overrun", "stop_s", stop_s, "s", 0, exit_code=code, limit_s=grace_s + margin_s),
        row("stop_overrun", "stop_exit_code", float(code if code is not None else -1), "code", 0)]
