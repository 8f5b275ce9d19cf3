"""The email_digest workflow: parse_email -> ingest_pdf (one per PDF) -> build_digest -> deliver.

Task callables are module-level functions bound to settings with
``functools.partial``, so they stay picklable for process executors. Each
imports the stages it runs, so building the DAG (``show`` orders a run's
tasks by it) loads no PDF, MIME or SMTP code (issue 16).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from . import tracing
from .config import Settings
from .dag import DAG, Task, TaskContext
from .errors import NotReadError, PdfTooLargeError, StoreError, TaskIOError
from .store import DAGRunStore
from .workdir import shed_if_ended

log = logging.getLogger(__name__)
EMAIL_DIGEST = "email_digest"
DIGEST_WINDOW_S = 3600.0  # [delivery] max_digests_per_hour counts the digests of the last hour


def parse_email_task(ctx: TaskContext, settings: Settings) -> dict[str, Any]:
    """Parse the spooled message and write its PDF attachments to the run's work dir.

    With ``ingest.parse_isolate`` a capped worker process reads and parses the spool file, so a big or
    hostile message costs the worker's memory, never this process's (issue 11); otherwise it is parsed here.
    """
    from .stages import extract_worker, parse

    with tracing.span("stage.parse", run_id=ctx.run_id):
        if settings.ingest.parse_isolate:
            pool = extract_worker.pool_for(settings.ingest)
            return pool.parse(Path(ctx.payload["spool"]), Path(ctx.work_dir), settings.ingest)
        raw = Path(ctx.payload["spool"]).read_bytes()
        return parse.summarize_message(raw, Path(ctx.work_dir), settings.ingest)


def ingest_parallel(settings: Settings) -> int | None:
    """How many of one mail's PDFs are extracted at once: as many as the extraction pool has workers (more would
    only wait in its queue, each holding a runner thread that other mails' parses need), with
    ``ingest.fair_by_mail``; None (all at once) without it, without worker processes (``isolate`` off), and on
    Dask, whose workers are the cluster's."""
    if settings.executor.kind == "dask" or not settings.ingest.fair_by_mail or not settings.ingest.isolate:
        return None
    return settings.ingest.workers


def ingest_executor(settings: Settings) -> str:
    """Where ingest_pdf runs: the cluster on Dask; with ``runner.extract_pool``, where a mail's PDFs go to the
    workers ``ingest.workers`` at a time (``ingest_parallel``), threads of their own that only wait for a worker
    (``max_active_runs`` x ``workers`` of them: one for each PDF that may be submitted); else the runner's."""
    if settings.executor.kind == "dask":
        return "dask"
    return "extract" if settings.runner.extract_pool and ingest_parallel(settings) is not None else "thread"


def pdf_items(parsed: dict[str, Any]) -> list[dict[str, Any]]:
    """The list ingest_pdf fans out over."""
    return parsed["attachments"]


def ingest_pdf_task(ctx: TaskContext, settings: Settings) -> dict[str, Any]:
    """Extract one attachment's text (a file) and report pages and words."""
    from .stages import cluster_ingest, ingest

    item = ctx.item
    if item.get("rejected"):
        raise PdfTooLargeError(item["rejected"], item["name"])
    if item.get("unread"):  # a wrapper whose files are not read: the run is partial (stages.wrappers)
        raise NotReadError(item["unread"], item["name"])
    # a file of this try's own: a try abandoned at shutdown may still be writing (or removing) its text while
    # the run's next owner extracts the same attachment (it ended with the other's text or a FileNotFoundError)
    text_path = Path(ctx.work_dir) / "text" / f"{ctx.index:03d}-{uuid.uuid4().hex[:8]}.txt"
    with tracing.span("stage.ingest", run_id=ctx.run_id, size=item["size"]):
        if settings.executor.kind == "dask":  # on a Dask worker: its memory limit is the cap, no local pool
            result = cluster_ingest.ingest_on_worker(Path(item["path"]), text_path, settings.ingest,
                                                     settings.executor.pages_per_task)
        else:
            result = ingest.ingest_pdf(Path(item["path"]), text_path, settings.ingest)
    if shed_if_ended(Path(ctx.work_dir)):  # a late try: the run ended (and shed its text) while it ran
        log.info("run %s: a late try of %s ended after its run; its text was deleted", ctx.run_id, ctx.task_id)
    return {"name": item["name"], "pages": result.pages, "words": result.words, "chars": result.chars,
            "has_text": result.has_text, "text_path": result.text_path, "seconds": result.seconds,
            "pages_failed": result.pages_failed, "title": result.title, "pages_unmapped": result.pages_unmapped}


