"""A document read with PDFium (pypdfium2): its pages' text, title and checked page count.

PDFium has no decompression limit of its own: the extraction worker's address-space cap is what bounds a bomb,
so use it only with ``[ingest] isolate`` on.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import CorruptPdfError, EncryptedPdfError


class PdfiumPages:
    """A document read with PDFium (pypdfium2). It has no decompression limit of its own: the worker's
    address-space cap is what bounds a bomb, so use it only with ``isolate`` on."""

    def __init__(self, path: Path, name: str, limits: IngestConfig) -> None:
        self.path, self.name, self.finished = path, name, False
        self.doc: Any = None
        self.pages: int | None = None  # the page count when /Count was found wrong (loadable_pages)

    def __enter__(self) -> PdfiumPages:
        import pypdfium2 as pdfium

        if self.doc is not None:
            return self
        try:
            self.doc = pdfium.PdfDocument(_load_pdfium(self.path, self.name))
        except pdfium.PdfiumError as exc:
            # a password or security error only for a file with an /Encrypt entry: belt and braces, as a stale
            # error code once called a plain file encrypted (see _load_pdfium)
            if exc.err_code in (pdfium.raw.FPDF_ERR_PASSWORD, pdfium.raw.FPDF_ERR_SECURITY) and \
                    _has_encrypt_entry(self.path):
                if exc.err_code == pdfium.raw.FPDF_ERR_PASSWORD:
                    raise EncryptedPdfError("encrypted with a password (the empty password does not open it)",
                                            self.name) from exc
                raise EncryptedPdfError(f"encrypted with a security handler PDFium cannot open ({exc})",
                                        self.name) from exc  # a certificate (Adobe.PubSec) or DRM handler
            raise CorruptPdfError(f"PDFium: {exc}", self.name) from exc
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # the document stays open until close(): a worker may keep it for the next request

    def close(self) -> None:
        if self.doc is not None:
            self.doc.close()
            self.doc = None

    def __len__(self) -> int:
        return self.pages if self.pages is not None else len(self.doc)

    def loadable_pages(self, limit: int) -> int:
        """The page count, checked once: PDFium takes the page tree's ``/Count`` on trust.

        - Over ``limit``: when page ``limit`` (the first past it) and the last do not load, the count is one
          past the last page that does, found by bisection (a one-page file claiming a million pages was
          refused as too large; 0 when none loads: "no pages", corrupt, as pypdf says of such a file).
        - Within it: pages that do not load at the end are counted from the last one down; when they are more
          than half the count, the count lied (one page behind /Count 4,999 was "4,998 of 4,999 pages could
          not be read") and is cut to the pages before them. Fewer stay damaged pages, reported as such, and
          every page below is read: a damaged page in the middle never hides the pages after it.
        """
        if self.pages is None:
            declared = len(self.doc)
            self.pages = declared
            if declared > limit:
                if not self._loads(limit) and not self._loads(declared - 1):
                    good, bad = -1, limit
                    while bad - good > 1:
                        middle = (good + bad) // 2
                        good, bad = (middle, bad) if self._loads(middle) else (good, middle)
                    self.pages = good + 1
            else:
                top = declared - 1
                while top >= 0 and not self._loads(top):  # a few µs a page: at most `limit` of them
                    top -= 1
                if declared - (top + 1) > declared // 2 and top >= 0:
                    self.pages = top + 1
        return self.pages

    def _loads(self, number: int) -> bool:
        try:
            self.doc[number].close()
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - PdfiumError "Failed to load page.", or worse: not a page
            return False
        return True

    def metadata_title(self) -> str:
        """The document information dictionary's Title, or "" (a damaged dictionary costs only the title)."""
        try:
            return str(self.doc.get_metadata_dict().get("Title") or "")
        except Exception:  # noqa: BLE001 - any damage in the Info dictionary: no title, the text stands
            return ""

    def text(self, number: int) -> str:
        try:
            page = self.doc[number]  # PdfiumError "Failed to load page." when the page object is damaged
        except MemoryError:
            raise
        except Exception as exc:
            raise CorruptPdfError(f"PDFium: {exc}", self.name) from exc
        try:
            if page.get_rotation():  # PDFium orders a rotated page's lines as drawn: bottom to top at /Rotate 90
                page.set_rotation(0)  # in memory only: the text then reads as on the unrotated page
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


PDFIUM_ERRORS = {1: "Unknown error", 2: "File access error", 3: "Data format error", 4: "Incorrect password error",
                 5: "Unsupported security scheme", 6: "Page not found or content error"}


def _load_pdfium(path: Path, name: str) -> Any:
    """PDFium's handle of the document at ``path``: PdfiumError when it cannot load it, CorruptPdfError when it
    has no page.

    pypdfium2's own load (``PdfDocument(path)``) never closes a document that loads with no page: each such file
    left a descriptor and its parsed objects in a long-lived extraction worker (200 of 200 here), and reported
    whatever error code an earlier failure had left (a password error for a plain file read after an encrypted
    one)."""
    import pypdfium2 as pdfium

    raw = pdfium.raw.FPDF_LoadDocument(os.fsencode(path) + b"\0", None)
    if not raw:  # a failed load sets the error code itself: this one is fresh
        code = pdfium.raw.FPDF_GetLastError()
        if code == pdfium.raw.FPDF_ERR_FILE:  # the file, not the document: its OSError (EACCES: a chmod in the
            with open(path, "rb"):            # data dir, which the run waits out), not "corrupt" for good
                pass
        raise pdfium.PdfiumError(f"Failed to load document (PDFium: {PDFIUM_ERRORS.get(code, code)}).",
                                 err_code=code)
    if pdfium.raw.FPDF_GetPageCount(raw) < 1:
        pdfium.raw.FPDF_CloseDocument(raw)
        # an encrypted file whose keys do not decrypt its page tree (pdf.js issue 19484's files) loads "with no pages"
        damaged = " it can decrypt (its /Encrypt entry looks damaged)" if _has_encrypt_entry(path) else ""
        raise CorruptPdfError(f"PDFium: the document has no pages{damaged}", name)
    return raw


_ENCRYPT_ENTRY = re.compile(rb"/Encrypt\s*(?:\d+\s+\d+\s+R|<<)")  # "/Encrypt 12 0 R" or "/Encrypt <<"


def _has_encrypt_entry(path: Path) -> bool:
    """True when the file has an ``/Encrypt`` entry, as every encrypted PDF's trailer does: a key followed by
    its value, not the bare word (a plain file whose text said "see /Encrypt" was reported encrypted)."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"/Encrypt") >= 0 and _ENCRYPT_ENTRY.search(data) is not None  # type: ignore[call-overload]
    except (OSError, ValueError):  # an empty file cannot be mapped (ValueError): nothing in it
        return False


