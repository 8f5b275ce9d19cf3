"""Parse a raw email: who sent it, what it is about, and which attachments are PDFs.

Attachments are written to files under the run's work directory, never
under their own names: a name from the sender is display text only, and the
file name is built from a sanitised copy of it (``safe_filename``).

Addresses are parsed by ``email.headerregistry`` (RFC 5322: quoted local
parts, display names with commas, encoded words, comments), never by regexes.
Odd headers make the email package raise instead of recording a defect; every
such exception becomes a ParseError that names the header.
"""

from __future__ import annotations

import re
import unicodedata
from email import errors as email_errors
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from pathlib import Path
from typing import Any

from ..errors import ParseError

MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r"[^\w.\- ]+")
# What the email package raises on odd header input (CPython 3.11: ValueError for an encoded word that
# decodes to CR/LF, IndexError for "a@", AttributeError/TypeError for some 8-bit junk, HeaderParseError).
HEADER_ERRORS = (ValueError, LookupError, TypeError, AttributeError, email_errors.MessageError)


def parse_message(raw: bytes) -> EmailMessage:
    """Parse MIME leniently; raise ParseError when there is no usable header block or sender."""
    try:  # the parser reads Content-Type and Content-Transfer-Encoding of every part while it parses
        msg = BytesParser(policy=policy.default).parsebytes(raw)
    except HEADER_ERRORS as exc:
        raise ParseError(f"Content-Type: cannot parse the MIME headers of a part ({exc})") from exc
    if not list(msg.keys()):
        raise ParseError("not an email: no header block (is this raw MIME?)")
    sender_address(msg)
    return msg  # type: ignore[return-value]


def raw_header(msg: EmailMessage, name: str) -> str:
    """The unparsed value of header ``name`` as one printable line, for error messages."""
    return clean_header(next((v for k, v in msg.raw_items() if k.lower() == name.lower()), ""), 80)


def read_header(msg: EmailMessage, name: str) -> Any:
    """Return header ``name`` parsed by the message's policy (None when absent); ParseError naming it if unparsable."""
    try:
        return msg[name]
    except HEADER_ERRORS as exc:
        raise ParseError(f"{name}: cannot parse {raw_header(msg, name)!r} ({exc})") from exc


def parse_mailboxes(name: str, value: str) -> tuple[list[Address], tuple[Exception, ...]]:
    """Parse ``value`` as the address header ``name``; return (its mailboxes, the parser's defects).

    Groups are flattened; mailboxes without a local part or a domain are left out.
    Raises ParseError naming the header when the email package cannot parse it.
    """
    try:
        header = policy.default.header_factory(name, value)
        addresses = list(header.addresses)
    except HEADER_ERRORS as exc:
        raise ParseError(f"{name}: cannot parse {clean_header(value, 80)!r} ({exc})") from exc
    return usable_mailboxes(addresses), tuple(header.defects)


def usable_mailboxes(addresses: Any) -> list[Address]:
    """The mailboxes someone can be written to: both a local part and a domain ("<>" and "x" are not)."""
    return [a for a in addresses if a.username and a.domain]


def addr_spec(address: Address, name: str) -> str:
    """The address as RFC 5322 writes it (local part quoted when needed), 8-bit bytes decoded as UTF-8.

    A raw 8-bit header reaches the parser as surrogate escapes; RFC 6532 says they are UTF-8.
    Raises ParseError naming header ``name`` when they are not.
    """
    try:
        return address.addr_spec.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError as exc:
        raise ParseError(f"{name}: address {clean_header(address.addr_spec, 80)!r} is not valid UTF-8") from exc


def sender_address(msg: EmailMessage) -> str:
    """Return the addr-spec of the first usable mailbox in From:; ParseError naming the header otherwise."""
    header = read_header(msg, "From")
    mailboxes = usable_mailboxes(header.addresses if header is not None else ())
    if not mailboxes:
        raise ParseError(f"From: no usable address in {raw_header(msg, 'From') or 'missing'!r}: nobody to reply to")
    return addr_spec(mailboxes[0], "From")


