"""Several ``serve`` processes on one PostgreSQL store and one data dir (issue 12): real processes, real SMTP.

What must hold when gateways and engines share a store: a Message-ID sent to
two gateways makes one run (the store's unique key decides, the second
gateway answers 250 with that run); a gateway reconciling the spool while
another one writes into it makes no second run; a ``kill -9``ed serve's
acked mail is finished by the others; a store that goes away gets 451, never
250, and 250 again once it is back.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port
from helpers import send_for_run_id, wait_until

from pipeline import store as s
from pipeline.audit.base import fixtures as fx
from pipeline.audit.base.serveproc import ServeProcess, digests_by_original, toml_text
from pipeline.config import GatewayConfig, Settings, StoreConfig
from pipeline.service import GATEWAY, PipelineService
from pipeline.store import DAGRunStore, Run, open_store
from pipeline.workflows import EMAIL_DIGEST

MAILS_PER_GATEWAY = 1000
SERVE_CONFIG = {
    "engine": {"heartbeat_interval_s": 0.5, "stale_after_s": 3.0, "shutdown_grace_s": 5.0},
    # the subject here is sharing a store, not the parse worker; one extraction worker per serve (2 cores)
    "ingest": {"parse_isolate": False, "workers": 1, "page_workers": 1},
}


def all_runs(store: DAGRunStore, page: int = 1000) -> list[Run]:
    """Every run in the store, newest first (keyset pages)."""
    runs: list[Run] = []
    while batch := store.list_runs(limit=page, before_run_id=runs[-1].run_id if runs else None):
        runs += batch
    return runs


def runs_per_message_id(runs: list[Run]) -> Counter[str]:
    """How many runs each Message-ID has: its own key, or a reused one (``"<id> sha256:..."``), or none."""
    return Counter((r.dedup_key or "").partition(" ")[0] for r in runs)


def three_bursts(count: int) -> list[list[tuple[str, bytes]]]:
    """A burst per gateway; every third message of gateway i's own burst is also sent to gateway i+1.

    Every 250th message carries a one-page PDF. Built from two templates (the email package is slow).
    """
    plain = fx.email_with([], message_id="<MID>")
    with_pdf = fx.email_with([("page.pdf", fx.text_pdf(1, seed=5))], message_id="<MID>")

    def message(mid: str, n: int) -> tuple[str, bytes]:
        return mid, (with_pdf if n % 250 == 0 else plain).replace(b"<MID>", mid.encode())

    own = [[message(f"<g{i}-{n}@scaleout.test>", n) for n in range(count)] for i in range(3)]
    return [own[i] + own[i - 1][::3] for i in range(3)]


class Sender:
    """Threads sending a burst to one gateway like an MTA: a 4xx or a lost connection is retried on a new
    connection; ``stop`` ends it (the MX went away: mail goes to another). Records each Message-ID's 250."""

    def __init__(self, port: int, burst: list[tuple[str, bytes]], threads: int = 2) -> None:
        self.port, self.acked, self.stopped = port, set[str](), threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(burst[i::threads],)) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _send(self, burst: list[tuple[str, bytes]]) -> None:
        smtp: smtplib.SMTP | None = None
        for mid, raw in burst:
            while not self.stopped.is_set():
                try:
                    smtp = smtp or smtplib.SMTP("127.0.0.1", self.port, timeout=60)
                    smtp.sendmail("alice@example.com", ["digest@pipeline.local"], raw)
                    self.acked.add(mid)
                    break
                except (OSError, smtplib.SMTPException):
                    close(smtp)
                    smtp = None
                    self.stopped.wait(0.2)
        close(smtp)

    def wait(self, timeout_s: float) -> set[str]:
        """Wait for the threads to finish (stop them after ``timeout_s``); return the acked Message-IDs."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.stop()
        return set(self.acked)

    def stop(self) -> None:
        self.stopped.set()
        for thread in self._threads:
            thread.join()


def close(smtp: smtplib.SMTP | None) -> None:
    """Close an SMTP client connection however it ended."""
    if smtp is not None:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


@pytest.mark.timeout(600)
def test_three_serves_on_one_store_make_one_run_per_message_id_and_finish_a_killed_ones_mail(pg_url, tmp_path):
    data = tmp_path / "data"
    config = {"store": {"url": pg_url}, **SERVE_CONFIG}
    serves = [ServeProcess(data, tmp_path / f"serve{i}", config) for i in range(3)]
    senders: list[Sender] = []
    try:
        with ThreadPoolExecutor(3) as starting:  # at once: an empty database migrated by three processes
            list(starting.map(ServeProcess.start, serves))
        bursts = three_bursts(MAILS_PER_GATEWAY)
        senders = [Sender(serve.port, burst) for serve, burst in zip(serves, bursts, strict=True)]
        assert wait_until(lambda: len(senders[2].acked) >= len(bursts[2]) // 3, timeout_s=300)
        serves[2].kill()  # kill -9 mid-burst: its acked mail is the others' to finish
        senders[2].stop()
        acked = set().union(*(sender.wait(timeout_s=400) for sender in senders))
        sent = {mid for burst in bursts for mid, _ in burst}
        with open_store(StoreConfig(url=pg_url)) as store:
            assert wait_until(lambda: all_ended(store), timeout_s=300), "runs still queued or running"
            runs = all_runs(store)
        per_id = runs_per_message_id(runs)
        assert not [mid for mid, n in per_id.items() if n > 1], "a Message-ID got two runs"
        assert set(per_id) <= sent  # no run without a Message-ID of ours (no key-less or hash-keyed runs)
        states = {(r.dedup_key or "").partition(" ")[0]: r.state for r in runs}
        assert {mid for mid in acked if states.get(mid) != s.SUCCESS} == set()
        digests = digests_by_original(data / "outbox")
        assert max(digests.values()) == 1 and acked <= set(digests)  # one digest each, none twice
        assert len(acked) > 2 * MAILS_PER_GATEWAY  # the two live gateways took all of theirs
    finally:
        for sender in senders:
            sender.stop()
        for serve in serves:
            serve.kill()


def all_ended(store: DAGRunStore) -> bool:
    """True when no run is queued or running (one aggregate query: cheap to poll); 0.2 s between polls."""
    ended = set(store.count_runs_by_state()) <= {s.SUCCESS, s.FAILED}
    if not ended:
        time.sleep(0.2)
    return ended


# -- in-process gateways on one store: the races, with no engine running ------------------------------------------


def gateway_settings(tmp_path: Path, url: str) -> Settings:
    """Gateway-only settings on the shared data dir ``tmp_path/data`` and store ``url``, on a free port."""
    base = Settings.for_data_dir(tmp_path / "data")
    return replace(base, store=replace(base.store, url=url),
                   gateway=GatewayConfig(port=free_port(), drop_folder=False))


def gateways(tmp_path: Path, url: str, count: int) -> list[PipelineService]:
    services: list[PipelineService] = []
    try:
        for _ in range(count):
            services.append(PipelineService(gateway_settings(tmp_path, url), role=GATEWAY).start())
    except BaseException:
        stop_all(services)
        raise
    return services


def stop_all(services: list[PipelineService]) -> None:
    for service in services:
        service.stop(grace_s=5)


def test_same_message_id_at_two_gateways_at_once_makes_one_run(pg_url, tmp_path):
    services = gateways(tmp_path, pg_url, 2)
    try:
        messages = [fx.email_with([], message_id=f"<twice-{i}@example.com>") for i in range(30)]
        barrier = threading.Barrier(2)

        def send(service: PipelineService, raw: bytes) -> int:
            barrier.wait(timeout=30)
            return send_for_run_id(service, raw)

        with ThreadPoolExecutor(2) as pool:
            for raw in messages:
                pair = [pool.submit(send, service, raw) for service in services]
                first, second = (f.result(timeout=60) for f in pair)
                assert first == second  # the second gateway answers 250 with the first one's run
        store = services[0].store
        assert len(all_runs(store)) == len(messages)
        assert store.count_runs_by_state() == {s.QUEUED: len(messages)}  # gateways only: nothing claimed
    finally:
        stop_all(services)


def test_spool_reconciliation_during_another_gateways_burst_makes_no_second_run(pg_url, tmp_path):
    receiving, reconciling = gateways(tmp_path, pg_url, 2)
    try:
        run_ids: dict[str, int] = {}
        done = threading.Event()

        def burst() -> None:
            try:
                for i in range(150):
                    mid = f"<race-{i}@example.com>"
                    run_ids[mid] = send_for_run_id(receiving, fx.email_with([], message_id=mid))
            finally:
                done.set()

        sender = threading.Thread(target=burst)
        sender.start()
        passes = 0
        while not done.is_set():
            reconciling.reconcile_spool()  # what a gateway starting now does while the other one writes
            passes += 1
        sender.join()
        runs = all_runs(receiving.store)
        assert max(runs_per_message_id(runs).values()) == 1 and len(runs) == len(run_ids)
        assert {r.dedup_key: r.run_id for r in runs} == run_ids  # each 250 named the message's one run
        assert passes > 1
    finally:
        stop_all([receiving, reconciling])


def test_store_down_under_a_running_serve_answers_451_then_250_once_it_is_back(pg_server, pg_url, tmp_path):
    settings = gateway_settings(tmp_path, pg_url)
    settings = replace(settings, store=replace(settings.store, busy_timeout_ms=1000),  # the wait for a connection
                       engine=replace(settings.engine, heartbeat_interval_s=0.2, stale_after_s=2.0, backoff_max_s=0.5))
    service = PipelineService(settings).start()  # gateway and engine: both meet the outage
    try:
        assert send(service, "<before@example.com>") == 250
        pg_server.pg_ctl("stop", "-m", "fast", "-w")
        try:
            replies = {send(service, f"<down-{i}@example.com>") for i in range(3)}
            assert replies == {451}
        finally:
            pg_server.pg_ctl("start")  # the session's server: every later test needs it back
        assert wait_until(lambda: send(service, "<after@example.com>") == 250, timeout_s=120)
        assert service.engine.wait(service.store.find_run(EMAIL_DIGEST, "<after@example.com>").run_id,
                                   timeout=120).state == s.SUCCESS
    finally:
        service.stop(grace_s=5)


def send(service: PipelineService, message_id: str) -> int:
    """Send one message; return the SMTP code of the final reply."""
    raw = fx.email_with([], message_id=message_id)
    try:
        with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=120) as smtp:
            smtp.sendmail("alice@example.com", ["digest@pipeline.local"], raw)
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    except smtplib.SMTPRecipientsRefused as exc:
        return next(iter(exc.recipients.values()))[0]
    return 250


# -- a serve on another host: its runs come back by their stale heartbeat, not by a pid check ----------------------


def serve_command(data: Path, url: str, *args: str) -> list[str]:
    config = ["--config", str(data.parent / "serve.toml")]
    return [sys.executable, "-m", "pipeline", "--data-dir", str(data), "--store-url", url, *config, "serve", *args]


def test_runs_of_a_killed_serve_on_another_host_are_finished_once_its_heartbeat_is_stale(pg_url, tmp_path):
    """A UTS namespace gives the first serve another host name: its pid means nothing to the second one."""
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --uts (root, as in CI) to give a serve another host name")
    data = tmp_path / "data"
    (tmp_path / "serve.toml").write_text(toml_text(SERVE_CONFIG))
    port = free_port()
    other = subprocess.Popen(["unshare", "--uts", "sh", "-c", 'hostname elsewhere && exec "$@"', "sh",
                              *serve_command(data, pg_url, "--port", str(port), "--no-drop-folder")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    engine: subprocess.Popen[bytes] | None = None
    try:
        assert wait_until(lambda: smtp_answers(port), timeout_s=120), "serve on 'elsewhere' never listened"
        raw = fx.email_with([("long.pdf", fx.text_pdf(150, seed=3))], message_id="<elsewhere@example.com>")
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            smtp.sendmail("alice@example.com", ["digest@pipeline.local"], raw)
        with open_store(StoreConfig(url=pg_url)) as store:
            assert wait_until(lambda: owner_host(store) == "elsewhere", timeout_s=120)
            os.killpg(other.pid, signal.SIGKILL)  # kill -9 with its workers: a host gone mid-run
            other.wait()
            with open(tmp_path / "engine.log", "wb") as log:
                engine = subprocess.Popen(serve_command(data, pg_url, "--workers-only"), stdout=log, stderr=log,
                                          start_new_session=True)
            assert wait_until(lambda: run_state(store) == s.SUCCESS, timeout_s=180), \
                (tmp_path / "engine.log").read_text()[-2000:]
            assert owner_host(store) == socket.gethostname()  # finished here, after the requeue
        assert "left running by a dead process" in (tmp_path / "engine.log").read_text()
    finally:
        for proc in (other, engine):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def smtp_answers(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
            smtp.noop()
        return True
    except (OSError, smtplib.SMTPException):
        time.sleep(0.1)
        return False


def owner_host(store: DAGRunStore) -> str | None:
    run = store.find_run(EMAIL_DIGEST, "<elsewhere@example.com>")
    return run.owner.partition(":")[0] if run is not None and run.owner else None


def run_state(store: DAGRunStore) -> str | None:
    run = store.find_run(EMAIL_DIGEST, "<elsewhere@example.com>")
    time.sleep(0.1)
    return run.state if run is not None else None
