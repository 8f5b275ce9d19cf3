"""A relay whose mailbox answers every digest back to the gateway, as responders that ignore RFC 3834 do.

The digest's recipient is outside the machine, so the audit and the tests fake it: an aiosmtpd server that
takes each digest and answers it to the gateway, at most ``cap`` times (a real loop has no cap). ``ticket``
answers as a ticket system does ("[Ticket #n] Re: <subject>", ``In-Reply-To`` the digest, no
``Auto-Submitted``); ``forward`` as a rule that forwards each mail as an attachment (``message/rfc822`` in
base64, as Exchange may send it, under a subject of its own: only the attachment shows what it is).
"""

from __future__ import annotations

import email
import smtplib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email import policy
from email.message import EmailMessage
from typing import Any

HOWS = ("ticket", "forward")


class Responder:
    """An aiosmtpd handler: keeps each digest and answers it to ``gateway_port`` (module docstring)."""

    def __init__(self, gateway_port: int, how: str, cap: int = 5, sender: str = "alice@example.com") -> None:
        if how not in HOWS:
            raise ValueError(f"how must be one of {HOWS}, not {how!r}")
        self.gateway_port, self.how, self.cap, self.sender = gateway_port, how, cap, sender
        self.digests: list[EmailMessage] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        digest = email.message_from_bytes(envelope.content, policy=policy.default)
        with self._lock:
            self.digests.append(digest)  # type: ignore[arg-type]  # policy.default gives an EmailMessage
            number = len(self.digests)
        if number <= self.cap:
            threading.Thread(target=self._answer, args=(digest, envelope.content, number), daemon=True).start()
        return "250 OK"

    def _answer(self, digest: EmailMessage, raw_digest: bytes, number: int) -> None:
        answer = EmailMessage()
        answer["From"], answer["To"] = self.sender, "digest@pipeline.local"
        answer["Message-ID"] = f"<answer-{number}@example.com>"
        if self.how == "ticket":
            answer["Subject"] = f"[Ticket #{number}] Re: {digest['Subject']}"
            answer["In-Reply-To"] = answer["References"] = str(digest["Message-ID"])
            answer.set_content("Thank you, we received your request.")
        else:
            answer["Subject"] = "Forwarded by rule"
            answer.set_content("Forwarded by rule.")
            answer.add_attachment(raw_digest, maintype="message", subtype="rfc822")
        try:
            with smtplib.SMTP("127.0.0.1", self.gateway_port, timeout=30) as smtp:
                smtp.send_message(answer, from_addr=self.sender, to_addrs=["digest@pipeline.local"])
        except (OSError, smtplib.SMTPException):
            pass  # a gateway that is gone or refuses: the loop ends there, which is what is counted


@contextmanager
def responding(gateway_port: int, relay_port: int, how: str, cap: int = 5) -> Iterator[Responder]:
    """A ``Responder`` listening on 127.0.0.1:``relay_port`` for the duration."""
    from aiosmtpd.controller import Controller

    responder = Responder(gateway_port, how, cap)
    controller = Controller(responder, hostname="127.0.0.1", port=relay_port)
    controller.start()
    try:
        yield responder
    finally:
        controller.stop()
