"""End to end over real SMTP: the gateway, the email_digest workflow, delivery to a real relay."""

import logging
import smtplib
import time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
from helpers import send_for_run_id

from pipeline.audit.base import fixtures as fx


def send(service, raw: bytes, sender="alice@example.com", rcpt=("digest@pipeline.local",)):
    with smtplib.SMTP(service.settings.gateway.host, service.settings.gateway.port, timeout=30) as smtp:
        refused = smtp.sendmail(sender, list(rcpt), raw)
    assert not refused
    return smtp


def send_and_get_run(service, raw: bytes, **kw):
    return service.engine.wait(send_for_run_id(service, raw), timeout=60)


def tasks(service, run_id):
    return {t.task_id: t for t in service.store.get_tasks(run_id)}


@pytest.mark.parametrize("baseline", [{}, {"bulk_data": False}, {"accept_off_loop": False},
                                      {"inline_accept_bytes": 64 * 1024}, {"lean_sessions": False}],
                         ids=["defaults", "line-reader-baseline", "accept-on-loop-baseline", "inline-accepts",
                              "aiosmtpd-sessions"])
def test_mail_with_pdfs_gets_a_digest_reply(service_factory, smtp_sink, baseline):
    service = service_factory(**baseline)
    raw = fx.email_with([("report.pdf", fx.text_pdf(3)), ("scan.pdf", fx.image_pdf(1))], subject="Q3 reports",
                        message_id="<q3@example.com>")
    run = send_and_get_run(service, raw)
    assert run.state == "success", run.reason
    assert run.dedup_key == "<q3@example.com>"
    assert set(tasks(service, run.run_id)) == {"parse_email", "ingest_pdf[0]", "ingest_pdf[1]", "build_digest",
                                               "deliver"}
    reply = smtp_sink[0].wait_for(1)[0]
    assert reply["Subject"] == "Digest: Q3 reports" and reply["To"] == "alice@example.com"
    assert reply["In-Reply-To"] == "<q3@example.com>"
    text = reply.get_body(("plain",)).get_content()
    assert "(report.pdf): 3 pages" in text and "scan.pdf: 1 page, 0 words (no text layer" in text
    assert reply.get_body(("html",)) is not None


def test_timings_are_recorded_for_every_stage(service_factory):
    service = service_factory()
    run = send_and_get_run(service, fx.email_with([("a.pdf", fx.text_pdf(1))], message_id="<t@x>"))
    assert run.queued_at >= run.payload["data_end_at"]
    assert run.queued_at - run.payload["data_end_at"] < 60  # a sanity bound, not a performance check
    for task in tasks(service, run.run_id).values():
        assert task.started_at and task.ended_at and task.ended_at >= task.started_at


def test_bad_attachments_fail_only_their_own_task(service_factory, smtp_sink):
    service = service_factory()
    raw = fx.email_with([("good.pdf", fx.text_pdf(1)),
                         ("locked.pdf", fx.text_pdf(1, encrypt="aes", user_password="pw")),
                         ("open-aes.pdf", fx.text_pdf(1, encrypt="aes")), ("cut.pdf", fx.truncated(fx.text_pdf(3))),
                         ("noise.pdf", fx.random_bytes(3000))], message_id="<bad@example.com>")
    run = send_and_get_run(service, raw)
    assert run.state == "success"
    states = {k: (v.state, v.error_type) for k, v in tasks(service, run.run_id).items()}
    assert states["ingest_pdf[0]"] == ("success", None)
    assert states["ingest_pdf[1]"] == ("failed", "encrypted")
    assert states["ingest_pdf[2]"] == ("success", None)
    assert states["ingest_pdf[3]"] == ("failed", "corrupt") and states["ingest_pdf[4]"] == ("failed", "corrupt")
    assert states["deliver"] == ("success", None)
    text = smtp_sink[0].wait_for(1)[0].get_body(("plain",)).get_content()
    assert "locked.pdf: could not be read (encrypted" in text and "cut.pdf: could not be read (corrupt" in text
    # the store's copy of the error names the attachment as saved; the digest names it as its sender did, once
    assert tasks(service, run.run_id)["ingest_pdf[3]"].error_message.startswith("003-cut.pdf: ")
    assert "003-cut.pdf" not in text and "(corrupt: 003-" not in text


