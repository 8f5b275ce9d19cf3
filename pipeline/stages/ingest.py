"""Ingestion: the text of a PDF, page by page, inside hard limits.

pypdf bounds single streams (decompression caps) but not a whole document's
time or memory, and PDFium bounds nothing, so by default extraction runs in
worker processes with an address-space limit and a wall-clock timeout
(``extract_worker``); a hostile file costs at most those. The engines
themselves live in ``pdf_text``. Text is streamed to a file page by page (one
form feed per page), never held whole in memory, and its path is what later
steps receive. A damaged page costs that page (``PdfText.pages_failed``); the
document fails as corrupt only when none of its pages can be read.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import IngestConfig
from .extract_worker import pool_for
from .pdf_text import PdfText, extract_text, require_a_readable_page
from .pdf_text import _stream_pages as _stream_pages  # the audit's line profiler names it here

__all__ = ["PdfText", "extract_text", "ingest_pdf"]

log = logging.getLogger(__name__)


def ingest_pdf(pdf_path: Path, text_path: Path, limits: IngestConfig) -> PdfText:
    """Extract text under every limit: in capped worker processes unless ``limits.isolate`` is off.

    With ``limits.page_workers`` > 1 the pages are split into that many contiguous shards extracted by
    different workers at once, and their text files are joined in order. Raises an IngestError subclass:
    CorruptPdfError when no page could be read, WorkerCrashedError (retryable) when a worker died for a
    cause other than its memory cap.
    """
    name = Path(pdf_path).name
    if not limits.isolate:
        result = extract_text(pdf_path, text_path, limits)
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
    with open(text_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out)
            part.unlink()
    words = sum(r.words for r in results)
    page_error = next((r.page_error for r in results if r.page_error), "")
    return PdfText(results[0].pages, words, sum(r.chars for r in results), str(text_path), words > 0,
                   max(r.seconds for r in results), sum(r.pages_failed for r in results), page_error)