def build_digest_task(ctx: TaskContext, settings: Settings) -> dict[str, Any]:
    """Summarise every document (failed ones listed with their reason) into digest.json."""
    from .stages import digest

    with tracing.span("stage.digest", run_id=ctx.run_id):
        email = ctx.upstream["parse_email"]
        documents = digest.describe_documents(email["attachments"], ctx.upstream["ingest_pdf"], dict(ctx.errors),
                                              settings.ingest.summary_sentences)
        rendered = digest.render_digest(email, documents)
        path = Path(ctx.work_dir) / "digest.json"
        path.write_text(json.dumps({"subject": rendered.subject, "text": rendered.text, "html": rendered.html}))
    failed = sum("error" in d for d in documents)
    return {"digest_path": str(path), "documents": len(documents), "failed_documents": failed}


def deliver_task(ctx: TaskContext, settings: Settings, quota: DAGRunStore | None = None) -> dict[str, Any]:
    """Send the digest to the envelope sender (or the configured recipient), once per run.

    Whom it goes to, and when no digest is sent (null sender), is ``deliver.reply_recipient``'s rule;
    a skipped digest returns ``{"skipped": why}``, one over ``[delivery] max_digests_per_hour`` too, as
    counted in ``quota`` (the run store: the count outlives a restart and is shared by its processes).
    A run requeued after a crash that came after delivery must not send a second digest: the digest's
    Message-ID and outbox file name derive from the run, and a marker in the work dir records a relay send.
    """
    from .stages import deliver

    key = delivery_key(ctx)
    marker = Path(ctx.work_dir) / "delivered.json"
    earlier = deliver.delivered_before(marker)
    # only this run's own marker counts: a work dir left by an older version's purge can hold another run's
    if earlier is not None and earlier.get("message_id") == deliver.digest_message_id(key, settings.delivery):
        return earlier
    email = ctx.upstream["parse_email"]
    to, origin = deliver.reply_recipient(ctx.payload, email, settings.delivery)
    if to is None:  # RFC 3834: never answer the null reverse-path; never guess an address
        log.info("run %s: no digest sent: %s", ctx.run_id, origin)
        return {"skipped": origin}
    limit = settings.delivery.max_digests_per_hour
    if origin == deliver.CONFIGURED:  # the operator's own recipient, no address a client can claim
        quota = None
    if quota is not None and not quota.reserve_digest(str(to), key, limit, DIGEST_WINDOW_S):
        why = f"over [delivery] max_digests_per_hour ({limit} digests to {to} within the hour)"
        log.warning("run %s: no digest sent: %s", ctx.run_id, why)
        return {"skipped": why}
    try:
        return _send_digest(ctx, settings, email, to, key, marker)
    except BaseException:
        if quota is not None:
            _give_back(quota, str(to), key, ctx.run_id)
        raise


def _give_back(quota: DAGRunStore, to: str, key: str, run_id: int) -> None:
    """Release the digest's place in the quota: it was not sent. A store that fails here must not hide why the
    digest failed; its place then stays taken until the hour is over."""
    try:
        quota.release_digest(to, key)
    except StoreError as exc:
        log.warning("run %s: the unsent digest to %s still counts against its quota: %s", run_id, to, exc)


def _send_digest(ctx: TaskContext, settings: Settings, email: dict[str, Any], to: Any, key: str,
                 marker: Path) -> dict[str, Any]:
    """Compose the digest to ``to`` and send it, recording it in ``marker`` the moment the relay takes it."""
    from .stages import deliver, digest

    with tracing.span("stage.deliver", run_id=ctx.run_id):
        saved = _saved_digest(Path(ctx.upstream["build_digest"]["digest_path"]))
        msg = deliver.compose_reply(digest.Digest(**saved), email, settings.delivery, to=to,
                                    message_id=deliver.digest_message_id(key, settings.delivery))
        result = {"to": str(msg["To"]), "message_id": str(msg["Message-ID"])}

        def taken(where: str) -> None:  # at the relay's 250, before its QUIT: a crash there must not resend it
            result["where"] = where
            try:
                durable = bool(settings.delivery.relay) or not deliver.same_disk(marker.parent,
                                                                                 Path(settings.delivery.outbox))
                deliver.mark_delivered(marker, result, durable=durable)
            except OSError as exc:  # delivered all the same; only a crash before the next try could resend it
                log.warning("run %s: digest delivered, but its marker could not be written: %s", ctx.run_id, exc)

        deliver.send_message(msg, settings.delivery, key=key, maybe_stored=_storing(marker), taken=taken)
    return result


