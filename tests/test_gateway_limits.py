"""What one sender can hold (issue 11), over real SMTP: sessions, time, bytes in flight, memory, log volume;
and who may send at all (the sender allow-list, the Return-Path trace header)."""

from __future__ import annotations

import logging
import random
import resource
import smtplib
import socket
import threading
import time
import tracemalloc
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port
from helpers import wait_until
from test_smtp_data import HEAD, RawSession, random_wire, stuff

from pipeline.audit.base import fixtures as fx
from pipeline.bulk_smtp import GatewayController, Unstuffer, unstuff
from pipeline.config import GatewayConfig
from pipeline.service import PipelineService
from pipeline.smtp_limits import SessionLimits

LINE = b"x" * 78 + b"\r\n"


def greeted(port: int) -> socket.socket:
    """A connection that got its 220 and then says nothing (an idle session)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert sock.recv(512).startswith(b"220 "), "no greeting"
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def temp_files(service) -> list[Path]:
    return list(service.spool.directory.glob(".incoming-*.tmp"))


def send(service, raw: bytes = b"Subject: hi\r\n\r\nhello\r\n", sender: str = "alice@example.com",
         options: tuple[str, ...] = ()) -> tuple[int, str]:
    """One message over smtplib; the DATA reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
        smtp.ehlo()
        code, reply = smtp.mail(sender, list(options))
        assert code == 250, reply
        smtp.rcpt("digest@pipeline.local")
        code, reply = smtp.data(raw)
    return code, reply.decode()


def spool_file(service, reply: str) -> Path:
    run = service.store.get_run(int(reply.rsplit(" ", 1)[1]))
    return Path(run.payload["spool"])


def test_beyond_max_sessions_is_421_and_a_client_gets_250_once_a_slot_is_free(service_factory, caplog):
    service = service_factory(max_sessions=3)
    limits, port = service.gateway.limits, service.settings.gateway.port
    assert wait_until(lambda: limits.sessions == 0)  # the controller's own start-up probe has gone
    with ExitStack() as stack, caplog.at_level(logging.WARNING, logger="pipeline.smtp_limits"):
        idle = [stack.enter_context(greeted(port)) for _ in range(3)]
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
                assert read_all(extra) == b"421 4.3.2 Too many connections, try again later\r\n"
        assert limits.log.counts["session limit"] == 5
        idle.pop().close()
        assert wait_until(lambda: limits.sessions == 2)
        code, reply = send(service)
        assert code == 250, reply
    refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refusals) == 1  # five refusals, one log line (rate-limited)


def test_idle_session_is_closed_with_421(service_factory):
    service = service_factory(command_timeout_s=0.5)
    with greeted(service.settings.gateway.port) as sock:
        assert read_all(sock) == b"421 4.4.2 Idle timeout, closing connection\r\n"
    assert wait_until(lambda: service.gateway.limits.sessions == 0)


def test_session_cap_ends_a_drip_fed_data_and_leaves_nothing_behind(service_factory):
    """Data arriving keeps the idle timer from firing; the session cap ends it all the same."""
    service = service_factory(command_timeout_s=2.0, session_timeout_s=4.0)
    smtp = RawSession(service.settings.gateway.port)
    try:
        smtp.start_data()
        smtp.sock.sendall(HEAD)
        assert wait_until(lambda: temp_files(service)), "streamed DATA has no spool temp file"
        smtp.sock.settimeout(0.1)
        closing = b""
        while not closing.endswith(b"\r\n"):  # one line every 0.1 s, until the server speaks
            try:
                smtp.sock.sendall(LINE)
                closing += smtp.sock.recv(512)
            except TimeoutError:
                continue
        assert closing == b"421 4.4.2 Session timeout, closing connection\r\n"
    finally:
        smtp.close()
    # the loop's thread removes the temp file, then gives the bytes back: wait for both, not one then the other
    assert wait_until(lambda: not temp_files(service) and service.gateway.limits.inflight.used == 0)
    assert service.store.count_runs_by_state() == {}


@pytest.mark.parametrize("how", ["disconnect", "552"])
def test_refused_or_lost_data_leaves_no_temp_file_and_no_bytes_in_flight(service_factory, how):
    service = service_factory(max_message_bytes=200_000)
    smtp = RawSession(service.settings.gateway.port)
    try:
        smtp.start_data()
        smtp.sock.sendall(HEAD + LINE * 1000)
        assert wait_until(lambda: temp_files(service) and service.gateway.limits.inflight.used > 50_000)
        if how == "552":
            smtp.sock.sendall(LINE * 3000 + b".\r\n")
            assert smtp.reply()[0] == 552
            assert not temp_files(service)  # removed before the answer
    finally:
        smtp.close()
    assert wait_until(lambda: not temp_files(service) and service.gateway.limits.inflight.used == 0)
    assert service.store.count_runs_by_state() == {}


