"""Parts that wrap other files: a ZIP archive's PDFs and a gzip file's one file are read; other wrappers are named
in the digest as not read, never taken for a PDF themselves.

Files that may be PDFs and are not read (a wrapper, a part of a split message, a damaged ZIP archive, a member that
is encrypted or past the archive's budget) are items of the mail's attachment list with ``unread`` set (``parse``):
each fails its ingest_pdf as not_read, so the run ends partial and the digest says why, as for a PDF that cannot be
read (they were listed beside the PDFs, and a mail whose one PDF came in a winmail.dat ended a plain success).

A prober's finds: an uncompressed ZIP or tar whose first KB held a PDF's ``%PDF-`` was digested as one document,
the other PDFs inside lost without a word; Outlook's winmail.dat, S/MIME and OpenPGP wrappers were listed "not a
PDF (application/ms-tnef)", which says nothing of the PDFs inside; the parts of a split message were read as a
"corrupt" PDF or as no PDF at all.
"""

from __future__ import annotations

import io
import lzma
import zipfile
import zlib
from collections.abc import Iterator
from email.message import EmailMessage

from .headers import attachment_name

MAX_MEMBERS = 1000  # files read from one archive (the MIME part limit's size)
ARCHIVE_BUDGET = 4  # an archive's files are read up to this many times max_attachment_bytes in all (a bomb of
# a thousand deflated members would otherwise write max_attachment_bytes a thousand times to the work dir)
ZIP = "a ZIP archive"
GZIP = "a gzip file"  # one file, compressed: read (``gzip_files``)
NOT_A_PDF_IN_GZIP = "not a PDF (in a gzip file)"
NOT_READ = "its files are not read"
NOT_A_PDF_IN_ZIP = "not a PDF (in a ZIP archive)"
NOT_A_PDF_BUT_ZIP = "not a PDF but a ZIP archive (a Word or other office file?)"
NO_PDF_IN_ZIP = "not a PDF: a ZIP archive with no PDF in it"
OUTLOOK_MSG = "an Outlook message (.msg)"
BINHEX = b"(This file must be converted with BinHex"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # a compound file: Outlook's .msg, and old .doc and .xls too
# containers the parser would walk into as a message or a multipart, whose content is not the mail's files
UNREAD_CONTAINERS = {
    "message/partial": "a part of a split message (not put together again)",
    "message/external-body": "a file by reference (not fetched)",
    "multipart/encrypted": "an encrypted message (OpenPGP/MIME)",
}
_TYPES = {
    "application/ms-tnef": "an Outlook TNEF wrapper (winmail.dat)",
    "application/vnd.ms-tnef": "an Outlook TNEF wrapper (winmail.dat)",
    "application/pkcs7-mime": "an S/MIME wrapper (signed or encrypted)",
    "application/x-pkcs7-mime": "an S/MIME wrapper (signed or encrypted)",
    "application/pgp-encrypted": "an OpenPGP-encrypted file",
    "text/x-moz-deleted": "an attachment the sender's mail program deleted",
    "application/vnd.ms-outlook": OUTLOOK_MSG,
}
_MAGIC = (
    (b"PK\x03\x04", ZIP),
    (b"\x1f\x8b", GZIP),
    (b"\x78\x9f\x3e\x22", "an Outlook TNEF wrapper (winmail.dat)"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
)


def wrapper_kind(part: EmailMessage, payload: bytes) -> str | None:
    """What wraps the files of this leaf ``part`` ("a ZIP archive", ...), or None for a part that wraps none."""
    kind = _TYPES.get(part.get_content_type())
    name = (attachment_name(part) or "").lower()
    if kind and "pkcs7" in part.get_content_type() and (
            str(part.get_param("smime-type", "")).lower() == "certs-only" or name.endswith(".p7c")):
        return None  # certificates only, no content (a probe's .p7c made a run partial): listed, not a PDF
    if kind:
        return kind
    if part.get_content_type() == "application/mac-binhex40" or (name and BINHEX in payload[:1024]):
        return "a BinHex file"  # a Mac's BinHex text, named .pdf in a probe, failed "corrupt" (a body quoting its
        # banner is no file: a reviewer's find)
    for magic, what in _MAGIC:
        if payload.startswith(magic):
            return what
    if payload[257:262] == b"ustar":
        return "a tar archive"
    if name.endswith(".msg") and payload.startswith(OLE_MAGIC):  # a probe's .msg was a plain "not a PDF"
        return OUTLOOK_MSG
    return "an OpenPGP-encrypted file" if name.endswith((".pgp", ".gpg")) else None


def may_be_pdf(name: str) -> bool:
    """Whether an archive member that was not read may be a PDF: named ``.pdf``, or with no type in its name (a
    ``.jpg`` past the archive's budget was failed as a PDF that could not be read: a reviewer's find)."""
    last = name.rsplit("/", 1)[-1]
    return last.lower().endswith(".pdf") or "." not in last.lstrip(".")


def archive_files(payload: bytes, max_bytes: int, named_pdf: bool) -> Iterator[tuple[str, bytes | None, str]]:
    """``zip_members``, but an archive with no file that is or may be a PDF is one entry named "" (the archive's
    own name): NOT_A_PDF_BUT_ZIP when the sender labelled or named it a PDF (a .docx sent as contract.pdf was
    "document.xml: not a PDF" and a plain success, the sender's name nowhere), else NO_PDF_IN_ZIP with its count
    of files (a .docx listed a dozen XML files by their own names)."""
    others: list[tuple[str, bytes | None, str]] = []
    found = False
    for member in zip_members(payload, max_bytes):
        if member[2] == NOT_A_PDF_IN_ZIP and not found:
            others.append(member)
            continue
        if not found:  # the files before the first PDF, in the archive's order
            yield from others
            found = True
        yield member
    if not found:
        yield "", None, NOT_A_PDF_BUT_ZIP if named_pdf else f"{NO_PDF_IN_ZIP} ({len(others)} files)"


# what zipfile raises for a damaged archive: its own error, and its decompressors' (zlib.error for a damaged
# deflate stream, 3,286 of 20,000 fuzzed archives in a probe; OSError for bzip2, LZMAError), NotImplementedError
# for a version or method field it does not know (a damaged central directory: "zip file version 14.9")
ZIP_ERRORS = (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError, zlib.error, lzma.LZMAError)


def gzip_files(payload: bytes, max_bytes: int, name: str | None) -> Iterator[tuple[str, bytes | None, str]]:
    """The one file of a gzip part, as ``zip_members`` gives a member: named as the part without its ``.gz``,
    decompressed no further than ``max_bytes`` + 1 (a bomb is cut there, and refused as too large). A probe's
    scan.pdf.gz was an unread document, and a DMARC report's .xml.gz made its run partial."""
    inner = (name or "")[:-3] if (name or "").lower().endswith(".gz") else name or ""
    try:
        data = _gunzipped(payload, max_bytes + 1)
    except (zlib.error, EOFError) as exc:
        yield inner, None, f"a gzip file that cannot be read ({exc}): {NOT_READ}"
        return
    if data[257:262] == b"ustar":
        yield "", None, f"a tar archive (gzip-compressed): {NOT_READ}"  # under the part's name: it may hold PDFs
    elif data[:5] == b"%PDF-" or inner.lower().endswith(".pdf"):
        yield inner, data, ""
    else:
        yield inner, None, NOT_A_PDF_IN_GZIP


def _gunzipped(payload: bytes, limit: int) -> bytes:
    """A gzip file's data, every member of it, no more than ``limit`` bytes; EOFError for one cut short (a
    reviewer's find: a truncated scan.pdf.gz was passed on as a PDF, failed "corrupt")."""
    out, rest = b"", payload
    while rest and len(out) < limit:
        stream = zlib.decompressobj(zlib.MAX_WBITS | 16)
        out += stream.decompress(rest, limit - len(out))
        if not stream.eof:
            if len(out) >= limit:
                break  # cut at the limit: refused as too large
            raise EOFError("the file is cut short")
        rest = stream.unused_data.lstrip(b"\0")  # the next member, if any (some writers pad with NULs)
    return out


def zip_members(payload: bytes, max_bytes: int) -> Iterator[tuple[str, bytes | None, str]]:
    """(name, PDF bytes or None, why not) for each file of a ZIP archive, at most MAX_MEMBERS: PDFs by name or
    ``%PDF-``; one over ``max_bytes`` uncompressed is read no further than that (a bomb is cut there), and once
    ARCHIVE_BUDGET times ``max_bytes`` were read in all, the rest are listed, not read."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
        members = [m for m in archive.infolist() if not m.is_dir()][:MAX_MEMBERS]
    except ZIP_ERRORS as exc:
        yield "", None, f"a ZIP archive that cannot be read ({exc}): {NOT_READ}"
        return
    left = ARCHIVE_BUDGET * max_bytes
    for member in members:
        if left <= 0:
            yield member.filename.rsplit("/", 1)[-1], None, \
                f"not read: its ZIP archive's files are over {ARCHIVE_BUDGET * max_bytes:,} bytes in all"
            continue
        limit = min(max_bytes, left)
        name, data, why = _member(archive, member, limit)
        if data is not None and len(data) > limit and limit < max_bytes:  # within the file limit, past the budget
            data, why = None, f"not read: its ZIP archive's files are over {ARCHIVE_BUDGET * max_bytes:,} bytes in all"
        left -= len(data or b"")
        yield name, data, why  # a file over max_bytes comes back max_bytes + 1 long: refused as too large


def _member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, max_bytes: int) -> tuple[str, bytes | None, str]:
    name = member.filename.rsplit("/", 1)[-1]
    if member.flag_bits & 0x1:
        return name, None, "encrypted in its ZIP archive: not read"
    try:
        with archive.open(member) as fh:
            data = fh.read(max_bytes + 1)
    except ZIP_ERRORS as exc:
        return name, None, f"in a ZIP archive that cannot be read ({exc})"
    if data[:5] != b"%PDF-" and not name.lower().endswith(".pdf"):
        return name, None, NOT_A_PDF_IN_ZIP
    return name, data, ""
