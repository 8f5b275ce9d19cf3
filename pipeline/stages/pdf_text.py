"""PDF text engines: pypdf and PDFium behind one small interface, page by page, their errors typed.

A leaf module: it imports nothing from ``ingest`` or ``extract_worker``, so the
worker process and the in-process path both use it without an import circle.

A page whose text cannot be read costs that page, not the document: it is
written as an empty page, counted in ``PdfText.pages_failed``, and the first
such error is kept for the message. Whether a document with *no* readable page
is corrupt is decided by the caller once all shards are in (``require_a_readable_page``).
Limits (pages, decompression, time) and a full address space still stop the whole document.

A caller that shares workers between documents asks for a page range and a time
slice instead of a shard: extraction then stops after the first page that ends
past the slice, and ``PdfText.end_page`` says where the next request should start.
Such a caller comes back to the same document many times, so a worker keeps the
documents it used last open (``OpenDocuments``): reopening costs pypdf ~0.75 s
for 6,000 pages, and a 1 s slice that began with it would be mostly overhead.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import tracing
from ..config import IngestConfig
from ..errors import CorruptPdfError, EncryptedPdfError, IngestError, PdfTooLargeError, showable
from .pdfium_pages import PdfiumPages
from .text_normal import count_words, normalize_page, pick_title

if TYPE_CHECKING:  # imported where used: a process that extracts with PDFium never loads pypdf (issue 16)
    import pypdf

PAGES_PER_SPAN = 50
OPEN_COST_FACTOR = 4  # a slice lasts at least this many times what opening the document took in it


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
    end_page: int = 0  # one past the last page this result covers (0-based)
    title: str = ""  # the document's title (metadata, else the first page's heading); set by the part with page 1
    pages_unmapped: int = 0  # pages whose characters map to no letter (fonts without a Unicode map): not scans


@dataclass
class _Progress:
    """Where extraction has got to: one past the last page done, unreadable pages and the first one's error."""

    end: int = 0
    count: int = 0
    first: str = ""
    first_page_text: str = ""  # the text of the document's first page, when this request read it
    unmapped: int = 0  # pages whose engine text was all control codes: glyph numbers, fonts with no Unicode map

    def add(self, number: int, exc: Exception) -> None:
        self.count += 1
        self.first = self.first or showable(f"page {number + 1}: {exc}")  # logged, shown in the digest


