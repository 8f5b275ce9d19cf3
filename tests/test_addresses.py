"""Every RFC 5322 sender address gets its digest; no header makes parsing or delivery raise an untyped error.

Real raw messages go through ``summarize_message``; real replies go through
``compose_reply`` and ``send_message`` into a Maildir (or a real relay), and
the To: header written there is parsed back.
"""

import random
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from pipeline.config import DeliveryConfig, IngestConfig
from pipeline.errors import DeliveryError, ParseError
from pipeline.stages import deliver, digest, headers, parse

DIGEST = digest.Digest("Digest: hello", "text body", "<p>html body</p>")
LIMITS = IngestConfig(max_attachment_bytes=1000)


def raw_mail(from_header: bytes, headers: bytes = b"Message-ID: <m1@example.com>\r\n") -> bytes:
    return b"From: " + from_header + b"\r\nTo: digest@localhost\r\nSubject: hello\r\n" + headers + b"\r\nbody\r\n"


def reply_to(address: str, config: DeliveryConfig, email: dict | None = None):
    return deliver.compose_reply(DIGEST, email or {}, config, to=deliver.reply_address(address))


def deliver_to_maildir(tmp_path, email: dict) -> bytes:
    config = DeliveryConfig(outbox=tmp_path / "outbox")
    where = deliver.send_message(reply_to(email["from"], config, email), config)
    with open(where, "rb") as fh:
        return fh.read()


def to_header_of(saved: bytes) -> list[str]:
    msg = BytesParser(policy=policy.default).parsebytes(saved)
    return [headers.addr_spec(a, "To") for a in headers.read_header(msg, "To").addresses]


@pytest.mark.parametrize(("from_header", "expected"), [
    (b'"System Administrator"@example.com', '"System Administrator"@example.com'),
    (b'"a b"@example.com', '"a b"@example.com'),
    (b'"a\\"b"@example.com', '"a\\"b"@example.com'),
    (b'"Doe, John" <john@example.com>', "john@example.com"),
    (b"=?utf-8?q?J=C3=B6rg?= <j@example.com>", "j@example.com"),
    (b"=?utf-8?b?invalid?= <x@example.com>", "x@example.com"),
    (b"john@example.com (John Doe)", "john@example.com"),
    (b"John Doe <  john @ example.com  >", "john@example.com"),
    (b"<@route.example:a@example.com>", "a@example.com"),
    (b"Team: alice@example.com, bob@example.com;", "alice@example.com"),
    (b"x@[127.0.0.1]", "x@[127.0.0.1]"),
    (b"j\xc3\xb6rg@example.com", "jörg@example.com"),  # RFC 6532: raw UTF-8
], ids=lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else None)
def test_every_address_form_gets_its_reply(tmp_path, from_header, expected):
    info = parse.summarize_message(raw_mail(from_header), tmp_path / "work", LIMITS)
    assert info["from"] == expected
    saved = deliver_to_maildir(tmp_path, info)
    assert to_header_of(saved) == [expected]
    assert b"=?" not in saved.split(b"\nTo:")[1].split(b"\n")[0]  # never an encoded word in an addr-spec


def test_utf8_local_part_is_written_as_utf8(tmp_path):
    saved = deliver_to_maildir(tmp_path, {"from": "jörg@example.com", "subject": "x"})
    assert "To: jörg@example.com".encode() in saved


@pytest.mark.parametrize(("header", "from_header", "headers"), [
    ("From", b"=?utf-8?q?a=0Ab?=@example.com", b""),
    ("From", b"a@", b""),
    ("From", b"\x80?<", b""),
    ("From", b"\xff:=;] >a ", b""),
    ("From", b"", b""),
    ("From", b"undisclosed-recipients:;", b""),
    ("From", b"<>", b""),
    ("From", b'"unterminated@example.com', b""),
    ("From", b'"\xc3"@example.com', b""),  # 8-bit bytes that are not UTF-8
    ("Content-Type", b"a@example.com", b"MIME-Version: 1.0\r\nContent-Type: application/pdf; name=;n*\r\n"),
])
def test_unusable_header_is_malformed_email_naming_it(tmp_path, header, from_header, headers):
    with pytest.raises(ParseError) as err:
        parse.summarize_message(raw_mail(from_header, headers), tmp_path, LIMITS)
    assert str(err.value).startswith(f"{header}:") and err.value.reason == "malformed_email"
    assert "\n" not in str(err.value) and "\r" not in str(err.value)


def test_an_unusable_message_id_only_leaves_the_digest_unthreaded(tmp_path):
    info = parse.summarize_message(raw_mail(b"a@example.com", b"Message-ID: <\t,. a\r\n"), tmp_path, LIMITS)
    assert info["message_id"] is None and info["from"] == "a@example.com"


def test_unparsable_attachment_header_is_malformed_email(tmp_path):
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
           b"--XX\r\nContent-Type: text/plain\r\n\r\nhi\r\n--XX\r\n"
           b"Content-Disposition: attachment; i*\r\n\r\n%PDF-1.4 x\r\n--XX--\r\n")  # the parser's IndexError
    with pytest.raises(ParseError, match="^Content-Disposition:"):
        parse.summarize_message(raw, tmp_path, LIMITS)


