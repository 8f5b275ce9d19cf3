"""Relays as they behave in the wild (greylisting, permanent refusals, content scanners slow to answer the
final dot, tarpits, odd replies to QUIT): what each does to a digest. The relay is outside the machine, so
it is faked here: a scripted SMTP server on loopback (pipeline.audit.base.fakerelay)."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port
from helpers import send_for_run_id, smtp_answers, wait_until

from pipeline.audit.base import fixtures as fx
from pipeline.audit.base.fakerelay import Relay, running
from pipeline.cli import format_run
from pipeline.config import DeliveryConfig, GatewayConfig, RunnerConfig
from pipeline.errors import DeliveryError
from pipeline.service import PipelineService
from pipeline.sqlite_store import SqliteRunStore
from pipeline.stages import deliver
from pipeline.stages.digest import Digest
from pipeline.store import SUCCESS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def relay() -> Iterator[Relay]:
    with running(Relay([{}])) as scripted:
        yield scripted


def send(relay: Relay) -> str:
    config = DeliveryConfig(relay=relay.url)
    to = deliver.reply_address("alice@example.com")
    msg = deliver.compose_reply(Digest("Digest: hi", "body", "<p>body</p>"), {"message_id": "<m@x>"}, config, to=to)
    return deliver.send_message(msg, config)


@pytest.mark.parametrize("stage,reply", [("mail", "550 5.7.1 no relaying"), ("rcpt", "553 5.1.3 bad address"),
                                         ("dot", "554 5.7.0 message rejected"),
                                         ("mail", "530 5.7.0 Must issue a STARTTLS command first")])
def test_a_permanent_refusal_is_not_tried_again_and_says_what_the_relay_said(relay, stage, reply):
    relay.scripts = [{stage: reply}]
    with pytest.raises(DeliveryError, match="refused the digest: " + reply.split()[0]) as refused:
        send(relay)
    assert not refused.value.retryable and not relay.messages


@pytest.mark.parametrize("stage,reply", [("greeting", "421 4.3.2 busy"), ("mail", "451 4.7.1 greylisted"),
                                         ("rcpt", "452 4.2.2 mailbox full"), ("dot", "451 4.3.0 try later")])
def test_a_temporary_refusal_is_tried_again_and_says_so(relay, stage, reply):
    relay.scripts = [{stage: reply}]
    with pytest.raises(DeliveryError) as deferred:
        send(relay)
    assert deferred.value.retryable and not relay.messages
    assert "deferred the digest: 4" in str(deferred.value) or "unreachable or gone" in str(deferred.value)


def test_a_relay_answering_garbage_is_said_to_not_speak_smtp_not_to_defer(relay):
    """A prober's relay greeted with a line of binary garbage: the run failed "deferred the digest: -1 arbage
    line" (smtplib's code for a line without one, its first characters cut), a protocol error called a deferral."""
    relay.scripts = [{"mail": "hello world"}]
    with pytest.raises(DeliveryError, match=r"does not speak SMTP: it answered a line without a reply code "
                                            r"\(\.\.\.'o world'\)") as garbage:
        send(relay)
    assert garbage.value.retryable and "deferred" not in str(garbage.value) and not relay.messages


def test_a_421_to_quit_after_the_relay_took_the_digest_is_a_delivery(relay):
    relay.scripts = [{"quit": "421 4.3.0 shutting down"}]
    assert send(relay) == relay.url and len(relay.messages) == 1


def test_a_relay_slow_to_answer_the_final_dot_is_waited_for(relay, monkeypatch):
    """A content scanner answers the final dot later than any command; giving up sent the digest again."""
    monkeypatch.setattr(deliver, "COMMAND_TIMEOUT_S", 0.5)
    relay.dot_delay_s = 1.5
    assert send(relay) == relay.url and len(relay.messages) == 1 and relay.connections == 1


