"""PDF text engines: pypdf and PDFium behind one small interface, page by page, their errors typed.

A leaf module: it imports nothing from ``ingest`` or ``extract_worker``, so the
worker process and the in-process path both use it without an import circle.

A page whose text cannot be read costs that page, not the document: it is
written as an empty page, counted in ``PdfText.pages_failed``, and the first
such error is kept for the message. Whether a document with *no* readable page
is corrupt is decided by the caller once all shards are in (``require_a_readable_page``).
Limits (pages, decompression, time) and a full address space still stop the whole document.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pypdf
from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError

from .. import tracing
from ..config import IngestConfig
from ..errors import CorruptPdfError, EncryptedPdfError, IngestError, PdfTooLargeError

PAGES_PER_SPAN = 50


@dataclass(frozen=True)
class PdfText:
    """What ingestion learned about one PDF (or one shard of its pages)."""

    pages: int
    words: int
    chars: int
    text_path: str
    has_text: bool
    seconds: float
    pages_failed: int = 0  # pages whose text the engine could not read (written as empty pages)
    page_error: str = ""  # the first of those errors, e.g. "page 2: PDFium: Failed to load page."


@dataclass
class _PageFailures:
    """A running count of unreadable pages and the first one's error."""

    count: int = 0
    first: str = ""

    def add(self, number: int, exc: Exception) -> None:
        self.count += 1
        self.first = self.first or f"page {number + 1}: {exc}"


def extract_text(pdf_path: Path, text_path: Path, limits: IngestConfig, shard: tuple[int, int] = (0, 1)) -> PdfText:
    """Extract the text of shard ``i`` of ``n`` (a contiguous block of pages) in this process.

    ``pages`` in the result is the document's page count; words, chars and pages_failed are the shard's.
    Raises an IngestError subclass on bad input; unreadable pages are counted, not raised.
    """
    name = Path(pdf_path).name
    size = Path(pdf_path).stat().st_size
    if size > limits.max_attachment_bytes:
        raise PdfTooLargeError(f"{size:,} bytes, over the {limits.max_attachment_bytes:,}-byte limit", name)
    started = time.monotonic()
    opener = _PdfiumPages if limits.engine == "pdfium" else _PypdfPages
    failures = _PageFailures()
    with opener(Path(pdf_path), name, limits) as doc:
        pages = len(doc)
        if pages > limits.max_pages:
            raise PdfTooLargeError(f"{pages:,} pages, over the {limits.max_pages:,}-page limit", name)
        index, count = shard
        block = -(-pages // count)
        numbers = range(index * block, min(pages, (index + 1) * block))
        write = _stream_pages if limits.stream_text else _hold_pages
        words, chars = write(_pages(doc, numbers, started + limits.timeout_s, name, failures), text_path)
    return PdfText(pages, words, chars, str(text_path), words > 0, time.monotonic() - started,
                   failures.count, failures.first)


def require_a_readable_page(result: PdfText, name: str) -> PdfText:
    """Return ``result``, or raise CorruptPdfError when the document has pages and none could be read."""
    if result.pages and result.pages_failed >= result.pages:
        raise CorruptPdfError(f"none of the {result.pages:,} pages could be read: {result.page_error}"[:500], name)
    return result


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
        except (IngestError, MemoryError):
            raise
        except Exception as exc:
            # pypdf reports damage as its own errors but also as plain ones from deep inside its parser
            # (KeyError, TypeError, NotImplementedError for an unknown filter, RecursionError, ...)
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
        try:
            page = self.doc[number]  # PdfiumError "Failed to load page." when the page object is damaged
        except MemoryError:
            raise
        except Exception as exc:
            raise CorruptPdfError(f"PDFium: {exc}", self.name) from exc
        try:
            textpage = page.get_textpage()
            try:
                return textpage.get_text_range().replace("\r\n", "\n")
            finally:
                textpage.close()
        except MemoryError:
            raise
        except Exception as exc:
            raise CorruptPdfError(f"PDFium: {exc}", self.name) from exc
        finally:
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


def _pages(doc: Any, numbers: range, deadline: float, name: str, failures: _PageFailures) -> Iterator[str]:
    """Each page's text in order (an unreadable page as ""), in spans of PAGES_PER_SPAN pages, under the time limit.

    Only CorruptPdfError is a page's own fault; a limit (PdfTooLargeError) or MemoryError stops the document.
    """
    for first in range(numbers.start, numbers.stop, PAGES_PER_SPAN):
        with tracing.span("ingest.pages", first=first, document=name):
            for number in range(first, min(first + PAGES_PER_SPAN, numbers.stop)):
                try:
                    text = doc.text(number)
                except CorruptPdfError as exc:
                    failures.add(number, exc)
                    text = ""
                yield text
                if time.monotonic() > deadline:
                    raise PdfTooLargeError(f"extraction took longer than the time limit (page {number + 1})", name)


def _stream_pages(pages: Iterator[str], text_path: Path) -> tuple[int, int]:
    """Write each page as it is extracted (one form feed after each): memory stays one page deep."""
    words = chars = 0
    Path(text_path).parent.mkdir(parents=True, exist_ok=True)
    with open(text_path, "w", encoding="utf-8") as out:
        for text in pages:
            out.write(text)
            out.write("\f")
            words += len(text.split())
            chars += len(text)
    return words, chars


def _hold_pages(pages: Iterator[str], text_path: Path) -> tuple[int, int]:
    """The baseline ``stream_text`` replaced: the whole text in memory, then written at once."""
    count = [0]

    def counted() -> Iterator[str]:
        for page in pages:
            count[0] += 1
            yield page + "\f"

    text = "".join(counted())
    Path(text_path).parent.mkdir(parents=True, exist_ok=True)
    Path(text_path).write_text(text, encoding="utf-8")
    return len(text.split()), len(text) - count[0]