def test_same_message_twice_makes_one_run_and_a_reused_message_id_makes_a_second(service_factory, smtp_sink,
                                                                                 caplog):
    """Issue 11 item 7: the same Message-ID with other content is a new run (never dropped after a 250)."""
    service = service_factory()
    original = fx.email_with([], message_id="<dup@example.com>")
    changed = fx.email_with([], message_id="<dup@example.com>", body="changed")
    first = send_and_get_run(service, original)
    assert send_and_get_run(service, original).run_id == first.run_id  # the same mail again: a duplicate
    with caplog.at_level(logging.WARNING, logger="pipeline.gateway"):
        second = send_and_get_run(service, changed)
    assert second.run_id != first.run_id and second.state == "success", second.reason
    assert second.dedup_key == f"<dup@example.com> sha256:{Path(second.payload['spool']).stem}"
    assert "<dup@example.com> of run 1 reused by a different message" in caplog.text
    assert send_and_get_run(service, changed).run_id == second.run_id  # the second mail again: its own run
    assert send_and_get_run(service, original).run_id == first.run_id
    no_id = fx.email_with([], message_id=None)
    assert send_and_get_run(service, no_id).run_id == send_and_get_run(service, no_id).run_id
    assert sum(service.store.count_runs_by_state().values()) == 3
    assert len(smtp_sink[0].wait_for(3)) == 3  # a digest for each different mail


def test_oversized_message_is_refused_with_552(service_factory):
    service = service_factory(max_message_bytes=50_000)
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("size") and smtp.esmtp_features["size"] == "50000"
        with pytest.raises((smtplib.SMTPDataError, smtplib.SMTPSenderRefused)) as err:
            smtp.sendmail("alice@example.com", ["d@pipeline.local"], fx.email_with([("big.pdf", fx.text_pdf(40))]))
    assert err.value.smtp_code == 552
    assert service.store.count_runs_by_state() == {}


def test_recipient_outside_allow_list_gets_550(service_factory):
    service = service_factory(allowed_recipient_domains=("pipeline.local",))
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
            smtp.sendmail("a@example.com", ["someone@elsewhere.org"], fx.email_with([]))
        assert err.value.recipients["someone@elsewhere.org"][0] == 550
        assert not smtp.sendmail("a@example.com", ["digest@pipeline.local"], fx.email_with([], message_id="<ok@x>"))


@pytest.mark.parametrize("command", ["MAIL FROM:<alice@", "MAIL FROM:<@>"])
def test_a_malformed_sender_address_gets_553_not_a_temporary_failure(service_factory, command):
    service = service_factory()
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
        smtp.ehlo()
        code, reply = smtp.docmd(command)
        assert code == 553, reply  # permanent (5.1.3 malformed): an MTA must not retry what never parses
        assert not smtp.sendmail("a@example.com", ["digest@pipeline.local"], fx.email_with([], message_id="<ok@x>"))
    assert service.engine.wait(service.store.find_run("email_digest", "<ok@x>").run_id, timeout=60).state == "success"


def test_garbage_data_is_stored_and_fails_at_parse(service_factory):
    service = service_factory()
    garbage = fx.random_bytes(1500).hex().encode()
    run = send_and_get_run(service, b"\r\n".join(garbage[i:i + 60] for i in range(0, len(garbage), 60)) + b"\r\n")
    assert run.state == "failed" and run.reason.startswith("parse_email: malformed_email")
    assert (service.spool.directory / run.payload["spool"].rsplit("/", 1)[1]).exists()
    states = {k: v.state for k, v in tasks(service, run.run_id).items()}
    assert states == {"parse_email": "failed", "ingest_pdf": "upstream_failed", "build_digest": "upstream_failed",
                      "deliver": "upstream_failed"}