def test_a_session_closed_while_its_accept_waits_for_the_pool_frees_its_temp_file(service_factory):
    """The client closes right after its final dot while every accept thread is busy: the queued accept never
    runs, and its spooled temp file is closed and removed, not left open until a restart."""
    service = service_factory(max_message_bytes=200_000)
    pool, budget = service.gateway._pool, service.gateway.limits.inflight
    release = threading.Event()
    busy = [pool.submit(release.wait, 30) for _ in range(pool._max_workers)]  # every accept thread held
    try:
        smtp = RawSession(service.settings.gateway.port)
        smtp.start_data()
        smtp.sock.sendall(HEAD + LINE * 100 + b".\r\n")
        assert wait_until(lambda: temp_files(service) and pool._work_queue.qsize() >= 1)  # its accept queued
        smtp.close()  # no reply awaited: the session ends while its accept waits
        assert wait_until(lambda: not temp_files(service)), "the unaccepted data's temp file was kept"
        assert budget.used == 0
    finally:
        release.set()
        for job in busy:
            job.result(timeout=30)
    assert service.store.count_runs_by_state() == {}  # not accepted, not answered: the sender still has it
    code, text = send(service)  # and the gateway takes mail as before
    assert code == 250, text


def test_inflight_cap_answers_452_at_mail_and_after_data_and_frees_on_disconnect(service_factory):
    service = service_factory(max_message_bytes=100_000, max_inflight_bytes=150_000)
    budget, port = service.gateway.limits.inflight, service.settings.gateway.port
    with ExitStack() as stack:
        other = RawSession(port)
        stack.callback(other.close)
        holder = RawSession(port)
        try:
            holder.start_data()
            holder.sock.sendall(HEAD + LINE * 1100)  # about 88 KB held, no end yet
            assert wait_until(lambda: budget.used >= 88_000)
            code, text = other.command(b"MAIL FROM:<bob@example.com> SIZE=80000")
            assert (code, text) == (452, "4.3.1 Insufficient system storage")
            assert other.send(stuff(HEAD + LINE * 1000) + b".\r\n") == (452, "4.3.1 Insufficient system storage")
            assert len(temp_files(service)) == 1  # the holder's; the refused data left none
        finally:
            holder.close()
        assert wait_until(lambda: budget.used == 0), "a lost session's bytes were not given back"
        assert other.command(b"MAIL FROM:<bob@example.com> SIZE=80000")[0] == 250
        assert other.command(b"RSET")[0] == 250
        code, text = other.send(stuff(HEAD + LINE * 1000) + b".\r\n")
        assert code == 250, text
    assert wait_until(lambda: not temp_files(service))
    assert sum(service.store.count_runs_by_state().values()) == 1


@contextmanager
def gateway_only(settings, **gateway):
    """A service that accepts but runs nothing (no parsing in this process to blur a memory figure)."""
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port(), drop_folder=False,
                                                                      **gateway)))
    service.start(run_workers=False)
    try:
        yield service
    finally:
        service.stop(grace_s=5)


def peak_heap_while_sending(service, megabytes: int) -> int:
    """Send a message of ``megabytes`` MB from a reused 64 KB buffer; the Python heap's peak meanwhile."""
    chunk = LINE * 800
    smtp = RawSession(service.settings.gateway.port)
    tracemalloc.start()
    try:
        smtp.start_data()
        tracemalloc.reset_peak()
        smtp.sock.sendall(HEAD)
        for _ in range(megabytes * 1024 * 1024 // len(chunk)):
            smtp.sock.sendall(chunk)
        smtp.sock.sendall(b".\r\n")
        code, text = smtp.reply()
        assert code == 250, text
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        smtp.close()


@pytest.mark.parametrize("stream_data", [True, False], ids=["streamed", "whole-baseline"])
def test_streamed_data_keeps_the_heap_small_whatever_the_size(settings, stream_data):
    with gateway_only(settings, stream_data=stream_data) as service:
        peak = peak_heap_while_sending(service, 20)
    if stream_data:
        assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a 20 MB message"
    else:  # the baseline holds the message: the measurement does see a whole message
        assert peak > 20 * 1024 * 1024, peak


def test_accept_errors_of_a_full_descriptor_table_are_logged_once_per_interval(caplog):
    """asyncio reports each failed accept() (EMFILE) to the loop's exception handler: one line, no traceback."""
    limits = SessionLimits(max_sessions=10_000)  # the session limit would prevent this; here it must not
    controller = GatewayController(object(), limits=limits, hostname="127.0.0.1", port=free_port())
    controller.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients: list[socket.socket] = []
    cause = "socket.accept() out of system resource: OSError"
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.smtp_limits"):
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(list(Path("/proc/self/fd").iterdir())) + 40, hard))
            try:
                while len(clients) < 500:  # the server's accepts and our sockets fill the table together
                    clients.append(socket.create_connection(("127.0.0.1", controller.port), timeout=30))
            except OSError:
                pass
            assert wait_until(lambda: limits.log.counts[cause] >= 3), limits.log.counts  # asyncio retries each 1 s
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for client in clients:
                client.close()
            # accept() is FIFO: a greeting for a new connection means every earlier one was accepted; once
            # their sessions have seen EOF and closed, stopping the loop leaves no accepted socket behind
            with socket.create_connection(("127.0.0.1", controller.port), timeout=30) as probe:
                assert probe.recv(512).startswith(b"220")
            assert wait_until(lambda: limits.sessions == 0), limits.sessions
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for client in clients:
            client.close()
        controller.stop()
    lines = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]
    assert "Too many open files" in lines[0].getMessage()