def extract_text(pdf_path: Path, text_path: Path, limits: IngestConfig, shard: tuple[int, int] = (0, 1),
                 chunk: tuple[int, int] | None = None, slice_s: float = 0.0,
                 documents: OpenDocuments | None = None) -> PdfText:
    """Extract the text of shard ``i`` of ``n`` (a contiguous block of pages) in this process.

    With ``chunk`` (first, stop) the pages from ``first`` up to ``stop`` (clamped to the document) are read
    instead; with ``slice_s`` > 0 reading stops after the first page that ends ``slice_s`` seconds after the
    start (``end_page`` in the result tells where), or later when opening the document took long. With
    ``documents`` the document is taken from and left in that cache. ``pages`` in the result is the
    document's page count; words, chars and pages_failed are the pages read. Raises an IngestError
    subclass on bad input; unreadable pages are counted, not raised.
    """
    name = Path(pdf_path).name
    size = Path(pdf_path).stat().st_size
    if size > limits.max_attachment_bytes:
        raise PdfTooLargeError(f"{size:,} bytes, over the {limits.max_attachment_bytes:,}-byte limit", name)
    if not size:  # PDFium's "Data format error" said nothing of why (a probe's 0-byte attachment)
        raise CorruptPdfError("an empty file (0 bytes): the sender's mail program attached nothing", name)
    started = time.monotonic()
    with (documents or OpenDocuments(0)).open(Path(pdf_path), name, limits) as doc:
        pages = doc.loadable_pages(limits.max_pages)  # PDFium trusts /Count: checked once per document
        if pages > limits.max_pages:
            raise PdfTooLargeError(f"{pages:,} pages, over the {limits.max_pages:,}-page limit", name)
        index, count = shard
        block = -(-pages // count)
        numbers = range(index * block, min(pages, (index + 1) * block)) if chunk is None else \
            range(chunk[0], min(pages, chunk[1]))
        progress = _Progress(end=numbers.start)
        opening_s = time.monotonic() - started
        until = started + max(slice_s, OPEN_COST_FACTOR * opening_s) if slice_s > 0 else float("inf")
        write = _stream_pages if limits.stream_text else _hold_pages
        words, chars = write(_pages(doc, numbers, (started + limits.timeout_s, until), name, progress), text_path)
        doc.finished = progress.end >= pages  # this worker is unlikely to see the document again
        title = pick_title(doc.metadata_title(), progress.first_page_text) if numbers.start == 0 < pages else ""
    return PdfText(pages, words, chars, str(text_path), words > 0, time.monotonic() - started,
                   progress.count, progress.first, max(progress.end, numbers.start), title, progress.unmapped)


def require_a_readable_page(result: PdfText, name: str) -> PdfText:
    """Return ``result``, or raise CorruptPdfError when the document has no page or none could be read."""
    if not result.pages:  # pypdf reads an empty page tree as 0 pages; PDFium refuses to load it
        raise CorruptPdfError("the document has no pages", name)
    if result.pages_failed >= result.pages:
        raise CorruptPdfError(f"none of the {result.pages:,} pages could be read: {result.page_error}"[:500], name)
    return result


class OpenDocuments:
    """The documents a worker used last, kept open between requests (``size`` at most; 0 keeps none).

    A document is closed when it fails, when a request has read its last page, or when it is the least
    recently used one over ``size``. The key includes the file's inode, size and mtime, so a file
    rewritten under the same name is opened afresh.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._docs: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._docs)

    @contextmanager
    def open(self, path: Path, name: str, limits: IngestConfig) -> Iterator[Any]:
        """The document entered for one request (its limits applied while the block runs)."""
        st = os.stat(path)
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, limits.engine, limits.max_decompressed_bytes)
        doc = self._docs.pop(key, None)
        if doc is None:
            doc = (PdfiumPages if limits.engine == "pdfium" else _PypdfPages)(path, name, limits)
        try:
            with doc:
                yield doc
        except BaseException:
            doc.close()
            raise
        if doc.finished or not self.size:
            doc.close()
            return
        self._docs[key] = doc
        while len(self._docs) > self.size:
            self._docs.popitem(last=False)[1].close()


# pypdf's output caps per filter and buffer (pypdf 6+); [ingest] max_decompressed_bytes sets every one of them
DECOMPRESSION_LIMITS = ("zlib_maximum_output_length", "lzw_maximum_output_length", "maximum_declared_stream_length",
                        "run_length_maximum_output_length", "array_based_stream_maximum_output_length",
                        "jbig2_maximum_output_length", "brotli_maximum_output_length", "image_maximum_buffer_size")


class _PypdfPages:
    """A document read with pypdf, its limits applied while entered, its errors typed; reusable until closed."""

    def __init__(self, path: Path, name: str, limits: IngestConfig) -> None:
        self.name, self.path, self.finished = name, path, False
        self.max_bytes = limits.max_decompressed_bytes
        self.reader: Any = None  # a pypdf.PdfReader once entered

    def __enter__(self) -> _PypdfPages:
        import pypdf

        caps: dict[str, Any] = {name: self.max_bytes for name in DECOMPRESSION_LIMITS}
        self._config = pypdf.apply_configuration(**caps)
        self._config.__enter__()
        if self.reader is None:
            self.reader = self._guard(lambda: _open(self.path, self.name))
        return self

    def __exit__(self, *exc: object) -> None:
        self._config.__exit__(None, None, None)

    def close(self) -> None:
        self.reader = None  # pypdf read the whole file into memory: dropping the reader frees it

    def __len__(self) -> int:
        return self._guard(lambda: len(self.reader.pages))

    def loadable_pages(self, limit: int) -> int:
        """The page count (pypdf counts the page tree's leaves: nothing to check)."""
        return len(self)

    def text(self, number: int) -> str:
        return self._guard(lambda: self.reader.pages[number].extract_text() or "")

    def metadata_title(self) -> str:
        """The document information dictionary's Title, or "" (a damaged dictionary costs only the title)."""
        try:
            return str(self.reader.metadata.title or "") if self.reader.metadata else ""
        except Exception:  # noqa: BLE001 - any damage in the Info dictionary: no title, the text stands
            return ""

    def _guard(self, fn: Any) -> Any:
        from pypdf.errors import DependencyError, LimitReachedError

        try:
            return fn()
        except LimitReachedError as exc:  # decompressed size, declared xref sizes; but also damage (below)
            message = _OBJECT_ID.sub(")", str(exc))  # "IndirectObject(2, 0, 139930529771344)": a new id each run
            if _is_damage(message):  # a reference loop, a token far longer than any real one: a probe's
                raise CorruptPdfError(f"damaged: {message}", self.name) from exc  # were "too_large"
            raise PdfTooLargeError(f"over a pypdf limit: {message}", self.name) from exc
        except DependencyError as exc:  # jbig2dec missing: this machine's lack, not the file's damage (PDFium reads it)
            raise CorruptPdfError(f"not read: pypdf needs what this machine lacks ({exc}); the pdfium engine reads "
                                  "such pages", self.name) from exc  # a page's: the other pages are still read
        except (IngestError, MemoryError):
            raise
        except Exception as exc:
            # pypdf reports damage as its own errors but also as plain ones from deep inside its parser
            # (KeyError, TypeError, NotImplementedError for an unknown filter, RecursionError, ...)
            raise CorruptPdfError(f"{type(exc).__name__}: {exc}"[:500], self.name) from exc


# pypdf's LimitReachedError for damage rather than size: a reference loop or cycle
_DAMAGE = re.compile(r"loop with self reference|[Cc]ycl(e|ic)")
# or a token read past its limit ("Read stream length of 112 exceeds maximum allowed length of 64."): a name or a
# number (limits of 64 to 4,096 bytes) is damage; a stream without /Length past max_decompressed_bytes is size
_TOKEN_PAST = re.compile(r"Read stream length of \d+ exceeds maximum allowed length of (\d+)")
MAX_TOKEN_LIMIT = 1 << 20
_OBJECT_ID = re.compile(r", \d{6,}\)")


def _is_damage(message: str) -> bool:
    token = _TOKEN_PAST.search(message)
    return bool(_DAMAGE.search(message)) or (token is not None and int(token.group(1)) < MAX_TOKEN_LIMIT)


def _open(pdf_path: Path, name: str) -> pypdf.PdfReader:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = pypdf.PdfReader(pdf_path)
    except NotImplementedError as exc:  # "only Standard PDF encryption handler is available": a certificate handler
        if "encrypt" in str(exc).lower():
            raise EncryptedPdfError(f"encrypted with a security handler pypdf cannot open ({exc})", name) from exc
        raise
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


def _pages(doc: Any, numbers: range, stops: tuple[float, float], name: str, progress: _Progress) -> Iterator[str]:
    """Each page's text in order (an unreadable page as ""), in spans of PAGES_PER_SPAN pages, under the time limit.

    ``stops`` is (deadline, until): past the deadline the document fails, past ``until`` reading ends quietly
    (a time slice). Only CorruptPdfError is a page's own fault; a limit (PdfTooLargeError) or MemoryError
    stops the document.
    """
    deadline, until = stops
    for first in range(numbers.start, numbers.stop, PAGES_PER_SPAN):
        with tracing.span("ingest.pages", first=first, document=name):
            for number in range(first, min(first + PAGES_PER_SPAN, numbers.stop)):
                try:
                    raw = doc.text(number)
                    text = normalize_page(raw)
                except CorruptPdfError as exc:
                    progress.add(number, exc)
                    raw = text = ""
                if raw and not text.strip() and not raw.isspace():  # the characters were all controls: they are
                    progress.unmapped += 1  # glyph numbers (pdf.js bug1001080: 47 on a page), not a missing layer
                if number == 0:
                    progress.first_page_text = text
                yield text
                progress.end = number + 1
                now = time.monotonic()
                if now > deadline:
                    raise PdfTooLargeError(f"extraction took longer than the time limit (page {number + 1})", name)
                if now > until:
                    return


def _stream_pages(pages: Iterator[str], text_path: Path) -> tuple[int, int]:
    """Write each page as it is extracted (one form feed after each): memory stays one page deep."""
    words = chars = 0
    Path(text_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(text_path, "w", encoding="utf-8", errors="replace") as out:  # the last guard: see _CONTROLS
            for text in pages:
                out.write(text)
                out.write("\f")
                words += count_words(text)
                chars += len(text)
    except BaseException:  # a full disk, a limit, a stop: partial text must not keep the room it took
        Path(text_path).unlink(missing_ok=True)
        raise
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
    Path(text_path).write_text(text, encoding="utf-8", errors="replace")
    return count_words(text), len(text) - count[0]
