"""Reading a mail's headers: who sent it, its Message-ID and Return-Path, as one-line text.

Addresses are parsed by ``email.headerregistry`` (RFC 5322: quoted local
parts, display names with commas, encoded words, comments), never by regexes.
Odd headers make the email package raise instead of recording a defect; every
such exception becomes a ParseError that names the header.
"""

from __future__ import annotations

import re
from email import errors as email_errors
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.utils import collapse_rfc2231_value, getaddresses
from typing import Any

from ..errors import ParseError
from .mailpolicy import DEFAULT, MAX_HEADER_CHARS, decode_8bit, superset_charset, wider_charsets

MAX_NAME_CHARS = 100
# What the email package raises on odd header input (CPython 3.11: ValueError for an encoded word that
# decodes to CR/LF, IndexError for "a@", AttributeError/TypeError for some 8-bit junk, HeaderParseError).
# RecursionError: comments or quoted strings nested a few hundred deep ("((((...") exhaust the parser's stack.
# NameError: UnboundLocalError from the parser's own bug for a domain literal left open ("<a@[ >").
HEADER_ERRORS = (ValueError, LookupError, TypeError, AttributeError, NameError, RecursionError,
                 email_errors.MessageError)


# C1 controls as Windows-1252 reads their bytes: a text labelled ISO-8859-1 is most often Windows-1252, as web
# browsers assume (Outlook's "It=92s =93Q3=94" lost its quotes and dash); the five bytes it leaves undefined stay
_C1_AS_CP1252 = {c: bytes([c]).decode("cp1252") for c in range(0x80, 0xA0) if c not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)}
_C1_TABLE = str.maketrans({chr(c): text for c, text in _C1_AS_CP1252.items()})


def readable(text: str) -> str:
    """``text`` with raw 8-bit bytes (surrogate escapes) read as UTF-8, or else as Windows-1252 (a raw Latin-1
    "Jürgen" came out "J�rgen"), and C1 controls read as Windows-1252 would."""
    if any("\udc80" <= c <= "\udcff" for c in text):
        text = decode_8bit(text)
    return text.translate(_C1_TABLE)


def clean_header(value: object, limit: int = 200) -> str:
    """One line of printable text from a header value: no CR/LF can reach an outgoing header."""
    text = readable(str(value or "")[:limit * 8])  # a megabyte header is not read to give its first line
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:limit]


def why(exc: BaseException) -> str:
    """What a header parse failure says, in words (a RecursionError's own text names no header)."""
    return "nested too deep to parse" if isinstance(exc, RecursionError) else str(exc)


def raw_header(msg: EmailMessage, name: str) -> str:
    """The unparsed value of header ``name`` as one printable line, for error messages."""
    return clean_header(next((v for k, v in msg.raw_items() if k.lower() == name.lower()), ""), 80)


def read_header(msg: EmailMessage, name: str) -> Any:
    """Return header ``name`` parsed by the message's policy (None when absent); ParseError naming it if unparsable."""
    try:
        return msg[name]
    except HEADER_ERRORS as exc:
        raise ParseError(f"{name}: cannot parse {raw_header(msg, name)!r} ({why(exc)})") from None


def parse_mailboxes(name: str, value: str) -> tuple[list[Address], tuple[Exception, ...]]:
    """Parse ``value`` as the address header ``name``; return (its mailboxes, the parser's defects).

    Groups are flattened; mailboxes without a local part or a domain are left out.
    Raises ParseError naming the header when the email package cannot parse it.
    """
    try:
        header = DEFAULT.header_factory(name, value)
        addresses = list(header.addresses)
    except HEADER_ERRORS as exc:
        raise ParseError(f"{name}: cannot parse {clean_header(value, 80)!r} ({why(exc)})") from None
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


def sender_mailbox(msg: EmailMessage) -> Address:
    """Return the first usable mailbox in From:; ParseError naming the header otherwise."""
    try:
        header = read_header(msg, "From")
        mailboxes = usable_mailboxes(header.addresses if header is not None else ())
        if header is not None and header.defects:
            mailboxes = bracketed_mailbox(msg) or mailboxes
    except ParseError:
        mailboxes = lenient_mailboxes(msg, "From")
        if not mailboxes:
            raise
    if not mailboxes:
        raw = raw_header(msg, "From")  # "no usable address in 'missing'" read as if the header said "missing"
        raise ParseError(f"From: no usable address in {raw!r}: nobody to reply to" if raw else
                         "From: no such header: nobody to reply to")
    return mailboxes[0]