def test_sender_allow_list_answers_550_at_mail_and_refuses_the_null_sender(service_factory):
    service = service_factory(allowed_sender_domains=("example.com",))
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
        smtp.ehlo()
        for sender in ("mallory@evil.example.org", "<>", "alice@example.com.evil.org"):
            code, text = smtp.docmd(f"MAIL FROM:<{sender.strip('<>')}>")
            assert (code, text) == (550, b"5.7.1 Sender domain not accepted here"), sender
    code, reply = send(service, sender="Alice@EXAMPLE.com")
    assert code == 250, reply
    assert sum(service.store.count_runs_by_state().values()) == 1


@pytest.mark.parametrize("stream_data", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("sender, options, header", [
    ("alice@example.com", (), b"Return-Path: <alice@example.com>\r\n"),
    ("", (), b"Return-Path: <>\r\n"),
    ("jos\u00e9@ex\u00e4mple.com", ("SMTPUTF8",), "Return-Path: <jos\u00e9@ex\u00e4mple.com>\r\n".encode()),
], ids=["ascii", "null-sender", "smtputf8"])
def test_spool_file_starts_with_the_envelope_sender_as_return_path(service_factory, stream_data, sender,
                                                                    options, header):
    """The digest's addressee survives a crash between the spool's fsync and the run's commit."""
    service = service_factory(stream_data=stream_data)
    raw = fx.email_with([], message_id="<rp@example.com>")
    code, reply = send(service, raw, sender=sender, options=options)
    assert code == 250, reply
    path = spool_file(service, reply)
    assert path.read_bytes() == header + raw
    assert service.spool.load(path).return_path == sender
    assert service.spool.load(path).message_id == "<rp@example.com>"


class StreamCollector:
    """A handler that takes the data streamed (a real, small DataWriter) and keeps what was written."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []
        self.pieces: list[bytes] = []

    async def handle_DATA_START(self, server, session, envelope):
        self.pieces = []
        return self

    def write(self, data: bytes) -> None:
        self.pieces.append(data)

    def abort(self) -> None:
        self.pieces = []

    async def handle_DATA(self, server, session, envelope) -> str:
        assert envelope.writer is self and envelope.content is None
        self.contents.append(b"".join(self.pieces))
        return "250 OK"


def test_streamed_data_agrees_with_aiosmtpd_on_random_bytes():
    """Whatever the bytes, what is streamed is the content aiosmtpd's own reader hands its handler."""
    from test_smtp_data import ContentHandler

    rng = random.Random(6532)
    wires = [random_wire(rng) for _ in range(200)] + [b".\r\n", b"\r\n.\r\n", b"..\r\n.\r\n"]
    results = []
    for handler, bulk_data in ((StreamCollector(), True), (ContentHandler(), False)):
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
    assert results[0] == results[1] and len(results[0]) == len(wires)


def test_unstuffer_gives_unstuff_s_bytes_however_the_data_is_split():
    rng = random.Random(2821)
    parts = [b".", b"..", b"\r", b"\n", b"\r\n", b"x", b"\r\n.", b".\r\n"]
    for _ in range(3000):
        raw = b"".join(rng.choices(parts, k=rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(raw) + 1), min(len(raw) + 1, rng.randint(0, 6)))) + [len(raw)]
        unstuffer, out, start = Unstuffer(), b"", 0
        for cut in cuts:
            out += unstuffer.feed(raw[start:cut])
            start = cut
        assert out + unstuffer.flush() == unstuff(raw), (raw, cuts)


