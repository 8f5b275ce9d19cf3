"""Delivery: the digest as a reply to the sender, by SMTP relay or into a Maildir outbox.

Every header is built from cleaned one-line values, so nothing in the
incoming mail (CR/LF in a subject, a name, a Message-ID) can add a header.
The To: header is an ``email.headerregistry.Address`` built from the parsed
addr-spec alone (no display name), so a quoted local part such as
``"System Administrator"@example.com`` is written quoted, as RFC 5322 wants.
"""

from __future__ import annotations

import json
import mailbox
import os
import re
import smtplib
from email import errors as email_errors
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import DeliveryConfig
from ..errors import DeliveryError, ParseError
from .digest import Digest
from .parse import clean_header, parse_mailboxes

_MSG_ID = re.compile(r"^<[^<>\s]{1,900}>$")
# Defects that still leave one well-defined mailbox: a UTF-8 local part (RFC 6532) and an obsolete route.
_HARMLESS = (email_errors.NonASCIILocalPartDefect, email_errors.ObsoleteHeaderDefect)
# RFC 6532: a UTF-8 address is written as UTF-8, never as an RFC 2047 encoded word (which policy.default
# would silently put in the local part); a relay must then offer SMTPUTF8 (smtplib checks).
_UTF8 = policy.default.clone(utf8=True)


def reply_address(text: str) -> Address:
    """Parse ``text`` as the one mailbox the reply goes to.

    Raises DeliveryError(retryable=False) when it is not exactly one mailbox with a
    local part and a domain: another try cannot make it an address.
    """
    shown = clean_header(text, 80)
    try:
        mailboxes, defects = parse_mailboxes("To", text)
    except ParseError as exc:
        raise DeliveryError(f"cannot deliver to {shown!r}: {exc}", retryable=False) from exc
    broken = [d for d in defects if not isinstance(d, _HARMLESS)]
    if len(mailboxes) != 1 or broken or not text.isprintable():
        raise DeliveryError(f"cannot deliver to {shown!r}: not a single mailbox address", retryable=False)
    return Address(username=mailboxes[0].username, domain=mailboxes[0].domain)


def compose_reply(digest: Digest, email: dict[str, Any], config: DeliveryConfig,
                  message_id: str | None = None) -> EmailMessage:
    """Build the reply mail: plain text and HTML alternatives, threaded under the original.

    Raises DeliveryError(retryable=False) when the recipient is not one mailbox address.
    """
    recipient = reply_address(config.recipient or email["from"])
    msg = EmailMessage(policy=policy.default if str(recipient).isascii() else _UTF8)
    msg["From"] = config.sender
    msg["To"] = recipient
    msg["Subject"] = clean_header(digest.subject, 250)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = message_id or make_msgid(domain=_domain(config))
    original = email.get("message_id") or ""
    if _MSG_ID.match(original):
        msg["In-Reply-To"] = original
        msg["References"] = original
    msg.set_content(digest.text)
    msg.add_alternative(digest.html, subtype="html")
    return msg


def digest_message_id(key: str, config: DeliveryConfig) -> str:
    """The digest's Message-ID for a delivery ``key``: the same on every try, so a resend can be recognised."""
    return f"<{key}@{_domain(config)}>"


def _domain(config: DeliveryConfig) -> str:
    return config.sender.partition("@")[2] or "localhost"


def send_message(msg: EmailMessage, config: DeliveryConfig, key: str | None = None) -> str:
    """Hand the message to the relay, or add it to the outbox; return where it went.

    With a ``key`` the outbox copy is ``new/<key>``, written once: a run retried after a crash that
    came after delivery finds it there and does not deliver twice. Raises DeliveryError: retryable
    for an unreachable relay or an unwritable outbox, not retryable for a UTF-8 address and a relay
    that does not offer SMTPUTF8 (RFC 6531).
    """
    if config.relay:
        return _relay(msg, config)
    try:
        if key is None:
            return str(Path(config.outbox) / "new" / mailbox.Maildir(Path(config.outbox), create=True).add(msg))
        return _add_once(msg, Path(config.outbox), key)
    except OSError as exc:  # full disk, read-only outbox: another try may work
        raise DeliveryError(f"outbox {config.outbox}: cannot store the digest: {exc}") from exc


def _relay(msg: EmailMessage, config: DeliveryConfig) -> str:
    url = urlparse(config.relay or "")
    try:
        with smtplib.SMTP(url.hostname or "127.0.0.1", url.port or 25, timeout=30) as smtp:
            smtp.send_message(msg)
    except smtplib.SMTPNotSupportedError as exc:  # a UTF-8 address and a relay without SMTPUTF8
        raise DeliveryError(f"relay {config.relay} cannot take {msg['To']}: {exc}", retryable=False) from exc
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryError(f"relay {config.relay} refused or unreachable: {exc}") from exc
    return str(config.relay)


def _add_once(msg: EmailMessage, outbox: Path, key: str) -> str:
    """Store ``msg`` as ``outbox/new/<key>`` unless a message of that name is in new/ or cur/ already."""
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True, exist_ok=True)
    done = [p for p in (outbox / "new" / key, *(outbox / "cur").glob(f"{key}:*"), outbox / "cur" / key) if p.exists()]
    if done:
        return str(done[0])
    tmp = outbox / "tmp" / f"{key}.{os.getpid()}"
    with open(tmp, "wb") as out:  # Maildir: write in tmp/, fsync, then rename into new/
        out.write(msg.as_bytes())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, outbox / "new" / key)
    return str(outbox / "new" / key)


def delivered_before(marker: Path) -> dict[str, Any] | None:
    """What an earlier try of this run delivered (its marker file), or None."""
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def mark_delivered(marker: Path, result: dict[str, Any]) -> None:
    """Record, durably, that this run's digest went out (a relay cannot be asked afterwards)."""
    tmp = marker.with_suffix(".tmp")
    with open(tmp, "w") as out:
        json.dump(result, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, marker)
