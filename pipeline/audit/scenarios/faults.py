"""The audit's fault scenarios: each fault injected into a real ``python -m pipeline serve`` driven over SMTP.

Every fault is judged the same way (``faultcheck``), from the senders' reply
logs, the run store and the Maildir outbox (the relay's mailbox for ``bad_relay``): messages sent, acked (250), lost
(acked but no run, or a run that never reached a terminal state), duplicated
(more than one run or digest for a Message-ID), ended without a typed reason,
time to recover, and the replies senders saw. The server's behaviour is
measured, not assumed: a fault it does not survive shows up as figures, not as
an exception.
"""

from __future__ import annotations

import math
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from ... import store as s
from ..base import fixtures as fx
from ..base.fakerelay import DROP, Relay, running
from ..base.faultcheck import (
    MACHINE_CASES,
    Rows,
    attachment_files,
    bad_input_messages,
    burst_messages,
    case_outcomes,
    figures,
    judge,
    retries_logged,
    runs_by_message,
    skipped,
    task_instances,
    wait_terminal,
    waiting_runs,
    wild_mail_messages,
    worker_deaths,
)
from ..base.harness import frame, row, run_parts
from ..base.recorder import AuditRecorder
from ..base.serveproc import (
    GATEWAY_PROCESS,
    Replies,
    Senders,
    ServeProcess,
    digests_by_original,
    free_port,
    reply_of,
    serving,
)
from . import datadir_faults, mail_loop, monitoring, relay_hung, scaleout_faults

# -- the faults --------------------------------------------------------------------------------------------------


def kill_serve(work: Path, messages: int = 1000, senders: int = 8, kill_points: tuple[float, ...] = (0.25, 0.5, 0.75),
               timeout_s: float = 600.0) -> Rows:
    """``kill -9`` serve when each fraction of ``messages`` is acked, restart it at once; judge every acked one."""
    serve = ServeProcess(work / "data", work)
    rows: Rows = []
    kills: list[float] = []
    answering: list[float] = []  # when each restarted serve answered: a 250 logged before may be the dead one's
    try:
        serve.start()
        with Senders(serve.port, burst_messages("kill", messages), work, senders) as sending:
            for i, point in enumerate(kill_points):
                acked = sending.wait_acked(math.ceil(point * messages), timeout_s)
                serve.kill()
                kills.append(time.time())
                serve.start()
                answering.append(time.time())
                rows.append(row("kill_serve", "acked_at_kill", acked, "messages", i, kill_point=point,
                                restart_s=answering[-1] - kills[-1]))
            replies = sending.wait(timeout_s)
        verdict = judge(serve.data_dir, replies, messages, timeout_s)
    finally:
        serve.kill()
    for i, (point, killed_at, answered_at) in enumerate(zip(kill_points, kills, answering, strict=True)):
        first = replies.first_ack_after(answered_at)
        if first is not None:
            rows.append(row("kill_serve", "recover_s", first - killed_at, "s", i, kill_point=point,
                            to="first 250 after the restarted serve answered"))
    return rows + figures("kill_serve", verdict, replies, None, kills=len(kill_points), senders=senders)


VICTIM_ID = "<worker-victim@faults.audit>"