# "ceo@bigbank.example <anna@example.com>": an address written unquoted as the display name. The strict parser
# takes it for the mailbox and drops the bracketed one, the address mail readers show and answer (a prober's
# find, after MimeKit's sample "jang.abcdef@xyzlinu <jang.abcdef@xyzlinux12345678.it>": a third party got the
# digest of a drop-folder mail, and an SMTP mail's digest named the wrong sender)
_ADDRESS_AS_NAME = re.compile(r'^\s*([^<>",@]*@[^<>",]*?)\s*<([^<>\s",]+@[^<>\s",]+)>\s*$')  # one mailbox


def bracketed_mailbox(msg: EmailMessage) -> list[Address]:
    """From:'s bracketed mailbox when its display name is an unquoted address, else []."""
    value = next((str(v) for k, v in msg.raw_items() if k.lower() == "from"), "")
    found = _ADDRESS_AS_NAME.match(" ".join(value.split())) if len(value) <= MAX_HEADER_CHARS else None
    if found is None:
        return []
    try:
        return usable_mailboxes([Address(display_name=found.group(1), addr_spec=found.group(2))])
    except (ValueError, IndexError, email_errors.HeaderParseError):  # not an addr-spec after all
        return []


def lenient_mailboxes(msg: EmailMessage, name: str) -> list[Address]:
    """Header ``name``'s mailboxes as the older parser reads them, display names cleaned to one line: for a
    header the strict parser refuses over its display name alone (an encoded CR/LF in ``=?utf-8?q?a=0D=0A?=``
    failed a drop-folder mail's PDFs, "nobody to reply to", and left an SMTP mail's digest without a sender)."""
    value = next((str(v) for k, v in msg.raw_items() if k.lower() == name.lower()), "")
    if "=?" not in value or len(value) > MAX_HEADER_CHARS:  # only an encoded word decodes to CR/LF
        return []
    value = wider_charsets(value)
    mailboxes = []
    for display, address in getaddresses([value]):
        try:
            display = str(make_header(decode_header(display)))
        except HEADER_ERRORS:  # an unknown charset: the name as written
            pass
        try:
            mailboxes.append(Address(display_name=clean_header(display, MAX_NAME_CHARS), addr_spec=address))
        except HEADER_ERRORS:
            continue
    return usable_mailboxes(mailboxes)


def header_sender(msg: EmailMessage, replied_at_from: bool) -> tuple[str, str]:
    """(address, display name) of the first usable mailbox in From:, for display, and for the reply to mail that
    has no envelope sender and is answered (``replied_at_from``: the drop folder, ``ingest``): ParseError naming
    From: then.

    Mail that came by SMTP is answered at its envelope sender, never at From:, and machine-made mail is not
    answered at all, so a From: that is missing (as a script's mail through Postfix, a bounce's ``MAILER DAEMON
    <>``) or unreadable is shown as none instead of failing the mail's PDFs."""
    try:
        mailbox = sender_mailbox(msg)
        return addr_spec(mailbox, "From"), sender_name(mailbox)
    except ParseError:
        if replied_at_from:
            raise
        return "", ""


def attachment_name(part: EmailMessage) -> str | None:
    """The part's file name as ``get_filename`` reads it, but an RFC 2231 ``filename*`` (or ``name*``) wins over a
    plain one beside it: RFC 6266 4.3, the plain one is the fallback for old readers. The email package takes
    the one written first, so ``filename="Rechnung.pdf"; filename*=utf-8''Rechnung%20M%C3%A4rz.pdf`` was
    digested under the fallback."""
    name = extended_param(part, "content-disposition", "filename")
    if name is None and part.get_param("filename", None, "content-disposition") is None:
        name = extended_param(part, "content-type", "name")
    return name if name is not None else _as_written(part, part.get_filename())


# a plain name parameter as written: unquoted (up to the next ";"), or quoted
_RAW_NAME = re.compile(r'(?:^|;)\s*(?:file)?name\s*=\s*(?:"([^"\r\n]*)"|([^";\r\n]+))', re.IGNORECASE)


def _decoded_words(text: str) -> str | None:
    try:
        return str(make_header(decode_header(wider_charsets(text)))).strip() or None
    except HEADER_ERRORS:  # an unknown charset: no name, as before
        return None