def test_a_tarpit_relay_is_given_up_at_the_session_deadline(relay, monkeypatch):
    """Each byte of its greeting comes before the read times out: only the session's deadline ends it."""
    monkeypatch.setattr(deliver, "COMMAND_TIMEOUT_S", 0.5)
    monkeypatch.setattr(deliver, "SESSION_DEADLINE_S", 1.5)
    relay.trickle_greeting = True
    with pytest.raises(DeliveryError, match="did not finish the session within 1.5 s") as slow:
        send(relay)
    assert slow.value.retryable


def test_stopping_ends_a_session_stuck_on_a_relay_at_once(relay):
    relay.scripts = [{"greeting": ""}]  # accepts the connection, never greets (30 s, the command timeout)
    failed: list[BaseException] = []

    def sending() -> None:
        try:
            send(relay)
        except DeliveryError as exc:
            failed.append(exc)

    thread = threading.Thread(target=sending)
    thread.start()
    assert wait_until(lambda: relay.connections == 1 and deliver.abort_relay_sessions() == 1, timeout_s=10)
    thread.join(10)
    assert not thread.is_alive() and failed and failed[0].retryable
    assert "was cut off: serve stopped" in str(failed[0])


def test_relay_sessions_that_hang_hold_threads_of_their_own_not_those_that_parse_other_mail(relay, settings):
    """A prober's find: a relay that hung after the data held all 16 task threads for its 10-minute wait for the
    final dot's reply; no other mail was parsed meanwhile, while serve answered 250. Relay sessions run on
    ``[runner] io_workers`` threads of their own."""
    relay.dot_delay_s = 300  # hangs after the data, until the relay stops
    runner = replace(settings.runner, thread_workers=2, io_workers=2)
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port()), runner=runner,
                                      delivery=DeliveryConfig(relay=relay.url))).start()
    try:
        for i in range(3):  # two hold both io threads, the third waits for one
            send_for_run_id(service, fx.email_with([], message_id=f"<hung{i}@x>"))
        assert wait_until(lambda: relay.connections == 2, 60)
        later = send_for_run_id(service, fx.email_with([], message_id="<later@x>"))
        assert wait_until(lambda: {t.task_id: t.state for t in service.store.get_tasks(later)}.get("build_digest")
                          == SUCCESS, 60), service.store.get_tasks(later)
        assert relay.connections == 2 and not relay.messages
    finally:
        service.stop()


def test_digests_to_one_address_past_the_hourly_quota_are_skipped_and_say_why(relay, settings):
    """Whoever can connect can claim any envelope sender: ``[delivery] max_digests_per_hour`` bounds how many
    digests one address gets through the relay. Past it the run succeeds, its deliver task saying why; another
    address still gets its own."""
    delivery = DeliveryConfig(relay=relay.url, max_digests_per_hour=2)
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port()), delivery=delivery)).start()
    try:
        sent = [(who, send_for_run_id(service, fx.email_with([], message_id=f"<quota{i}@x>", sender=who), who))
                for i, who in enumerate(["victim@example.org"] * 3 + ["Other@Example.org"])]
        ended = [(who, service.engine.wait(run_id, timeout=60)) for who, run_id in sent]
        outputs = [{t.task_id: t for t in service.store.get_tasks(run.run_id)}["deliver"].output
                   for _, run in ended]
        shown = [format_run(service.store, run.run_id, as_json=False) for _, run in ended]
    finally:
        service.stop()
    assert [run.state for _, run in ended] == [SUCCESS] * 4
    assert sorted(o.get("to", "").lower() for o in outputs if "skipped" not in o) == [
        "other@example.org", "victim@example.org", "victim@example.org"]
    skipped = [o["skipped"] for o in outputs if "skipped" in o]
    assert len(skipped) == 1 and "max_digests_per_hour (2 digests to victim@example.org" in skipped[0], outputs
    assert len(relay.messages) == 3
    assert sum("deliver" in text and "skipped: over [delivery] max_digests_per_hour" in text for text in shown) == 1


