"""Parse a raw email: who sent it, what it is about, and which attachments are PDFs.

Attachments are written to files under the run's work directory, never
under their own names: a name from the sender is display text only, and the
file name is built from a sanitised copy of it (``safe_filename``).
"""

from __future__ import annotations

import re
import unicodedata
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from ..errors import ParseError

MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r"[^\w.\- ]+")


def parse_message(raw: bytes) -> EmailMessage:
    """Parse MIME leniently; raise ParseError when there is no usable header block or sender."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    if not list(msg.keys()):
        raise ParseError("not an email: no header block (is this raw MIME?)")
    sender = parseaddr(str(msg.get("From", "")))[1]
    if "@" not in sender:
        raise ParseError(f"no usable From address ({str(msg.get('From', 'missing'))[:80]!r}): nobody to reply to")
    return msg  # type: ignore[return-value]


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


def extract_attachments(msg: EmailMessage, dest: Path, max_bytes: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Write PDF attachments to ``dest``; return (pdf items, names of skipped non-PDF parts).

    A PDF over ``max_bytes`` is listed with ``rejected`` set and not written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    pdfs: list[dict[str, Any]] = []
    skipped: list[str] = []
    for part in msg.iter_attachments():
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = b""
        raw_name = part.get_filename()
        if not is_pdf(part, payload):  # type: ignore[arg-type]
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
        "subject": clean_header(msg.get("Subject", "")),
        "from": parseaddr(str(msg.get("From")))[1],
        "message_id": clean_header(msg.get("Message-ID", ""), 998) or None,
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
