"""Delivery: the digest as a reply to the envelope sender, by SMTP relay or into a Maildir outbox.

Whom the digest goes to (issue 11: a digest must not go to a third party named in a header):

0. Never to machine-made mail (``Auto-Submitted``, delivery reports), and never to the digest's own
   sender address: that is how mail loops start (``autoreply``; RFC 3834).
1. ``delivery.recipient`` when it is configured.
2. The envelope sender: the run payload's ``mail_from`` (SMTP ``MAIL FROM``); but list and bulk mail
   (``List-Id``, ``Precedence: bulk``) gets no digest, as its envelope sender is a list's bounce
   address, nor does an envelope sender without a domain (``MAILER-DAEMON``), nor one whose local part
   is a mail system's or a list's own (``MAILER-DAEMON@``, ``owner-x@``, ``x-request@``, ``x-bounces+…@``:
   RFC 3834 2).
3. An SMTP message whose ``MAIL FROM`` was the null reverse-path (``<>``) gets no digest: RFC 3834
   (and RFC 5321 6.1) forbid answering bounces and auto-replies automatically.
4. Without ``mail_from`` in the payload (a run recreated from the spool file alone), the message's
   first ``Return-Path`` header: the gateway writes it above everything the sender wrote. ``<>``
   there is the null sender again: no digest.
5. Messages from local sources, with no envelope at all (``source`` "dropfolder", "cli" or "audit",
   no Return-Path), go to the ``From:`` address: whoever put them there can write to the data dir.
   So does a run rebuilt from the spool (``source`` "spool") from a file without Return-Path: the
   gateway writes one on every SMTP message, so such a file came from a local source.
6. Anything else (an SMTP message with neither) gets no digest.

The From, Reply-To and Sender headers of an SMTP message are never used as the address. The To
header carries the From header's display name when From names the same address (a sender
addressing its own mailbox). A skipped digest is not an error: the deliver task succeeds with
``{"skipped": reason}``.

Every header is built from cleaned one-line values, so nothing in the
incoming mail (CR/LF in a subject, a name, a Message-ID) can add a header.
The To: header is an ``email.headerregistry.Address`` built from the parsed
addr-spec, so a quoted local part such as ``"System Administrator"@example.com``
is written quoted, as RFC 5322 wants. A UTF-8 address is written as UTF-8
(RFC 6532), never as an encoded word; a relay without SMTPUTF8 makes that a
non-retryable DeliveryError naming the address.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mailbox
import os
import re
import smtplib
import socket
import threading
from collections.abc import Callable, Mapping
from email import errors as email_errors
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import DeliveryConfig, ascii_domain
from ..errors import MACHINE_ERRNOS, DeliveryError, MachineShortError, ParseError
from .autoreply import DIGEST_HEADERS, MACHINE
from .digest import Digest
from .headers import clean_header, parse_mailboxes
from .mailpolicy import REPLY, REPLY_UTF8

log = logging.getLogger(__name__)
_MSG_ID = re.compile(r"^<[^<>\s]{1,900}>$")
# Defects that still leave one well-defined mailbox: a UTF-8 local part (RFC 6532) and an obsolete route.
_HARMLESS = (email_errors.NonASCIILocalPartDefect, email_errors.ObsoleteHeaderDefect)
# RFC 6532: a UTF-8 address is written as UTF-8 (mailpolicy.REPLY_UTF8), never as an RFC 2047 encoded word
# (which the default policy would silently put in the local part); a relay must then offer SMTPUTF8.


COMMAND_TIMEOUT_S = 30.0  # connect, the greeting and each command's reply
DATA_END_TIMEOUT_S = 600.0  # the reply to the final dot (RFC 5321 4.5.3.2.6: 10 minutes)
SESSION_DEADLINE_S = 900.0  # a whole relay session, however the relay trickles its replies
_SESSIONS: set[Any] = set()  # the relay sessions open in this process (abort_relay_sessions)
_SESSIONS_LOCK = threading.Lock()

LOCAL_SOURCES = frozenset({"dropfolder", "cli", "audit"})  # in-process callers with write access to the data dir
NULL_SENDER = "null sender"
NO_ENVELOPE = "no envelope sender"
NO_DOMAIN = "envelope sender without a domain"
NO_USABLE_FROM = "no usable From: address"
OWN_ADDRESS = "the digest's own sender address"
CONFIGURED = "delivery.recipient"  # reply_recipient's why for the operator's configured recipient
# local parts of a mail system's or a list's own addresses (RFC 3834 2): a bounce sent with a sender, a list's
# owner or request robot, Mailman's return path (x-bounces+anna=example.com@), a VERP one (bounce-x=anna=…@);
# a postmaster, a no-reply robot (noreply-dmarc-support@, no-reply@), a mail service's bounce address
# (SendGrid's bounces+5555-abcd-anna=example.com@, Mandrill's bounce-md_3085.5e0b@): a probe's got digests
_SYSTEM_LOCAL = re.compile(r"mailer-daemon|listserv|majordomo|postmaster|owner-.+|.+-request|.+-bounces(\+.+)?"
                           r"|bounces?-.+=.+|bounce-md_.+|bounces?\+.+|(.+[-._])?(no-?reply|do-?not-?reply)([-._+].*)?",
                           re.IGNORECASE)
# a mail service's bounce subdomain: Google Groups' 3abc@scoutcamp.bounces.google.com (a label before it, two
# after: bounce.com and bounce.co.uk are someone's own domains, a reviewer's find)
_SYSTEM_DOMAIN = re.compile(r".+\.bounces?\.[^.]+\.[^.]+", re.IGNORECASE)


def reply_address(text: str, name: str = "") -> Address:
    """Parse ``text`` as the one mailbox the reply goes to, shown with display ``name`` (by default the one
    ``text`` gives: ``[delivery] recipient = "Admin <admin@example.com>"`` keeps "Admin"). A Unicode domain is
    written as the DNS knows it (punycode), so a relay without SMTPUTF8 takes it when the local part is ASCII.

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
    [mailbox] = mailboxes
    return Address(display_name=clean_header(name or mailbox.display_name, 100), username=mailbox.username,
                   domain=ascii_domain(mailbox.domain))