def test_a_failing_data_start_is_answered_before_any_data_and_the_session_goes_on(service_factory, monkeypatch):
    """No 354 before the spool writer exists: a client never sends data that could be read as commands."""
    from pipeline.spool import Spool

    service = service_factory()

    def broken(self):
        raise RuntimeError("injected: the spool writer cannot be built")

    monkeypatch.setattr(Spool, "open_writer", broken)  # a bug, which no real input provokes
    smtp = RawSession(service.settings.gateway.port)
    try:
        assert smtp.command(b"MAIL FROM:<alice@example.com>")[0] == 250
        assert smtp.command(b"RCPT TO:<digest@pipeline.local>")[0] == 250
        assert smtp.command(b"DATA") == (451, "4.3.0 Temporary failure, try again later")
        monkeypatch.undo()
        assert smtp.command(b"DATA")[0] == 354  # the envelope is intact: the retry works
        smtp.sock.sendall(stuff(HEAD + b"retried\r\n") + b".\r\n")
        assert smtp.reply()[0] == 250
    finally:
        smtp.close()
    assert sum(service.store.count_runs_by_state().values()) == 1


def test_recipients_beyond_max_recipients_get_452_and_the_mail_makes_one_run(service_factory):
    """RCPT TO had no limit: 4 sessions of 250,000 recipients each held 2.9 GB in serve and its gateway (a
    prober's find). The 101st recipient gets 452 4.5.3 (RFC 5321: the client sends the rest later); the
    transaction goes on with the 100 taken."""
    service = service_factory(max_recipients=100)
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("alice@example.com")
        codes = [smtp.rcpt(f"r{i}@example.com")[0] for i in range(101)]
        code, reply = smtp.data(fx.email_with([], message_id="<many-rcpt@x>"))
    assert codes == [250] * 100 + [452] and code == 250, reply
    [run] = service.store.list_runs()
    assert len(run.payload["rcpt_tos"]) == 100


def test_a_recipient_named_again_is_kept_once(service_factory):
    """A prober's RCPT TO of one address five times was stored five times in the run's rcpt_tos."""
    service = service_factory(max_recipients=3)
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("alice@example.com")
        codes = [smtp.rcpt(who)[0] for who in ["d@pipeline.local", "D@Pipeline.local", "d@pipeline.local",
                                                "e@pipeline.local", "f@pipeline.local"]]
        code, reply = smtp.data(fx.email_with([], message_id="<again-rcpt@x>"))
    assert codes == [250] * 5 and code == 250, reply  # a name given again uses no place of max_recipients
    [run] = service.store.list_runs()
    assert run.payload["rcpt_tos"] == ["d@pipeline.local", "e@pipeline.local", "f@pipeline.local"]


def _replies_in(sock: socket.socket) -> int:
    """How many reply lines have arrived on ``sock`` so far (read without waiting)."""
    sock.setblocking(False)
    count = 0
    try:
        while chunk := sock.recv(1 << 20):
            count += chunk.count(b"\r\n")
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return count


@pytest.mark.parametrize("fair_share_replies", [16, 0], ids=["default", "off (aiosmtpd's way)"])
def test_a_client_pipelining_thousands_of_commands_does_not_hold_the_others_replies(service_factory, monkeypatch,
                                                                                   fair_share_replies):
    """A prober's find: aiosmtpd answers a session's buffered lines without letting other sessions run, so one
    client writing commands without pause held every other sender (a normal mail took 9 s beside it). The
    gateway's loop is held while both write, so their lines wait together; then the normal client's NOOP must
    be answered after a few of the flooder's replies, not after all those one read took in (4,702 here). The
    replies are counted on the server, in the order it sends them. The junk limit is lifted: it would end the
    flood after 100 refusals."""
    from pipeline.smtp_limits import LimitedSMTP

    sent: list[tuple[int, bytes]] = []  # (session, reply) in the order the gateway sends them
    push = LimitedSMTP.push

    async def recorded(self, status):
        sent.append((id(self), status if isinstance(status, bytes) else status.encode()))
        await push(self, status)

    monkeypatch.setattr(LimitedSMTP, "push", recorded)
    service = service_factory(fair_share_replies=fair_share_replies, max_junk_commands=1_000_000)
    port = service.settings.gateway.port
    loop = service.gateway._controller.loop
    with greeted(port) as flooder, greeted(port) as normal:
        flooder.sendall(b"MAIL FROM:<a@example.com>\r\n")
        assert flooder.recv(512).startswith(b"250")
        held = threading.Event()
        loop.call_soon_threadsafe(lambda: (held.set(), time.sleep(1.0)))
        assert held.wait(10)
        flooder.sendall(b"MAIL FROM:<a@example.com>\r\n" * 9000)  # each answered 503 (nested MAIL)
        normal.sendall(b"NOOP\r\n")
        normal.settimeout(30)
        assert normal.recv(512).startswith(b"250")
    oks = [(i, session) for i, (session, status) in enumerate(sent) if status.startswith(b"250 OK")]
    flooding = oks[0][1]  # the first 250 OK is the flooder's MAIL, then comes the normal client's NOOP
    noop = next(i for i, session in oks if session != flooding)
    before = sum(session == flooding for session, _ in sent[oks[0][0] + 1:noop])
    if fair_share_replies:
        assert before <= 2 * fair_share_replies, f"the normal client waited for {before:,} of the flooder's replies"
    else:  # the switch's baseline: all that one read took in
        assert before >= 1000, before


