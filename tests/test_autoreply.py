"""No digest answers machine-made mail, list mail, or the pipeline's own address: no mail loops (RFC 3834).

Raw messages through ``summarize_message`` for what marks them; the reply rule
on its own; and over real SMTP, a service whose relay routes every digest back
to its own gateway: one mail makes exactly two runs, the second without a digest.
"""

from dataclasses import replace

import pytest
from conftest import free_port
from helpers import send_for_run_id as send

from pipeline.config import DeliveryConfig, GatewayConfig
from pipeline.errors import ConfigurationError
from pipeline.service import PipelineService
from pipeline.stages import deliver, parse


def raw(headers: str, content_type: str = "text/plain") -> bytes:
    return (f"From: Bob <bob@example.org>\r\nTo: digest@pipeline.local\r\nSubject: hello\r\n{headers}"
            f"Message-ID: <auto@example.org>\r\nContent-Type: {content_type}\r\n\r\nbody\r\n").encode()


@pytest.mark.parametrize(("headers", "content_type", "kind"), [
    ("Auto-Submitted: auto-replied\r\n", "text/plain", "reply"),
    ("Auto-Submitted: Auto-Generated (invoices); owner-email=\"bob@example.org\"\r\n", "text/plain", "auto"),
    ("Auto-Submitted: no\r\n", "text/plain", None),
    ("X-Autoreply: yes\r\n", "text/plain", "reply"),
    ("", "multipart/report; report-type=delivery-status; boundary=x", "report"),
    ("Precedence: bulk\r\n", "text/plain", "bulk"),
    ("Precedence: JUNK\r\n", "text/plain", "bulk"),
    ("Precedence: first-class\r\n", "text/plain", None),
    ("List-Id: Announcements <announce.lists.example.com>\r\n", "text/plain", "list"),
    ("List-Id: <a.lists.example.com>\r\nResent-From: bob@example.org\r\n", "text/plain", "list"),
    ("", "text/plain", None),
], ids=["auto-replied", "auto-generated-with-comment", "auto-submitted-no", "x-autoreply", "report", "bulk",
        "junk", "first-class", "list-id", "resent-list-mail", "a-person"])
def test_what_marks_a_message_as_machine_made_or_list_mail(tmp_path, headers, content_type, kind):
    from pipeline.config import IngestConfig

    marked = parse.summarize_message(raw(headers, content_type), tmp_path, IngestConfig())["automated"]
    assert (marked or {}).get("kind") == kind


SMTP_PAYLOAD = {"source": "smtp", "mail_from": "bob@example.org"}
EMAIL = {"from": "bob@example.org", "from_name": "Bob"}


@pytest.mark.parametrize(("kind", "to_sender", "to_recipient"), [
    ("reply", None, None), ("report", None, None),  # an automatic reply or report: never answered
    ("auto", None, "ops@example.net"),  # an invoice system's mail: digested for the operator, not answered
    ("bulk", None, "ops@example.net"), ("list", None, "ops@example.net"),  # a list's bounce address: not answered
], ids=["reply", "report", "auto", "bulk", "list"])
def test_the_reply_rule_for_marked_mail(kind, to_sender, to_recipient):
    email = {**EMAIL, "automated": {"kind": kind, "why": f"because {kind}"}}
    for config, expected in ((DeliveryConfig(), to_sender), (DeliveryConfig(recipient="ops@example.net"),
                                                              to_recipient)):
        to, why = deliver.reply_recipient(SMTP_PAYLOAD, email, config)
        assert (str(to) if to else None) == expected
        assert why == (f"because {kind}" if expected is None else "delivery.recipient")


def test_no_digest_goes_to_the_digests_own_address_or_a_sender_without_a_domain():
    config = DeliveryConfig(sender="digest@pipeline.example")
    own = {"source": "smtp", "mail_from": "Digest@PIPELINE.example"}
    assert deliver.reply_recipient(own, EMAIL, config) == (None, f"{deliver.OWN_ADDRESS} (digest@pipeline.example)")
    for recipient in ("Digest@pipeline.example", "Digest <digest@PIPELINE.example>"):  # refused at start
        with pytest.raises(ConfigurationError, match="no digest would ever go out"):
            DeliveryConfig(sender="digest@pipeline.example", recipient=recipient).validate()
    daemon = {"source": "smtp", "mail_from": "MAILER-DAEMON"}
    assert deliver.reply_recipient(daemon, EMAIL, DeliveryConfig()) == (None, deliver.NO_DOMAIN)


def test_a_vacation_notice_gets_no_digest_and_a_digest_says_it_is_automatic(service_factory, smtp_sink):
    service = service_factory()
    notice = service.engine.wait(send(service, raw("Auto-Submitted: auto-replied\r\n"), "bob@example.org"), 60)
    assert notice.state == "success", notice.reason
    tasks = {t.task_id: t for t in service.store.get_tasks(notice.run_id)}
    assert tasks["deliver"].output == {"skipped": "an automatic message (Auto-Submitted: auto-replied)"}
    person = service.engine.wait(send(service, raw(""), "bob@example.org"), 60)
    assert person.state == "success", person.reason
    (digest,) = smtp_sink[0].wait_for(1)  # the notice's run ended first: only the person's digest went out
    assert digest["Auto-Submitted"] == "auto-replied" and digest["X-Auto-Response-Suppress"] == "All"


def test_a_relay_that_routes_digests_back_to_the_gateway_makes_no_loop(settings):
    port = free_port()
    delivery = DeliveryConfig(relay=f"smtp://127.0.0.1:{port}", sender="digest@pipeline.example")
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=port), delivery=delivery)).start()
    try:
        first = service.engine.wait(send(service, raw(""), "bob@example.org"), 60)
        assert first.state == "success", first.reason
        # the digest came back through the gateway as a second run; it must end without a digest of its own
        runs = [r for r in service.store.list_runs(limit=10) if r.run_id != first.run_id]
        assert len(runs) == 1, runs
        second = service.engine.wait(runs[0].run_id, 60)
        tasks = {t.task_id: t for t in service.store.get_tasks(second.run_id)}
        assert second.state == "success" and tasks["deliver"].output["skipped"].startswith("an automatic message")
        assert len(service.store.list_runs(limit=10)) == 2
    finally:
        service.stop(grace_s=10)


def test_list_mail_resent_by_a_person_is_answered_but_a_resending_list_is_not(tmp_path):
    from pipeline.config import IngestConfig

    def reply(headers: str, mail_from: str):
        email = parse.summarize_message(raw(headers), tmp_path, IngestConfig())
        return deliver.reply_recipient({"source": "smtp", "mail_from": mail_from}, email, DeliveryConfig())[0]

    by_alice = "List-Id: <a.lists.example.com>\r\nResent-From: Alice <Alice@example.com>\r\n"
    assert str(reply(by_alice, "alice@example.com")) == "alice@example.com"
    debian = ("List-Id: <debian-devel.lists.debian.org>\r\nPrecedence: list\r\n"  # SmartList resends as the list
              "Resent-From: debian-devel@lists.debian.org\r\nResent-Sender: debian-devel-request@lists.debian.org\r\n")
    assert reply(debian, "bounce-debian-devel=bob=example.org@lists.debian.org") is None