def envelope_sender(payload: Mapping[str, Any], email: Mapping[str, Any]) -> tuple[str, str]:
    """Return (address to reply to, where it came from), or ("", why there is none): rules 2 to 6 above."""
    mail_from = str(payload.get("mail_from") or "")
    if mail_from and mail_from != "<>":
        if "@" not in mail_from:  # MAILER-DAEMON and the like: a program's name, nobody to write to
            return "", NO_DOMAIN
        return mail_from, "MAIL FROM"
    if payload.get("source") == "smtp":
        return "", NULL_SENDER
    path = email.get("return_path")
    if path is not None:
        return (str(path), "Return-Path") if path else ("", NULL_SENDER)
    if payload.get("source") in LOCAL_SOURCES or payload.get("source") == "spool":
        # "spool": a run rebuilt after a crash from a file without Return-Path, which this version writes
        # on every SMTP message: so the file came from the drop folder or `ingest`
        # machine-made mail parses with From: unusable ("" : it is never answered), and bulk mail may too
        return (str(email["from"]), "From") if email.get("from") else ("", NO_USABLE_FROM)
    return "", NO_ENVELOPE


def reply_recipient(payload: Mapping[str, Any], email: Mapping[str, Any],
                    config: DeliveryConfig) -> tuple[Address | None, str]:
    """Return (the mailbox the digest goes to, why), or (None, why no digest is sent).

    Raises DeliveryError(retryable=False) when the chosen address is not one mailbox.
    """
    marked = email.get("automated") or {}  # absent from runs parsed by older versions: a person's mail
    if marked.get("kind") in MACHINE:
        return None, str(marked.get("why"))
    if config.recipient:
        return _unless_own(reply_address(config.recipient), CONFIGURED, config)
    address, origin = envelope_sender(payload, email)
    if not address:  # bulk or list mail from the drop folder may have no usable From: its mark says why
        return None, str(marked.get("why")) if marked else origin
    local, _, domain = address.rpartition("@")
    if _SYSTEM_LOCAL.fullmatch(local.strip('"')) or _SYSTEM_DOMAIN.fullmatch(domain.rstrip(">")):
        return None, f"a mail system's or a list's own address ({address}): RFC 3834 2"
    if marked and address.lower() != marked.get("resent_from"):  # bulk or list mail: a list's bounce address
        return None, str(marked.get("why"))                       # unless the person who resent it sent it
    mailbox = reply_address(address)
    if _same_mailbox(mailbox, email.get("from")):
        mailbox = reply_address(address, str(email.get("from_name") or ""))
    return _unless_own(mailbox, origin, config)