def test_the_configured_recipient_is_not_held_to_the_hourly_quota(relay, settings):
    """A reviewer's find: the quota (100 by default) also cut off the operator's own [delivery] recipient, an
    archive taking every digest, which no client can claim."""
    delivery = DeliveryConfig(relay=relay.url, max_digests_per_hour=1, recipient="archive@example.net")
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port()), delivery=delivery)).start()
    try:
        runs = [service.engine.wait(send_for_run_id(service, fx.email_with([], message_id=f"<arch{i}@x>")), 60)
                for i in range(3)]
        outputs = [{t.task_id: t for t in service.store.get_tasks(run.run_id)}["deliver"].output for run in runs]
    finally:
        service.stop()
    assert [o.get("to") for o in outputs] == ["archive@example.net"] * 3 and len(relay.messages) == 3, outputs


def test_the_hourly_quota_is_counted_in_the_store_over_a_restart_and_a_refused_digest_does_not_count(relay,
                                                                                                    tmp_path):
    """The count lived in serve's memory: a restart started it again (and N serve processes let N times as many
    through). It is in the run store now; a digest the relay refused gives its place back."""
    relay.scripts = [{"rcpt": "550 5.1.1 no such user"}, {}]  # the first session refuses, the others take it
    config, data = tmp_path / "pipeline.toml", tmp_path / "data"
    config.write_text(f'[delivery]\nrelay = "{relay.url}"\nmax_digests_per_hour = 1\n')
    ended = [_one_digest_by_a_serve_of_its_own(config, data, f"<quota{i}@x>") for i in range(3)]
    assert [state for state, _ in ended] == ["failed", SUCCESS, SUCCESS]  # the first refused for good
    assert ended[1][1]["to"] == "victim@example.org", ended
    assert "max_digests_per_hour (1 digests to victim@example.org" in ended[2][1]["skipped"], ended
    assert len(relay.messages) == 1


def _one_digest_by_a_serve_of_its_own(config: Path, data: Path, message_id: str) -> tuple[str, dict]:
    """Start ``python -m pipeline serve``, have it make one digest to victim@example.org, stop it (SIGTERM);
    return the run's state and its deliver task's output."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--config", str(config), "--data-dir", str(data),
                             "serve", "--port", str(port), "--no-drop-folder"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: smtp_answers(port) or proc.poll() is not None, 60) and proc.poll() is None
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo()
            smtp.mail("victim@example.org")
            smtp.rcpt("digest@pipeline.local")
            code, reply = smtp.data(fx.email_with([], message_id=message_id, sender="victim@example.org"))
        assert code == 250, reply
        run_id = int(reply.decode().rsplit(" ", 1)[1])
        with SqliteRunStore(data / "runs.sqlite3") as store:
            assert wait_until(lambda: store.get_run(run_id).state in (SUCCESS, "failed"), 60)
            deliver_try = {t.task_id: t for t in store.get_tasks(run_id)}["deliver"]
            return store.get_run(run_id).state, deliver_try.output or {}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err



def test_a_greylisting_relay_gets_its_digest_once_when_it_lets_it_in(relay, settings):
    """451 to the first two sessions (greylisting), then 250: the run succeeds on the third try, one copy."""
    relay.scripts = [{"rcpt": "451 4.7.1 greylisted, come back later"}] * 2 + [{}]
    fast = replace(settings.runner, retry_base_delay_s=0.05)
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port()), runner=fast,
                                      delivery=DeliveryConfig(relay=relay.url))).start()
    try:
        run = service.engine.wait(send_for_run_id(service, fx.email_with([], message_id="<grey@x>")), timeout=60)
        assert run.state == SUCCESS
        deliver_try = {t.task_id: t for t in service.store.get_tasks(run.run_id)}["deliver"]
        assert deliver_try.try_number == 3 and len(relay.messages) == 1
    finally:
        service.stop()


def test_delivery_is_retried_for_minutes_by_default():
    """The shipped schedule outlasts greylisting's usual 5 minutes, even with every pause at its shortest."""
    runner, delivery = RunnerConfig(), DeliveryConfig()
    pauses = [min(delivery.retry_max_delay_s, runner.retry_base_delay_s * 2 ** i) for i in range(delivery.retries)]
    assert 0.5 * sum(pauses) > 5 * 60  # the runner jitters each pause to 50-100 % of its length
