"""Ingestion: the text of a PDF, page by page, inside hard limits.

pypdf bounds single streams (decompression caps) but not a whole document's
time or memory, and PDFium bounds nothing, so by default extraction runs in
worker processes with an address-space limit and a wall-clock timeout
(``extract_worker``); a hostile file costs at most those. The engines
themselves live in ``pdf_text``. Text is streamed to a file page by page (one
form feed per page), never held whole in memory, and its path is what later
steps receive. A damaged page costs that page (``PdfText.pages_failed``); the
document fails as corrupt only when none of its pages can be read.

Fair extraction (``limits.fair_extraction``, issue 11): a document is a job of
page chunks on the shared workers (``worker_pool``). Its first requests are its
``page_workers`` shards (the worker resolves them from the page count, so an
idle pool starts the document on every lane at once, as the baseline did); what
a slice leaves of a shard is queued again in chunks of ``CHUNK_PAGES``, and each
request reads for about a time slice (``SLICE_S``, or an eighth of the timeout
if that is shorter; longer only when opening the document took long, see
``pdf_text``), so a slow hostile document gives a worker back within about a
slice and a newcomer is served next; the rest of a chunk cut short is queued
again (workers keep a document open between its requests). ``timeout_s`` is the
document's budget of worker time over all its chunks; past it the document
fails with PdfTooLargeError. Each chunk writes its own part file
(``<text>.p<first page>``); they are joined in page order when all are in.
Partial text rule: when a document fails (timeout, a limit, a worker death) its
part files and its text file are deleted, so a hostile document leaves no
text on disk. With ``fair_extraction`` off, the baseline: ``page_workers``
contiguous shards, each holding a worker to its end, partial text left as is.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import NotReadError, PdfTooLargeError
from .extract_worker import GRACE_S, jsonable, pool_for
from .pdf_text import PdfText, extract_text, require_a_readable_page
from .pdf_text import _stream_pages as _stream_pages  # the audit's line profiler names it here
from .worker_pool import Job

__all__ = ["PdfText", "extract_text", "ingest_pdf"]

log = logging.getLogger(__name__)
CHUNK_PAGES = 50  # pages per chunk: how finely a document's pages spread over idle workers
SLICE_S = 1.0  # a chunk request stops reading after this long (a newcomer's longest wait for a worker)


def ingest_pdf(pdf_path: Path, text_path: Path, limits: IngestConfig) -> PdfText:
    """Extract text under every limit: in capped worker processes unless ``limits.isolate`` is off.

    With ``limits.fair_extraction`` the document shares the workers chunk by chunk with the others (at most
    ``page_workers`` at once; see the module docstring); without it, with ``limits.page_workers`` > 1 the
    pages are split into that many contiguous shards extracted by different workers at once, and their text
    files are joined in order. Raises an IngestError subclass:
    CorruptPdfError when no page could be read, WorkerCrashedError (retryable) when a worker died for a
    cause other than its memory cap.
    """
    name = Path(pdf_path).name
    if not limits.isolate:
        result = extract_text(pdf_path, text_path, limits)
    elif limits.fair_extraction:
        result = _extract_fairly(pdf_path, text_path, limits)
    elif max(1, limits.page_workers) == 1:
        result = PdfText(**pool_for(limits).extract(pdf_path, text_path, limits))
    else:
        result = _extract_shards(pdf_path, text_path, limits)
    if result.pages_failed:
        log.warning("%s: %d of %d pages could not be read (first: %s)", name, result.pages_failed, result.pages,
                    result.page_error)
    return require_a_readable_page(result, name)


def _extract_shards(pdf_path: Path, text_path: Path, limits: IngestConfig) -> PdfText:
    """Extract ``page_workers`` contiguous shards in parallel workers and join their text files in page order."""
    pool, shards = pool_for(limits), limits.page_workers
    parts = [Path(f"{text_path}.part{i}") for i in range(shards)]
    with ThreadPoolExecutor(shards) as threads:
        futures = [threads.submit(pool.extract, pdf_path, part, limits, (i, shards)) for i, part in enumerate(parts)]
        results = [PdfText(**f.result()) for f in futures]  # the first failing shard's error is raised, in order
    return join_parts(parts, results, text_path, seconds=max(r.seconds for r in results))


def join_parts(parts: list[Path], results: list[PdfText], text_path: Path, seconds: float) -> PdfText:
    """Concatenate the part files (in page order) into ``text_path``, delete them, and sum their counts.

    ``results[i]`` is the extraction of ``parts[i]``; ``seconds`` is the document's time as the caller counts it
    (the slowest shard, the worker time spent, or the ranges' sum).
    """
    with open(text_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out)
            part.unlink()
    words = sum(r.words for r in results)
    page_error = next((r.page_error for r in results if r.page_error), "")
    return PdfText(results[0].pages, words, sum(r.chars for r in results), str(text_path), words > 0, seconds,
                   sum(r.pages_failed for r in results), page_error, results[-1].end_page,
                   next((r.title for r in results if r.title), ""), sum(r.pages_unmapped for r in results))


def _extract_fairly(pdf_path: Path, text_path: Path, limits: IngestConfig) -> PdfText:
    """Extract the document as a job of page chunks on the shared workers; on failure leave no text behind."""
    job = _PageChunks(Path(pdf_path), Path(text_path), limits)
    try:
        pool_for(limits).run(job)
        return job.join()
    except Exception:
        remove_files([*job.parts, Path(text_path)])
        raise


def remove_files(paths: list[Path]) -> None:
    """Delete what exists of these files (a failed document's partial text); a path that cannot be is logged."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove partial text %s: %s", path, exc)


class _PageChunks(Job):
    """One document as chunks of pages (first page, stop page), each written to a part file of its own."""

    def __init__(self, pdf_path: Path, text_path: Path, limits: IngestConfig) -> None:
        # the first requests are the page_workers shards (the worker resolves them from the page count), so an
        # idle pool starts a document on all its lanes at once; what a slice leaves is queued again by page
        shards = max(1, limits.page_workers)
        super().__init__(pdf_path.name, limits.timeout_s, [("shard", i, shards) for i in range(shards)],
                         max_workers=limits.page_workers, by_run=limits.fair_by_mail,
                         run_budget_s=limits.mail_timeout_s if limits.fair_by_mail else None,
                         newcomer_s=min(limits.newcomer_s, SLICE_S, limits.timeout_s / 8))  # one slice at most
        self.pdf_path, self.text_path, self.limits = pdf_path, text_path, limits
        self.parts: list[Path] = []  # every part file a request was given, so a failure can remove them
        self.results: dict[tuple[int, int], PdfText] = {}  # (first page, arrival) -> that chunk's result
        self.pages: int | None = None

    def request(self, chunk: Any, remaining_s: float) -> dict[str, Any]:
        where: dict[str, Any]
        if chunk[0] == "shard":
            part = Path(f"{self.text_path}.s{chunk[1]:03d}")
            where = {"shard": [chunk[1], chunk[2]]}
        else:
            part = Path(f"{self.text_path}.p{chunk[0]:06d}")
            where = {"chunk": list(chunk)}
        self.parts.append(part)
        # the slice ends by the end of the budget, after which the queue fails the document (a page that does
        # not end is killed GRACE_S later); the worker's own time limit lies past both, so the timeout is typed
        # in one place and always reads the same
        return {"op": "extract", "pdf": str(self.pdf_path), "text": str(part), **where,
                "slice_s": min(SLICE_S, self.limits.timeout_s / 8, remaining_s),
                "limits": jsonable(replace(self.limits, timeout_s=remaining_s + 2 * GRACE_S))}

    def absorb(self, chunk: Any, reply: dict[str, Any]) -> list[Any]:
        """Keep the chunk's result; return the rest of a chunk cut short by its slice, in chunks of pages."""
        result = PdfText(**reply)
        self.pages = result.pages
        if chunk[0] == "shard":  # the same block arithmetic as pdf_text.extract_text
            block = -(-result.pages // chunk[2])
            first, stop = chunk[1] * block, min(result.pages, (chunk[1] + 1) * block)
        else:
            first, stop = chunk[0], min(chunk[1], result.pages)
        self.results[(first, len(self.results))] = result  # empty shards of a tiny document share a first page
        return [(p, min(p + CHUNK_PAGES, stop)) for p in range(max(first, result.end_page), stop, CHUNK_PAGES)]

    def timeout_error(self) -> PdfTooLargeError:
        return PdfTooLargeError(f"extraction took longer than {self.limits.timeout_s:g} s and was stopped", self.name)

    def run_budget_error(self, run_budget_s: float) -> NotReadError:
        return NotReadError(f"not read: the mail's documents had used all the time one mail may take "
                            f"({run_budget_s:g} s of worker time)", self.name)

    def join(self) -> PdfText:
        """Concatenate the part files in page order into the text file and sum the chunks' counts."""
        results = [self.results[first] for first in sorted(self.results)]
        return join_parts([Path(r.text_path) for r in results], results, self.text_path, seconds=self.spent_s)