def kill_worker(work: Path, pdf: Path, timeout_s: float = 300.0) -> Rows:
    """``kill -9`` an extraction worker provably mid-way through the victim document (its ingest_pdf task running,
    the worker's CPU time growing, the run's text file open in it). By design the pool answers that with
    WorkerCrashedError and the runner tries ingest_pdf again (try 2); the figures say whether it did, what the
    store and serve's log recorded, whether the run ended typed, and whether a later PDF still succeeds."""
    big = fx.email_with([(Path(pdf).name, Path(pdf).read_bytes())], message_id=VICTIM_ID)
    small = burst_messages("after-worker-kill", 1, pdf_every=1)
    with serving(work / "data", work) as serve:
        with Senders(serve.port, [(VICTIM_ID, big)], work, 1) as sending:
            replies = sending.wait(timeout_s)
        found = _worker_on_run(serve, VICTIM_ID, timeout_s=60.0)
        if found is None:
            return skipped("kill_worker", "no extraction worker was caught mid-way through the victim document: "
                                          "it was extracted before one could be killed (use a larger PDF)")
        victim, run_id, evidence = found
        victim.kill()
        killed_at = time.time()
        seen_errors = _errors_while_retrying(serve.data_dir, timeout_s)
        ended = judge(serve.data_dir, replies, 1, timeout_s)["last_ended_at"]  # before the next mail is sent
        _, tasks = task_instances(serve.data_dir, VICTIM_ID, "ingest_pdf")
        with Senders(serve.port, small, work, 1) as sending:
            replies = Replies(replies.events + sending.wait(timeout_s).events)
        verdict = judge(serve.data_dir, replies, 2, timeout_s)
        workers = {p.pid for p in serve.extract_workers()}
        victim_case, follow = case_outcomes(serve.data_dir, [("victim", VICTIM_ID), ("next_pdf", small[0][0])])
        log_text = serve.log_path.read_text(errors="replace")
    retries = retries_logged(log_text, run_id)
    # a retry that succeeded leaves no error on the task in the store: name it from serve's log
    victim_case["task_errors"] = ", ".join(filter(None, [victim_case["task_errors"], *(f"{r} (retried)"
                                                                                      for r in retries)]))
    rows = figures("kill_worker", verdict, replies, None)
    if ended:
        rows.append(row("kill_worker", "victim_ended_s", ended - killed_at, "s", 0, to="the victim's run ended"))
    rows.append(row("kill_worker", "victim_worker_mid_document", 1.0, "bool", 0, pid=victim.pid, run_id=run_id,
                    **evidence))
    rows += _victim_rows(attachment_files(serve.data_dir, run_id), victim.pid, tasks, seen_errors, log_text, retries)
    rows.append(row("kill_worker", "victim_run_typed", float(victim_case.pop("typed")), "bool", 0, **victim_case))
    rows.append(row("kill_worker", "next_pdf_succeeded", float(follow["state"] == s.SUCCESS), "bool", 0,
                    workers_after=len(workers), victim_replaced=victim.pid not in workers and bool(workers)))
    return rows


def _victim_rows(documents: set[str], pid: int, tasks: list[dict[str, Any]], seen_errors: set[str], log_text: str,
                 retries: list[str]) -> Rows:
    """Whether serve's log says the killed pid died on one of this run's ``documents``, and each ingest_pdf
    instance's tries and events as the store has them."""
    died = worker_deaths(log_text).get(pid)
    served = died is not None and died[0] in documents
    rows = [row("kill_worker", "killed_worker_served_victim", float(served), "bool", 0, pid=pid,
                logged=f"died on {died[0]} ({died[1]})" if died else "no death logged for this pid")]
    return rows + [row("kill_worker", "victim_task_try_number", t["try_number"], "tries", i, task=t["task_id"],
                       state=t["state"], events=t["events"], error_while_retrying=", ".join(sorted(seen_errors)),
                       retries_logged="; ".join(retries))
                   for i, t in enumerate(tasks)]


