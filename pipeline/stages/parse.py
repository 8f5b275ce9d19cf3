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

Bounds, each a ParseError (reason ``malformed_email``) rather than minutes of
work or an untyped RecursionError: parts nested more than
``IngestConfig.max_mime_depth`` levels below the message; more than
``MAX_PARTS`` parts (counted on the raw bytes before parsing, from the declared
boundaries' delimiter lines, and again on the tree); nesting so deep that the
email package's parser (which recurses once per level) runs out of stack.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from itertools import islice
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import ParseError
from .autoreply import automated, digest_subject_reply
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
from .mailpolicy import DEFAULT, SMTP
from .mime_repair import (
    BOUNDARY_PARAM,
    canonical_transfer_encoding,
    encoded_forward,
    misread_forward,
    needs_header_repair,
    repair_header_block,
)
from .uuencode import uuencoded_files
from .wrappers import (
    NO_PDF_IN_ZIP,
    NOT_A_PDF_IN_ZIP,
    NOT_READ,
    UNREAD_CONTAINERS,
    ZIP,
    archive_files,
    may_be_pdf,
    wrapper_kind,
)

MAX_PARTS = 1000  # MIME parts (containers and leaves) in one message; a real mail has a handful
MAX_REPAIRED_FORWARDS = 3  # forwarded mails whose misread headers are repaired (each costs a parse of its tree)
# bytes of JSON the parse's result may take: under the store's MAX_INLINE_OUTPUT (64 KB), with room to spare.
# A mail of 300 PDFs with 100-character names (1.7 MB) made a 77 KB result, and the run failed bad_output
RESULT_BUDGET = 48 * 1024
_UNSAFE = re.compile(r"[^\w.\- ]+")
NO_PDF_WITHOUT_BOUNDARY = "multipart without boundary: no PDF found"
TRACE_HEADERS = frozenset({"return-path", "received"})  # what mail servers add: no sign the sender wrote a mail


def parse_message(raw: bytes, max_depth: int = IngestConfig.max_mime_depth) -> EmailMessage:
    """Parse MIME leniently; raise ParseError when there is no usable header block.

    Also ParseError for more than MAX_PARTS parts (checked on the raw bytes first, so a mail of
    100,000 empty parts costs a scan, not minutes of parsing) and for nesting too deep to parse.
    """
    msg = _parse_repaired(raw, max_depth)
    if not [name for name in msg.keys() if name.lower() not in TRACE_HEADERS]:  # the gateway writes Return-Path
        raise ParseError("not an email: no header block (is this raw MIME?)")
    return msg  # type: ignore[return-value]


def _parse_repaired(raw: bytes, max_depth: int) -> EmailMessage:
    """``_parse``, once more on the header block put right where the parser shows it misread it (a header line
    without a colon cut it short: ``mime_repair``)."""
    msg = _parse(raw, max_depth)
    if needs_header_repair(msg):
        repaired = repair_header_block(raw)
        if repaired is not None:
            msg = _parse(repaired, max_depth)
    return msg


def _parse(raw: bytes, max_depth: int) -> EmailMessage:
    """The email package's parse of ``raw``; ParseError for too many parts, nesting too deep, or MIME headers
    it cannot read."""
    check_part_count(raw)
    try:  # the parser reads Content-Type and Content-Transfer-Encoding of every part while it parses
        return BytesParser(_counted_parts(MAX_PARTS), policy=DEFAULT).parsebytes(raw)  # type: ignore[return-value]
    except _TooManyParts:
        raise ParseError(f"MIME: more than {MAX_PARTS:,} parts") from None
    except RecursionError as exc:  # the feed parser recurses once per multipart level: ~300 levels exhaust it
        if _mime_levels(exc) > max_depth:  # (a deep tree may run out of stack in a part's header parse)
            raise ParseError(f"MIME: parts nested too deep to parse (the limit is {max_depth} levels)") from None
        raise ParseError(f"Content-Type: cannot parse the MIME headers of a part ({why(exc)})") from None
    except HEADER_ERRORS as exc:
        raise ParseError(f"Content-Type: cannot parse the MIME headers of a part ({why(exc)})") from exc


class _TooManyParts(Exception):
    """Raised inside the email package's parser at its part MAX_PARTS + 1."""


def _counted_parts(limit: int) -> Callable[..., EmailMessage]:
    """A message factory for the parser that raises _TooManyParts once it made ``limit`` parts. The scan of
    ``check_part_count`` first is cheap but reads only the usual spellings: a boundary given in RFC 2231 pieces
    (``boundary*0=``), bare-CR line ends or a boundary over 200 characters passed it, and 400,000 empty parts
    held a parse worker for 45 s, every other mail's parse waiting behind it. This bounds whatever the parser
    itself reads as parts."""
    made = -1  # the parser makes one message when it starts, to see which arguments the factory takes

    def make(policy: Any = DEFAULT) -> EmailMessage:
        nonlocal made
        made += 1
        if made > limit:
            raise _TooManyParts
        return EmailMessage(policy=policy)

    return make


def _mime_levels(exc: BaseException) -> int:
    """How many of the feed parser's frames ``exc`` passed through: about one per multipart level."""
    frames, frame = 0, exc.__traceback__
    while frame is not None:
        frames += frame.tb_frame.f_code.co_filename.endswith("feedparser.py")
        frame = frame.tb_next
    return frames


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


def check_part_count(raw: bytes) -> None:
    """Raise ParseError when ``raw`` has more than MAX_PARTS delimiter lines of its declared boundaries.

    Every part of a multipart begins at such a line, so their number bounds the parts the parser would
    build; two regex scans in C, whatever the size.
    """
    boundaries = {quoted or bare for quoted, bare in BOUNDARY_PARAM.findall(raw)}
    if not boundaries:
        return
    count = len(boundaries)
    if count <= MAX_PARTS:
        alternatives = b"|".join(re.escape(b) for b in sorted(boundaries, key=len, reverse=True))
        delimiter = re.compile(rb"^--(?:" + alternatives + rb")[ \t]*\r?$", re.MULTILINE)
        count = sum(1 for _ in islice(delimiter.finditer(raw), MAX_PARTS + 1))
    if count > MAX_PARTS:
        raise ParseError(f"MIME: more than {MAX_PARTS:,} parts")


def walk_parts(msg: EmailMessage, max_depth: int) -> Iterator[EmailMessage]:
    """Yield every part of ``msg`` in document order, depth first, with an explicit stack (no recursion).

    Raises ParseError for a part nested more than ``max_depth`` levels below the message, or more
    than MAX_PARTS parts in all.
    """
    stack: list[tuple[EmailMessage, int]] = [(msg, 0)]
    seen = repaired = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if depth > max_depth:
            raise ParseError(f"MIME: a part is nested {depth} levels deep, over the limit of {max_depth}")
        if seen > MAX_PARTS:
            raise ParseError(f"MIME: more than {MAX_PARTS:,} parts")
        yield part
        if part.is_multipart() and part.get_content_type() not in UNREAD_CONTAINERS:  # (listed, not read)
            # multipart/* with a boundary, and message/rfc822 (one child: the message)
            children: list[EmailMessage] = part.get_payload()  # type: ignore[assignment]
            # a forward in base64 (its child is the encoded text), or one whose headers the parser misread (a
            # scanner's mail forwarded whole: its PDFs were lost without a word). Each is printed back and parsed
            # again with all it holds: at most MAX_REPAIRED_FORWARDS of the latter, or a forward misread at each
            # of 31 levels parsed 50 MB 31 times (65 s)
            forwarded = encoded_forward(part)
            if forwarded is None and repaired < MAX_REPAIRED_FORWARDS:
                forwarded = misread_forward(part)
                repaired += forwarded is not None
            if forwarded is not None:
                children = [_parse_repaired(forwarded, max_depth)]
            stack.extend((child, depth + 1) for child in reversed(children))


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
        payload = part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        if part.get_content_maintype() == "multipart":  # is_multipart() is False: no boundary parameter
            pdf = pdf_in_body(payload)
            return name, pdf, "" if pdf is not None else NO_PDF_WITHOUT_BOUNDARY
        wrapped = wrapper_kind(part, payload)
        if wrapped == ZIP:
            return name, payload, ZIP  # its PDFs are read (_extract_into)
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
    for part in walk_parts(msg, limits.max_mime_depth):
        if part.is_multipart():
            unread = UNREAD_CONTAINERS.get(part.get_content_type())
            if unread:
                pdfs.append(_unread(None, unread, len(pdfs) + len(skipped)))
            continue
        raw_name, payload, reason = read_leaf(part)
        if reason == ZIP:
            for member, data, why in archive_files(payload or b"", limits.max_attachment_bytes, named_pdf(part)):
                _count_file(pdfs, skipped)
                if data is not None:
                    pdfs.append(_store_pdf(member, data, len(pdfs), dest, limits.max_attachment_bytes))
                elif not why.startswith((NOT_A_PDF_IN_ZIP, NO_PDF_IN_ZIP)) and may_be_pdf(member):  # encrypted,
                    # damaged, past the budget; an archive labelled or named a PDF with no PDF in it
                    pdfs.append(_unread(member or raw_name, why, len(pdfs) + len(skipped)))
                else:
                    skipped.append({"name": display_name(member or raw_name, len(pdfs) + len(skipped)),
                                    "reason": why})
        elif payload is not None:
            pdfs.append(_store_pdf(raw_name, payload, len(pdfs), dest, limits.max_attachment_bytes))
        elif reason.endswith(NOT_READ):  # a wrapper
            pdfs.append(_unread(raw_name, reason, len(pdfs) + len(skipped)))
        elif reason:
            skipped.append({"name": display_name(raw_name, len(pdfs) + len(skipped)), "reason": reason})
        else:  # the message body
            for uu_name, data in body_files(part):
                _count_file(pdfs, skipped)
                if data[:5] == b"%PDF-" or uu_name.lower().endswith(".pdf"):
                    pdfs.append(_store_pdf(uu_name, data, len(pdfs), dest, limits.max_attachment_bytes))
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


def _store_pdf(raw_name: str | None, payload: bytes, index: int, dest: Path, max_bytes: int) -> dict[str, Any]:
    item: dict[str, Any] = {"name": display_name(raw_name, index), "size": len(payload), "path": None}
    if len(payload) > max_bytes:
        item["rejected"] = f"attachment is {len(payload):,} bytes, over the {max_bytes:,}-byte limit"
    else:
        path = dest / safe_filename(raw_name, index)
        try:
            path.write_bytes(memoryview(payload)[pdf_start(payload):])  # a view: no copy of the PDF
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
    Raises ParseError (reason malformed_email).
    """
    msg = parse_message(raw, limits.max_mime_depth)
    envelope = return_path(msg)
    sender, name = header_sender(msg, envelope)
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
        "automated": automated(msg) or digest_subject_reply(subject, bool(pdfs)),
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
