"""Ingestion: the text of a PDF with pypdf, page by page, inside hard limits.

pypdf bounds single streams (decompression caps) but not a whole document's
time or memory, so by default extraction runs in a worker process with an
address-space limit and a wall-clock timeout (``extract_worker``); a hostile
file costs at most those. Text is streamed to a file page by page (one form feed per page),
never held whole in memory, and its path is what later steps receive.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pypdf
from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError, PyPdfError

from .. import tracing
from ..config import IngestConfig
from ..errors import CorruptPdfError, EncryptedPdfError, IngestError, PdfTooLargeError

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


def extract_text(pdf_path: Path, text_path: Path, limits: IngestConfig, shard: tuple[int, int] = (0, 1)) -> PdfText:
    """Extract the text of shard ``i`` of ``n`` (a contiguous block of pages) in this process.

    ``pages`` in the result is the document's page count; words and chars are the shard's.
    Raises an IngestError subclass on bad input.
    """
    name = Path(pdf_path).name
    size = Path(pdf_path).stat().st_size
    if size > limits.max_attachment_bytes:
        raise PdfTooLargeError(f"{size:,} bytes, over the {limits.max_attachment_bytes:,}-byte limit", name)
    started = time.monotonic()
    opener = _PdfiumPages if limits.engine == "pdfium" else _PypdfPages
    with opener(Path(pdf_path), name, limits) as doc:
        pages = len(doc)
        if pages > limits.max_pages:
            raise PdfTooLargeError(f"{pages:,} pages, over the {limits.max_pages:,}-page limit", name)
        index, count = shard
        block = -(-pages // count)
        numbers = range(index * block, min(pages, (index + 1) * block))
        write = _stream_pages if limits.stream_text else _hold_pages
        words, chars = write(doc, numbers, text_path, started + limits.timeout_s, name)
    return PdfText(pages, words, chars, str(text_path), words > 0, time.monotonic() - started)


class _PypdfPages:
    """A document read with pypdf, its limits applied, its errors typed."""

    def __init__(self, path: Path, name: str, limits: IngestConfig) -> None:
        self.name = name
        self._config = pypdf.apply_configuration(
            zlib_maximum_output_length=limits.max_decompressed_bytes,
            lzw_maximum_output_length=limits.max_decompressed_bytes,
            maximum_declared_stream_length=limits.max_decompressed_bytes)
        self.path = path

    def __enter__(self) -> _PypdfPages:
        self._config.__enter__()
        self.reader = self._guard(lambda: _open(self.path, self.name))
        return self

    def __exit__(self, *exc: object) -> None:
        self._config.__exit__(None, None, None)

    def __len__(self) -> int:
        return self._guard(lambda: len(self.reader.pages))

    def text(self, number: int) -> str:
        return self._guard(lambda: self.reader.pages[number].extract_text() or "")

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except LimitReachedError as exc:
            raise PdfTooLargeError(f"decompression limit reached: {exc}", self.name) from exc
        except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
            if isinstance(exc, IngestError):
                raise
            # pypdf reports damage as its own errors but also as plain ones from deep inside its parser
            raise CorruptPdfError(f"{type(exc).__name__}: {exc}"[:500], self.name) from exc


class _PdfiumPages:
    """A document read with PDFium (pypdfium2). It has no decompression limit of its own: the worker's
    address-space cap is what bounds a bomb, so use it only with ``isolate`` on."""

    def __init__(self, path: Path, name: str, limits: IngestConfig) -> None:
        self.path, self.name = path, name

    def __enter__(self) -> _PdfiumPages:
        import pypdfium2 as pdfium

        try:
            self.doc = pdfium.PdfDocument(str(self.path))
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower():
                raise EncryptedPdfError("encrypted with a password (the empty password does not open it)",
                                        self.name) from exc
            raise CorruptPdfError(f"PDFium: {exc}", self.name) from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self.doc.close()

    def __len__(self) -> int:
        return len(self.doc)

    def text(self, number: int) -> str:
        page = self.doc[number]
        textpage = page.get_textpage()
        try:
            return textpage.get_text_range().replace("\r\n", "\n")
        finally:
            textpage.close()
            page.close()


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


def _pages(doc: Any, numbers: range, deadline: float, name: str) -> Iterator[str]:
    """Each page's text in order, in spans of PAGES_PER_SPAN pages, under the time limit."""
    for first in range(numbers.start, numbers.stop, PAGES_PER_SPAN):
        with tracing.span("ingest.pages", first=first, document=name):
            for number in range(first, min(first + PAGES_PER_SPAN, numbers.stop)):
                yield doc.text(number)
                if time.monotonic() > deadline:
                    raise PdfTooLargeError(f"extraction took longer than the time limit (page {number + 1})", name)


def _stream_pages(doc: Any, numbers: range, text_path: Path, deadline: float, name: str) -> tuple[int, int]:
    """Write each page as it is extracted (one form feed after each): memory stays one page deep."""
    words = chars = 0
    Path(text_path).parent.mkdir(parents=True, exist_ok=True)
    with open(text_path, "w", encoding="utf-8") as out:
        for text in _pages(doc, numbers, deadline, name):
            out.write(text)
            out.write("\f")
            words += len(text.split())
            chars += len(text)
    return words, chars


def _hold_pages(doc: Any, numbers: range, text_path: Path, deadline: float, name: str) -> tuple[int, int]:
    """The baseline ``stream_text`` replaced: the whole text in memory, then written at once."""
    text = "".join(page + "\f" for page in _pages(doc, numbers, deadline, name))
    Path(text_path).parent.mkdir(parents=True, exist_ok=True)
    Path(text_path).write_text(text, encoding="utf-8")
    return len(text.split()), len(text) - len(numbers)


def ingest_pdf(pdf_path: Path, text_path: Path, limits: IngestConfig) -> PdfText:
    """Extract text under every limit: in capped worker processes unless ``limits.isolate`` is off.

    With ``limits.page_workers`` > 1 the pages are split into that many contiguous shards extracted by
    different workers at once, and their text files are joined in order.
    """
    if not limits.isolate:
        return extract_text(pdf_path, text_path, limits)
    from .extract_worker import pool_for  # the worker module imports this one

    pool = pool_for(limits)
    shards = max(1, limits.page_workers)
    if shards == 1:
        return PdfText(**pool.extract(pdf_path, text_path, limits))
    parts = [Path(f"{text_path}.part{i}") for i in range(shards)]
    with ThreadPoolExecutor(shards) as threads:
        futures = [threads.submit(pool.extract, pdf_path, part, limits, (i, shards)) for i, part in enumerate(parts)]
        results = [f.result() for f in futures]  # the first failing shard's error is raised, in shard order
    with open(text_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out)
            part.unlink()
    words, chars = sum(r["words"] for r in results), sum(r["chars"] for r in results)
    return PdfText(results[0]["pages"], words, chars, str(text_path), words > 0, max(r["seconds"] for r in results))
