"""How the fault scenarios judge a serve process: typed reasons, runs and digests per Message-ID, and the
messages they send (a burst, and the bad inputs real mail carries).

Judged from the outside only: the senders' reply logs (``serveproc.Replies``),
the run store opened read-only-ish, and the Maildir outbox.
"""

from __future__ import annotations

import base64
import gzip
import io
import logging
import re
import sqlite3
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ... import errors
from ... import store as s
from ...config import StoreConfig
from ...sqlite_store import SqliteRunStore
from . import fixtures as fx
from .harness import row
from .serveproc import Replies, digests_by_original

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]
# Run-level reasons the engine and runner write themselves, not raised as an error class.
ENGINE_REASONS = frozenset({"internal", "upstream_failed", "bad_output"})
TERMINAL_RUN_STATES = (s.SUCCESS, s.FAILED)


def known_reasons() -> frozenset[str]:
    """Every typed reason: the ``reason`` of each error class in ``pipeline.errors``, plus ENGINE_REASONS."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.PipelineError)]
    return frozenset(c.reason for c in classes) | ENGINE_REASONS


def typed_reason(reason: str | None) -> str | None:
    """The known reason a stored reason starts with (``corrupt`` or ``ingest_pdf[0]: corrupt: ...``), else None."""
    known = known_reasons()
    for token in (reason or "").split(": ")[:2]:
        if token.strip() in known:
            return token.strip()
    return None


# -- judging ---------------------------------------------------------------------------------------------------


def judged_store(data_dir: Path, store: StoreConfig | None = None) -> s.DAGRunStore:
    """The store serve wrote: ``store`` when given (a PostgreSQL serve), else the SQLite file in ``data_dir``."""
    if store is not None:
        return s.open_store(store, create=False)
    return SqliteRunStore(Path(data_dir) / "runs.sqlite3", create=False)


def runs_by_message(data_dir: Path, store_config: StoreConfig | None = None) -> dict[str, list[s.Run]]:
    """Every run in serve's store by dedup key (the Message-ID); empty when there is no store yet."""
    if store_config is None and not (Path(data_dir) / "runs.sqlite3").exists():
        return {}
    store = judged_store(data_dir, store_config)
    try:
        runs = store.list_runs(limit=10**9)
    finally:
        store.close()
    found: dict[str, list[s.Run]] = defaultdict(list)
    for run in runs:
        found[run.dedup_key or ""].append(run)
    return found


def wait_terminal(data_dir: Path, message_ids: list[str], timeout_s: float,
                  store_config: StoreConfig | None = None) -> dict[str, list[s.Run]]:
    """Wait until each message's runs have all ended (or ``timeout_s``); return the runs by Message-ID."""
    deadline = time.monotonic() + timeout_s
    problem: Exception | None = None
    while True:
        try:
            runs = runs_by_message(data_dir, store_config)
        except errors.StoreError as exc:  # busy or unreadable for now: the fault may still be there
            runs, problem = {}, exc
        pending = [m for m in message_ids if not runs.get(m) or
                   any(r.state not in TERMINAL_RUN_STATES for r in runs[m])]
        if not pending or time.monotonic() > deadline:
            if pending:
                log.warning("%d message(s) without a finished run after %.0f s (last store error: %s)",
                            len(pending), timeout_s, problem)
            return runs
        time.sleep(0.1)


def untyped_runs(data_dir: Path, runs: list[s.Run], store_config: StoreConfig | None = None) -> list[s.Run]:
    """Runs that failed without a typed reason, or with a task instance whose error type is not typed."""
    store = judged_store(data_dir, store_config)
    try:
        out = []
        for run in runs:
            task_errors = [t.error_type for t in store.get_tasks(run.run_id) if t.state == s.FAILED]
            if (run.state == s.FAILED and typed_reason(run.reason) is None) or \
                    any(typed_reason(e) is None for e in task_errors):
                out.append(run)
        return out
    finally:
        store.close()