def _worker_on_run(serve: ServeProcess, message_id: str, timeout_s: float
                   ) -> tuple[psutil.Process, int, dict[str, Any]] | None:
    """An extraction worker provably working on ``message_id``'s document right now: its ingest_pdf task is
    running (try 1), the worker's CPU time grows, and it has that run's text file open. Polled until
    ``timeout_s`` or the task is no longer on its first try."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run_id, tasks = task_instances(serve.data_dir, message_id, "ingest_pdf")
        if tasks and not any(t["state"] in (s.QUEUED, s.RUNNING) and t["try_number"] <= 1 for t in tasks):
            return None  # extracted (or failed) before a worker could be caught on it
        running = [t for t in tasks if t["state"] == s.RUNNING and t["try_number"] == 1]
        if run_id is None or not running:
            time.sleep(0.02)
            continue
        busy = _busy_workers(serve.extract_workers(), window_s=0.1)
        run_dir = str(serve.data_dir / "work" / str(run_id)) + "/"
        for cpu_s, worker in busy:
            try:
                held = [f.path for f in worker.open_files() if f.path.startswith(run_dir)]
            except psutil.Error:
                continue
            if held:
                return worker, run_id, {"task": running[0]["task_id"], "cpu_growth_s": round(cpu_s, 3),
                                        "file_open": Path(held[0]).name}
    return None


def _busy_workers(workers: list[psutil.Process], window_s: float) -> list[tuple[float, psutil.Process]]:
    """``(CPU seconds used during window_s, worker)`` of the workers whose CPU time grew, busiest first."""
    before: dict[int, float] = {}
    for w in workers:
        try:
            before[w.pid] = sum(w.cpu_times()[:2])
        except psutil.Error:
            continue
    time.sleep(window_s)
    grown = []
    for w in workers:
        try:
            delta = sum(w.cpu_times()[:2]) - before[w.pid]
        except (psutil.Error, KeyError):
            continue
        if delta > 0.01:
            grown.append((delta, w))
    return sorted(grown, key=lambda pair: -pair[0])


def _errors_while_retrying(data_dir: Path, timeout_s: float) -> set[str]:
    """The error types the store shows on the victim's ingest_pdf instances while they wait to retry, followed
    until every instance is past its first try or has ended (the store keeps only the latest try's error)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, tasks = task_instances(data_dir, VICTIM_ID, "ingest_pdf")
        seen |= {t["error_type"] for t in tasks if t["state"] == s.RETRYING and t["error_type"]}
        if tasks and all(t["try_number"] > 1 or t["state"] in s.TERMINAL_TASK_STATES for t in tasks):
            return seen
        time.sleep(0.02)
    return seen


_LOCK_HOLDER = """import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def hold_store_lock(db_path: Path, seconds: float) -> tuple[float, float]:
    """Hold ``BEGIN EXCLUSIVE`` on the store from another process for ``seconds``; return (locked, released)."""
    proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(db_path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "locked":
            raise RuntimeError("the lock holder could not lock the store")
        locked = time.time()
        proc.wait(seconds + 120)
        return locked, time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def store_locked(work: Path, messages: int = 200, senders: int = 4, lock_s: float = 10.0,
                 busy_timeout_ms: int = 1000, timeout_s: float = 300.0, margin_s: float = 2.0) -> Rows:
    """Lock the run store from another process for ``lock_s`` while senders keep sending at a steady pace, from
    about ``margin_s`` before the lock to ``margin_s`` after it."""
    gap = (lock_s + 2 * margin_s) * senders / messages  # sending spans the lock with a margin either side
    metrics_port = free_port()
    with serving(work / "data", work, {"store": {"busy_timeout_ms": busy_timeout_ms}},
                 args=("--metrics-port", str(metrics_port))) as serve:
        with Senders(serve.port, burst_messages("locked", messages), work, senders, gap_s=gap) as sending:
            sending.wait_acked(max(1, messages // 10), timeout_s)
            with monitoring.timed_scrapes(metrics_port) as scrapes:  # what Prometheus sees of serve meanwhile
                locked, released = hold_store_lock(serve.data_dir / "runs.sqlite3", lock_s)
            replies = sending.wait(timeout_s)
        verdict = judge(serve.data_dir, replies, messages, timeout_s)
    during = [r for _, r, at in replies.events if locked <= at <= released]
    scraped = [(seconds, ok) for at, seconds, ok in scrapes if locked <= at <= released]
    return figures("store_locked", verdict, replies, released, lock_s=lock_s, busy_timeout_ms=busy_timeout_ms) + [
        row("store_locked", "replies_during_lock", during.count("250"), "replies", 0, reply="250"),
        row("store_locked", "replies_during_lock", len(during) - during.count("250"), "replies", 0, reply="other"),
        row("store_locked", "scrape_max_s", max((s_ for s_, _ in scraped), default=float("nan")), "s", 0,
            scrapes=len(scraped)),
        row("store_locked", "scrapes_failed", sum(not ok for _, ok in scraped), "scrapes", 0, scrapes=len(scraped))]


def hung_gateway(work: Path, messages: int = 200, senders: int = 4, hung_after_s: float = 5.0,
                 timeout_s: float = 300.0, margin_s: float = 2.0) -> Rows:
    """Stop serve's gateway process (SIGSTOP: its event loop hangs, as a deadlock would leave it) while senders
    keep sending at a steady pace; serve kills it after ``[serve] gateway_hung_after_s`` (``hung_after_s`` here;
    30 s by default) and starts another. *recover s* runs from the hang to the first 250 from the new gateway:
    the first one logged after the hung process was gone, since a 250 it wrote just before the hang can reach its
    sender a moment after it (CI saw a "recovery" of 0.1 ms)."""
    gap = (hung_after_s + 2 * margin_s) * senders / messages  # sending spans the hang with a margin either side
    with serving(work / "data", work, {"serve": {"gateway_hung_after_s": hung_after_s}}) as serve:
        with Senders(serve.port, burst_messages("hung", messages), work, senders, gap_s=gap) as sending:
            sending.wait_acked(max(1, messages // 10), timeout_s)
            [child] = [p for p in serve.descendants() if GATEWAY_PROCESS in _command(p)]
            hung_at = time.time()
            child.suspend()
            gone = _wait_gone(child, hung_after_s + 60)
            replies = sending.wait(timeout_s)
        verdict = judge(serve.data_dir, replies, messages, timeout_s)
    return figures("hung_gateway", verdict, replies, hung_at, answered_from=gone, hung_after_s=hung_after_s) + [
        row("hung_gateway", "killed_after_s", gone - hung_at, "s", 0, to="serve killed the hung gateway")]


def _command(proc: psutil.Process) -> str:
    """The command line of ``proc``; "" for one that ended meanwhile."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _wait_gone(proc: psutil.Process, timeout_s: float) -> float:
    """When ``proc`` ended (wall time); TimeoutError if it outlives ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return time.time()
        except psutil.NoSuchProcess:
            return time.time()
        time.sleep(0.05)
    raise TimeoutError(f"the hung gateway process {proc.pid} was not killed within {timeout_s:g} s")


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the disk is full; return the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                written += fh.write(chunk)
            except OSError:
                if len(chunk) <= 4096:
                    return written
                chunk = chunk[: len(chunk) // 16]  # top up the last megabyte in smaller pieces


def disk_full(work: Path, messages: int = 40, senders: int = 2, full_s: float = 5.0, size_mb: int = 48,
              timeout_s: float = 300.0) -> Rows:
    """Serve on a small tmpfs filled with ballast while senders send; remove the ballast ``full_s`` after the
    first refusal (the spool is full: the first mail is refused)."""
    mount = work / "disk"
    return _on_full_disk("disk_full", mount, mount / "data", work, messages, senders, full_s, size_mb, timeout_s)


def work_disk_full(work: Path, messages: int = 40, senders: int = 2, full_s: float = 5.0, size_mb: int = 16,
                   timeout_s: float = 300.0, span_s: float = 8.0) -> Rows:
    """Only serve's work dir (``data/work``: attachments, text, digests) on a small tmpfs filled with ballast:
    the spool has room, so the first mails are acked, and their runs must wait for room, not fail (they all
    failed ``task_io`` for good before, with serve healthy). Senders keep sending for ``span_s``, so the mails
    after the engine saw the machine short are refused with 451 (*refused after s*: how long the gateway acked
    mail before that); the ballast is removed ``full_s`` after the first refusal."""
    data_dir = work / "data"
    return _on_full_disk("work_disk_full", data_dir / "work", data_dir, work, messages, senders, full_s, size_mb,
                         timeout_s, span_s)


def outbox_full(work: Path, messages: int = 40, senders: int = 2, full_s: float = 5.0, size_mb: int = 16,
                timeout_s: float = 300.0, span_s: float = 8.0) -> Rows:
    """Only the outbox (``data/outbox``, the Maildir digests go into) on a small tmpfs filled with ballast: the
    runs get as far as delivery and must wait there for room, not fail (every digest was lost after deliver's
    13-26 minutes of retries, serve healthy throughout), the gateway answering 451 meanwhile, as in
    ``work_disk_full``."""
    data_dir = work / "data"
    return _on_full_disk("outbox_full", data_dir / "outbox", data_dir, work, messages, senders, full_s, size_mb,
                         timeout_s, span_s)


def _on_full_disk(fault: str, mount: Path, data_dir: Path, work: Path, messages: int, senders: int, full_s: float,
                  size_mb: int, timeout_s: float, span_s: float = 0.0) -> Rows:
    """Serve on ``data_dir`` with a tmpfs of ``size_mb`` on ``mount`` filled with ballast while senders send
    (spread over ``span_s``); the ballast is removed ``full_s`` after the first refusal senders see, or after
    they all finished if none came."""
    mount.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return skipped(fault, f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        with serving(data_dir, work) as serve:
            ballast = mount / "ballast"
            _fill(ballast)
            filled = time.time()
            gap = span_s * senders / messages
            with Senders(serve.port, burst_messages(fault, messages), work, senders, gap_s=gap) as sending:
                refused = sending.wait_refused(timeout_s)
                waiting = _sample_waiting(serve.data_dir, full_s)
                ballast.unlink()
                removed = time.time()
                replies = sending.wait(timeout_s)
            leftovers = len(list((serve.data_dir / "spool").glob(".incoming-*.tmp")))
            verdict = judge(serve.data_dir, replies, messages, timeout_s)
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    acked_full = sum(filled <= at < removed for at in replies.acked_events)
    first = replies.events[0][2] if replies.events else removed
    return figures(fault, verdict, replies, removed, size_mb=size_mb, full_s=full_s) + [
        row(fault, "partial_spool_files", leftovers, "files", 0),
        row(fault, "acked_while_full", acked_full, "messages", 0),  # each must still end in exactly one run
        row(fault, "waiting_runs", waiting[0], "runs", 0),
        row(fault, "waiting_unexplained", waiting[1], "runs", 0),
        *([row(fault, "refused_after_s", refused - first, "s", 0, to="first refusal")] if refused else [])]


def _sample_waiting(data_dir: Path, seconds: float, every_s: float = 0.25) -> tuple[int, int]:
    """For ``seconds``: the most runs seen waiting (queued again after their start), and the most of them seen
    with no reason saying why (``show`` must not just say "queued")."""
    most, unexplained = 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        waiting, silent = waiting_runs(data_dir)
        most, unexplained = max(most, waiting), max(unexplained, silent)
        time.sleep(every_s)
    return most, unexplained


_SNAPSHOT_HOLDER = """import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("BEGIN")
db.execute("SELECT count(*) FROM runs").fetchone()
print("reading", flush=True)
sys.stdin.read()
db.execute("COMMIT")
"""


def wal_reader(work: Path, messages: int = 400, senders: int = 4, after: int = 20, timeout_s: float = 300.0) -> Rows:
    """Another process holds an old snapshot of serve's store (a ``sqlite3`` shell left in a transaction, a long
    backup) while senders send ``messages``: SQLite cannot reuse the WAL, which grows; once the reader goes,
    ``after`` more mails reuse it and it is cut back (``journal_size_limit``). *recover s*: reader gone → the
    first of those mails acked."""
    fault = "wal_reader"
    with serving(work / "data", work) as serve:
        wal = serve.data_dir / "runs.sqlite3-wal"
        reader = subprocess.Popen([sys.executable, "-c", _SNAPSHOT_HOLDER, str(serve.data_dir / "runs.sqlite3")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout is not None and reader.stdin is not None
            if reader.stdout.readline().strip() != "reading":
                raise RuntimeError("the snapshot holder could not read the store")
            burst = burst_messages(fault, messages + after)
            for batch in ("held", "after"):
                (work / batch).mkdir(parents=True, exist_ok=True)
            with Senders(serve.port, burst[:messages], work / "held", senders) as sending:
                held = sending.wait(timeout_s)
            wait_terminal(serve.data_dir, list(held.acked), timeout_s)
            peak = _size(wal)
            reader.stdin.close()  # the reader commits and goes
            reader.wait(60)
            released = time.time()
            with Senders(serve.port, burst[messages:], work / "after", senders) as sending:
                later = sending.wait(timeout_s)
            replies = Replies(sorted(held.events + later.events, key=lambda e: e[2]))
            verdict = judge(serve.data_dir, replies, messages + after, timeout_s)
            cut_back = _size(wal)
        finally:
            if reader.poll() is None:
                reader.kill()
            reader.wait()
            for stream in (reader.stdin, reader.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
    return figures(fault, verdict, replies, released) + [
        row(fault, "wal_peak_mb", peak / 2**20, "MB", 0, to="while the reader held its snapshot"),
        row(fault, "wal_after_mb", cut_back / 2**20, "MB", 0, to=f"{after} mails after the reader went")]


def drop_backlog(work: Path, files: int = 3000, mails: int = 20, senders: int = 2, timeout_s: float = 600.0) -> Rows:
    """Serve started on ``files`` mails waiting in ``inbox/new/`` (dropped while it was down), and ``mails`` sent
    over SMTP meanwhile: *recover s* is start → SMTP answering (a backlog taken before serve was up held start-up
    past its 60 s limit), *drain s* start → last run ended; every file and mail must end in exactly one run."""
    fault = "drop_backlog"
    data = work / "data"
    new = data / "inbox" / "new"
    new.mkdir(parents=True, exist_ok=True)
    burst = burst_messages(fault, files + mails)
    for i, (_, raw) in enumerate(burst[:files]):
        (new / f"{i:06d}.eml").write_bytes(raw)
    started = time.time()
    serve = ServeProcess(data, work, drop_folder=True)
    try:
        serve.start()
        answering = time.time()
        (work / "smtp").mkdir(parents=True, exist_ok=True)
        with Senders(serve.port, burst[files:], work / "smtp", senders) as sending:
            sent = sending.wait(timeout_s)
        dropped = [(message_id, "250", started) for message_id, _ in burst[:files]]  # taken as files, not sent
        replies = Replies(sorted(dropped + sent.events, key=lambda e: e[2]))
        verdict = judge(serve.data_dir, replies, files + mails, timeout_s)
    finally:
        serve.kill()
    rows = figures(fault, verdict, replies, None, files=files)
    rows.append(row(fault, "recover_s", answering - started, "s", 0, to="SMTP answering"))
    if verdict["last_ended_at"]:
        rows.append(row(fault, "drain_s", verdict["last_ended_at"] - started, "s", 0, to="backlog drained"))
    return rows


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def bad_input(work: Path, timeout_s: float = 300.0) -> Rows:
    """Send a damaged-page PDF, a From: decoding to CR/LF and a quoted local part; record each typed outcome."""
    cases = bad_input_messages()
    with serving(work / "data", work) as serve:
        with Senders(serve.port, [(mid, raw) for _, mid, raw in cases], work, 1) as sending:
            replies = sending.wait(timeout_s)
        verdict = judge(serve.data_dir, replies, len(cases), timeout_s)
        outcomes = case_outcomes(serve.data_dir, [(case, mid) for case, mid, _ in cases])
    wild = {case for case, _, _ in wild_mail_messages()}  # each carries one PDF; MACHINE_CASES want no digest
    missed = sum(1 - min(o["pdfs"], 1) for o in outcomes if o["case"] in wild)
    answered = sum(o["digests"] for o in outcomes if o["case"] in MACHINE_CASES)
    return figures("bad_input", verdict, replies, None) + [
        row("bad_input", "case_typed", float(o.pop("typed")), "bool", i, **o) for i, o in enumerate(outcomes)
    ] + [row("bad_input", "wild_mail_pdfs_missed", missed, "pdfs", 0, cases=len(wild)),
         row("bad_input", "automatic_mail_answered", answered, "digests", 0)
         ] + mail_loop.mail_loop(work / "loop", timeout_s=min(timeout_s, mail_loop.LOOP_WATCH_S))


# the digest's recipient (the mail's envelope sender) -> (the relay's scripts for that recipient's sessions,
# the run's state, the copies the relay should take, the deliver task's tries): greylisting (451 to RCPT until
# the third session), a connection lost mid-DATA, a 421 to QUIT after the relay took the digest, a permanent
# refusal at the final dot
RELAY_CASES: dict[str, tuple[list[dict[str, str]], str, int, int]] = {
    "greylisted": ([{"rcpt": "451 4.7.1 greylisted, come back later"}] * 2 + [{}], s.SUCCESS, 1, 3),
    "dropped": ([{"data": DROP}, {}], s.SUCCESS, 1, 2),
    "quit_421": ([{"quit": "421 4.3.0 shutting down"}], s.SUCCESS, 1, 1),
    "refused": ([{"dot": "554 5.7.1 message rejected"}], s.FAILED, 0, 1),
}


def bad_relay(work: Path, timeout_s: float = 120.0) -> Rows:
    """A serve whose ``[delivery] relay`` behaves as relays in the wild do (``RELAY_CASES``; the relay is
    outside the machine, so it is ``fakerelay``), one mail per behaviour from a sender of that name: each
    digest the relay took once, a permanent refusal failing its run at once with what the relay said."""
    mailbox_dir = work / "relay-mailbox"
    relay = Relay([{}], by_recipient={case: scripts for case, (scripts, *_) in RELAY_CASES.items()},
                  mailbox=mailbox_dir)
    replies = Replies()
    with running(relay), serving(work / "data", work, {"delivery": {"relay": relay.url}}) as serve:
        for case in RELAY_CASES:
            message_id = f"<relay-{case}@faults.audit>"
            raw = fx.email_with([], sender=f"{case}@example.com", message_id=message_id)
            try:
                with smtplib.SMTP("127.0.0.1", serve.port, timeout=60) as smtp:
                    smtp.sendmail(f"{case}@example.com", ["digest@pipeline.local"], raw)
                reply = "250"
            except (OSError, smtplib.SMTPException) as exc:
                reply = reply_of(exc)
            replies.events.append((message_id, reply, time.time()))
        verdict = judge(serve.data_dir, replies, len(RELAY_CASES), timeout_s, outbox=mailbox_dir)
        copies = digests_by_original(mailbox_dir)
        runs = runs_by_message(serve.data_dir)
        outcomes: list[dict[str, Any]] = []
        for case, (_, state, want_copies, want_tries) in RELAY_CASES.items():
            message_id = f"<relay-{case}@faults.audit>"
            found = runs.get(message_id)
            run = found[-1] if found else None
            _, deliver = task_instances(serve.data_dir, message_id, "deliver")
            tries = deliver[0]["try_number"] if deliver else None
            got = {"state": run.state if run else "no run", "copies": copies.get(message_id, 0),
                   "deliver_tries": tries, "reason": (run.reason or "")[:200] if run else ""}
            outcomes.append({"case": case, **got, "as_expected": (got["state"], got["copies"], tries) == (
                state, want_copies, want_tries), "expected": f"{state}, {want_copies} copies, {want_tries} tries"})
    unexpected = sum(not o["as_expected"] for o in outcomes)
    return figures("bad_relay", verdict, replies, None) + [
        row("bad_relay", "relay_case_as_expected", float(o.pop("as_expected")), "bool", i, **o)
        for i, o in enumerate(outcomes)] + [row("bad_relay", "relay_cases_unexpected", unexpected, "cases", 0,
                                                cases=len(outcomes))]


FAULTS = ("kill_serve", "kill_worker", "store_locked", "wal_reader", "hung_gateway", "disk_full", "work_disk_full",
          "outbox_full", "spool_replaced", "stop_overrun", "store_server_down", "scheduler_killed", "scheduler_frozen",
          "drop_backlog", "bad_input", "bad_relay", "relay_hung")


def fault_figures(work: Path, params: dict[str, dict[str, Any]], only: tuple[str, ...] = FAULTS,
                  recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Run each fault in ``only`` with its ``params`` (keyword arguments) in its own directory under ``work``.

    A fault whose harness fails is recorded as an ``error`` row with the message, and the others still run.
    """
    runners: dict[str, Callable[..., Rows]] = {
        "kill_serve": kill_serve, "kill_worker": kill_worker, "store_locked": store_locked, "wal_reader": wal_reader,
        "drop_backlog": drop_backlog,
        "hung_gateway": hung_gateway, "disk_full": disk_full, "work_disk_full": work_disk_full,
        "outbox_full": outbox_full, "spool_replaced": datadir_faults.spool_replaced,
        "stop_overrun": datadir_faults.stop_overrun, "store_server_down": scaleout_faults.store_server_down,
        "scheduler_killed": scaleout_faults.scheduler_killed, "scheduler_frozen": scaleout_faults.scheduler_frozen,
        "bad_input": bad_input, "bad_relay": bad_relay, "relay_hung": relay_hung.relay_hung}
    rows = run_parts(runners, only, params, work, "fault", "faults")
    if recorder is not None:
        recorder.record("faults", pd.DataFrame(rows))
    return frame(rows)