def _saved_digest(path: Path) -> dict[str, Any]:
    """The digest build_digest saved; a damaged file (cut short by a power loss: it is not fsynced) is a typed
    error no retry mends, where a missing one (an OSError) is retried as any task's file error is."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError among them
        raise TaskIOError(f"the saved digest {path.name} is damaged ({' '.join(str(exc).split())[:200]}); "
                          "the run's digest was lost", retryable=False) from exc
    return saved


def _storing(marker: Path) -> bool:
    """Leave a sign beside ``marker`` that this run's digest is about to be stored; return whether an earlier
    try left one (it may have stored the digest, then crashed before its marker: look for it everywhere).

    Not fsynced: it only has to outlive a crashed process, and on ext4 a rename into an outbox on the same disk
    that survives a power loss was journaled after this file's creation (an outbox on another disk gets a marker
    fsynced at once instead: ``deliver.mark_delivered``). Where it cannot be written, every try looks."""
    sign = marker.with_name("delivering")
    if sign.exists():
        return True
    try:
        sign.touch()
    except OSError:
        return True
    return False


def start_extraction_workers(settings: Settings) -> None:
    """Start the worker processes this workflow's tasks will use, without waiting for them (none on Dask).

    A caller about to run the workflow calls it first, so the workers' start-up overlaps its own (the
    CLI's ``ingest`` imports the service meanwhile; issue 16). Raises WorkerCrashedError when no process
    can be started.
    """
    from .stages import extract_worker

    ingest_here = settings.ingest.isolate and settings.executor.kind != "dask"
    if settings.ingest.parse_isolate or ingest_here:
        extract_worker.pool_for(settings.ingest).start_workers()


def cluster_try_timeout_s(settings: Settings) -> float | None:
    """How long an ingestion try may take on the Dask cluster before the runner fails it (None: local).

    Locally the extraction pool enforces ``ingest.timeout_s`` by killing the worker. On a Dask worker the
    budget is checked only between pages, and a try can wait in the scheduler's queue (no worker free, or
    all paused for memory): without this bound a run could stay running for ever. A timed-out try is
    retried once (its worker is not stopped; its late result is ignored), then the document fails.
    """
    if settings.executor.kind != "dask":
        return None
    return 4 * settings.ingest.timeout_s + 60


def stage_executor(settings: Settings) -> str:
    """Where build_digest and deliver run: ``runner.stage_executor``, "auto" being the process pool."""
    return "process" if settings.runner.stage_executor == "auto" else settings.runner.stage_executor


def delivery_key(ctx: TaskContext) -> str:
    """A name for this run's digest, stable across tries and distinct across runs (and purged, reused ids)."""
    spool = str(ctx.payload.get("spool", ""))
    return f"digest-{ctx.run_id}-{hashlib.sha256(f'{ctx.run_id}:{spool}'.encode()).hexdigest()[:16]}"


def email_digest_dag(settings: Settings, store: DAGRunStore | None = None) -> DAG:
    """Build the email_digest workflow bound to ``settings``.

    ``store`` counts the digests per address of ``[delivery] max_digests_per_hour`` (through a relay only: a
    Maildir outbox mails nobody); without it (a DAG built only to be read) none are counted.
    """
    quota = store if settings.delivery.relay and settings.delivery.max_digests_per_hour else None
    return DAG(EMAIL_DIGEST, [
        # one retry, for a parse worker killed from outside (WorkerCrashedError); a malformed mail fails at once
        Task("parse_email", partial(parse_email_task, settings=settings), retries=1),
        # one retry: only a retryable error gets it, i.e. WorkerCrashedError (a worker killed from outside);
        # bad input (every other IngestError) fails at once
        # with executor.kind "dask" each instance is a future on the cluster (``dask_executor``)
        Task("ingest_pdf", partial(ingest_pdf_task, settings=settings), deps=("parse_email",),
             map_over="parse_email", map_items=pdf_items, retries=1,
             executor=ingest_executor(settings),
             timeout_s=cluster_try_timeout_s(settings), max_parallel=ingest_parallel(settings)),
        # build_digest and deliver: in the runner's process pool by default (runner.stage_executor), deliver only
        # into the Maildir (a relay's network waits would hold the pool's few workers); one retry for a pool
        # worker killed from outside (worker_crashed); deliver has [delivery] retries
        Task("build_digest", partial(build_digest_task, settings=settings), deps=("parse_email", "ingest_pdf"),
             allow_failed=("ingest_pdf",), executor=stage_executor(settings), retries=1),
        # a quota is bound only with a relay, where deliver runs on this process's threads (a store is not picklable)
        Task("deliver", partial(deliver_task, settings=settings, quota=quota), deps=("parse_email", "build_digest"),
             retries=settings.delivery.retries, retry_max_delay_s=settings.delivery.retry_max_delay_s,
             executor="io" if settings.delivery.relay else stage_executor(settings)),
    ])
