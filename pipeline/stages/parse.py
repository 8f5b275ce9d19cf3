"""Parse a raw email: who sent it, what it is about, and which of its parts are PDFs.

Attachments are written to files under the run's work directory, never
under their own names: a name from the sender is display text only, and the
file name is built from a sanitised copy of it (``safe_filename``).

Headers (who sent it, its Message-ID) are read by ``headers``.

Which parts count (issue 11). Every part anywhere in the MIME tree is looked at,
without recursion: nested multipart/mixed, alternative and related, and forwarded
mails (message/rfc822): a PDF in an attached .eml is what a user forwards, so it
is digested like a direct attachment. Text parts without a file name are the
message body; every other part that is not a PDF is listed in ``skipped`` with
its reason, so the digest can say what it left out. A multipart without a
boundary parameter is what Python's email package makes of it (a
NoBoundaryInMultipartDefect and the body as one payload, as common clients show
it): its body is taken when it is a PDF, raw or base64, and skipped otherwise.

MIME parsing and its bounds (parts, nesting, a parser out of stack) are ``mime_tree``'s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import ParseError
from .autoreply import automated, digest_reply
from .headers import (
    HEADER_ERRORS,
    MAX_NAME_CHARS,
    attachment_name,
    clean_header,
    header_sender,
    message_id,
    read_header,
    readable,
    return_path,
    why,
)
from .mailpolicy import DEFAULT, SMTP, body_charset, fallback_charset
from .mime_repair import canonical_transfer_encoding, chunked_base64

# the MIME tree's parse and bounds lived here: callers and tests still use parse.MAX_PARTS, parse.parse_message
from .mime_tree import (  # noqa: F401
    MAX_PARTS,
    MAX_REPAIRED_FORWARDS,
    TRACE_HEADERS,
    check_part_count,
    parse_message,
    walk_parts,
)
from .uuencode import uuencoded_files
from .wrappers import (
    GZIP,
    NO_PDF_IN_ZIP,
    NOT_A_PDF_IN_GZIP,
    NOT_A_PDF_IN_ZIP,
    NOT_READ,
    UNREAD_CONTAINERS,
    ZIP,
    archive_files,
    gzip_files,
    may_be_pdf,
    wrapper_kind,
)

# bytes of JSON the parse's result may take: under the store's MAX_INLINE_OUTPUT (64 KB), with room to spare.
# A mail of 300 PDFs with 100-character names (1.7 MB) made a 77 KB result, and the run failed bad_output
RESULT_BUDGET = 48 * 1024
_UNSAFE = re.compile(r"[^\w.\- ]+")
NO_PDF_WITHOUT_BOUNDARY = "multipart whose parts could not be found: no PDF found"


def display_name(name: str | None, index: int) -> str:
    """A printable one-line version of a sender-supplied file name, for the digest."""
    if not name:
        return f"attachment-{index + 1}"
    cleaned = "".join(c for c in unicodedata.normalize("NFC", readable(name)) if c.isprintable()).strip()
    cleaned = cleaned or f"attachment-{index + 1}"
    if len(cleaned) <= MAX_NAME_CHARS:
        return cleaned
    _, dot, ext = cleaned.rpartition(".")
    tail = "." + ext if dot and 0 < len(ext) <= 10 else ""  # a long name cut keeps its extension (it lost ".pdf")
    return cleaned[:MAX_NAME_CHARS - len(tail) - 1] + "…" + tail


def safe_filename(name: str | None, index: int) -> str:
    """Build a file name that cannot escape its directory: no separators, NUL, dot-files, or long names."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFKC", base).encode("utf-8", "replace").decode("utf-8")
    base = _UNSAFE.sub("_", "".join(c for c in base if c.isprintable())).strip(" .")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, "pdf"
    # characters and bytes both capped: 60 four-byte characters would pass 255 bytes, the usual name limit
    stem, ext = _clip_utf8(stem[:60], 150) or "attachment", _clip_utf8(ext[:10], 16) or "pdf"
    return f"{index:03d}-{stem}.{ext}"


