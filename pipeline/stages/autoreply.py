"""Mail a digest must not answer (RFC 3834): machine-made mail, and list mail to its sender.

A digest is an automatic response. Answering another automatic message is how
mail loops start: a vacation notice answering the digest, the digest
answering the notice, for ever; or the pipeline answering its own digest when
a relay routes it back to the gateway. So ``automated`` reads, while the
message is parsed, what marks it as made by a machine or sent to a list:

- ``Auto-Submitted: auto-replied`` (RFC 3834 5), and the older
  ``X-Autoreply``/``X-Autorespond`` of vacation programs: kind ``reply``;
- ``Auto-Submitted`` with another value but ``no`` (``auto-generated``: an
  invoice system, a scanner, a notification): kind ``auto``;
- a delivery or read report (top-level ``multipart/report``, RFC 6522): kind ``report``;
- ``Precedence: bulk``, ``list`` or ``junk``: kind ``bulk``;
- ``List-Id`` (RFC 2919): kind ``list``: the envelope sender of list mail is
  the list's bounce address, not a person. ``resent_from`` keeps the
  ``Resent-From`` mailbox: when it is the envelope sender, a person resent the
  mail and is answered (a list that resends, as SmartList does, names itself
  there, and its envelope sender is its bounce address: not answered).

Delivery (``deliver.reply_recipient``) then sends no digest for ``reply`` and
``report``, whoever it would go to, and none for any kind when it would answer
the sender; a configured ``[delivery] recipient`` still gets the digest of
``auto``, ``bulk`` and ``list`` mail (machine-made PDFs it may well want).
The digest itself says ``Auto-Submitted: auto-replied`` (RFC 3834 5.2) and
asks Exchange not to answer it (``X-Auto-Response-Suppress``), so a digest
that comes back is recognised.
"""

from __future__ import annotations

import re
from email.message import EmailMessage
from email.utils import parseaddr

from .mailpolicy import MAX_HEADER_CHARS

MACHINE = frozenset({"reply", "report"})  # never answered, not even to a configured recipient
_COMMENT = re.compile(r"\([^()]*\)")
BULK_PRECEDENCE = frozenset({"bulk", "list", "junk"})
DIGEST_HEADERS = {"Auto-Submitted": "auto-replied", "X-Auto-Response-Suppress": "All"}


def automated(msg: EmailMessage) -> dict[str, str] | None:
    """``{"kind": ..., "why": ...}`` when ``msg`` is machine-made or list mail (module docstring), else None."""
    auto = _token(msg, "Auto-Submitted")
    if auto == "auto-replied":
        return {"kind": "reply", "why": f"an automatic message (Auto-Submitted: {auto})"}
    for name in ("X-Autoreply", "X-Autorespond"):
        if _raw(msg, name) is not None:
            return {"kind": "reply", "why": f"an automatic reply ({name})"}
    if msg.get_content_type() == "multipart/report":
        return {"kind": "report", "why": "a delivery or read report (multipart/report)"}
    if auto and auto != "no":
        return {"kind": "auto", "why": f"an automatic message (Auto-Submitted: {auto})"}
    resent = {"resent_from": _address(_raw(msg, "Resent-From") or "")}  # a person who resent it
    precedence = _token(msg, "Precedence")
    if precedence in BULK_PRECEDENCE:
        return {"kind": "bulk", "why": f"bulk mail (Precedence: {precedence})", **resent}
    if _raw(msg, "List-Id") is not None:
        return {"kind": "list", "why": "mailing-list mail (List-Id)", **resent}
    return None


def _address(value: str) -> str:
    """The address in ``value``, lower case; "" for none, or for one nested too deep to read ("((((...")."""
    try:
        return parseaddr(value[:MAX_HEADER_CHARS])[1].lower()
    except RecursionError:
        return ""


def _raw(msg: EmailMessage, name: str) -> str | None:
    """The first raw value of header ``name`` (no header parsing: an odd value must not fail the mail)."""
    return next((str(v) for k, v in msg.raw_items() if k.lower() == name.lower()), None)


def _token(msg: EmailMessage, name: str) -> str:
    """The keyword a header like ``Auto-Submitted: auto-replied; (comment)`` starts with, lower case, or ""."""
    value = _COMMENT.sub("", _raw(msg, name) or "")
    return "".join(c for c in value.split(";")[0].strip().lower() if c.isprintable())[:40]
