"""The digest goes to the envelope sender only, never to an address a header names (issue 11, item 3).

Over real SMTP into a real service; the digest reaches a real relay that
records the envelope (RCPT) as well as the message, or a real Maildir outbox.
"""

import email
import smtplib
import threading
from dataclasses import replace
from email import policy

import pytest
from aiosmtpd.controller import Controller
from conftest import free_port

from pipeline.audit.base import fixtures as fx
from pipeline.config import DeliveryConfig, GatewayConfig
from pipeline.service import PipelineService
from pipeline.stages import deliver, headers, parse
from pipeline.workflows import EMAIL_DIGEST


class EnvelopeSink:
    """A real SMTP receiver that keeps (RCPT TO list, parsed message) of everything relayed to it."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], email.message.EmailMessage]] = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=policy.default)
        with self.arrived:
            self.received.append((list(envelope.rcpt_tos), msg))
            self.arrived.notify_all()
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 30.0) -> list:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)


@pytest.fixture
def sink():
    handler, port = EnvelopeSink(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, f"smtp://127.0.0.1:{port}"
    controller.stop()


@pytest.fixture
def start_service(settings):
    """Start a PipelineService delivering to ``relay`` (or the Maildir outbox when None); stopped after."""
    services = []

    def make(relay=None):
        delivery = DeliveryConfig(relay=relay, outbox=settings.data_dir / "outbox")
        cfg = replace(settings, gateway=GatewayConfig(port=free_port()), delivery=delivery)
        services.append(PipelineService(cfg).start())
        return services[-1]

    yield make
    for service in services:
        service.stop(grace_s=10)


def send(service, mail_from: str, raw: bytes, options: tuple[str, ...] = ()) -> int:
    """One SMTP transaction with envelope sender ``mail_from`` ("" is the null sender <>); the run id."""
    with smtplib.SMTP(service.settings.gateway.host, service.settings.gateway.port, timeout=30) as smtp:
        smtp.ehlo()
        code, reply = smtp.mail(mail_from, list(options))
        assert code == 250, reply
        smtp.rcpt("digest@pipeline.local")
        code, reply = smtp.data(raw)
    assert code == 250, reply
    return int(reply.decode().rsplit(" ", 1)[1])


def headers_mail(from_header: str, extra: str = "", message_id: str = "<reply@example.com>") -> bytes:
    head = f"From: {from_header}\r\nTo: digest@pipeline.local\r\nSubject: please digest\r\n{extra}"
    return (head + f"Message-ID: {message_id}\r\n\r\nno attachments\r\n").encode("utf-8")


def finished(service, run_id: int):
    run = service.engine.wait(run_id, timeout=60)
    return run, {t.task_id: t for t in service.store.get_tasks(run_id)}


def test_digest_goes_to_the_envelope_sender_never_to_a_header_address(start_service, sink):
    service = start_service(sink[1])
    others = "Reply-To: other@elsewhere.example\r\nSender: s@elsewhere.example\r\n"
    raw = headers_mail("victim@elsewhere.example", others)
    run, tasks = finished(service, send(service, "bob@example.org", raw))
    assert run.state == "success", run.reason
    ((rcpt, msg),) = sink[0].wait_for(1)
    assert rcpt == ["bob@example.org"] and msg["To"] == "bob@example.org"
    assert tasks["deliver"].output["to"] == "bob@example.org"


def test_to_carries_the_from_display_name_when_it_names_the_envelope_sender(start_service, sink):
    service = start_service(sink[1])
    run, _ = finished(service, send(service, "alice@example.com", headers_mail('"Example, Alice" <alice@EXAMPLE.com>')))
    assert run.state == "success", run.reason
    ((rcpt, msg),) = sink[0].wait_for(1)
    assert rcpt == ["alice@example.com"]
    (to,) = msg["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Example, Alice", "alice@example.com")


def test_the_null_sender_gets_no_digest_and_its_run_succeeds(start_service, sink):
    service = start_service(sink[1])
    run, tasks = finished(service, send(service, "", headers_mail("mailer-daemon@example.org")))
    assert run.state == "success", run.reason
    assert tasks["deliver"].state == "success" and tasks["deliver"].output == {"skipped": "null sender"}
    assert sink[0].received == []  # deliver has finished: nothing went out


@pytest.mark.parametrize(("sender", "from_header", "name", "written"), [
    ("jörg@example.com", "Jörg Müller <jörg@example.com>", "Jörg Müller", "jörg@example.com"),
    ("josé@exämple.org", "josé@exämple.org", "", "josé@xn--exmple-cua.org"),  # the domain as the DNS knows it
])
def test_a_utf8_sender_gets_a_valid_to_header_in_the_maildir(start_service, sender, from_header, name, written):
    service = start_service()  # no relay: the Maildir outbox
    raw = headers_mail(from_header, message_id="<utf8@example.com>")
    run, tasks = finished(service, send(service, sender, raw, ("SMTPUTF8",)))
    assert run.state == "success", run.reason
    (saved,) = (service.settings.delivery.outbox / "new").iterdir()
    data = saved.read_bytes()
    # RFC 6532: header fields are UTF-8; parsed as such, To is exactly the sender's mailbox
    (to,) = email.message_from_string(data.decode("utf-8"), policy=policy.default)["To"].addresses
    assert (to.display_name, to.addr_spec) == (name, written)
    (as_bytes,) = email.message_from_bytes(data, policy=policy.default)["To"].addresses
    assert headers.addr_spec(as_bytes, "To") == written and b"=?" not in data.split(b"\nTo:")[1].split(b"\n")[0]
    assert tasks["deliver"].output["to"] == str(to)


def test_a_utf8_sender_reaches_a_relay_over_smtputf8(start_service, sink):
    service = start_service(sink[1])
    run, _ = finished(service, send(service, "jörg@example.com", headers_mail("jörg@example.com"), ("SMTPUTF8",)))
    assert run.state == "success", run.reason
    ((rcpt, msg),) = sink[0].wait_for(1)
    assert rcpt == ["jörg@example.com"]
    assert [headers.addr_spec(a, "To") for a in msg["To"].addresses] == ["jörg@example.com"]


def test_a_run_rebuilt_from_the_spool_file_replies_to_its_return_path(start_service, sink, settings):
    service = start_service(sink[1])
    spooled = settings.data_dir / "rebuilt.eml"  # a run recreated from the file alone: no mail_from
    spooled.write_bytes(b"Return-Path: <bob@example.org>\r\n" + headers_mail("victim@elsewhere.example"))
    run = service.engine.trigger(EMAIL_DIGEST, {"spool": str(spooled), "source": "spool"})
    run, _ = finished(service, run.run_id)
    assert run.state == "success", run.reason
    ((rcpt, msg),) = sink[0].wait_for(1)
    assert rcpt == ["bob@example.org"] and msg["To"] == "bob@example.org"


def test_a_dropped_message_without_envelope_goes_to_its_from(start_service, sink):
    service = start_service(sink[1])
    inbox = service.settings.data_dir / "inbox"
    (inbox / "tmp" / "1.eml").write_bytes(fx.email_with([], sender="Alice <alice@example.com>", message_id="<d@x>"))
    (inbox / "tmp" / "1.eml").rename(inbox / "new" / "1.eml")
    ((rcpt, msg),) = sink[0].wait_for(1)
    assert rcpt == ["alice@example.com"] and msg["To"] == "Alice <alice@example.com>"


EMAIL = {"from": "victim@elsewhere.example", "from_name": "Victim"}


@pytest.mark.parametrize(("payload", "email_extra", "expected"), [
    ({"source": "smtp", "mail_from": "bob@example.org"}, {}, ("bob@example.org", "MAIL FROM")),
    ({"source": "smtp", "mail_from": "<>"}, {"return_path": "bob@example.org"}, (None, "null sender")),
    ({"source": "smtp", "mail_from": ""}, {}, (None, "null sender")),
    ({"source": "spool"}, {"return_path": "bob@example.org"}, ("bob@example.org", "Return-Path")),
    ({"source": "spool", "mail_from": ""}, {"return_path": ""}, (None, "null sender")),
    ({"source": "spool"}, {"return_path": None}, ("Victim <victim@elsewhere.example>", "From")),  # a local file
    ({"source": "elsewhere"}, {"return_path": None}, (None, "no envelope sender")),
    ({"source": "dropfolder", "mail_from": ""}, {}, ("Victim <victim@elsewhere.example>", "From")),
    ({"source": "cli"}, {"return_path": "bob@example.org"}, ("bob@example.org", "Return-Path")),
], ids=["mail-from", "null-mail-from", "empty-mail-from", "return-path", "null-return-path",
        "spool-without-return-path", "nothing", "dropfolder-from", "cli-return-path"])
def test_the_reply_rule(payload, email_extra, expected):
    to, why = deliver.reply_recipient(payload, {**EMAIL, **email_extra}, DeliveryConfig())
    assert (str(to) if to else None, why) == expected


def test_a_configured_recipient_overrides_every_sender():
    config = DeliveryConfig(recipient="ops@example.net")
    for payload in ({"source": "smtp", "mail_from": "bob@example.org"}, {"source": "smtp", "mail_from": "<>"}):
        to, why = deliver.reply_recipient(payload, EMAIL, config)
        assert (str(to), why) == ("ops@example.net", "delivery.recipient")


@pytest.mark.parametrize(("headers", "expected"), [
    (b"Return-Path: <bob@example.org>\r\nReturn-Path: <evil@elsewhere.example>\r\n", "bob@example.org"),
    (b"Return-Path: <>\r\n", ""),
    (b"Return-Path: <j\xc3\xb6rg@example.com>\r\n", "jörg@example.com"),
    (b"Return-Path: not an address at all,\r\n", ""),
    (b"", None),
], ids=["first-wins", "null", "utf8", "garbage", "absent"])
def test_the_return_path_is_read_from_the_first_header(tmp_path, headers, expected):
    from pipeline.config import IngestConfig

    info = parse.summarize_message(headers + headers_mail("victim@elsewhere.example"), tmp_path, IngestConfig())
    assert info["return_path"] == expected and info["from"] == "victim@elsewhere.example"