def display_name(name: str | None, index: int) -> str:
    """A printable one-line version of a sender-supplied file name, for the digest."""
    if not name:
        return f"attachment-{index + 1}"
    cleaned = "".join(c for c in unicodedata.normalize("NFC", name) if c.isprintable()).strip()
    return (cleaned or f"attachment-{index + 1}")[:MAX_NAME_CHARS]


def safe_filename(name: str | None, index: int) -> str:
    """Build a file name that cannot escape its directory: no separators, NUL, dot-files, or long names."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFKC", base).encode("utf-8", "replace").decode("utf-8")
    base = _UNSAFE.sub("_", "".join(c for c in base if c.isprintable())).strip(" .")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, "pdf"
    stem, ext = stem[:60] or "attachment", ext[:10] or "pdf"
    return f"{index:03d}-{stem}.{ext}"


def is_pdf(part: EmailMessage, payload: bytes) -> bool:
    """True for application/pdf parts, *.pdf names, and octet-streams that start like a PDF."""
    name = (part.get_filename() or "").lower()
    return part.get_content_type() == "application/pdf" or name.endswith(".pdf") or payload[:5] == b"%PDF-"


def read_attachments(msg: EmailMessage) -> list[tuple[str | None, bytes, bool]]:
    """Return (sender's file name, decoded payload, is it a PDF) for every attachment part.

    Raises ParseError naming Content-Disposition when a part's headers cannot be parsed.
    """
    try:
        parts = []
        for part in msg.iter_attachments():
            payload = part.get_payload(decode=True)
            payload = payload if isinstance(payload, bytes) else b""
            parts.append((part.get_filename(), payload, is_pdf(part, payload)))  # type: ignore[arg-type]
    except HEADER_ERRORS as exc:
        raise ParseError(f"Content-Disposition: cannot parse an attachment's headers ({exc})") from exc
    return parts


def extract_attachments(msg: EmailMessage, dest: Path, max_bytes: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Write PDF attachments to ``dest``; return (pdf items, names of skipped non-PDF parts).

    A PDF over ``max_bytes`` is listed with ``rejected`` set and not written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    pdfs: list[dict[str, Any]] = []
    skipped: list[str] = []
    for raw_name, payload, pdf in read_attachments(msg):
        if not pdf:
            skipped.append(display_name(raw_name, len(pdfs) + len(skipped)))
            continue
        index = len(pdfs)
        item: dict[str, Any] = {"name": display_name(raw_name, index), "size": len(payload), "path": None}
        if len(payload) > max_bytes:
            item["rejected"] = f"attachment is {len(payload):,} bytes, over the {max_bytes:,}-byte limit"
        else:
            path = dest / safe_filename(raw_name, index)
            path.write_bytes(payload)
            item["path"] = str(path)
        pdfs.append(item)
    return pdfs, skipped


def clean_header(value: object, limit: int = 200) -> str:
    """One line of printable text from a header value: no CR/LF can reach an outgoing header."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(value or "")).split())[:limit]


def summarize_message(raw: bytes, work_dir: Path, max_attachment_bytes: int) -> dict[str, Any]:
    """Parse ``raw`` and return the facts later steps need (small JSON), attachments written to files."""
    msg = parse_message(raw)
    pdfs, skipped = extract_attachments(msg, work_dir / "attachments", max_attachment_bytes)
    return {
        "subject": clean_header(read_header(msg, "Subject")),
        "from": sender_address(msg),
        "message_id": clean_header(read_header(msg, "Message-ID"), 998) or None,
        "attachments": pdfs,
        "skipped": skipped,
    }


def wrap_pdf(pdf: bytes, filename: str, sender: str = "ingest@localhost") -> bytes:
    """Wrap a bare PDF as an email with one attachment, so it runs through the same workflow."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = sender
    msg["Subject"] = clean_header(filename)
    msg.set_content(f"{clean_header(filename)} submitted with `python -m pipeline ingest`.")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename=display_name(filename, 0))
    return msg.as_bytes(policy=SMTP)