def _as_written(part: EmailMessage, parsed: str | None) -> str | None:
    """``parsed`` (the email package's reading of a plain name), or the name as written where the package cut it:
    an unquoted name with blanks ("filename=Report Final 2026.pdf" was "Report"), or a Windows path in quotes,
    whose backslashes it read as escapes ("C:UsersannaDesktopQuarterly report.pdf": the file's own name is
    after the last backslash), or an unquoted encoded word it did not read at all. From a probe's samples
    (mime4j's multi-2evil, stalwart's legacy mails)."""
    for header in ("content-disposition", "content-type"):
        raw = next((str(v) for k, v in part.raw_items() if k.lower() == header), "")
        found = _RAW_NAME.search(raw[:MAX_HEADER_CHARS]) if "name" in raw.lower() else None
        if found is None:
            continue
        quoted, bare = found.group(1), found.group(2)
        if not parsed:  # an unquoted encoded word, "filename==?utf-8?q?caf=C3=A9.pdf?=": no name at all
            return _decoded_words(bare.strip()) if bare and bare.strip().startswith("=?") else parsed
        if quoted is not None and "\\" in quoted and "\\\"" not in quoted and "=?" not in quoted:
            return decode_8bit(quoted.rsplit("\\", 1)[-1].strip()) or parsed
        whole = decode_8bit(bare.strip()) if bare is not None else ""
        if " " in whole and whole.startswith(parsed) and "=?" not in whole:  # raw 8-bit read as the name was
            return whole
        return parsed
    return parsed


def extended_param(part: EmailMessage, header: str, param: str) -> str | None:
    """Parameter ``param`` of the part's first ``header`` when it is written the RFC 2231 way (``name*=``,
    ``name*0*=``), decoded; None when it is not."""
    raw = next((str(v) for k, v in part.raw_items() if k.lower() == header), None)
    if raw is None or not re.search(rf";\s*{param}\*", raw, re.IGNORECASE):
        return None
    holder = Message()  # compat32 reads each parameter as written, an RFC 2231 one apart from a plain one
    holder[header] = _percent_encoded(raw[:MAX_HEADER_CHARS])
    values = [value for key, value in (holder.get_params([], header) or [])[1:] if key == param]
    if not values:
        return None
    value = values[-1]  # (the RFC 2231 one comes last)
    if isinstance(value, tuple) and value[0]:  # (charset, language, text)
        value = (superset_charset(value[0]), value[1], value[2])
    return collapse_rfc2231_value(value).strip()


def _percent_encoded(raw: str) -> str:
    """``raw`` with each byte over 127 written ``%XX``: an RFC 2231 value holding raw 8-bit text (which writers send
    instead of its %-escapes) is then decoded with its declared charset, as an escaped one is. Decoded as text
    first, it came out of the email package as literal ``\\u5831`` escapes (a reviewer's find)."""
    data = raw.encode("utf-8", "surrogateescape")  # surrogates: the raw bytes as parsed; other text: UTF-8
    return "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in data)


def message_id(msg: EmailMessage) -> str | None:
    """The Message-ID as one line, for the digest's In-Reply-To; None when absent or unreadable (``<>``): the
    gateway deduplicates on the raw header, so an odd one costs only the threading, not the mail."""
    try:
        return clean_header(read_header(msg, "Message-ID"), 998) or None
    except ParseError:
        return None


def sender_name(mailbox: Address) -> str:
    """The mailbox's display name as one printable line (raw 8-bit bytes read as UTF-8, RFC 6532)."""
    return clean_header(mailbox.display_name, MAX_NAME_CHARS)


def return_path(msg: EmailMessage) -> str | None:
    """The address of the first Return-Path header, "" for the null reverse-path, None when there is none.

    The gateway writes this trace header above everything the sender wrote (RFC 5321 4.4), so the
    first one is the envelope sender. One that is not a single usable address counts as null: a digest
    must not go to a guess.
    """
    value = next((str(v) for k, v in msg.raw_items() if k.lower() == "return-path"), None)
    if value is None:
        return None
    try:
        mailboxes = usable_mailboxes(DEFAULT.header_factory("To", value.strip()).addresses)
        return addr_spec(mailboxes[0], "Return-Path") if len(mailboxes) == 1 else ""
    except (ParseError, *HEADER_ERRORS):
        return ""