def test_message_without_attachment_gets_a_digest(service_factory, smtp_sink):
    service = service_factory()
    run = send_and_get_run(service, fx.email_with([], subject="just text", message_id="<plain@x>"))
    assert run.state == "success"
    assert "no PDF attachments" in smtp_sink[0].wait_for(1)[0].get_body(("plain",)).get_content()


def test_hostile_names_and_headers_stay_harmless(service_factory, smtp_sink):
    service = service_factory()
    msg = EmailMessage()
    msg["From"] = "mallory@example.com"
    msg["To"] = "digest@pipeline.local"
    msg["Subject"] = "=?utf-8?q?Hi=0D=0ABcc:_victim@example.com?="
    msg["Message-ID"] = "<hostile@example.com>"
    msg.set_content("see attached")
    for name in ["../../escape.pdf", "/etc/cron.d/evil.pdf", "x" * 300 + ".pdf", "Résumé 📄.pdf"]:
        msg.add_attachment(fx.text_pdf(1, seed=len(name)), maintype="application", subtype="pdf", filename=name)
    run = send_and_get_run(service, msg.as_bytes(policy=SMTP))
    assert run.state == "success"
    work = service.settings.data_dir / "work" / str(run.run_id) / "attachments"  # shed once the run ended
    parsed = next(t.output for t in service.store.get_tasks(run.run_id) if t.task_id == "parse_email")
    written = [Path(a["path"]) for a in parsed["attachments"]]
    assert len(written) == 4 and all(p.resolve().parent == work.resolve() for p in written)
    # nothing outside the run's attachments (shed just after the run ended: it may still be there)
    escaped = [p for p in service.settings.data_dir.parent.rglob("*escape.pdf") if p.resolve().parent != work.resolve()]
    assert not escaped and not Path("/etc/cron.d/evil.pdf").exists()
    reply = smtp_sink[0].wait_for(1)[0]
    assert reply["Bcc"] is None and reply["Subject"].startswith("Digest: Hi")
    assert b"\nBcc:" not in reply.as_bytes()
    assert "Résumé 📄.pdf" in reply.get_body(("plain",)).get_content()


def test_relay_down_retries_then_fails_with_reason(service_factory, settings):
    from dataclasses import replace

    from conftest import free_port

    from pipeline.config import DeliveryConfig, GatewayConfig
    from pipeline.service import PipelineService

    dead = DeliveryConfig(relay=f"smtp://127.0.0.1:{free_port()}", retries=3)  # the default tries for minutes
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port()), delivery=dead)).start()
    try:
        run = send_and_get_run(service, fx.email_with([], message_id="<relay@x>"))
        deliver = tasks(service, run.run_id)["deliver"]
        assert run.state == "failed" and deliver.error_type == "delivery" and deliver.try_number == 4
    finally:
        service.stop()


def test_drop_folder_message_becomes_a_run(service_factory):
    service = service_factory()
    inbox = service.settings.data_dir / "inbox"
    (inbox / "tmp" / "1.eml").write_bytes(fx.email_with([("a.pdf", fx.text_pdf(1))], message_id="<drop@x>"))
    (inbox / "tmp" / "1.eml").rename(inbox / "new" / "1.eml")
    deadline = time.monotonic() + 20
    while not service.store.list_runs() and time.monotonic() < deadline:
        time.sleep(0.02)
    run = service.engine.wait(service.store.list_runs()[0].run_id, timeout=30)
    assert run.state == "success" and run.payload["source"] == "dropfolder"
    assert not list((inbox / "new").iterdir()) and len(list((inbox / "cur").iterdir())) == 1