def _clip_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` bytes of UTF-8, at a character boundary."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


# what mailers in the wild label PDFs with, besides application/pdf
PDF_TYPES = frozenset({"application/pdf", "application/x-pdf", "application/acrobat", "application/vnd.pdf",
                       "applications/vnd.pdf", "text/pdf", "text/x-pdf"})
# parts named like a PDF that are not one: AppleDouble's resource fork (multipart/appledouble) carries the name of
# the file it describes, and was digested as a "corrupt" PDF beside the real one
NOT_PDF_TYPES = frozenset({"application/applefile"})
APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"
PDF_HEADER_WINDOW = 1024  # PDF readers (PDFium too) find %PDF- within this many bytes of the start (a BOM, NULs)
PDF_HEADER_SEARCH = 64 * 1024  # a PDF's file is stored from its %PDF- when that is this far in (``pdf_start``)


def is_pdf(part: EmailMessage, payload: bytes) -> bool:
    """True for parts of a PDF type, *.pdf names, and parts other than text whose first KB holds ``%PDF-``."""
    kind = part.get_content_type()
    if kind in NOT_PDF_TYPES and payload[:4] == APPLEDOUBLE_MAGIC:  # (AppleSingle, the same type, holds the file)
        return False
    if named_pdf(part) or payload[:5] == b"%PDF-":
        return True
    return part.get_content_maintype() != "text" and b"%PDF-" in payload[:PDF_HEADER_WINDOW]


def named_pdf(part: EmailMessage) -> bool:
    """True for a part the sender labelled (a PDF type) or named (``*.pdf``) a PDF."""
    return part.get_content_type() in PDF_TYPES or (attachment_name(part) or "").lower().endswith(".pdf")


def pdf_start(payload: bytes) -> int:
    """Where ``%PDF-`` begins in the first PDF_HEADER_SEARCH bytes of ``payload`` (0 when it is not there).

    A PDF is stored from there: PDFium looks no further than PDF_HEADER_WINDOW in (a PDF behind 2 KB of text a
    mail gateway prepended failed "corrupt", which pypdf and viewers read), and it counts the file's offsets from
    the header anyway; pypdf then finds its offsets right too."""
    return max(payload.find(b"%PDF-", 0, PDF_HEADER_SEARCH), 0)


def pdf_in_body(payload: bytes) -> bytes | None:
    """The PDF a boundary-less multipart carries as its whole body: raw, or base64 without a header saying so."""
    if payload.lstrip()[:5] == b"%PDF-":
        return payload.lstrip()
    try:
        decoded = base64.b64decode(b"".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if decoded[:5] == b"%PDF-" else None


def read_leaf(part: EmailMessage) -> tuple[str | None, bytes | None, str]:
    """Return (sender's file name, PDF bytes or None, why it is not a PDF) for one leaf part.

    The reason is "" for a PDF and for the message body (text without a file name): nothing to list.
    Raises ParseError naming Content-Disposition when the part's headers cannot be parsed.
    """
    try:
        name = attachment_name(part)
        canonical_transfer_encoding(part)
        payload = chunked_base64(part) or part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        if part.get_content_maintype() == "multipart":  # is_multipart() is False: no boundary parameter
            pdf = pdf_in_body(payload)  # an empty one (a nested multipart that reused its parent's boundary): nothing
            return name, pdf, "" if pdf is not None or not payload.strip() else NO_PDF_WITHOUT_BOUNDARY
        wrapped = wrapper_kind(part, payload)
        if wrapped in (ZIP, GZIP):
            return name, payload, wrapped  # its PDFs are read (_extract_into)
        if wrapped:
            return name, None, f"{wrapped}: {NOT_READ}"
        if is_pdf(part, payload):  # a scanner's base64 PDF without a Content-Transfer-Encoding: decoded here
            return name, payload if payload[:5] == b"%PDF-" else pdf_in_body(payload) or payload, ""
        body = name is None and part.get_content_maintype() == "text" and \
            part.get_content_disposition() != "attachment"
        kind = clean_header(part.get_content_type(), 80)  # as sent: NUL and terminal escapes reached the digest
        return name, None, "" if body else f"not a PDF ({kind})" if kind not in NOT_PDF_TYPES else \
            f"not a PDF ({kind}: Mac file information)"
    except HEADER_ERRORS as exc:
        raise ParseError(f"Content-Disposition: cannot parse an attachment's headers ({why(exc)})") from None


def body_files(part: EmailMessage) -> Iterator[tuple[str, bytes]]:
    """The uuencoded files in a body part (``read_leaf`` found no file name on it); none for most mail."""
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes) and b"begin" in payload:
        yield from uuencoded_files(payload)


def extract_attachments(msg: EmailMessage, dest: Path,
                        limits: IngestConfig) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Write every PDF part to ``dest``; return (pdf items, skipped parts as {"name", "reason"}).

    A PDF over ``limits.max_attachment_bytes`` is listed with ``rejected`` set and not written.
    Raises ParseError (see ``walk_parts`` and ``read_leaf``). On any error the files written so far are removed:
    a parse that fails for a full disk must not keep its room (a prober's 5 MB mail left 1.6 MB of a PDF there
    while it waited, so no other run could get room, and serve answered 451 for good).
    """
    dest.mkdir(parents=True, exist_ok=True)
    pdfs: list[dict[str, Any]] = []
    try:
        skipped = _extract_into(msg, dest, limits, pdfs)
    except BaseException:
        for item in pdfs:
            _unlink_quietly(item["path"])
        raise
    return pdfs, skipped


def _extract_into(msg: EmailMessage, dest: Path, limits: IngestConfig, pdfs: list[dict[str, Any]]
                  ) -> list[dict[str, str]]:
    skipped: list[dict[str, str]] = []
    seen: dict[bytes, str] = {}  # the stored PDFs' hashes: a copy is listed, not digested again
    for part in walk_parts(msg, limits.max_mime_depth):
        if part.is_multipart():
            unread = UNREAD_CONTAINERS.get(part.get_content_type())
            if unread:
                pdfs.append(_unread(None, unread, len(pdfs) + len(skipped)))
            continue
        raw_name, payload, reason = read_leaf(part)
        if reason in (ZIP, GZIP):
            files = archive_files(payload or b"", limits.max_attachment_bytes, named_pdf(part)) if reason == ZIP \
                else gzip_files(payload or b"", limits.max_attachment_bytes, raw_name)
            for member, data, why in files:
                _count_file(pdfs, skipped)
                if data is not None:
                    _add_pdf(member, data, dest, limits, pdfs, skipped, seen)
                elif not why.startswith((NOT_A_PDF_IN_ZIP, NO_PDF_IN_ZIP, NOT_A_PDF_IN_GZIP)) and may_be_pdf(member):
                    # encrypted, damaged, past the budget; an archive labelled or named a PDF with no PDF in it
                    pdfs.append(_unread(member or raw_name, why, len(pdfs) + len(skipped)))
                else:
                    skipped.append({"name": display_name(member or raw_name, len(pdfs) + len(skipped)),
                                    "reason": why})
        elif payload is not None:
            _add_pdf(raw_name, payload, dest, limits, pdfs, skipped, seen)
        elif reason.endswith(NOT_READ):  # a wrapper
            pdfs.append(_unread(raw_name, reason, len(pdfs) + len(skipped)))
        elif reason:
            skipped.append({"name": display_name(raw_name, len(pdfs) + len(skipped)), "reason": reason})
        else:  # the message body
            for uu_name, data in body_files(part):
                _count_file(pdfs, skipped)
                if data[:5] == b"%PDF-" or uu_name.lower().endswith(".pdf"):
                    _add_pdf(uu_name, data, dest, limits, pdfs, skipped, seen)
                else:
                    skipped.append({"name": display_name(uu_name, len(pdfs) + len(skipped)),
                                    "reason": "not a PDF (uuencoded in the body)"})
    return skipped


def _count_file(pdfs: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
    """One more file from inside a part (uuencoded in a body, in a ZIP archive): one bound for the whole mail."""
    if len(pdfs) + len(skipped) >= MAX_PARTS:
        raise ParseError(f"MIME: more than {MAX_PARTS:,} parts (files in bodies and archives counted)")


def _unread(raw_name: str | None, why: str, index: int) -> dict[str, Any]:
    """An item for a file that may hold PDFs and is not read (``wrappers``): its ingest_pdf fails it as not_read."""
    return {"name": display_name(raw_name, index), "size": 0, "path": None, "unread": why}


def _add_pdf(raw_name: str | None, payload: bytes, dest: Path, limits: IngestConfig, pdfs: list[dict[str, Any]],
             skipped: list[dict[str, str]], seen: dict[bytes, str]) -> None:
    """Store a PDF part as the mail's next document, or list it when it is a copy of one stored before (``seen``:
    the stored ones' hashes and names): a mail with the same PDF attached twice (a forward with the original
    re-attached) was extracted and digested twice. Hashing costs about 1.3 ms a MB."""
    body = memoryview(payload)[pdf_start(payload):]  # a view: no copy of the PDF
    key = hashlib.blake2b(body, digest_size=16).digest()
    if key in seen:
        name = display_name(raw_name, len(pdfs) + len(skipped))
        skipped.append({"name": name, "reason": f"the same file as {seen[key]} (above)"})  # read or not, once
        return
    item = _store_pdf(raw_name, payload, body, len(pdfs), dest, limits.max_attachment_bytes)
    if item["path"]:  # two copies of a file over the size limit are each listed as such
        seen[key] = item["name"]
    pdfs.append(item)


def _store_pdf(raw_name: str | None, payload: bytes, body: memoryview, index: int, dest: Path,
               max_bytes: int) -> dict[str, Any]:
    """Write ``body`` (the part's ``payload`` from its ``%PDF-``) as the next document, or refuse it over
    ``max_bytes``; its item for the mail's list."""
    item: dict[str, Any] = {"name": display_name(raw_name, index), "size": len(payload), "path": None}
    if len(payload) > max_bytes:
        item["rejected"] = f"attachment is {len(payload):,} bytes, over the {max_bytes:,}-byte limit"
    else:
        path = dest / safe_filename(raw_name, index)
        try:
            path.write_bytes(body)
        except BaseException:  # half written (a full disk): it must not keep the room it took
            _unlink_quietly(str(path))
            raise
        item["path"] = str(path)
    return item


def _unlink_quietly(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def summarize_message(raw: bytes, work_dir: Path, limits: IngestConfig) -> dict[str, Any]:
    """Parse ``raw`` and return the facts later steps need (small JSON), PDF parts written to files.

    ``limits`` gives max_attachment_bytes and max_mime_depth. ``return_path`` is the envelope sender the
    gateway recorded (see ``return_path``); ``from``/``from_name`` are the header's, for display.
    Raises ParseError (reason malformed_email). Raw 8-bit header bytes that are not UTF-8 are read in the charset
    the mail names for its text, if any (``mailpolicy.body_charset``).
    """
    with fallback_charset(body_charset(raw)):
        return _summarize(raw, work_dir, limits)


def _summarize(raw: bytes, work_dir: Path, limits: IngestConfig) -> dict[str, Any]:
    msg = parse_message(raw, limits.max_mime_depth)
    envelope = return_path(msg)
    machine_made = automated(msg)
    sender, name = header_sender(msg, replied_at_from=envelope is None and machine_made is None)
    pdfs, skipped = extract_attachments(msg, work_dir / "attachments", limits)
    subject = clean_header(read_header(msg, "Subject"))
    return fit_result({
        "subject": subject,
        "from": sender,
        "from_name": name,
        "return_path": envelope,
        "message_id": message_id(msg),
        "attachments": pdfs,
        "skipped": skipped,
        # machine-made or list mail, or an answer to a digest: see autoreply (None for a person's mail)
        "automated": machine_made or digest_reply(msg, subject, bool(pdfs)),
    })


def fit_result(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with as many of its PDFs (in the mail's order) and listed parts as fit ``RESULT_BUDGET``; the rest
    are named in one entry each of ``skipped``, so the digest says how many were left out and why. The files of
    PDFs left out are removed."""
    if len(json.dumps(info)) <= RESULT_BUDGET:
        return info
    room = RESULT_BUDGET - len(json.dumps({**info, "attachments": [], "skipped": []})) - 600  # the two notes
    pdfs, left_out = _fitting(info["attachments"], room)
    room -= len(json.dumps(pdfs))
    skipped, unlisted = _fitting(info["skipped"], room)
    for item in left_out:
        _unlink_quietly(item.get("path"))  # a file that cannot go costs disk until the run sheds, not the run
    if left_out:
        skipped.append({"name": f"{len(left_out)} more PDF(s)", "reason": f"not digested: the first {len(pdfs)} "
                        f"PDFs' names fill the {RESULT_BUDGET // 1024} KB a mail's list of PDFs may take"})
    if unlisted:
        skipped.append({"name": f"{len(unlisted)} more part(s)", "reason": "not PDFs (too many to list one by one)"})
    return {**info, "attachments": pdfs, "skipped": skipped}


def _fitting(items: list[dict[str, Any]], room: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the first ``items`` whose JSON fits ``room`` bytes, the rest)."""
    for n, item in enumerate(items):
        room -= len(json.dumps(item)) + 2
        if room < 0:
            return items[:n], items[n:]
    return items, []


def wrap_pdf(pdf: bytes, filename: str, sender: str = "ingest@localhost") -> bytes:
    """Wrap a bare PDF as an email with one attachment, so it runs through the same workflow."""
    msg = EmailMessage(policy=DEFAULT)
    msg["From"] = sender
    msg["To"] = sender
    msg["Subject"] = clean_header(filename)
    msg.set_content(f"{clean_header(filename)} submitted with `python -m pipeline ingest`.")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename=display_name(filename, 0))
    return msg.as_bytes(policy=SMTP)
