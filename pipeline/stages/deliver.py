"""Delivery: the digest as a reply to the sender, by SMTP relay or into a Maildir outbox.

Every header is built from cleaned one-line values, so nothing in the
incoming mail (CR/LF in a subject, a name, a Message-ID) can add a header.
"""

from __future__ import annotations

import mailbox
import re
import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import DeliveryConfig
from ..errors import DeliveryError
from .digest import Digest
from .parse import clean_header

_MSG_ID = re.compile(r"^<[^<>\s]{1,900}>$")
_ADDRESS = re.compile(r"^[^@\s<>,;:\"]{1,64}@[^@\s<>,;:\"]{1,255}$")


def compose_reply(digest: Digest, email: dict[str, Any], config: DeliveryConfig) -> EmailMessage:
    """Build the reply mail: plain text and HTML alternatives, threaded under the original."""
    recipient = config.recipient or email["from"]
    if not _ADDRESS.match(recipient):
        raise DeliveryError(f"cannot deliver to {clean_header(recipient, 80)!r}: not a plain address", retryable=False)
    msg = EmailMessage()
    msg["From"] = config.sender
    msg["To"] = recipient
    msg["Subject"] = clean_header(digest.subject, 250)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=config.sender.partition("@")[2] or "localhost")
    original = email.get("message_id") or ""
    if _MSG_ID.match(original):
        msg["In-Reply-To"] = original
        msg["References"] = original
    msg.set_content(digest.text)
    msg.add_alternative(digest.html, subtype="html")
    return msg


def send_message(msg: EmailMessage, config: DeliveryConfig) -> str:
    """Hand the message to the relay, or add it to the outbox; return where it went."""
    if config.relay:
        url = urlparse(config.relay)
        try:
            with smtplib.SMTP(url.hostname or "127.0.0.1", url.port or 25, timeout=30) as smtp:
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"relay {config.relay} refused or unreachable: {exc}") from exc
        return config.relay
    box = mailbox.Maildir(Path(config.outbox), create=True)
    key = box.add(msg)
    return str(Path(config.outbox) / "new" / key)
