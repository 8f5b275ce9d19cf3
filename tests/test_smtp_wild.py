"""SMTP as real clients speak it, over real sockets to the real gateway: what Postfix would take is taken, what
can never get a digest is refused at once, and a slow sender is not cut off while it still sends."""

from __future__ import annotations

import socket
import time

import pytest
from helpers import wait_until
from test_smtp_data import HEAD, RawSession


def raw_reply(sock: socket.socket) -> bytes:
    """One reply line (enough for these single-line replies)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def test_a_transaction_without_helo_is_taken_as_postfix_takes_it(service_factory):
    service = service_factory()
    with socket.create_connection(("127.0.0.1", service.settings.gateway.port), timeout=30) as sock:
        assert raw_reply(sock).startswith(b"220 ")
        for line in (b"MAIL FROM:<alice@example.com>", b"RCPT TO:<digest@pipeline.local>", b"DATA"):
            sock.sendall(line + b"\r\n")
            assert raw_reply(sock)[:3] in (b"250", b"354"), line
        sock.sendall(HEAD + b"no greeting first\r\n.\r\n")
        reply = raw_reply(sock)
    assert reply.startswith(b"250 "), reply
    run = service.engine.wait(int(reply.split()[-1]), timeout=60)
    assert run.state == "success", run.reason


def test_a_sender_address_that_is_not_utf8_is_refused_at_mail(service_factory):
    service = service_factory()
    smtp = RawSession(service.settings.gateway.port)
    try:
        code, text = smtp.command(b"MAIL FROM:<caf\xe9@example.com>")  # Latin-1: no digest could ever go there
        assert (code, text) == (553, "5.6.7 Sender address is not valid UTF-8")
        assert smtp.command(b"MAIL FROM:<caf\xc3\xa9@example.com> SMTPUTF8")[0] == 250  # the session goes on
    finally:
        smtp.close()
    assert service.store.count_runs_by_state() == {}


@pytest.mark.parametrize("address", [b'<"a\rBcc: x"@example.com>', b"<a\x00b@example.com>", b'<"a\x01b"@example.com>'])
def test_a_sender_address_with_control_characters_is_refused_at_mail(service_factory, address):
    """A prober's find: these got 250, then the run failed at delivery (no digest could reach them), and the
    spool's Return-Path dropped the CR, naming another mailbox."""
    service = service_factory()
    smtp = RawSession(service.settings.gateway.port)
    try:
        assert smtp.command(b"MAIL FROM:" + address) == (553, "5.1.7 Sender address has control characters")
        assert smtp.command(b"MAIL FROM:<alice@example.com>")[0] == 250  # the session goes on
        smtp.command(b"RSET")
        # a zero-width non-joiner is not printable, yet valid in a Persian name (IDNA2008): taken
        assert smtp.command("MAIL FROM:<me@\u0645\u06cc\u200c\u062e.example> SMTPUTF8".encode())[0] == 250
    finally:
        smtp.close()
    assert service.store.count_runs_by_state() == {}


@pytest.mark.parametrize(("address", "reply"), [
    (b"<d\x00@example.com>", (553, "5.1.3 Recipient address has control characters")),
    (b"<d\r@example.com>", (553, "5.1.3 Recipient address has control characters")),
    (b"<>", (553, "5.1.3 Recipient address is empty")),
    (b"<caf\xe9@example.com>", (553, "5.6.7 Recipient address is not valid UTF-8")),
])
def test_a_recipient_address_no_mail_could_reach_is_refused_at_rcpt(service_factory, address, reply):
    """A prober's find: these got 250 and went into the run's recipients as sent."""
    service = service_factory()
    smtp = RawSession(service.settings.gateway.port)
    try:
        assert smtp.command(b"MAIL FROM:<alice@example.com>")[0] == 250
        assert smtp.command(b"RCPT TO:" + address) == reply
        assert smtp.command(b"RCPT TO:<digest@pipeline.local>")[0] == 250  # the transaction goes on
    finally:
        smtp.close()


def test_a_data_trickled_slower_than_a_line_per_idle_timeout_is_not_cut_off(service_factory):
    service = service_factory(command_timeout_s=1.0)
    smtp = RawSession(service.settings.gateway.port)
    try:
        smtp.start_data()
        smtp.sock.sendall(HEAD)
        deadline = time.monotonic() + 3.0  # three idle timeouts, one byte every 0.1 s: far below a line each
        while time.monotonic() < deadline:
            smtp.sock.sendall(b"x")
            time.sleep(0.1)
        smtp.sock.sendall(b"\r\n.\r\n")
        code, text = smtp.reply()
    finally:
        smtp.close()
    assert code == 250, text
    assert wait_until(lambda: service.store.count_runs_by_state() != {})


def test_a_utf8_address_without_smtputf8_is_refused_553_5_6_7(service_factory):
    """RFC 6531 3.4: a non-ASCII address in a transaction whose MAIL FROM did not declare SMTPUTF8 is refused
    553 5.6.7 (aiosmtpd took it with 250: the digest would go to an address the client never said it could use)."""
    service = service_factory()
    smtp = RawSession(service.settings.gateway.port)
    try:
        assert smtp.command("MAIL FROM:<jos\u00e9@example.com>".encode()) == (
            553, "5.6.7 Sender address is not ASCII: declare SMTPUTF8 on MAIL FROM (RFC 6531)")
        assert smtp.command("MAIL FROM:<me@b\u00fccher.example>".encode())[0] == 553  # a U-label domain too
        assert smtp.command(b"MAIL FROM:<alice@example.com>")[0] == 250
        assert smtp.command("RCPT TO:<d\u00efgest@pipeline.local>".encode()) == (
            553, "5.6.7 Recipient address is not ASCII: declare SMTPUTF8 on MAIL FROM (RFC 6531)")
        assert smtp.command(b"RCPT TO:<digest@pipeline.local>")[0] == 250  # the transaction goes on
        smtp.command(b"RSET")
        assert smtp.command("MAIL FROM:<jos\u00e9@example.com> SMTPUTF8".encode())[0] == 250  # declared: taken
        assert smtp.command("RCPT TO:<d\u00efgest@pipeline.local>".encode())[0] == 250
    finally:
        smtp.close()
    assert service.store.count_runs_by_state() == {}


def test_help_does_not_list_auth_which_the_gateway_does_not_offer(service_factory):
    """aiosmtpd's HELP listed AUTH (and 'HELP AUTH' gave its syntax), and AUTH answered 538 "encryption required",
    as if a STARTTLS would let it in: the gateway has neither. EHLO never offered it."""
    service = service_factory()
    smtp = RawSession(service.settings.gateway.port)
    try:
        code, text = smtp.command(b"HELP")
        assert code == 250 and "MAIL" in text.split() and "AUTH" not in text.split(), text
        code, text = smtp.command(b"HELP AUTH")
        assert code == 501 and "AUTH" not in text.split(), text
        assert smtp.command(b"AUTH PLAIN AGFAAGI=") == (502, "5.5.1 Error: authentication not enabled")
        assert "AUTH" not in smtp.command(b"EHLO client.example")[1]
        assert smtp.command(b"MAIL FROM:<alice@example.com>")[0] == 250  # the session goes on
    finally:
        smtp.close()