def test_random_header_junk_raises_only_parse_error(tmp_path):
    rng = random.Random(5322)
    alphabet = b'<>@"()\\,;:[]=?*\'. \taZ\x80\xff\xc3'
    for i in range(300):
        name = rng.choice([b"From", b"Subject", b"Message-ID", b"Content-Type", b"Content-Disposition"])
        junk = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        raw = b"From: a@example.com\r\nMIME-Version: 1.0\r\n" + name + b": " + junk + b"\r\n\r\nbody\r\n"
        try:
            info = parse.summarize_message(raw, tmp_path / str(i), LIMITS)
        except ParseError:
            continue
        reply_to(info["from"], DeliveryConfig(), info)  # what parsing accepts, delivery can address


@pytest.mark.parametrize("recipient", ["a@b, c@d", "", "x", "<>", "a@", "a@b\r\nBcc: x@y", "a@b\x00",
                                       "Team: a@example.com, b@example.com;", "\udcff@example.com"])
def test_reply_refuses_what_is_not_one_mailbox(recipient):
    with pytest.raises(DeliveryError, match="cannot deliver to") as err:
        deliver.reply_address(recipient)
    assert err.value.retryable is False
    assert "\n" not in str(err.value)


def test_quoted_local_part_reaches_a_real_relay(smtp_sink):
    sink, relay = smtp_sink
    config = DeliveryConfig(relay=relay)
    deliver.send_message(reply_to('"System Administrator"@example.com', config), config)
    (received,) = sink.wait_for(1)
    assert [a.addr_spec for a in received["To"].addresses] == ['"System Administrator"@example.com']


def test_utf8_address_reaches_a_relay_with_smtputf8(smtp_sink):
    sink, relay = smtp_sink  # aiosmtpd's Controller offers SMTPUTF8 by default
    config = DeliveryConfig(relay=relay)
    deliver.send_message(reply_to("jörg@example.com", config), config)
    (received,) = sink.wait_for(1)
    assert [headers.addr_spec(a, "To") for a in received["To"].addresses] == ["jörg@example.com"]


def test_utf8_address_and_a_relay_without_smtputf8_is_a_permanent_failure():
    from aiosmtpd.controller import Controller
    from conftest import SinkHandler, free_port

    port = free_port()
    controller = Controller(SinkHandler(), hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    controller.start()
    try:
        config = DeliveryConfig(relay=f"smtp://127.0.0.1:{port}")
        msg = reply_to("jörg@example.com", config)
        with pytest.raises(DeliveryError, match="SMTPUTF8") as err:
            deliver.send_message(msg, config)
    finally:
        controller.stop()
    assert err.value.retryable is False


def test_unwritable_outbox_is_a_retryable_delivery_error(tmp_path):
    (tmp_path / "outbox").write_text("a file where the Maildir should be")
    config = DeliveryConfig(outbox=tmp_path / "outbox")
    with pytest.raises(DeliveryError, match="outbox") as err:
        deliver.send_message(reply_to("a@example.com", config), config)
    assert err.value.retryable is True


def test_a_unicode_domain_is_written_in_punycode_and_reaches_a_relay_without_smtputf8():
    """A UTF-8 domain was written raw, so a relay without SMTPUTF8 refused the digest for good, although the
    DNS name (punycode) needs no extension."""
    from aiosmtpd.controller import Controller
    from conftest import SinkHandler, free_port

    assert deliver.reply_address("jörg@bücher.example").addr_spec == "jörg@xn--bcher-kva.example"
    handler, port = SinkHandler(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    controller.start()
    try:
        config = DeliveryConfig(relay=f"smtp://127.0.0.1:{port}")
        deliver.send_message(reply_to("anna@BÜCHER.example", config), config)
    finally:
        controller.stop()
    [received] = handler.messages
    assert [a.addr_spec for a in received["To"].addresses] == ["anna@xn--bcher-kva.example"]


def test_a_domain_idna_refuses_stays_as_written():
    assert deliver.reply_address("a@☃☃.example").domain == "☃☃.example"  # symbols are not IDNA 2008


def test_the_configured_recipients_display_name_is_kept(tmp_path):
    config = DeliveryConfig(outbox=tmp_path / "outbox", recipient="Mail Admin <admin@example.com>")
    to, why = deliver.reply_recipient({"mail_from": "a@example.com"}, {"from": "a@example.com"}, config)
    assert (to.display_name, to.addr_spec, why) == ("Mail Admin", "admin@example.com", "delivery.recipient")
    saved = deliver.send_message(deliver.compose_reply(DIGEST, {}, config, to=to), config)
    assert b"To: Mail Admin <admin@example.com>" in Path(saved).read_bytes()


def test_a_recipient_that_is_the_sender_in_punycode_is_refused_at_start():
    """A reviewer's find: the two compared as written, and no digest would ever have gone out."""
    from pipeline.errors import ConfigurationError

    config = DeliveryConfig(sender="digest@xn--bcher-kva.example", recipient="Digest <DIGEST@b\u00fccher.example>")
    with pytest.raises(ConfigurationError, match="is delivery.sender"):
        config.validate()
