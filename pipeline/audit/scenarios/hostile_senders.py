"""The audit's hostile senders (issue 11), each against a real ``python -m pipeline serve`` on loopback.

Eight figures, each with its before/after where a setting switches the behaviour:

- sessions: a normal client's whole-transaction latency (connect → final 250) while N idle sessions are held
  open, N = 0, half the session limit, the limit, the limit + extra; what the idle connections got (220 or 421);
  that the normal client gets in once a slot is freed; and serve's log bytes per 1,000 refused connections.
- memory: serve's peak RSS (serve alone, and its worker processes) while large mails arrive at once, with
  ``gateway.stream_data`` and ``ingest.parse_isolate`` off (before) and on (after).
- head of line: a hostile slow PDF first, a normal small PDF 1 s later; the normal one's end-to-end time
  (DATA end → run ended) with ``ingest.fair_extraction`` off and on, the hostile run's outcome and the
  partial text it left.
- head of line, many PDFs: a mail of several hostile slow PDFs first, the normal one 1 s later, with
  ``ingest.fair_by_mail`` off (the PDFs share the workers one by one) and on (mails do); and the same with
  ``ingest.mail_timeout_s`` out of reach and set (mail budget): the hostile run's time, its PDFs not read.
- head of line, a crowd (``hostile_crowd``): ten mails of slow PDFs at once, then the normal one, with
  ``runner.extract_pool`` and ``ingest.newcomer_s`` off and on.
- spool lifecycle: spool and work bytes per 1,000 mails before and after ``python -m pipeline purge``, the
  bytes purge reports, and the runs and digests a restart re-creates (expected none).
- pipelining (``hostile_pipelining``): a normal client's mail beside a client that pipelines commands without
  pause, with ``gateway.fair_share_replies`` off and on; and a NOOP flood ended by ``gateway.max_junk_commands``.
- abandoned accepts: senders that close the connection right after their final dot, never reading the reply,
  many at once (more than the gateway's accept threads), then send every message again as an MTA would: the
  accepts dropped, the spool temp files and gateway descriptors left, messages without exactly one run.

Figures are measured, never assumed: a server that does not hold shows it in the rows, not as an exception.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from ... import store as s
from ..base import fixtures as fx
from ..base.faultcheck import Rows, burst_messages, runs_by_message, task_instances, wait_terminal
from ..base.harness import frame, row, run_parts
from ..base.recorder import AuditRecorder
from ..base.serveproc import RECIPIENT, SENDER, Senders, ServeProcess, digests_by_original, serving, timed_sends
from .hostile_checks import (
    MB,
    IdleSessions,
    RssSampler,
    connect_churn,
    in_clients,
    log_since,
    log_size,
    message_template,
    serve_connections,
    stream_file,
    tree_bytes,
    wait_connections_at_most,
)
from .hostile_crowd import head_of_line_crowd
from .hostile_pipelining import pipelining
from .hostile_quota import digest_flood
from .pipeline_profile import role_of

SCENARIO = "hostile"
MODES = (("before", False), ("after", True))  # (mode, the switches' value)


def _small_mails(prefix: str, count: int) -> list[bytes]:
    """``count`` small text mails with unique Message-IDs."""
    return [fx.email_with([], subject="normal client", message_id=f"<{prefix}-{i}@hostile.audit>")
            for i in range(count)]


# -- sessions ----------------------------------------------------------------------------------------------------


def sessions(work: Path, limit: int = 100, extra: int = 100, sends: int = 20, release: int = 10,
             churn: int = 1000) -> Rows:
    """Hold N idle sessions open for N in (0, limit/2, limit, limit + extra) with ``gateway.max_sessions =
    limit``; at each N a normal client sends ``sends`` small mails, each on a new connection. At N >= limit,
    ``release`` idle sessions are then closed and the client sends again. Last, with the slots full, ``churn``
    connections one after another measure serve's log growth per refused connection."""
    config = {"gateway": {"max_sessions": limit, "command_timeout_s": 600.0, "session_timeout_s": 900.0}}
    rows: Rows = []
    with serving(work / "data", work, config) as serve:
        for level in (0, limit // 2, limit, limit + extra):
            rows += _session_level(serve, level, limit, sends, release if level >= limit else 0)
        rows += _refusal_log(serve, limit, churn)
    return rows


def _session_level(serve: ServeProcess, level: int, limit: int, sends: int, release: int) -> Rows:
    """The figures of one level of idle sessions (and, with ``release``, after freeing that many)."""
    wait_connections_at_most(serve, 0)  # the previous level's sessions are gone from serve too
    tags = {"level": level, "limit": limit, "phase": "held"}
    with IdleSessions(serve.port, level) as idle:
        held = serve_connections(serve)
        rows = [row("sessions", "idle_replies", n, "connections", 0, reply=reply, **tags)
                for reply, n in sorted(idle.replies.items())]
        rows.append(row("sessions", "serve_connections", held, "connections", 0, **tags))
        got = idle.replies.get("220", 0)
        rows.append(row("sessions", "over_limit_accepted", max(0, got - limit), "connections", 0, **tags))
        rows.append(row("sessions", "under_limit_refused", max(0, min(level, limit) - got), "connections", 0,
                        **tags))
        rows += _normal_client(serve.port, f"level{level}", sends, **tags)
        if release:
            closed = idle.release(release)
            still = sum(1 for sock in idle.socks if idle.first.get(sock) == "220")
            wait_connections_at_most(serve, still)
            tags = {**tags, "phase": "after_release", "released": closed}
            found = _normal_client(serve.port, f"level{level}-released", sends, **tags)
            acked = sum(r["value"] for r in found if r["metric"] == "normal_replies" and r["tags"]["reply"] == "250")
            rows += found + [row("sessions", "normal_through_after_release", float(acked == sends), "bool", 0,
                                 **tags)]
    return rows


def _normal_client(port: int, prefix: str, sends: int, **tags: Any) -> Rows:
    """A normal client's ``sends`` transactions from a client process: latency of each 250, replies counted."""
    results = in_clients(timed_sends, [(port, _small_mails(prefix, sends))])[0]
    rows = [row("sessions", "normal_latency_ms", seconds * 1000, "ms", i, **tags)
            for i, (reply, seconds) in enumerate(results) if reply == "250"]
    return rows + [row("sessions", "normal_replies", n, "sends", 0, reply=reply, **tags)
                   for reply, n in sorted(Counter(reply for reply, _ in results).items())]


def _refusal_log(serve: ServeProcess, limit: int, churn: int) -> Rows:
    """Fill every slot, then connect ``churn`` times: serve's log bytes and tracebacks per 1,000 refused."""
    wait_connections_at_most(serve, 0)
    with IdleSessions(serve.port, limit):
        offset = log_size(serve)
        seen = in_clients(connect_churn, [(serve.port, churn)])[0]
        time.sleep(1.0)  # let serve write what it logs about the last ones
        grown, text = log_size(serve) - offset, log_since(serve, offset)
    refused = seen.get("421", 0)
    tags = {"level": limit, "limit": limit, "phase": "churn", "connections": churn}
    rows = [row("sessions", "churn_replies", n, "connections", 0, reply=reply, **tags)
            for reply, n in sorted(seen.items())]
    rows += [row("sessions", "log_bytes", grown, "bytes", 0, refused=refused, **tags),
             row("sessions", "tracebacks_logged", text.count("Traceback"), "tracebacks", 0, refused=refused, **tags)]
    if refused:
        rows.append(row("sessions", "log_bytes_per_1000_refused", grown * 1000 / refused, "bytes", 0, **tags))
    return rows


# -- memory ------------------------------------------------------------------------------------------------------


def memory(work: Path, mails: int = 10, mail_mb: float = 44, reps: int = 1, cache_dir: Path | None = None,
           timeout_s: float = 900.0) -> Rows:
    """Serve's peak RSS while ``mails`` mails of about ``mail_mb`` MB (PDF attachments) arrive at once, before
    (stream_data and parse_isolate off, no in-flight cap) and after (both on, the default cap), interleaved."""
    template = _large_mail(Path(cache_dir or work), mail_mb, work / f"large-{mail_mb:g}mb.eml")
    rows: Rows = []
    for rep in range(reps):
        for mode, on in MODES:
            config: dict[str, dict[str, Any]] = {"gateway": {"stream_data": on}, "ingest": {"parse_isolate": on}}
            if not on:  # the old gateway had no in-flight cap: measure it without one
                config["gateway"]["max_inflight_bytes"] = 1 << 40
            rows += _memory_once(work / f"memory-{mode}-{rep}", config, template, mails, rep, timeout_s,
                                 mode=mode, mails=mails, nominal_mb=mail_mb,
                                 mail_mb=round(template.stat().st_size / MB, 1))
    return rows


PLACEHOLDER = "<hostile-large-00000000@hostile.audit>"


def _large_mail(cache_dir: Path, mail_mb: float, path: Path) -> Path:
    """A mail of about ``mail_mb`` MB: mixed (image and text) PDFs of at most 16 MB each, base64 in MIME."""
    pdf_mb = mail_mb / 1.37  # base64 in 76-character lines: 4/3 × 78/76
    parts = max(1, math.ceil(pdf_mb / 16))
    pdf = fx.cached(cache_dir, f"hostile-mixed-{pdf_mb / parts:.1f}mb.pdf", {"mb": round(pdf_mb / parts, 1)},
                    lambda: fx.image_pdf_of_size(pdf_mb / parts, text_lines=20))
    return message_template(path, [(f"part-{i}.pdf", pdf.read_bytes()) for i in range(parts)], PLACEHOLDER)


def _memory_once(work: Path, config: dict[str, dict[str, Any]], template: Path, count: int, rep: int,
                 timeout_s: float, **tags: Any) -> Rows:
    """One serve, ``count`` client processes streaming the template at once; RSS sampled until the runs end."""
    ids = [PLACEHOLDER.replace("00000000", f"{rep:02d}{i:06d}") for i in range(count)]
    with serving(work / "data", work, config) as serve:
        sampler = RssSampler(serve)
        sampler.sample()
        idle_serve = sampler.peak_serve
        with sampler:
            started = time.monotonic()
            sent = in_clients(stream_file, [(serve.port, str(template), PLACEHOLDER.encode(), mid.encode(), 30, 1.0)
                                            for mid in ids], timeout_s)
            accepted_s = time.monotonic() - started
            acked = [mid for mid, (_, last, _, _) in zip(ids, sent, strict=True) if last == "250"]
            runs = wait_terminal(serve.data_dir, acked, timeout_s)
    failed = sum(1 for mid in acked for r in runs.get(mid, []) if r.state != s.SUCCESS)
    rows = [row("memory", metric, value / MB, "MB", rep, **tags) for metric, value in (
        ("serve_peak_rss_mb", sampler.peak_serve), ("workers_peak_rss_mb", sampler.peak_workers),
        ("total_peak_rss_mb", sampler.peak_total), ("serve_idle_rss_mb", idle_serve))]
    rows += [row("memory", "first_replies", n, "mails", rep, reply=reply, **tags)
             for reply, n in sorted(Counter(first for first, _, _, _ in sent).items())]
    return rows + [row("memory", "accepted", len(acked), "mails", rep, **tags),
                   row("memory", "tries", sum(t for _, _, _, t in sent), "transactions", rep, **tags),
                   row("memory", "all_accepted_s", accepted_s, "s", rep, **tags),
                   row("memory", "runs_not_succeeded", failed, "runs", rep, samples=sampler.taken, **tags)]


# -- head-of-line blocking ---------------------------------------------------------------------------------------


def head_of_line(work: Path, timeout_s: float = 10.0, slow_pages: int = 200, gap_s: float = 1.0, reps: int = 1,
                 wait_s: float = 300.0) -> Rows:
    """A hostile slow PDF mailed first, a normal one-page PDF ``gap_s`` after its 250; with
    ``ingest.fair_extraction`` off (before) and on (after), ``ingest.timeout_s`` short to keep it brief."""
    return _both_modes(work, "head_of_line", 1, slow_pages, lambda on: {"timeout_s": timeout_s, "fair_extraction": on},
                       gap_s, reps, wait_s)


def head_of_line_many(work: Path, pdfs: int = 6, timeout_s: float = 2.0, slow_pages: int = 200, gap_s: float = 1.0,
                      reps: int = 1, wait_s: float = 300.0) -> Rows:
    """A mail of ``pdfs`` hostile slow PDFs, then a normal one-page PDF mail ``gap_s`` after the first began;
    ``ingest.fair_by_mail`` off (before: the PDFs share the workers one by one) and on (after: mails do)."""
    return _both_modes(work, "head_of_line_many", pdfs, slow_pages,
                       lambda on: {"timeout_s": timeout_s, "fair_by_mail": on}, gap_s, reps, wait_s)


def mail_budget(work: Path, pdfs: int = 20, timeout_s: float = 2.0, mail_timeout_s: float = 6.0,
                slow_pages: int = 200, gap_s: float = 1.0, reps: int = 1, wait_s: float = 300.0) -> Rows:
    """The mail of ``pdfs`` hostile slow PDFs and the normal one after it (as ``head_of_line_many``), with
    ``ingest.mail_timeout_s`` out of reach (before: the most a setting in seconds may be) and at ``mail_timeout_s``
    (after): how long the hostile run took and how many of its PDFs were not read for the mail's budget."""
    return _both_modes(work, "mail_budget", pdfs, slow_pages,
                       lambda on: {"timeout_s": timeout_s, "mail_timeout_s": mail_timeout_s if on else 86_400.0},
                       gap_s, reps, wait_s)


def _both_modes(work: Path, part: str, pdfs: int, slow_pages: int, ingest: Callable[[bool], dict[str, Any]],
                gap_s: float, reps: int, wait_s: float) -> Rows:
    """``_head_of_line_once`` for each rep, the switch off (before) then on (after): ``[ingest]`` is ``ingest(on)``,
    its keys tags of the rows too, and the hostile mail carries ``pdfs`` copies of the slow PDF."""
    slow, which = _slow_pdf(slow_pages)
    normal = fx.text_pdf(1, seed=9)
    rows: Rows = []
    for rep in range(reps):
        for mode, on in MODES:
            config = ingest(on)
            rows += _head_of_line_once(work / f"{part}-{mode}-{rep}", {"ingest": config}, ([slow] * pdfs, normal),
                                       gap_s, rep, wait_s, part=part, mode=mode, **config, hostile_pdf=which,
                                       hostile_pdfs=pdfs, hostile_kb=round(len(slow) / 1024, 1),
                                       normal_kb=round(len(normal) / 1024, 1))
    return rows


def _slow_pdf(pages: int) -> tuple[bytes, str]:
    """The fixtures' hostile slow PDF (``fx.slow_pdf``), or a long text PDF where the fixtures have none yet."""
    maker: Callable[[int], bytes] | None = getattr(fx, "slow_pdf", None)
    if maker is None:
        return fx.text_pdf(pages * 10), f"text_pdf({pages * 10}): fx.slow_pdf is missing"
    return maker(pages), f"slow_pdf({pages})"


def _head_of_line_once(work: Path, config: dict[str, dict[str, Any]], pdfs: tuple[list[bytes], bytes], gap_s: float,
                       rep: int, wait_s: float, part: str = "head_of_line", **tags: Any) -> Rows:
    """One serve: the hostile mail (its PDFs ``pdfs[0]``), then (``gap_s`` after its extraction began) the normal
    one; their runs judged from serve's store, as rows of ``part``."""
    hostile_id, normal_id = f"<hol-hostile-{rep}@hostile.audit>", f"<hol-normal-{rep}@hostile.audit>"
    hostile = fx.email_with([(f"hostile{i}.pdf", fx.distinct(pdf, i)) for i, pdf in enumerate(pdfs[0])],
                            message_id=hostile_id)
    normal = fx.email_with([("normal.pdf", pdfs[1])], message_id=normal_id)
    with serving(work / "data", work, config) as serve:
        first = in_clients(timed_sends, [(serve.port, [hostile])])[0][0][0]
        tags["hostile_extracting"] = _wait_extracting(serve.data_dir, hostile_id, 60.0)
        time.sleep(gap_s)
        second = in_clients(timed_sends, [(serve.port, [normal])])[0][0][0]
        runs = wait_terminal(serve.data_dir, [hostile_id, normal_id], wait_s)
        bad, good = (runs.get(mid, [None])[-1] for mid in (hostile_id, normal_id))
        left = tree_bytes(serve.data_dir / "work" / str(bad.run_id) / "text") if bad else (0, 0)
        _, extracted = task_instances(serve.data_dir, hostile_id, "ingest_pdf")
    tags = {**tags, "replies": f"hostile {first}, normal {second}"}
    state = {"hostile_state": bad.state if bad else "no run"}  # text left by a failed run is partial text
    failed = [t for t in extracted if t["state"] != s.SUCCESS]  # the run may succeed with the document failed
    rows = [row(part, "hostile_pdf_failed", float(bool(failed) or not extracted), "bool", rep,
                error=", ".join(f"{t['state']}: {t['error_type']}" for t in failed), **tags),
            row(part, "hostile_text_left_files", left[1], "files", rep, **state, **tags),
            row(part, "hostile_text_left_bytes", left[0], "bytes", rep, **state, **tags)]
    if part == "mail_budget":  # not read, or not to the end, once the mail's documents had used its budget
        rows.append(row(part, "hostile_pdfs_cut_by_the_mail_budget",
                        sum(t["error_type"] == "not_read" for t in failed), "pdfs", rep, **tags))
    for name, run in (("normal", good), ("hostile", bad)):
        ended = run is not None and run.ended_at is not None
        outcome = {"state": run.state if run else "no run", "reason": ((run.reason or "") if run else "")[:200]}
        succeeded = float(run is not None and run.state == s.SUCCESS)
        rows.append(row(part, f"{name}_run_succeeded", succeeded, "bool", rep, **outcome, **tags))
        if ended:
            assert run is not None and run.ended_at is not None
            since = float(run.payload.get("data_end_at") or run.queued_at)
            rows.append(row(part, f"{name}_latency_s", run.ended_at - since, "s", rep, **outcome, **tags))
    return rows


def _wait_extracting(data_dir: Path, message_id: str, timeout_s: float) -> bool:
    """Wait until the message's ingest_pdf task runs, so the next mail arrives while it is being extracted
    (not while it is still parsed); False if it never ran within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, tasks = task_instances(data_dir, message_id, "ingest_pdf")
        if any(t["state"] != s.QUEUED for t in tasks):
            return True
        time.sleep(0.02)
    return False


# -- spool lifecycle ---------------------------------------------------------------------------------------------


def spool_lifecycle(work: Path, mails: int = 1000, senders: int = 4, pdf_every: int = 1,
                    timeout_s: float = 900.0) -> Rows:
    """``mails`` small mails (every ``pdf_every``-th with a one-page PDF); spool + work bytes before and after
    ``python -m pipeline purge --older-than 0`` (the real CLI, while serve runs); then a leftover temp file of a
    killed accept is planted and serve restarted: the runs and digests the restart re-creates, whether a run id
    is reused, whether the temp file is gone."""
    serve = ServeProcess(work / "data", work)
    dirs = (serve.data_dir / "spool", serve.data_dir / "work")
    try:
        serve.start()
        messages = burst_messages("spool", mails, pdf_every=pdf_every)
        with Senders(serve.port, messages, work, senders) as sending:
            acked = list(sending.wait(timeout_s).acked)
        runs = wait_terminal(serve.data_dir, acked, timeout_s)
        top = max((r.run_id for found in runs.values() for r in found), default=0)
        before, digests = tree_bytes(*dirs), digests_by_original(serve.data_dir / "outbox")
        purged = serve.cli("purge", "--older-than", "0")
        after = tree_bytes(*dirs)
        serve.stop()
        stale = serve.data_dir / "spool" / ".incoming-killed-accept.tmp"
        stale.write_bytes(b"x" * MB)
        serve.start()
        recreated = sum(len(found) for found in runs_by_message(serve.data_dir).values())
        in_clients(timed_sends, [(serve.port, [fx.email_with([], message_id="<spool-restarted@hostile.audit>")])])
        after_restart = wait_terminal(serve.data_dir, [k for k in runs_by_message(serve.data_dir) if k], timeout_s)
        resent = digests_by_original(serve.data_dir / "outbox")
    finally:
        serve.kill()
    per_1000 = 1000 / max(1, len(acked))
    new_ids = [r.run_id for found in after_restart.values() for r in found]  # recreated runs and the new mail's
    tags = {"mails": mails, "acked": len(acked), "pdf_every": pdf_every}
    rows = [row("spool", "bytes_before_purge_per_1000", before[0] * per_1000, "bytes", 0, files=before[1], **tags),
            row("spool", "bytes_after_purge_per_1000", after[0] * per_1000, "bytes", 0, files=after[1], **tags),
            row("spool", "bytes_after_purge", after[0], "bytes", 0, files=after[1], **tags),
            row("spool", "freed_measured", before[0] - after[0], "bytes", 0, **tags),
            row("spool", "runs_recreated_after_restart", recreated, "runs", 0, **tags),
            row("spool", "digests_resent_after_restart", sum(resent[m] - digests[m] for m in acked), "digests", 0,
                **tags),
            row("spool", "run_ids_reused", len([i for i in new_ids if i <= top]), "runs", 0,
                lowest_new_run_id=min(new_ids, default=None), highest_before_purge=top, **tags),
            row("spool", "stale_temp_files_left", float(stale.exists()), "files", 0, **tags)]
    return rows + _purge_rows(purged, tags)


# purge prints MB as the project counts it (pipeline.config.MB = 2**20): 16,326,676 bytes print as "15.6 MB"
_UNITS = {"b": 1, "bytes": 1, "kb": 1024, "mb": MB, "gb": 1024 * MB, "kib": 1024, "mib": MB, "gib": 1024 * MB}


def _purge_rows(done: Any, tags: dict[str, Any]) -> Rows:
    """What ``purge`` said: its exit code, the runs it purged and the bytes it reports freed (when it does)."""
    said = " ".join((done.stdout + done.stderr).split())[:300]
    rows = [row("spool", "purge_exit_code", done.returncode, "code", 0, output=said, **tags)]
    purged = re.search(r"purged ([\d,]+) run", said)
    if purged:
        rows.append(row("spool", "runs_purged", int(purged[1].replace(",", "")), "runs", 0, **tags))
    freed = re.search(r"freed ([\d.,]+)\s*(bytes|[kmg]i?b|b)\b", said, re.I)
    if freed:
        value = float(freed[1].replace(",", "")) * _UNITS[freed[2].lower()]
        rows.append(row("spool", "freed_reported", value, "bytes", 0, reported=freed[0], **tags))
    return rows


# -- abandoned accepts ------------------------------------------------------------------------------------------


def _send_and_close(port: int, messages: list[bytes], timeout_s: float = 60.0) -> int:
    """Open a session per message up to DATA's 354, then send every such message's data and final dot, then
    close every connection without reading a reply: all of them in flight at once. Runs in a client process;
    returns how many were sent to their final dot (a session refused before its 354 sends nothing)."""
    socks, ready = [], []
    try:
        for raw in messages:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
                socks.append(sock)
                replies = sock.makefile("rb")
                reply = replies.readline()
                for line in (b"EHLO closer.example", f"MAIL FROM:<{SENDER}>".encode(),
                             f"RCPT TO:<{RECIPIENT}>".encode(), b"DATA"):
                    if reply[:1] not in (b"2", b"3"):  # refused (421 beyond the session limit) or closed
                        break
                    sock.sendall(line + b"\r\n")
                    while (reply := replies.readline())[3:4] == b"-":  # a reply's continuation lines
                        continue
            except OSError:
                continue
            if reply.startswith(b"354"):
                ready.append((sock, raw))
        sent = 0
        for sock, raw in ready:
            try:
                sock.sendall(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")  # raw ends with CRLF
                sent += 1
            except OSError:
                continue
    finally:
        for sock in socks:
            sock.close()
    return sent


def _gateway_fds(serve: ServeProcess) -> int:
    """Open descriptors of the process that holds serve's SMTP sessions (its gateway process by default)."""
    assert serve.proc is not None
    for proc in serve.descendants():
        try:
            if role_of(proc, serve.proc.pid) == "gateway":
                return proc.num_fds()
        except psutil.Error:  # gone meanwhile
            continue
    return psutil.Process(serve.proc.pid).num_fds() if serve.proc is not None else 0


def _settled_runs(data_dir: Path, timeout_s: float, quiet_s: float = 1.0) -> dict[str, list[s.Run]]:
    """The runs of every message once none has been added for ``quiet_s`` and all have ended (an accept that was
    running when its session closed renames its file before it commits its run)."""
    seen: set[str] = set()
    while True:
        keys = {k for k in runs_by_message(data_dir) if k}
        ended = wait_terminal(data_dir, sorted(keys), timeout_s)
        if keys == seen:
            return ended
        seen = keys
        time.sleep(quiet_s)


def abandoned_accepts(work: Path, mails: int = 200, clients: int = 4, settle_s: float = 30.0,
                      timeout_s: float = 300.0) -> Rows:
    """``clients`` processes of ``mails / clients`` sessions each send their mail and close at once without
    reading the reply; then, as an MTA would, every message is sent again normally. Rows: mails closed after
    their data, accepts dropped (no run made: its accept was still queued), the spool temp files and gateway
    descriptors left once the closed sessions settled, messages without exactly one run after the resend, and
    resent mails not answered 250."""
    serve = ServeProcess(work / "data", work)
    spool = serve.data_dir / "spool"
    try:
        serve.start()
        warm = fx.email_with([], message_id="<before-closers@hostile.audit>")  # lazily made descriptors made now
        in_clients(timed_sends, [(serve.port, [warm])])
        _settled_runs(serve.data_dir, timeout_s)
        fds_before = _gateway_fds(serve)
        messages = _small_mails("abandoned", mails)
        batches = [messages[i::clients] for i in range(clients)]
        sent = sum(in_clients(_send_and_close, [(serve.port, batch) for batch in batches]))
        deadline = time.monotonic() + settle_s  # until every session is closed and its data accepted or dropped
        while time.monotonic() < deadline and (list(spool.glob(".incoming-*.tmp")) or serve_connections(serve)):
            time.sleep(0.1)
        made = _settled_runs(serve.data_dir, timeout_s)
        temp_left = len(list(spool.glob(".incoming-*.tmp")))
        fds_after = _gateway_fds(serve)
        resent = in_clients(timed_sends, [(serve.port, batch) for batch in batches])
        ended = _settled_runs(serve.data_dir, timeout_s)
    finally:
        serve.kill()
    keys = [f"<abandoned-{i}@hostile.audit>" for i in range(mails)]
    tags = {"mails": mails, "clients": clients, "sent": sent}
    return [row("abandoned", "mails_closed_after_data", sent, "mails", 0, **tags),
            row("abandoned", "accepts_dropped", sent - sum(len(made.get(k, [])) for k in keys), "mails", 0, **tags),
            row("abandoned", "temp_files_left", temp_left, "files", 0, **tags),
            row("abandoned", "gateway_fds_growth", fds_after - fds_before, "fds", 0, before=fds_before, **tags),
            row("abandoned", "messages_without_one_run", sum(len(ended.get(k, [])) != 1 for k in keys), "messages",
                0, **tags),
            row("abandoned", "runs_not_ended", sum(r.state not in (s.SUCCESS, s.FAILED) for found in ended.values()
                                                   for r in found), "runs", 0, **tags),
            row("abandoned", "resent_not_250", sum(reply != "250" for batch in resent for reply, _ in batch),
                "mails", 0, **tags)]


# -- all of them -------------------------------------------------------------------------------------------------

PARTS: dict[str, Callable[..., Rows]] = {"sessions": sessions, "memory": memory, "head_of_line": head_of_line,
                                         "head_of_line_many": head_of_line_many, "mail_budget": mail_budget,
                                         "head_of_line_crowd": head_of_line_crowd,
                                         "spool": spool_lifecycle, "abandoned": abandoned_accepts,
                                         "pipelining": pipelining, "digest_flood": digest_flood}


def hostile_figures(work: Path, params: dict[str, dict[str, Any]], only: tuple[str, ...] = tuple(PARTS),
                    recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Run each part in ``only`` with its ``params`` (keyword arguments) in its own directory under ``work``;
    record the rows under scenario ``hostile``. A part whose harness fails is an ``error`` row with the message,
    and the others still run."""
    rows = run_parts(PARTS, only, params, work, "part", "hostile senders")
    if recorder is not None:
        recorder.record(SCENARIO, pd.DataFrame(rows))
    return frame(rows)