def test_a_client_pipelining_more_recipients_than_the_limit_is_not_cut_off(service_factory):
    """452 for too many recipients is no junk: RFC 5321's client sends the rest in another transaction."""
    service = service_factory()
    session = RawSession(service.settings.gateway.port)
    with session.sock, session.replies:
        assert session.command(b"MAIL FROM:<a@example.com>")[0] == 250
        session.sock.sendall(b"".join(b"RCPT TO:<r%d@pipeline.local>\r\n" % i for i in range(500)))
        codes = [session.reply()[0] for _ in range(500)]
        assert codes.count(250) == service.settings.gateway.max_recipients and codes.count(452) == 400
        assert session.command(b"DATA")[0] == 354
        assert session.command(b"Subject: many\r\n\r\nhi\r\n.")[0] == 250


def test_a_client_flooding_refused_commands_is_closed_with_421(service_factory):
    """A reviewer's find: nested MAILs, each answered 503, were not junk: 65,170 replies in 8 s, never closed."""
    service = service_factory()
    session = RawSession(service.settings.gateway.port)  # its EHLO is the first junk command
    with session.sock, session.replies:
        assert session.command(b"MAIL FROM:<a@example.com>")[0] == 250
        session.sock.sendall(b"MAIL FROM:<a@example.com>\r\n" * 200)
        replies = []
        while True:
            try:
                replies.append(session.reply())
            except ConnectionError:
                break
    assert replies[-1] == (421, "4.7.0 Too many commands without a mail, closing connection")
    assert [code for code, _ in replies[:-1]] == [503] * 100  # EHLO and 99 refusals are 100; the 101st closes


def test_commands_that_carry_no_mail_are_limited_per_mail_and_the_flooder_is_closed_with_421(service_factory):
    """Postfix's junk command limit: NOOP, RSET, VRFY, EXPN, HELP, HELO and EHLO, 100 per mail. A client that
    pipelined NOOPs for ever held the gateway; a client that sends mail between them is never cut off."""
    service = service_factory()
    junk_limit = service.settings.gateway.max_junk_commands
    session = RawSession(service.settings.gateway.port)  # its EHLO is the first
    with session.sock:
        session.sock.sendall(b"NOOP\r\n" * (junk_limit - 1))
        assert all(session.reply()[0] == 250 for _ in range(junk_limit - 1))
        assert session.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")[0] == 250  # a mail: counted afresh
        session.sock.sendall(b"RSET\r\n" * junk_limit + b"HELP\r\n")
        assert all(session.reply()[0] == 250 for _ in range(junk_limit))
        assert session.reply() == (421, "4.7.0 Too many commands without a mail, closing connection")
        assert session.replies.read() == b""  # closed
    assert service.gateway.limits.log.counts["too many commands without a mail"] == 1


def test_a_session_limit_the_open_file_limit_cannot_hold_is_refused_at_start():
    """A probe's find: ``max_sessions = 200`` under ``ulimit -n 64`` was accepted; with 70 idle connections the
    gateway's accept loop spun on EMFILE (a core busy, senders unanswered, serve healthy)."""
    import resource

    from pipeline.config import GatewayConfig
    from pipeline.errors import ConfigurationError
    from pipeline.smtp_limits import SessionLimits

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no open-file limit on this machine")
    with pytest.raises(ConfigurationError, match=rf"gateway.max_sessions = {soft} needs up to two open files"):
        SessionLimits.from_config(GatewayConfig(max_sessions=soft))
    assert SessionLimits.from_config(GatewayConfig(max_sessions=soft // 2)).max_sessions == soft // 2
