"""Ingestion: the text of a PDF with pypdf, page by page, inside hard limits.

pypdf bounds single streams (decompression caps) but not a whole document's
time or memory, so by default extraction runs in a worker process with an
address-space limit and a wall-clock timeout (``extract_worker``); a hostile
file costs at most those. Text is streamed to a file page by page (one form feed per page),
never held whole in memory, and its path is what later steps receive.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pypdf
from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError, PyPdfError

from .. import tracing
from ..config import IngestConfig
from ..errors import CorruptPdfError, EncryptedPdfError, PdfTooLargeError

log = logging.getLogger(__name__)
PAGES_PER_SPAN = 50


@dataclass(frozen=True)
class PdfText:
    """What ingestion learned about one PDF."""

    pages: int
    words: int
    chars: int
    text_path: str
    has_text: bool
    seconds: float


def extract_text(pdf_path: Path, text_path: Path, limits: IngestConfig) -> PdfText:
    """Extract every page's text in this process; raise an IngestError subclass on bad input."""
    name = Path(pdf_path).name
    size = Path(pdf_path).stat().st_size
    if size > limits.max_attachment_bytes:
        raise PdfTooLargeError(f"{size:,} bytes, over the {limits.max_attachment_bytes:,}-byte limit", name)
    started = time.monotonic()
    caps = {"zlib_maximum_output_length": limits.max_decompressed_bytes,
            "lzw_maximum_output_length": limits.max_decompressed_bytes,
            "maximum_declared_stream_length": limits.max_decompressed_bytes}
    try:
        with pypdf.apply_configuration(**caps):
            reader = _open(pdf_path, name)
            pages = len(reader.pages)
            if pages > limits.max_pages:
                raise PdfTooLargeError(f"{pages:,} pages, over the {limits.max_pages:,}-page limit", name)
            words, chars = _stream_pages(reader, text_path, started + limits.timeout_s, name)
    except LimitReachedError as exc:
        raise PdfTooLargeError(f"decompression limit reached: {exc}", name) from exc
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        # pypdf reports damage as its own errors but also as plain ones from deep inside its parser
        raise CorruptPdfError(f"{type(exc).__name__}: {exc}"[:500], name) from exc
    return PdfText(pages, words, chars, str(text_path), words > 0, time.monotonic() - started)


def _open(pdf_path: Path, name: str) -> pypdf.PdfReader:
    reader = pypdf.PdfReader(pdf_path)
    if reader.is_encrypted:
        try:
            opened = reader.decrypt("")
        except DependencyError as exc:
            raise EncryptedPdfError(f"encrypted, and a decryption library is missing: {exc}", name) from exc
        except (FileNotDecryptedError, NotImplementedError) as exc:
            raise EncryptedPdfError(f"encrypted: {exc}", name) from exc
        if not opened:
            raise EncryptedPdfError("encrypted with a password (the empty password does not open it)", name)
    return reader


def _stream_pages(reader: pypdf.PdfReader, text_path: Path, deadline: float, name: str) -> tuple[int, int]:
    words = chars = 0
    Path(text_path).parent.mkdir(parents=True, exist_ok=True)
    with open(text_path, "w", encoding="utf-8") as out:
        for first in range(0, len(reader.pages), PAGES_PER_SPAN):
            with tracing.span("ingest.pages", first=first, document=name):
                for number in range(first, min(first + PAGES_PER_SPAN, len(reader.pages))):
                    text = reader.pages[number].extract_text() or ""
                    out.write(text)
                    out.write("\f")
                    words += len(text.split())
                    chars += len(text)
                    if time.monotonic() > deadline:
                        raise PdfTooLargeError(f"extraction took longer than the time limit (page {number + 1})", name)
    return words, chars


def ingest_pdf(pdf_path: Path, text_path: Path, limits: IngestConfig) -> PdfText:
    """Extract text under every limit: in a capped worker process unless ``limits.isolate`` is off."""
    if not limits.isolate:
        return extract_text(pdf_path, text_path, limits)
    from .extract_worker import pool_for  # the worker module imports this one

    return PdfText(**pool_for(limits).extract(pdf_path, text_path, limits))
