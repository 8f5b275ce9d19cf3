"""SMTP DATA byte for byte: what a client sends is what lands in the spool, with both DATA readers.

smtplib dot-stuffs and rewrites line endings itself, so these tests speak the
protocol on a raw socket and dot-stuff the body as RFC 5321 4.5.2 asks of a
client. Every test runs on BulkDataSMTP streaming to the spool (the default),
on BulkDataSMTP holding the data whole (``stream_data=False``) and on aiosmtpd's
own line reader (``bulk_data=False``): all must agree byte for byte. The spool
file is the data after the ``Return-Path`` trace header the gateway prepends.
"""

from __future__ import annotations

import random
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.bulk_smtp import unstuff

HEAD = b"From: alice@example.com\r\nTo: digest@pipeline.local\r\nSubject: bytes\r\n\r\n"
# Line endings that are not <CRLF>.<CRLF>: none of them may end (or split) the data (SMTP smuggling)
SMUGGLING = [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\n"]

both_readers = pytest.mark.parametrize("reader", [{}, {"stream_data": False}, {"bulk_data": False}],
                                       ids=["bulk-streamed", "bulk-whole", "aiosmtpd"])
TRACE = b"Return-Path: <alice@example.com>\r\n"


def stuff(body: bytes) -> bytes:
    """Dot-stuff as a client must: every line that begins with "." gets one more "." in front."""
    return (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]


class RawSession:
    """A hand-written SMTP client: exact bytes out, reply lines in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.replies = self.sock.makefile("rb")
        assert self.reply()[0] == 220
        assert self.command(b"EHLO client.example")[0] == 250

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply."""
        text = []
        while True:
            line = self.replies.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            text.append(line[4:].decode().strip())
            if line[3:4] != b"-":
                return int(line[:3]), " ".join(text)

    def command(self, line: bytes) -> tuple[int, str]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def start_data(self) -> None:
        """MAIL, RCPT and DATA, up to the 354."""
        assert self.command(b"MAIL FROM:<alice@example.com>")[0] == 250
        assert self.command(b"RCPT TO:<digest@pipeline.local>")[0] == 250
        assert self.command(b"DATA")[0] == 354

    def send(self, wire: bytes, *, split_at: int | None = None) -> tuple[int, str]:
        """Send one message whose DATA bytes (already stuffed, terminator included) are ``wire``."""
        self.start_data()
        if split_at is None:
            self.sock.sendall(wire)
        else:  # two writes, so the server likely reads the terminator in two parts
            self.sock.sendall(wire[:split_at])
            time.sleep(0.05)
            self.sock.sendall(wire[split_at:])
        return self.reply()

    def close(self) -> None:
        self.replies.close()
        self.sock.close()


@contextmanager
def session(service) -> Iterator[RawSession]:
    raw = RawSession(service.settings.gateway.port)
    try:
        yield raw
    finally:
        raw.close()


def spooled(service, reply: tuple[int, str]) -> bytes:
    """The spooled bytes of the run a 250 reply names."""
    code, text = reply
    assert code == 250, text
    match = re.search(r"run (\d+)", text)
    assert match, text
    run = service.store.get_run(int(match[1]))
    stored = (service.spool.directory / Path(run.payload["spool"]).name).read_bytes()
    assert stored.startswith(TRACE), stored[:80]
    return stored[len(TRACE):]


def run_count(service) -> int:
    return sum(service.store.count_runs_by_state().values())


def mixed_body(seed: int, lines: int) -> bytes:
    """A body of short lines full of dots, bare CRs and LFs and binary bytes (each line under 1,000 bytes)."""
    rng = random.Random(seed)
    parts = [b".", b"..", b"...", b".x", b"..x", b"x.", b"x..", b"\r", b"\n", b"\x00", b"\xff", b"a" * 40]
    parts += SMUGGLING
    return HEAD + b"".join(b"".join(rng.choices(parts, k=rng.randint(0, 12))) + b"\r\n" for _ in range(lines))


EXACT_BODIES = {
    "dot lines": HEAD + b".\r\n..\r\n...\r\n.leading\r\n..two\r\nend.\r\nend..\r\nmid.dle\r\n. \r\n",
    "first line is a dot": b".\r\nafter\r\n",
    "first line starts with dots": b"..x\r\n",
    "one empty line": b"\r\n",
    "two empty lines": b"\r\n\r\n",
    "one short line": b"x\r\n",
    "empty line, then a dot line": b"\r\n.\r\n",
    "empty line, then a dotted line": b"\r\n.x\r\n",
    "starts with a bare CR": b"\r.\r\n",
    "last line ends with a dot": HEAD + b"x.\r\n",
    "last line is two dots": HEAD + b"..\r\n",
    "bare CR and LF": HEAD + b"a\rb\nc\r\r\n\n\r\n\x00\xff\r\n",
    "mixed, many pieces": mixed_body(seed=10, lines=8000),
}


@both_readers
def test_spooled_bytes_equal_sent_bytes(service_factory, reader):
    service = service_factory(**reader)
    with session(service) as smtp:
        for name, body in EXACT_BODIES.items():
            assert spooled(service, smtp.send(stuff(body) + b".\r\n")) == body, name
    assert run_count(service) == len(EXACT_BODIES)


@both_readers
@pytest.mark.parametrize("before", range(6))
def test_terminator_across_a_64k_boundary(service_factory, reader, before):
    """The final <CRLF>.<CRLF> starts ``before`` bytes ahead of byte 65,536 of the data (0: right on it)."""
    service = service_factory(**reader)
    prefix = HEAD + b"".join(b".%05d " % i + b"x" * 72 + b"\r\n" for i in range(795))
    last = b"y" * (65536 - before - len(stuff(prefix)))  # then the body's last CRLF starts the terminator
    body = prefix + last + b"\r\n"
    wire = stuff(body) + b".\r\n"
    assert wire.index(b"\r\n.\r\n") == 65536 - before
    with session(service) as smtp:
        assert spooled(service, smtp.send(wire, split_at=65536)) == body


@both_readers
def test_pipelined_commands_after_data_are_answered(service_factory, reader):
    service = service_factory(**reader)
    body = HEAD + b"pipelined\r\n.dot\r\n"
    with session(service) as smtp:
        smtp.start_data()
        smtp.sock.sendall(stuff(body) + b".\r\nRSET\r\nQUIT\r\n")
        queued = smtp.reply()
        assert smtp.reply()[0] == 250  # RSET
        assert smtp.reply()[0] == 221  # QUIT
    assert spooled(service, queued) == body
    assert run_count(service) == 1


@both_readers
def test_smuggling_sequences_stay_in_one_message(service_factory, reader):
    service = service_factory(**reader)
    smuggled = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<digest@pipeline.local>\r\nDATA\r\nSubject: evil\r\n\r\nx\r\n"
    body = HEAD + b"".join(b"before" + seq + smuggled + b".\r\n" for seq in SMUGGLING)
    with session(service) as smtp:
        assert spooled(service, smtp.send(stuff(body) + b".\r\n")) == body
        assert smtp.command(b"QUIT")[0] == 221  # the next reply is QUIT's: nothing in the body ran as a command
    assert run_count(service) == 1


@both_readers
def test_unstuffed_dot_after_crlf_is_removed(service_factory, reader):
    """A client that does not stuff ``<CRLF>.<LF>`` loses that dot: the line begins with "." (RFC 5321 4.5.2)."""
    service = service_factory(**reader)
    with session(service) as smtp:
        reply = smtp.send(HEAD + b"one\r\n.\ntwo\r\n.three\r\n.\r\n")
    assert spooled(service, reply) == HEAD + b"one\r\n\ntwo\r\nthree\r\n"


@both_readers
def test_empty_message_is_accepted(service_factory, reader):
    service = service_factory(**reader)
    with session(service) as smtp:
        assert spooled(service, smtp.send(b".\r\n")) == b""
        assert smtp.command(b"QUIT")[0] == 221


@both_readers
def test_over_the_size_limit_is_552_and_the_session_goes_on(service_factory, reader):
    service = service_factory(max_message_bytes=4096, **reader)
    line = b"z" * 78 + b"\r\n"
    exactly = HEAD + line * ((4096 - len(HEAD)) // 80 - 1) + b".dot\r\n"
    exactly += b"v" * (4096 - len(stuff(exactly)) - 2) + b"\r\n"
    assert len(stuff(exactly)) == 4096
    with session(service) as smtp:
        assert smtp.send(stuff(exactly[:-2] + b"v\r\n") + b".\r\n")[0] == 552  # one byte over: refused after draining
        assert smtp.send(stuff(HEAD + line * 4000) + b".\r\n")[0] == 552  # far over
        assert spooled(service, smtp.send(stuff(exactly) + b".\r\n")) == exactly  # the limit itself is fine
        assert smtp.command(b"QUIT")[0] == 221
    assert run_count(service) == 1


@both_readers
@pytest.mark.parametrize("how", ["eof", "close"])
def test_connection_lost_mid_data_makes_no_run(service_factory, reader, how):
    service = service_factory(**reader)
    with session(service) as smtp:
        smtp.start_data()
        smtp.sock.sendall(HEAD + b"half a message\r\n" * 5000 + b"no end")
        if how == "eof":
            smtp.sock.shutdown(socket.SHUT_WR)
            assert smtp.replies.readline() == b""  # the server closes without a reply
    with session(service) as smtp:  # the gateway still serves
        assert spooled(service, smtp.send(HEAD + b"whole\r\n.\r\n")) == HEAD + b"whole\r\n"
    assert run_count(service) == 1


@pytest.mark.parametrize("raw, content", [
    (b"", b""), (b"..\r\n", b".\r\n"), (b".x\r\n..\r\n", b"x\r\n.\r\n"), (b"a\r\n.\nb\r\n", b"a\r\n\nb\r\n"),
    (b"a\n.b\r.c\r\n", b"a\n.b\r.c\r\n"), (b"a\r\n...\r\n", b"a\r\n..\r\n"),
])
def test_unstuff_removes_one_leading_dot_per_line(raw, content):
    assert unstuff(raw) == content


class ContentHandler:
    """Keeps the content of every message, in order."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.contents.append(envelope.content)
        return "250 OK"


def random_wire(rng: random.Random) -> bytes:
    """DATA bytes as any client might send them, stuffed or not, ending in their first terminator."""
    parts = [b".", b"..", b"\r", b"\n", b"\r\n", b"x", b"yy" * 30] + SMUGGLING
    while True:
        wire = b"".join(rng.choices(parts, k=rng.randint(0, 40))) + b"\r\n.\r\n"
        wire = wire[2:] if wire.startswith(b"\r\n") and rng.random() < 0.3 else wire  # start at a line start
        if (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3:
            return wire


def test_bulk_reader_agrees_with_aiosmtpd_on_random_bytes():
    """Whatever the bytes, BulkDataSMTP hands the handler the content aiosmtpd's own reader does."""
    from conftest import free_port

    from pipeline.bulk_smtp import GatewayController

    rng = random.Random(5321)
    wires = [random_wire(rng) for _ in range(300)] + [b".\r\n", b"\r\n.\r\n", b"\r.\r\n\r\n.\r\n", b"..\r\n.\r\n"]
    results = []
    for bulk_data in (True, False):
        handler = ContentHandler()
        controller = GatewayController(handler, bulk_data=bulk_data, hostname="127.0.0.1", port=free_port())
        controller.start()
        try:
            raw = RawSession(controller.port)
            try:
                for wire in wires:
                    assert raw.send(wire)[0] == 250
            finally:
                raw.close()
        finally:
            controller.stop()
        results.append(handler.contents)
    assert results[0] == results[1]
    assert len(results[0]) == len(wires)