def _unless_own(mailbox: Address, origin: str, config: DeliveryConfig) -> tuple[Address | None, str]:
    """(``mailbox``, ``origin``), or (None, why) when it is the digest's own sender: the reply would loop.
    Compared without case, local part too: mail systems mostly ignore it, and a loop must not slip through."""
    if mailbox.addr_spec.lower() == reply_address(config.sender).addr_spec.lower():
        return None, f"{OWN_ADDRESS} ({config.sender})"
    return mailbox, origin


def _same_mailbox(mailbox: Address, header_address: object) -> bool:
    """True when the From header names ``mailbox`` (domains compare case-insensitively, RFC 5321 2.4)."""
    try:
        named = reply_address(str(header_address or ""))
    except DeliveryError:
        return False
    return named.username == mailbox.username and named.domain.lower() == mailbox.domain.lower()


def compose_reply(digest: Digest, email: Mapping[str, Any], config: DeliveryConfig, *, to: Address,
                  message_id: str | None = None) -> EmailMessage:
    """Build the reply to ``to`` (see ``reply_recipient``): text and HTML alternatives, threaded under the original."""
    utf8 = not to.addr_spec.isascii()  # RFC 6532: a UTF-8 address is written raw (needs SMTPUTF8 at the relay)
    msg = EmailMessage(policy=REPLY_UTF8 if utf8 else REPLY)
    msg["From"] = config.sender
    msg["To"] = to
    msg["Subject"] = clean_header(digest.subject, 250)
    msg["Date"] = formatdate(localtime=True)  # the real offset ("+0000" on a UTC host), never "-0000"
    msg["Message-ID"] = message_id or make_msgid(domain=_domain(config))
    for name, value in DIGEST_HEADERS.items():  # an automatic response (RFC 3834 5.2): never answered in turn
        msg[name] = value
    original = email.get("message_id") or ""
    if _MSG_ID.match(original) and original.isascii():  # a UTF-8 id (RFC 6532) would be written encoded
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


def send_message(msg: EmailMessage, config: DeliveryConfig, key: str | None = None,
                 maybe_stored: bool = True, taken: Callable[[str], None] | None = None) -> str:
    """Hand the message to the relay, or add it to the outbox; return where it went. ``taken(where)`` is called
    the moment it is delivered: for a relay at its 250 to the final dot, before QUIT, whose reply can take 30 s
    (the caller records the delivery there; serve killed while a relay held its QUIT reply sent it again).

    With a ``key`` the outbox copy is ``new/<key>``, written once: a run retried after a crash that
    came after delivery finds it there (or in cur/, once a mail reader has seen it) and does not deliver
    twice. ``maybe_stored=False`` says no earlier try can have stored it, so cur/ is not searched: that
    search lists every message a reader has kept (tens of ms per digest with tens of thousands there). Raises
    DeliveryError: retryable
    for an unreachable relay or an outbox that refuses the file, not retryable for a UTF-8 address and a relay
    that does not offer SMTPUTF8 (RFC 6531); MachineShortError for an outbox on a full or read-only disk.
    """
    if config.relay:
        return _relay(msg, config, taken)
    try:
        if key is None:
            where = str(Path(config.outbox) / "new" / mailbox.Maildir(Path(config.outbox), create=True).add(msg))
        else:
            where = _add_once(msg, Path(config.outbox), key, maybe_stored)
    except OSError as exc:  # a full or read-only disk is the machine's: the run waits for it (451 meanwhile)
        message = f"outbox {config.outbox}: cannot store the digest: {exc}"
        raise (MachineShortError(message) if exc.errno in MACHINE_ERRNOS else DeliveryError(message)) from exc
    if taken is not None:
        taken(where)
    return where


