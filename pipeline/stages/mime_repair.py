"""What real mail clients send that Python's email package misreads, put right before a PDF is lost.

Each repair is applied only where the parser left a sign of the problem (or, for a
forward attached as a file, where the file is named ``.eml``), so a well-formed
message is parsed once and never rewritten; a repair that fails to parse, or
yields no mail, leaves the part as it was:

- **A header line without a colon** (a scanner folding a long Subject without
  indenting the next line, or a stray line): the parser ends the header
  block there (``MissingHeaderBodySeparatorDefect``) and the rest of the
  headers, Content-Type included, becomes the body: the attachments vanish.
  ``repair_header_block`` folds such a line into the header above it when that
  header is free text (Subject, X-...), drops it otherwise, and keeps going,
  when real header lines follow it before the blank line.
- **A space before the colon** (``From : x``, obsolete syntax RFC 5322 4.5.3
  says to accept): the parser takes ``From `` for an mbox envelope line
  (``MisplacedEnvelopeHeaderDefect``) and drops the header. Same repair.
- **A forwarded message in base64 or quoted-printable** (RFC 2046 5.2.1
  forbids it; Exchange and some phones do it): the parser reads the encoded
  text as the message. ``encoded_forward`` decodes it and parses the result.
- **A forwarded message whose own headers the parser misread** (the scanner's
  mail above, forwarded whole): ``misread_forward`` prints it back as it came,
  and it is parsed with the same header repair as a top-level message.
- **An unquoted boundary with a character RFC 2045 says must be quoted**
  (``boundary=----=_NextPart_000_0001``, as scripts write it): the email
  package cuts it at the ``=``, finds none of the parts, and the PDF under it
  was listed as "no PDF found". ``resplit_multipart`` gives the part back with
  the boundary as sent, quoted, to be parsed again (mail readers read it whole).
- **A nested multipart with its parent's boundary** (RFC 2046 forbids it;
  webmail sends it): the inner part's closing delimiter closes the parent too,
  and the parts after it (the PDF) were read as the parent's epilogue.
  ``parts_after_close`` gives back an epilogue that holds the parent's own
  delimiter lines as a multipart to parse.
- **A mail attached as a file** (``forwarded.eml`` as application/octet-stream,
  as some clients forward): a leaf to the parser, listed "not a PDF" with the
  PDFs inside it unread. ``attached_mail`` gives its bytes back to be parsed
  as the forwarded message it is.
- **A Content-Transfer-Encoding with trailing blanks or in odd case**
  (``base64 ``): the email package leaves the payload encoded.
  ``canonical_transfer_encoding`` rewrites the header first.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from email import errors as email_errors
from email.message import EmailMessage, Message

from ..errors import ParseError
from .headers import HEADER_ERRORS

REPAIRABLE = (email_errors.MissingHeaderBodySeparatorDefect, email_errors.MisplacedEnvelopeHeaderDefect)
# headers whose value is parsed: a stray line folded into one would break it, so the line is dropped instead
STRUCTURED = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc", "return-path", "message-id",
                        "in-reply-to", "references", "date", "mime-version", "content-type",
                        "content-transfer-encoding", "content-disposition", "content-id", "resent-from",
                        "resent-to", "resent-cc", "resent-date", "resent-message-id", "resent-sender"})
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")  # a field name (printable ASCII but the colon), blanks, a colon
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# a multipart's boundary parameter in raw bytes, quoted or bare (mime_tree.check_part_count counts parts with it too)
BOUNDARY_PARAM = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
ENCODED = ("base64", "quoted-printable")


def needs_header_repair(msg: Message) -> bool:
    """True when the parser cut the header block short or dropped a header (see the module docstring);
    also for a first line ``From : x``, which it takes for an mbox envelope line without saying so."""
    unixfrom = (msg.get_unixfrom() or "").encode("ascii", "surrogateescape")  # 8-bit bytes came as surrogates
    return any(isinstance(defect, REPAIRABLE) for defect in msg.defects) or bool(_FIELD.match(unixfrom))


def repair_header_block(raw: bytes) -> bytes | None:
    """``raw`` with its header block put right, or None when there is nothing to repair.

    A line that is neither a header nor a folded continuation is a lost fold when a header line follows
    it before the blank line: it joins the free-text header above it, or is dropped after a structured
    one. Lines after the last real header are left alone: there the body began without its blank line.
    ``Name :`` becomes ``Name:``. A leading mbox ``From `` line is kept.
    """
    end = _BLANK_LINE.search(raw)
    head, rest = (raw[:end.start()], raw[end.start():]) if end else (raw, b"")
    declared = BOUNDARY_PARAM.search(head)  # a part's delimiter line right under the headers ends them too
    if declared:
        delimiter = re.search(rb"(?m)^--" + re.escape(declared.group(1) or declared.group(2)), head)
        if delimiter and delimiter.start() > 0:
            head, rest = head[:delimiter.start()], head[delimiter.start():] + rest
    lines = head.splitlines(keepends=True)
    last_field = max((i for i, line in enumerate(lines) if _FIELD.match(line)), default=-1)
    out: list[bytes] = []
    name = b""
    for i, line in enumerate(lines):
        field = _FIELD.match(line)
        if i == 0 and line.startswith(b"From ") and not field:  # mbox envelope line
            out.append(line)
        elif line[:1] in (b" ", b"\t") or i > last_field:  # a fold, or the body without its blank line
            out.append(line)
        elif field:
            name = field.group(1)
            out.append(name + b":" + line[field.end():])
        elif name and name.lower().decode() not in STRUCTURED:
            out.append(b" " + line)
        # else: a stray line under a structured header (or before any header): dropped
    repaired = b"".join(out) + rest
    return repaired if repaired != raw else None


def encoded_forward(part: EmailMessage) -> bytes | None:
    """The forwarded message a message/rfc822 ``part`` carries in base64 or quoted-printable, decoded;
    None for one sent as RFC 2046 says (7bit, 8bit, binary), which the parser has read already."""
    if part.get_content_type() != "message/rfc822":
        return None
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    children = part.get_payload()
    if cte not in ENCODED or not isinstance(children, list) or not children:
        return None
    child = children[0]  # the encoded text, parsed as if it were a message: print it back as it came
    if not isinstance(child, Message) or (cte == "base64" and child.keys()):
        return None  # base64 has no colons: a child with headers was sent in clear under a stale label
    from email.policy import EmailPolicy  # only here: the gateway imports this module, and its start must stay quick

    try:
        text = child.as_bytes(policy=EmailPolicy(refold_source="none", max_line_length=0))  # headers as parsed
    except RecursionError:  # nesting the parser took but the generator cannot print back
        raise ParseError("MIME: a forwarded message is nested too deep to read") from None
    if cte == "base64":
        try:
            return base64.b64decode(b"".join(text.split()))
        except (binascii.Error, ValueError):
            return None
    if any(isinstance(d, email_errors.MissingHeaderBodySeparatorDefect) for d in child.defects):
        # a soft line break (=) in a long header ended the parsed headers there: the generator put a blank
        # line at that point, which was not in the mail
        text = text.replace(b"\n\n", b"\n", 1) if child.keys() else text.removeprefix(b"\n")
    return quopri.decodestring(text)


def misread_forward(part: EmailMessage) -> bytes | None:
    """The forwarded message a message/rfc822 ``part`` carries in clear, printed back as it came, when the parser
    misread its headers (``needs_header_repair``: a header line without a colon cut them short, so its
    Content-Type, and every PDF under it, became body text); None otherwise."""
    if part.get_content_type() != "message/rfc822":
        return None
    children = part.get_payload()
    if not isinstance(children, list) or not children or not isinstance(children[0], Message):
        return None
    child = children[0]
    if not needs_header_repair(child):
        return None
    from email.policy import EmailPolicy

    try:
        text = child.as_bytes(policy=EmailPolicy(refold_source="none", max_line_length=0))  # headers as parsed
    except RecursionError:
        raise ParseError("MIME: a forwarded message is nested too deep to read") from None
    if any(isinstance(d, email_errors.MissingHeaderBodySeparatorDefect) for d in child.defects):
        # the generator put a blank line where the parser stopped reading headers: not in the mail
        text = text.replace(b"\n\n", b"\n", 1) if child.keys() else text.removeprefix(b"\n")
    return text


def resplit_multipart(part: EmailMessage) -> bytes | None:
    """A multipart the parser did not split (its boundary, as parsed, is on no line of its body), with the boundary
    as the raw header spells it quoted, when that one is: bytes to parse again. None otherwise."""
    if part.is_multipart() or part.get_content_maintype() != "multipart":
        return None
    raw = next((value for name, value in part.raw_items() if name.lower() == "content-type"), "")
    found = BOUNDARY_PARAM.search(str(raw).encode("utf-8", "surrogateescape"))
    boundary = (found.group(1) or found.group(2)) if found else None
    if not boundary or boundary.decode("utf-8", "surrogateescape") == part.get_boundary():
        return None  # the same boundary: parsing again finds the same nothing
    body = _raw_text(part.get_payload())
    return _as_multipart(part.get_content_type(), boundary, body)


def later_multipart(part: EmailMessage) -> bytes | None:
    """A leaf whose second (or later) Content-Type header is a multipart whose delimiter lines are in its body, as
    that multipart: the parser reads the first header only, so a stray ``Content-Type: text/plain`` above the
    real one (SpamAssassin's badmime2 sample, a probe's Apple Mail PDF) made every PDF vanish. None otherwise."""
    if part.is_multipart():
        return None
    values = [str(v) for name, v in part.raw_items() if name.lower() == "content-type"][1:]
    for value in values:
        kind = value.split(";", 1)[0].strip().lower()
        found = BOUNDARY_PARAM.search(value.encode("utf-8", "surrogateescape"))
        if kind.startswith("multipart/") and found and kind.isascii():
            return _as_multipart(kind, found.group(1) or found.group(2), _raw_text(part.get_payload()))
    return None


def parts_after_close(part: EmailMessage) -> bytes | None:
    """The parts a multipart's epilogue holds (its own delimiter lines after its closing one: a nested
    multipart that reused its boundary closed it early), as a multipart to parse; None for an epilogue of text."""
    boundary = part.get_boundary() if part.is_multipart() else None
    if not boundary or not part.epilogue:
        return None
    return _as_multipart("multipart/mixed", boundary.encode("utf-8", "surrogateescape"), _raw_text(part.epilogue))


def attached_mail(part: EmailMessage) -> bytes | None:
    """The mail a leaf part named ``*.eml`` (or ``*.msg`` with a mail's text in it, as some clients name a forward)
    carries (decoded), when it begins with a header line; None otherwise."""
    if part.is_multipart() or part.get_content_maintype() in ("multipart", "message"):
        return None
    try:
        name = part.get_filename() or ""
        payload = part.get_payload(decode=True) if name.lower().rstrip().endswith((".eml", ".msg")) else None
    except HEADER_ERRORS:  # headers it cannot read: read_leaf names them
        return None
    if not isinstance(payload, bytes) or not _FIELD.match(payload.lstrip()[:1000]):
        return None
    return payload.lstrip()


def _raw_text(payload: object) -> bytes:
    """A payload the parser kept as text, back as the bytes that came (8-bit bytes are surrogate escapes in it)."""
    return payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""


def _as_multipart(content_type: str, boundary: bytes, body: bytes) -> bytes | None:
    """``body`` from its first delimiter line of ``boundary`` on, under a header block naming it; None without
    one. What comes before is a preamble, which may hold the closing lines of nested multiparts that reused the
    boundary: the parser took the first for the end of this one too, and found no part (a reviewer's find)."""
    first = re.search(rb"^--" + re.escape(boundary) + rb"[ \t]*\r?$", body, re.MULTILINE)
    if b'"' in boundary or b"\\" in boundary or first is None:
        return None
    head = b"Content-Type: " + content_type.encode("ascii", "replace") + b'; boundary="' + boundary + b'"'
    return head + b"\r\n\r\n" + body[first.start():]


_INNER_PADDING = re.compile(r"=[ \t\r\n]*[A-Za-z0-9+/]")  # padding with more base64 after it
_PADDED_PIECE = re.compile(r"[^=]*=*")


def chunked_base64(part: EmailMessage) -> bytes | None:
    """A base64 body encoded in padded pieces (a script that encodes each block it reads), decoded piece by piece;
    None for any other body. The email package stops at the first padding: a probe's 10.6 KB PDF came out as its
    first 1,000 bytes, failed "corrupt"."""
    if str(part.get("content-transfer-encoding", "")).strip().lower() != "base64":
        return None
    text = part.get_payload()
    if not isinstance(text, str):
        return None
    first = text.find("=")  # a memchr: the regex from the start took 0.85 ms a MB
    if first < 0 or not _INNER_PADDING.search(text, first):
        return None
    joined = "".join(text.split())
    try:
        return b"".join(binascii.a2b_base64(piece) for piece in _PADDED_PIECE.findall(joined) if piece)
    except (binascii.Error, ValueError):  # not base64 after all: the package's own decoding stands
        return None


def canonical_transfer_encoding(part: EmailMessage) -> None:
    """Rewrite a Content-Transfer-Encoding the email package would not recognise (``base64 `` with a
    trailing blank, ``Base64\\t``) as its canonical lower-case name, so ``get_payload(decode=True)`` decodes."""
    value = part.get("content-transfer-encoding")
    if value is None:
        return
    canonical = str(value).strip().lower()
    if canonical in ENCODED and str(value) != canonical:
        part.replace_header("Content-Transfer-Encoding", canonical)
