"""Checks on the addresses that settings hold: loopback hosts, mailboxes, Unicode domains, relay URLs.

The settings' ``validate()`` methods use them (``pipeline.config``), and delivery writes domains with
``ascii_domain``; nothing here reads a file or the network.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import ConfigurationError


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in {"localhost", "localhost.localdomain", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_relay(relay: str) -> None:
    """A relay URL this client can use: smtp://host[:port], nothing else (it speaks no TLS and no AUTH, so a
    user:password in the URL would be sent nowhere, and shown in every failed run's reason)."""
    from urllib.parse import urlsplit

    shape = "delivery.relay must look like smtp://host:port"
    try:
        url = urlsplit(relay)
        port = url.port
    except ValueError as exc:  # a port that is not a number, or out of range
        raise ConfigurationError(f"{shape}: {exc}") from exc
    if port == 0:  # every digest would fail, after 13-26 minutes of retries (a probe's find)
        raise ConfigurationError(f"{shape}: port 0 is no port to connect to")
    if url.scheme.lower() != "smtp":
        raise ConfigurationError(f"{shape}, not {relay!r} (smtps and other schemes are not supported)")
    if url.username is not None or url.password is not None:
        raise ConfigurationError(f"{shape}: no user or password (the relay client speaks no AUTH)")
    if not url.hostname or url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigurationError(f"{shape}, not {relay!r}")


# local@domain, both dot-atoms (RFC 5322 3.4.1): the usual shape, which the email package reads as one mailbox
_PLAIN_MAILBOX = re.compile(r"[\w!#$%&'*+/=?^`{|}~-]+(\.[\w!#$%&'*+/=?^`{|}~-]+)*@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*",
                            re.ASCII)


def address_key(value: str) -> str:
    """The address in ``value`` (``Digest <d@example.org>`` is ``d@example.org``), lower case, its domain in
    punycode as delivery writes it, for comparing (a Unicode recipient equal to a punycode sender passed).
    The run store counts digests per address (``[delivery] max_digests_per_hour``) by this key."""
    from email.utils import parseaddr

    local, at, domain = parseaddr(value)[1].lower().rpartition("@")
    return f"{local}{at}{ascii_domain(domain)}" if at else domain  # no "@": rpartition leaves it all in domain


def ascii_domain(domain: str) -> str:
    """``domain`` in punycode (IDNA 2008 with UTS 46 mapping, as mail programs do); one IDNA refuses stays as
    it is, and then needs a relay with SMTPUTF8 like a UTF-8 local part."""
    if domain.isascii():
        return domain
    import idna  # only a Unicode domain pays for the import

    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain


def is_one_mailbox(value: str) -> bool:
    """True when ``value`` parses (RFC 5322, email.headerregistry) as exactly one mailbox with a domain."""
    if _PLAIN_MAILBOX.fullmatch(value):  # spares every CLI start the email package's import (issue 16)
        return True
    from email import errors as email_errors
    from email import policy

    try:
        mailboxes = [a for a in policy.default.header_factory("To", value).addresses if a.username and a.domain]
    except (ValueError, LookupError, TypeError, AttributeError, email_errors.MessageError):
        return False  # what the email package raises on odd input instead of recording a defect
    return len(mailboxes) == 1 and value.isprintable()