class _RelaySMTP(smtplib.SMTP):
    """smtplib's client, waiting for the reply to the final dot as long as RFC 5321 4.5.3.2.6 says (a relay
    that scans content answers late; giving up early sends the digest again)."""

    def data(self, msg: Any) -> tuple[int, bytes]:
        if self.sock is not None:
            self.sock.settimeout(DATA_END_TIMEOUT_S)
        return super().data(msg)


class _Session:
    """One relay session that a watchdog ends at ``deadline_s`` (a relay that trickles its replies byte by
    byte never lets a read time out) or ``abort_relay_sessions`` ends at once (serve stopping)."""

    def __init__(self, deadline_s: float) -> None:
        self.smtp = _RelaySMTP(timeout=COMMAND_TIMEOUT_S)
        self.ended: str | None = None  # why the session was ended from outside, if it was
        self._timer = threading.Timer(deadline_s, self.end, (f"did not finish the session within {deadline_s:g} s",))
        self._timer.daemon = True

    def __enter__(self) -> _Session:
        with _SESSIONS_LOCK:
            _SESSIONS.add(self)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with _SESSIONS_LOCK:
            _SESSIONS.discard(self)
        self.smtp.close()

    def end(self, why: str) -> None:
        """Shut the socket down: a read blocked on it returns at once (closing it alone would not wake it)."""
        self.ended = why
        sock = self.smtp.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def abort_relay_sessions() -> int:
    """End every relay session of this process now (serve stopping: a stuck relay must not hold the exit);
    return how many. Their tries fail retryable, and the runs are tried again at the next start."""
    with _SESSIONS_LOCK:
        sessions = list(_SESSIONS)
    for session in sessions:
        session.end("was cut off: serve stopped")
    return len(sessions)


def _relay(msg: EmailMessage, config: DeliveryConfig, taken: Callable[[str], None] | None = None) -> str:
    """Send ``msg`` through the relay; DeliveryError as the relay's reply says (5xx: not retryable)."""
    url = urlparse(config.relay or "")
    with _Session(SESSION_DEADLINE_S) as session:
        try:
            code, greeting = session.smtp.connect(url.hostname or "127.0.0.1", url.port or 25)
            if code != 220:  # smtplib.SMTP(host) raises this itself; connect() only returns the reply
                raise smtplib.SMTPConnectError(code, greeting)
            session.smtp.send_message(msg)
        except smtplib.SMTPNotSupportedError as exc:  # a UTF-8 address and a relay without SMTPUTF8
            raise DeliveryError(f"relay {config.relay} cannot take {msg['To']}: {exc}", retryable=False) from exc
        except (OSError, smtplib.SMTPException) as exc:
            if session.ended:
                raise DeliveryError(f"relay {config.relay} {session.ended}") from exc
            raise _relay_error(config.relay, exc) from exc
        # the relay has the digest (250 to the final dot): whatever it answers to QUIT, it is delivered
        if taken is not None:
            taken(str(config.relay))
        with contextlib.suppress(OSError, smtplib.SMTPException):
            session.smtp.quit()
    return str(config.relay)


def _relay_error(relay: str | None, exc: BaseException) -> DeliveryError:
    """A relay's refusal as a DeliveryError: a 5xx reply is permanent (RFC 5321 4.2.1: trying again cannot
    help), a 4xx reply or a lost connection is not."""
    text: bytes | str
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, text = min(exc.recipients.values(), key=lambda reply: reply[0])
    elif isinstance(exc, smtplib.SMTPResponseException):
        code, text = exc.smtp_code, exc.smtp_error
    else:
        return DeliveryError(f"relay {relay} unreachable or gone: {exc}")
    said = text.decode('utf-8', 'replace') if isinstance(text, bytes) else text
    if not 200 <= code < 600:  # smtplib's -1: a line without a 3-digit code (its first 4 characters cut off)
        return DeliveryError(f"relay {relay} does not speak SMTP: it answered a line without a reply code "
                             f"(...{said[:200]!r})")
    reply = f"{code} {said}"
    if 500 <= code < 600:
        return DeliveryError(f"relay {relay} refused the digest: {reply}", retryable=False)
    return DeliveryError(f"relay {relay} deferred the digest: {reply}")