def judge(data_dir: Path, replies: Replies, sent: int, timeout_s: float = 300.0,
          outbox: Path | None = None, store_config: StoreConfig | None = None) -> dict[str, Any]:
    """The figures of one fault: sent, acked, lost, duplicated, untyped, and when the last acked run ended.
    Digests are counted in ``outbox`` (a Maildir; serve's own outbox by default, a relay's mailbox when it has
    one); runs in ``store_config`` (a PostgreSQL serve's), by default the SQLite store in ``data_dir``."""
    acked = list(replies.acked)
    runs = wait_terminal(data_dir, acked, timeout_s, store_config)
    digests = digests_by_original(outbox or Path(data_dir) / "outbox")
    lost = [m for m in acked if not runs.get(m) or any(r.state not in TERMINAL_RUN_STATES for r in runs[m])]
    mine = [r for m in acked for r in runs.get(m, [])]
    succeeded = {m for m in acked if any(r.state == s.SUCCESS for r in runs.get(m, []))}
    missing = {m for m in succeeded if digests.get(m, 0) == 0}
    return {
        "sent": sent, "acked": len(acked), "lost": len(lost),
        "duplicated_runs": sum(len(runs.get(m, [])) > 1 for m in acked),
        "duplicated_digests": sum(digests.get(m, 0) > 1 for m in acked),
        "missing_digests": len(missing - no_digest_by_design(data_dir, {m: runs[m] for m in missing}, store_config)),
        "untyped": len(untyped_runs(data_dir, mine, store_config)) if mine else 0,
        "failed_runs": sum(r.state == s.FAILED for r in mine),
        "last_ended_at": max((r.ended_at or 0.0 for r in mine), default=None),
        "lost_ids": lost[:10],
    }


def no_digest_by_design(data_dir: Path, runs: dict[str, list[s.Run]],
                        store_config: StoreConfig | None = None) -> set[str]:
    """Message-IDs whose successful run's deliver task sent no digest on purpose (an automatic reply, the null
    sender: ``{"skipped": why}``), so a missing digest there is no fault."""
    if not runs:
        return set()
    store = judged_store(data_dir, store_config)
    try:
        return {m for m, found in runs.items() for r in found if r.state == s.SUCCESS and any(
            t.task_id == "deliver" and isinstance(t.output, dict) and "skipped" in t.output
            for t in store.get_tasks(r.run_id))}
    finally:
        store.close()


def waiting_runs(data_dir: Path, store_config: StoreConfig | None = None) -> tuple[int, int]:
    """Runs queued again after their start (waiting out a fault), and how many of them do not say why in their
    reason (what ``show`` prints); (0, 0) while the store cannot be read."""
    try:
        store = judged_store(data_dir, store_config)
    except errors.StoreError:
        return 0, 0
    try:
        waiting = [r for r in store.list_runs(state=s.QUEUED, limit=10**6) if r.started_at is not None]
    except errors.StoreError:
        return 0, 0
    finally:
        store.close()
    return len(waiting), sum(not r.reason for r in waiting)


def figures(fault: str, verdict: dict[str, Any], replies: Replies, removed_at: float | None,
            answered_from: float | None = None, **tags: Any) -> Rows:
    """Tidy rows of one fault's verdict, the replies senders saw, and the time to recover: from ``removed_at``
    to the first 250 logged at or after ``answered_from`` (``removed_at`` unless given)."""
    rows = [row(fault, metric, verdict[metric], "messages", 0, **tags)
            for metric in ("sent", "acked", "lost", "failed_runs", "untyped", "missing_digests")]
    rows.append(row(fault, "duplicated", verdict["duplicated_runs"] + verdict["duplicated_digests"], "messages", 0,
                    runs=verdict["duplicated_runs"], digests=verdict["duplicated_digests"], **tags))
    rows += [row(fault, "replies", count, "replies", 0, reply=reply, **tags)
             for reply, count in sorted(replies.counts().items())]
    if removed_at is not None:
        first = replies.first_ack_after(removed_at if answered_from is None else answered_from)
        if first is not None:
            rows.append(row(fault, "recover_s", first - removed_at, "s", 0, to="first 250", **tags))
        if verdict["last_ended_at"]:
            rows.append(row(fault, "drain_s", max(0.0, verdict["last_ended_at"] - removed_at), "s", 0,
                            to="backlog drained", **tags))
    return rows


def skipped(fault: str, reason: str) -> Rows:
    """The row of a fault that could not be injected here, with the reason."""
    return [row(fault, "skipped", 1, "fault", 0, reason=reason[:300])]


