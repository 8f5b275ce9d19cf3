"""Parse a raw mail into its MIME tree, within bounds, and walk every part of it (for ``parse``).

Bounds, each a ParseError (reason ``malformed_email``) rather than minutes of
work or an untyped RecursionError: parts nested more than
``IngestConfig.max_mime_depth`` levels below the message; more than
``MAX_PARTS`` parts (counted on the raw bytes before parsing, from the declared
boundaries' delimiter lines, and again on the tree); nesting so deep that the
email package's parser (which recurses once per level) runs out of stack.

A header block the parser misread (a header line without a colon cut it short)
is put right and parsed again (``mime_repair``); so is a forwarded mail in
base64 or with misread headers, which ``walk_parts`` reads like any other part.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from itertools import islice
from typing import Any

from ..config import IngestConfig
from ..errors import ParseError
from .headers import HEADER_ERRORS, why
from .mailpolicy import DEFAULT
from .mime_repair import (
    BOUNDARY_PARAM,
    attached_mail,
    encoded_forward,
    later_multipart,
    misread_forward,
    needs_header_repair,
    parts_after_close,
    repair_header_block,
    resplit_multipart,
)
from .wrappers import OLE_MAGIC, UNREAD_CONTAINERS

MAX_PARTS = 1000  # MIME parts (containers and leaves) in one message; a real mail has a handful
MAX_REPAIRED_FORWARDS = 3  # forwarded mails whose misread headers are repaired (each costs a parse of its tree)
MAX_RESPLITS = 3  # multiparts parsed again with their boundary as sent, or their epilogue's parts (mime_repair)
TRACE_HEADERS = frozenset({"return-path", "received"})  # what mail servers add: no sign the sender wrote a mail
MAIL_HEADERS = frozenset({"from", "date", "message-id", "mime-version", "received", "subject", "to"})


def parse_message(raw: bytes, max_depth: int = IngestConfig.max_mime_depth) -> EmailMessage:
    """Parse MIME leniently; raise ParseError when there is no usable header block.

    Also ParseError for more than MAX_PARTS parts (checked on the raw bytes first, so a mail of
    100,000 empty parts costs a scan, not minutes of parsing) and for nesting too deep to parse.
    """
    msg = _parse_repaired(_without_leading_blanks(raw), max_depth)
    if not [name for name in msg.keys() if name.lower() not in TRACE_HEADERS]:  # the gateway writes Return-Path
        if OLE_MAGIC in raw[:4096]:
            raise ParseError("not an email: an Outlook .msg file or another Office compound file (save the mail "
                             "as .eml, or forward it)")
        raise ParseError("not an email: no header block (is this raw MIME?)")
    return msg  # type: ignore[return-value]


def _without_leading_blanks(raw: bytes) -> bytes:
    """``raw`` without a UTF-8 byte-order mark and blank lines before its first header, as a Windows tool or a
    script saves a mail: a probe's BOM made From: the first header's name's tail ("From: no such header"), and a
    blank line first read as an empty header block ("not an email")."""
    return (raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw).lstrip(b"\r\n")  # the same object when none


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


def _reparsed(part: EmailMessage, raw: bytes, max_depth: int, parse: Callable[[bytes, int], EmailMessage],
              as_mail: bool = False) -> EmailMessage:
    """``raw`` (a repair of ``part``) parsed, or ``part`` as it was when that fails or, ``as_mail``, yields no mail
    (a note named notes.eml): a repair never makes a mail worse than the parse it repairs (a forward attached as
    a file with 1,001 parts failed the whole mail, not just itself)."""
    try:
        parsed = parse(raw, max_depth)
    except ParseError:
        return part
    if as_mail and not MAIL_HEADERS.intersection(name.lower() for name in parsed.keys()):
        return part
    return parsed


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
    seen = repaired = resplit = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if depth > max_depth:
            raise ParseError(f"MIME: a part is nested {depth} levels deep, over the limit of {max_depth}")
        if seen > MAX_PARTS:
            raise ParseError(f"MIME: more than {MAX_PARTS:,} parts")
        # an unquoted boundary the parser cut short ("----=_NextPart_0"): its parts were never found
        # or a multipart named by a second Content-Type header, which the parser does not read
        again = (resplit_multipart(part) or later_multipart(part)) if resplit < MAX_RESPLITS else None
        if again is not None:
            part, resplit = _reparsed(part, again, max_depth, _parse), resplit + 1
        # a forward attached as a file ("forwarded.eml", application/octet-stream): read as the mail it is
        forward = attached_mail(part) if repaired < MAX_REPAIRED_FORWARDS else None
        if forward is not None:
            part, repaired = _reparsed(part, forward, max_depth, _parse_repaired, as_mail=True), repaired + 1
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
            # a nested multipart that reused this one's boundary closed it: the parts after are in its epilogue
            after = parts_after_close(part) if resplit < MAX_RESPLITS else None
            if after is not None:
                extra = _reparsed(part, after, max_depth, _parse)
                if extra is not part and extra.is_multipart():  # an epilogue of closing lines only: no parts
                    children = children + extra.get_payload()  # type: ignore[operator]
                resplit += 1
            stack.extend((child, depth + 1) for child in reversed(children))