def _add_once(msg: EmailMessage, outbox: Path, key: str, maybe_stored: bool = True) -> str:
    """Store ``msg`` as ``outbox/new/<key>`` unless a message of that name is in new/ or (when an earlier try
    ``maybe_stored`` it) cur/ already.

    The Maildir's folders are made when the look-up or the write finds one missing, not on every digest. A try
    after one that may have stored it also removes what that one left in tmp/ (killed between its write and
    its rename: a whole digest each, which nothing else would ever remove).
    """
    if maybe_stored:
        _remove_leftovers(outbox, key)
    done = _delivered_as(outbox, key, maybe_stored)
    if done:
        return done
    data = msg.as_bytes()
    try:
        return _store(data, outbox, key)
    except FileNotFoundError:  # a folder was removed since the look-up
        _make_folders(outbox)
        return _store(data, outbox, key)


def _remove_leftovers(outbox: Path, key: str) -> None:
    """Delete ``tmp/<key>.<pid>`` files of earlier tries of this digest; one that cannot be is logged and left."""
    try:
        with os.scandir(outbox / "tmp") as entries:
            leftovers = [entry.path for entry in entries if entry.name.startswith(key + ".")]
    except OSError as exc:  # no tmp/ yet, or unreadable: the write below says what is wrong, if anything
        log.debug("cannot list %s: %s", outbox / "tmp", exc)
        return
    for path in leftovers:
        try:
            os.unlink(path)
            log.info("removed %s, left by an earlier try of this digest", path)
        except OSError as exc:
            log.warning("cannot remove %s, left by an earlier try of this digest: %s", path, exc)


def _make_folders(outbox: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True, exist_ok=True)


def _store(data: bytes, outbox: Path, key: str) -> str:
    """Maildir delivery: write in tmp/, fsync, then rename into new/ (a failed write, fsync or rename leaves no
    file in tmp/: a full disk is not made fuller by every retry)."""
    tmp = outbox / "tmp" / f"{key}.{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, outbox / "new" / key)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return str(outbox / "new" / key)


def _delivered_as(outbox: Path, key: str, search_cur: bool = True) -> str | None:
    """The path of the message named ``key`` in new/ or, with ``search_cur``, cur/ (``key`` or ``key:2,FLAGS``
    once read), or None.

    A prefix test over cur/'s names: a glob would compile a pattern for every key.
    """
    if (outbox / "new" / key).exists():
        return str(outbox / "new" / key)
    if not search_cur:
        if not (outbox / "cur").is_dir():  # the first digest into this outbox, or cur/ was removed
            _make_folders(outbox)
        return None
    try:
        with os.scandir(outbox / "cur") as entries:
            for entry in entries:
                if entry.name == key or entry.name.startswith(key + ":"):
                    return entry.path
    except FileNotFoundError:  # the first digest into this outbox, or cur/ was removed: mail readers need it
        _make_folders(outbox)
    return None


def delivered_before(marker: Path) -> dict[str, Any] | None:
    """What an earlier try of this run delivered (its marker file), or None."""
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def mark_delivered(marker: Path, result: dict[str, Any], durable: bool = True) -> None:
    """Record that this run's digest went out: ``durable`` (fsynced) for a relay, which cannot be asked
    afterwards, and for an outbox on another disk than the marker (``same_disk``). An outbox digest on the
    marker's disk is its own durable record: ext4 and XFS journal the ``delivering`` sign (``workflows._storing``)
    before the digest's rename, so a later try that finds the sign searches the outbox for it; the marker then
    only saves that try the composing, and its fsync held a stage worker for a disk flush on every run."""
    tmp = marker.with_suffix(".tmp")
    with open(tmp, "w") as out:
        json.dump(result, out)
        if durable:
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, marker)


def same_disk(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are on one filesystem (False when either cannot be looked at)."""
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