def task_instances(data_dir: Path, message_id: str, prefix: str) -> tuple[int | None, list[dict[str, Any]]]:
    """The latest run of ``message_id`` and its task instances named ``prefix...``: state, try_number, error_type,
    error_message and their events (``running@1 retrying(worker_crashed)@1 running@2 success@2``), read from serve's
    store opened read-only.

    ``(None, [])`` while there is no such run or the store cannot be read right now.
    """
    try:
        db = sqlite3.connect(f"file:{Path(data_dir) / 'runs.sqlite3'}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None, []
    try:
        run_id = db.execute("SELECT max(run_id) FROM runs WHERE dedup_key = ?", (message_id,)).fetchone()[0]
        if run_id is None:
            return None, []
        which = (run_id, f"{prefix}*")
        tasks = db.execute("SELECT task_id, state, try_number, error_type, error_message FROM task_runs "
                           "WHERE run_id = ? AND task_id GLOB ? ORDER BY task_id", which).fetchall()
        events = db.execute("SELECT task_id, state || coalesce('(' || error_type || ')', ''), try_number "
                            "FROM task_events WHERE run_id = ? AND task_id GLOB ? ORDER BY at, rowid", which).fetchall()
    except sqlite3.Error:
        return None, []
    finally:
        db.close()
    return run_id, [{"task_id": t, "state": state, "try_number": tries, "error_type": error, "error_message": message,
                     "events": " ".join(f"{e}@{n}" for i, e, n in events if i == t)}
                    for t, state, tries, error, message in tasks]


def attachment_files(data_dir: Path, run_id: int) -> set[str]:
    """File names of the attachments ``run_id``'s parse stored (as a worker's death names its document), from the
    store's parse_email result: the files themselves are deleted once the run has ended."""
    store = SqliteRunStore(Path(data_dir) / "runs.sqlite3", create=False)
    try:
        parsed = next((t.output for t in store.get_tasks(run_id) if t.task_id == "parse_email"), None)
    finally:
        store.close()
    attachments = parsed.get("attachments", []) if isinstance(parsed, dict) else []
    return {Path(a["path"]).name for a in attachments if a.get("path")}


_WORKER_DIED = re.compile(r"extraction worker (\d+) died on (\S+) \((\w+):")
_RETRYING = re.compile(r"run (\d+) task (\S+): try (\d+) failed \((\w+)\), retrying")


def worker_deaths(log_text: str) -> dict[int, tuple[str, str]]:
    """pid -> (document, reason) of every extraction worker serve's log says died mid-document."""
    return {int(m[1]): (m[2], m[3]) for m in _WORKER_DIED.finditer(log_text)}


def retries_logged(log_text: str, run_id: int) -> list[str]:
    """``task try N: reason`` of every retry serve's log records for ``run_id``."""
    return [f"{m[2]} try {m[3]}: {m[4]}" for m in _RETRYING.finditer(log_text) if int(m[1]) == run_id]


# -- messages ----------------------------------------------------------------------------------------------------


def burst_messages(prefix: str, count: int, pdf_every: int = 10) -> list[tuple[str, bytes]]:
    """``count`` messages with unique Message-IDs, every ``pdf_every``-th with a one-page PDF."""
    pdf = fx.text_pdf(1, seed=5)
    out = []
    for i in range(count):
        mid = f"<{prefix}-{i}@faults.audit>"
        attachments = [("page.pdf", pdf)] if pdf_every and i % pdf_every == 0 else []
        out.append((mid, fx.email_with(attachments, message_id=mid)))
    return out


def damaged_page_pdf(pages: int = 12, bad_page: int = 5) -> bytes:
    """A text PDF whose ``bad_page``-th content stream is overwritten with garbage of the same length (so the
    cross-reference offsets stay right and only that page is damaged, as a bad sector or a broken tool does)."""
    data = bytearray(fx.text_pdf(pages, seed=11))
    streams = [m.span(1) for m in re.finditer(rb"stream\n(.*?)\nendstream", data, flags=re.S)]
    start, end = streams[min(bad_page, len(streams) - 1)]
    middle = start + (end - start) // 4
    data[middle:end - 8] = (b"\x00\xffdamaged" * (end - middle))[:end - 8 - middle]
    return bytes(data)


def _damaged_pdf() -> bytes:
    """The fixtures' real-world-like damaged document when the fixtures offer one, else ours."""
    maker: Callable[[], bytes] | None = getattr(fx, "damaged_page_pdf", None)
    if maker is not None:
        try:
            return maker()
        except Exception:  # noqa: BLE001 -- a broken generator must not hide the fault; ours still damages a page
            pass
    return damaged_page_pdf()


def bad_input_messages() -> list[tuple[str, str, bytes]]:
    """``(case, Message-ID, raw)``: a damaged page, a From: that decodes to CR/LF (over SMTP only shown, so the
    mail is digested to its envelope sender with no header of it copied), a quoted local part."""
    damaged_id, header_id, quoted_id = "<damaged-page@faults.audit>", "<crlf-from@faults.audit>", \
        "<quoted-local@faults.audit>"
    damaged = fx.email_with([("report.pdf", _damaged_pdf())], message_id=damaged_id)
    header = (b"From: =?utf-8?q?Eve=0D=0ABcc=3A_victim=40example.com?= <eve@example.com>\r\n"
              b"To: digest@pipeline.local\r\nSubject: header with an encoded CR/LF\r\n"
              b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: " + header_id.encode() +
              b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello.\r\n")
    quoted = fx.email_with([("page.pdf", fx.text_pdf(1, seed=5))], message_id=quoted_id).replace(
        b"From: alice@example.com", b'From: "System Administrator"@example.com', 1)
    return [("damaged_page_pdf", damaged_id, damaged), ("crlf_encoded_from", header_id, header),
            ("quoted_local_part", quoted_id, quoted), *wild_mail_messages()]


def wild_mail_messages() -> list[tuple[str, str, bytes]]:
    """``(case, Message-ID, raw)`` as real clients write mail that Python's email package misreads
    (``stages.mime_repair``), each with one PDF that must be found, and an automatic reply that must get no
    digest (``stages.autoreply``)."""
    pdf = fx.text_pdf(1, seed=6)
    fold_id, forward_id, auto_id = "<scanner-fold@faults.audit>", "<base64-forward@faults.audit>", \
        "<auto-replied@faults.audit>"
    # a scanner's long Subject folded without indenting its second line: the parser would end the headers there
    fold = fx.email_with([("scan.pdf", pdf)], subject="Scanned document from MFP-4521,", message_id=fold_id)
    fold = fold.replace(b"MFP-4521,\r\n", b"MFP-4521,\r\nplease review\r\n", 1)
    inner = fx.email_with([("forwarded.pdf", pdf)], subject="the original", message_id="<original@faults.audit>")
    forward = (b"From: alice@example.com\r\nTo: digest@pipeline.local\r\nSubject: Fwd: the original\r\n"
               b"Message-ID: " + forward_id.encode() + b"\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=\"fwd\"\r\n\r\n--fwd\r\nContent-Type: text/plain\r\n\r\n"
               b"Forwarding.\r\n--fwd\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               + base64.encodebytes(inner).replace(b"\n", b"\r\n") + b"--fwd--\r\n")  # Exchange's way (RFC 2046: 7bit)
    auto = fx.email_with([("notice.pdf", pdf)], subject="Out of office", message_id=auto_id).replace(
        b"From: alice@example.com\r\n", b"From: alice@example.com\r\nAuto-Submitted: auto-replied\r\n", 1)
    return [("scanner_unindented_fold", fold_id, fold), ("forward_in_base64", forward_id, forward),
            ("auto_replied", auto_id, auto), *probe_mail_messages(pdf)]


MACHINE_CASES = frozenset({"auto_replied", "dmarc_report"})  # cases that must get no digest


def probe_mail_messages(pdf: bytes) -> list[tuple[str, str, bytes]]:
    """``(case, Message-ID, raw)``: the shapes the second wild-mail probe found the PDF lost or the run failed in,
    each with ``pdf`` to be found: a damaged ZIP beside it (an untyped parse failure), a stray Content-Type
    above the multipart one, base64 in padded pieces, yEnc in the body, a gzip file; and a DMARC report, which
    must get no digest."""
    def mail(case: str, content_type: bytes, body: bytes, subject: bytes = b"probe") -> tuple[str, str, bytes]:
        mid = f"<{case.replace('_', '-')}@faults.audit>"
        head = (b"From: alice@example.com\r\nTo: digest@pipeline.local\r\nSubject: " + subject + b"\r\n"
                b"Message-ID: " + mid.encode() + b"\r\nMIME-Version: 1.0\r\n" + content_type + b"\r\n\r\n")
        return case, mid, head + body

    def part(headers: bytes, data: bytes) -> bytes:
        return b"--P\r\n" + headers + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + _b64(data)

    multipart = b'Content-Type: multipart/mixed; boundary="P"'
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("invoice.pdf", fx.text_pdf(3, seed=7))
    damaged = bytearray(archive.getvalue())
    damaged[250:310] = bytes(b ^ 0x5A for b in damaged[250:310])  # inside the member's deflate stream
    pieces = b"".join(base64.encodebytes(pdf[i:i + 1000]) for i in range(0, len(pdf), 1000))
    return [
        mail("damaged_zip_beside_pdf", multipart, part(b"Content-Type: application/pdf; name=good.pdf", pdf)
             + part(b"Content-Type: application/zip; name=invoices.zip", bytes(damaged)) + b"--P--\r\n"),
        mail("second_content_type", b"Content-Type: text/plain\r\n" + multipart,
             part(b"Content-Type: application/pdf; name=scan.pdf", pdf) + b"--P--\r\n"),
        mail("base64_in_padded_pieces", multipart, b"--P\r\nContent-Type: application/pdf; name=chunks.pdf\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n" + pieces.replace(b"\n", b"\r\n") + b"--P--\r\n"),
        mail("yenc_in_body", b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit",
             b"Here it is:\r\n\r\n" + fx.yencoded(pdf, "invoice.pdf")),
        mail("gzip_pdf", multipart, part(b"Content-Type: application/gzip; name=scan.pdf.gz", gzip.compress(pdf))
             + b"--P--\r\n"),
        mail("dmarc_report", multipart, part(b"Content-Type: application/pdf; name=report.pdf", pdf) + b"--P--\r\n",
             subject=b"Report Domain: example.com Submitter: google.com Report-ID: <1234>"),
    ]


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")




def case_outcomes(data_dir: Path, cases: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per ``(case, Message-ID)``: run state, reason, its typed reason, failed tasks, pages failed, digests.

    ``typed`` is True when the run succeeded or failed with a known reason, and every failed task is typed too.
    """
    runs = runs_by_message(data_dir)
    digests = digests_by_original(Path(data_dir) / "outbox")
    store = SqliteRunStore(Path(data_dir) / "runs.sqlite3", create=False)
    out = []
    try:
        for case, mid in cases:
            found = runs.get(mid)
            run = found[-1] if found else None
            if run is None:
                out.append({"case": case, "state": "no run", "reason": None, "typed_reason": None, "typed": False,
                            "task_errors": "", "pages_failed": None, "pdfs": 0, "digests": digests.get(mid, 0)})
                continue
            tasks = store.get_tasks(run.run_id)
            task_errors = [t.error_type for t in tasks if t.state == s.FAILED]
            parsed = next((t.output for t in tasks if t.task_id == "parse_email" and isinstance(t.output, dict)), {})
            found_pdfs = len(parsed.get("attachments") or [])  # the PDFs the parse found (none if it failed)
            pages = [t.output.get("pages_failed") for t in tasks if isinstance(t.output, dict)]
            typed = typed_reason(run.reason)
            out.append({"case": case, "state": run.state, "reason": (run.reason or "")[:200], "typed_reason": typed,
                        "typed": (run.state == s.SUCCESS or typed is not None)
                        and all(typed_reason(e) for e in task_errors),
                        "task_errors": ", ".join(f"{t.task_id}: {t.error_type}" for t in tasks if t.error_type),
                        "pages_failed": sum(p for p in pages if isinstance(p, int)) if any(
                            isinstance(p, int) for p in pages) else None,
                        "pdfs": found_pdfs, "digests": digests.get(mid, 0)})
    finally:
        store.close()
    return out
