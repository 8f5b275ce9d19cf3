"""The gateway never answers 250 for work that will not run: each fault's SMTP reply, over real SMTP."""

from __future__ import annotations

import errno
import logging
import os
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port
from helpers import fill_disk, wait_until

from pipeline.audit.base import fixtures as fx
from pipeline.config import GatewayConfig, StoreConfig
from pipeline.dropfolder import DropFolder
from pipeline.engine import WorkflowEngine
from pipeline.errors import SpoolError, StartupError, StoreError
from pipeline.gateway import EmailGateway
from pipeline.service import PipelineService
from pipeline.spool import Spool
from pipeline.sqlite_store import SqliteRunStore
from pipeline.workflows import EMAIL_DIGEST


def smtp_data(port: int, raw: bytes) -> tuple[int, str]:
    """Send one message over real SMTP; return the DATA reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        code, reply = smtp.mail("alice@example.com")  # an unhealthy serve answers 451 here, before the data
        if code != 250:
            return code, reply.decode()
        smtp.rcpt("digest@pipeline.local")
        code, reply = smtp.data(raw)
    return code, reply.decode()


def spooled(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.iterdir())


@contextmanager
def started(settings, run_workers: bool = True, **gateway):
    """A PipelineService on a free port, stopped on every path."""
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port(), drop_folder=False, **gateway)))
    service.start(run_workers=run_workers)
    try:
        yield service
    finally:
        service.stop(grace_s=5)


@contextmanager
def exclusive_lock(path: Path):
    """Hold the store's write lock from a second, real SQLite connection."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        conn.close()  # ends the transaction


class UnhealthyEngine(WorkflowEngine):
    """A real engine that reports itself unhealthy, as it does after its loops failed repeatedly."""

    healthy = False
    health_problem = "claiming runs failed 3 times: StoreIOError: disk I/O error"


def test_unhealthy_engine_answers_451_spools_nothing_and_logs_one_line_per_interval(settings, tmp_path, caplog):
    """Each 451 was a WARNING of its own: an outage of a few seconds wrote 100 lines, and MTAs retrying a
    queue of thousands would write a line per try. One line per kind per interval; the rest are counted."""
    store = SqliteRunStore(settings.store)
    engine = UnhealthyEngine(store, settings)
    spool = Spool(tmp_path / "spool")
    gateway = EmailGateway(engine, spool, GatewayConfig(port=free_port())).start()
    try:
        replies = [smtp_data(gateway.config.port, fx.email_with([], message_id=f"<sick-{i}@x>")) for i in range(5)]
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("answered 451")]
    finally:
        gateway.stop()
        spool.close()
        store.close()
    for code, reply in replies:
        assert code == 451 and reply.startswith("4.3.0 Service temporarily unavailable"), reply
        assert reply.endswith("try again later")
    assert spooled(tmp_path / "spool") == []
    assert len(logged) == 1 and "claiming runs failed 3 times" in logged[0], logged
    stop_lines = [r.getMessage() for r in caplog.records if "more not logged" in r.getMessage()]
    assert stop_lines == ["answered 451 (UnavailableError): 4 more not logged"]  # counted at stop


def test_store_locked_makes_the_engine_unhealthy_451_then_250_after(settings):
    settings = replace(settings, store=StoreConfig(path=settings.store.path, busy_timeout_ms=100))
    with started(settings) as service:
        spool_dir = service.spool.directory
        with exclusive_lock(settings.store.path):
            assert wait_until(lambda: not service.engine.healthy), "engine never reported the locked store"
            code, reply = smtp_data(service.settings.gateway.port, fx.email_with([], message_id="<locked@x>"))
            assert code == 451 and reply.startswith("4.3.0 "), reply
            assert spooled(spool_dir) == []  # health is checked before spooling
        assert wait_until(lambda: service.engine.healthy), "engine did not recover after the lock was released"
        code, reply = smtp_data(service.settings.gateway.port, fx.email_with([], message_id="<locked@x>"))
        assert code == 250, reply
        run = service.engine.wait(int(reply.rsplit(" ", 1)[1]), timeout=60)
        assert run.state == "success", run.reason


def test_store_error_while_queueing_answers_451(settings):
    settings = replace(settings, store=StoreConfig(path=settings.store.path, busy_timeout_ms=100))
    with started(settings, run_workers=False) as service:  # no engine loops: the write of the run itself fails
        with exclusive_lock(settings.store.path):
            code, reply = smtp_data(service.settings.gateway.port, fx.email_with([], message_id="<busy@x>"))
        assert code == 451 and reply.startswith("4.3.0 Temporary failure"), reply
        assert service.store.count_runs_by_state() == {}


def test_a_store_that_refuses_writes_makes_the_gateway_unhealthy_until_a_mail_is_stored(settings):
    """A probe's find: a run store that refused every write (an immutable WAL) got 451 for every mail while serve
    reported itself healthy (an idle engine writes nothing, so nothing else saw it). Here SQLite refuses the run's
    row (SQLITE_READONLY, as for a file made read-only, which root would ignore): 451, and the gateway is unhealthy
    (451 before the data) until STORING_FRESH_S pass and a mail is stored again."""
    from pipeline.gateway import STORING_FRESH_S

    with started(settings, run_workers=False) as service:
        port, conn = service.settings.gateway.port, service.store._conn
        conn.execute("PRAGMA query_only = 1")
        codes = [smtp_data(port, fx.email_with([], message_id=f"<refused-{i}@x>"))[0] for i in range(3)]
        assert codes[0] == 451 and service.health_problem.startswith("storing mail failed: StoreIOError"), codes
        assert codes[1:] == [451, 451]  # refused at MAIL now, before the data: the health check says why
        conn.execute("PRAGMA query_only = 0")
        time.sleep(STORING_FRESH_S + 0.5)
        assert service.health_problem is None
        code, reply = smtp_data(port, fx.email_with([], message_id="<after@x>"))
        assert code == 250, reply


def test_an_accept_that_stalls_is_answered_451_at_its_limit_and_its_run_stands_once_it_completes(settings, caplog):
    """A store that does not answer (here locked by another process, waited on for 20 s; in the wild a frozen
    disk, a PostgreSQL server gone quiet): the sender used to wait for command_timeout_s, then get 421 "idle
    timeout", blaming it, with nothing logged above INFO. Now 451 at accept_timeout_s, and a WARNING."""
    caplog.set_level(logging.INFO, logger="pipeline")
    settings = replace(settings, store=StoreConfig(path=settings.store.path, busy_timeout_ms=20_000))
    raw = fx.email_with([], message_id="<stalled@x>")
    with started(settings, run_workers=False, accept_timeout_s=1.0) as service:
        port = service.settings.gateway.port
        with exclusive_lock(settings.store.path):
            started_at = time.monotonic()
            code, reply = smtp_data(port, raw)
            waited = time.monotonic() - started_at
        assert code == 451 and reply.startswith("4.3.0 Temporary failure storing"), reply
        assert waited < 15, waited  # answered at its 1 s limit, not at the 20 s lock wait
        assert wait_until(lambda: [r.dedup_key for r in service.store.list_runs()] == ["<stalled@x>"])
        code, reply = smtp_data(port, raw)  # the sender's retry finds the run the stalled accept made
        assert code == 250, reply
        assert [r.dedup_key for r in service.store.list_runs()] == ["<stalled@x>"]
    logged = [r for r in caplog.records if "took over 1 s" in r.getMessage()]
    assert logged and logged[0].levelno == logging.WARNING


def test_a_stalled_accept_that_then_fails_is_logged_and_the_retry_makes_the_one_run(settings, caplog):
    """The stalled accept's other end: the store stays locked past its busy timeout, so the accept that went on
    after the 451 fails. That failure is logged at WARNING (no one else hears of it), and the retry makes the
    message's one run."""
    caplog.set_level(logging.INFO, logger="pipeline")
    settings = replace(settings, store=StoreConfig(path=settings.store.path, busy_timeout_ms=2_000))
    raw = fx.email_with([], message_id="<late-fail@x>")
    with started(settings, run_workers=False, accept_timeout_s=0.5) as service:
        port = service.settings.gateway.port
        with exclusive_lock(settings.store.path):
            code, reply = smtp_data(port, raw)
            assert code == 451 and reply.startswith("4.3.0 Temporary failure storing"), reply
            assert wait_until(lambda: any("before it finished failed" in r.getMessage() for r in caplog.records))
        assert service.store.list_runs() == []
        code, reply = smtp_data(port, raw)
        assert code == 250, reply
        assert [r.dedup_key for r in service.store.list_runs()] == ["<late-fail@x>"]
    [late] = [r for r in caplog.records if "before it finished failed" in r.getMessage()]
    assert late.levelno == logging.WARNING and "StoreBusyError" in late.getMessage(), late.getMessage()


def test_a_failed_inline_accept_sends_the_next_accepts_to_the_thread_pool(settings):
    settings = replace(settings, store=StoreConfig(path=settings.store.path, busy_timeout_ms=3000))
    with started(settings, run_workers=False, inline_accept_bytes=64 * 1024) as service:
        inline, port = service.gateway.inline_accepts, service.settings.gateway.port
        assert inline.inline(1000) and not inline.inline(64 * 1024 + 1)
        with exclusive_lock(settings.store.path):  # the small mail's commit waits, then fails, on the event loop
            code, reply = smtp_data(port, fx.email_with([], message_id="<lock1@x>"))
            assert code == 451, reply
            assert not inline.inline(1000)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as slow:  # the next one waits in a pool thread
                slow.ehlo()
                slow.mail("alice@example.com")
                slow.rcpt("digest@pipeline.local")
                assert slow.docmd("DATA")[0] == 354
                body = fx.email_with([], message_id="<lock2@x>").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                slow.send(body + b"\r\n.\r\n")
                sent = time.monotonic()
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as other:  # greeted and answered meanwhile
                    assert other.noop()[0] == 250
                answered = time.monotonic() - sent
                code, reply = slow.getreply()
                waited = time.monotonic() - sent
        assert code == 451, reply
        assert answered < 1.5 < waited, (answered, waited)  # the loop served others while that accept waited
        code, text = smtp_data(port, fx.email_with([], message_id="<lock2@x>"))
        assert code == 250, text
        assert [r.dedup_key for r in service.store.list_runs()] == ["<lock2@x>"]


def test_spool_directory_gone_answers_451_and_creates_no_run(settings):
    with started(settings) as service:
        service.spool.directory.rmdir()  # empty: nothing was spooled yet
        code, reply = smtp_data(service.settings.gateway.port, fx.email_with([], message_id="<gone@x>"))
        assert code == 451 and reply.startswith("4.3.0 "), reply
        assert service.store.count_runs_by_state() == {}


@contextmanager
def tmpfs(directory: Path, size: str = "1m"):
    """Mount a small tmpfs on ``directory`` (skip the test where mounting is refused); unmounted after."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the disk under ``directory`` is full; return it."""
    return fill_disk(directory / "filler")


def test_spool_on_a_full_disk_answers_452_leaves_no_temp_file_and_resumes(settings, monkeypatch):
    """The accept's own answer to a full disk; the data dir's watch (not looking here) then makes serve unhealthy
    (test_datadir_watch)."""
    from pipeline import datadir_watch

    monkeypatch.setattr(datadir_watch, "WATCH_EVERY_S", 3600.0)
    with tmpfs(settings.data_dir / "spool") as spool_dir:
        service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port(), drop_folder=False)))
        try:
            service.start()
            filler = fill(spool_dir)
            raw = fx.email_with([("a.pdf", fx.text_pdf(2))], message_id="<full@x>")
            code, reply = smtp_data(service.settings.gateway.port, raw)
            assert (code, reply) == (452, "4.3.1 Insufficient system storage")
            assert spooled(spool_dir) == ["filler"]  # no .incoming-*.tmp left behind
            assert service.store.count_runs_by_state() == {}
            filler.unlink()  # space returns: the same message is accepted on the sender's retry
            code, reply = smtp_data(service.settings.gateway.port, raw)
            assert code == 250, reply
            assert service.engine.wait(int(reply.rsplit(" ", 1)[1]), timeout=60).state == "success"
        finally:
            service.stop(grace_s=5)  # releases the spool's directory handle before the unmount


def test_a_declared_size_more_than_the_spool_disk_has_free_is_refused_at_mail(settings, monkeypatch):
    """A reviewer's find: with 1 MB free, a 5 MB mail was read whole, then refused 452. A SIZE= (RFC 1870) more
    than the free space is refused at MAIL, before the data; one that fits is taken."""
    from pipeline import datadir_watch

    monkeypatch.setattr(datadir_watch, "WATCH_EVERY_S", 3600.0)  # the watch's own verdict is not this test's
    with tmpfs(settings.data_dir / "spool", "4m") as spool_dir:
        service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port(), drop_folder=False)))
        try:
            service.start()
            filler = fill_disk(spool_dir / "filler")
            filler.write_bytes(b"\0" * (3 << 20))  # about 1 MB left
            room = service.spool.free_bytes()
            assert room is not None and 100_000 < room < (2 << 20), room
            with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
                smtp.ehlo()
                refused = smtp.mail("alice@example.com", [f"SIZE={room + 1}"])
                assert refused == (452, b"4.3.1 Insufficient system storage"), refused
                smtp.rset()
                assert smtp.mail("alice@example.com", ["SIZE=1000"])[0] == 250
                smtp.rcpt("digest@pipeline.local")
                code, reply = smtp.data(fx.email_with([], message_id="<fits@x>"))
            assert code == 250, reply
        finally:
            service.stop(grace_s=5)


def test_a_full_disk_under_the_work_dir_keeps_acked_mail_waiting_answers_451_and_resumes(settings):
    """A prober's find: with data/work on its own full disk, the spool still took mail (250) and each run failed
    at once with task_io, for good: the mail was lost, and serve said it was healthy. Now the runs wait for
    room, the gateway answers 451 once two of them wait (one alone may just not fit), and the acked mail is
    digested once there is room."""
    with tmpfs(settings.data_dir / "work") as work_dir:
        service = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port(), drop_folder=False)))
        try:
            service.start()
            filler = fill(work_dir)
            acked_ids = []
            for mid in ("<acked@x>", "<acked-too@x>"):
                code, reply = smtp_data(service.settings.gateway.port, fx.email_with([("a.pdf", fx.text_pdf(2))],
                                                                                   message_id=mid))
                assert code == 250, reply
                acked_ids.append(int(reply.rsplit(" ", 1)[1]))
            acked = acked_ids[0]
            assert wait_until(lambda: not service.engine.healthy)
            assert "No space left on device" in (service.engine.health_problem or "")
            code, reply = smtp_data(service.settings.gateway.port, fx.email_with([], message_id="<later@x>"))
            assert code == 451, reply  # the sender keeps it: no 250 for work that cannot run now
            assert service.store.get_run(acked).state in ("queued", "running")
            filler.unlink()
            for run_id in acked_ids:
                run = service.engine.wait(run_id, timeout=60)
                assert run.state == "success" and run.reason is None, run.reason
            assert wait_until(lambda: service.engine.healthy)
        finally:
            service.stop(grace_s=5)


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_spool_failure_leaves_no_temp_file(tmp_path, monkeypatch, failing):
    spool = Spool(tmp_path / "spool")

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    # A disk that fails on write or fsync cannot be provoked on tmpfs; inject the OSError where the OS raises it.
    monkeypatch.setattr(Spool, "_write", broken) if failing == "write" else monkeypatch.setattr(os, "fsync", broken)
    try:
        with pytest.raises(SpoolError) as err:
            spool.store(b"Subject: x\r\n\r\nbody\r\n")
    finally:
        monkeypatch.undo()
        spool.close()
    assert not err.value.disk_full and "Input/output error" in str(err.value)
    assert spooled(tmp_path / "spool") == []


def test_port_in_use_is_a_startup_error_and_claims_nothing(settings):
    store = SqliteRunStore(settings.store)
    run, _ = store.create_run(EMAIL_DIGEST, {"spool": "none", "source": "test"}, "<waiting@x>")
    store.close()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        service = PipelineService(replace(settings, gateway=GatewayConfig(port=port, drop_folder=False)))
        with pytest.raises(StartupError, match=f"^SMTP port {port} on 127.0.0.1 is in use"):
            service.start()
    store = SqliteRunStore(settings.store)
    assert store.get_run(run.run_id).state == "queued"
    store.close()


def test_engine_that_cannot_start_closes_the_bound_port_again(settings):
    settings = replace(settings, store=StoreConfig(path=settings.store.path, busy_timeout_ms=100))
    port = free_port()
    service = PipelineService(replace(settings, gateway=GatewayConfig(port=port, drop_folder=False)))
    with exclusive_lock(settings.store.path), pytest.raises(StoreError):
        service.start()  # binds the port, then the engine's recovery meets the locked store
    with socket.create_server(("127.0.0.1", port)):  # the port is free again (and no fd or thread is left)
        pass
    service.stop()  # a second stop after the failed start's cleanup does nothing


def test_spool_directory_that_cannot_be_made_is_a_spool_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot open spool directory .*: Not a directory") as err:
        Spool(tmp_path / "file" / "spool")
    assert not err.value.disk_full


def test_data_dir_that_cannot_be_created_is_a_startup_error(settings, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    bad = replace(settings, data_dir=tmp_path / "file" / "data",
                  store=StoreConfig(path=tmp_path / "file" / "data" / "runs.sqlite3"))
    with pytest.raises(StartupError, match="cannot open the data dir: Not a directory"):
        PipelineService(bad)


class FlakyAccept:
    """Accept that fails (as an unavailable service does) the first ``failures`` times, then keeps the bytes."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.accepted = failures, 0, []

    def __call__(self, raw: bytes) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise SpoolError("cannot spool: disk full", disk_full=True)
        self.accepted.append(raw)


@pytest.mark.parametrize("watch_mode", ["inotify", "poll"])
def test_drop_folder_file_whose_accept_fails_stays_in_new_and_is_retried(tmp_path, watch_mode):
    accept = FlakyAccept(failures=2)
    folder = DropFolder(tmp_path / "inbox", accept, GatewayConfig(watch_mode=watch_mode, poll_interval_s=0.05),
                        retry_interval_s=0.05)
    (tmp_path / "inbox" / "new" / "early.eml").write_bytes(b"Subject: early\r\n\r\n")  # taken by the start scan
    folder.start()
    try:
        assert wait_until(lambda: accept.calls >= 1)
        assert (tmp_path / "inbox" / "new" / "early.eml").exists()  # failed: still there, not moved
        assert wait_until(lambda: accept.accepted == [b"Subject: early\r\n\r\n"])
        assert wait_until(lambda: not list((tmp_path / "inbox" / "new").iterdir()))
    finally:
        folder.stop()
    assert [p.name for p in (tmp_path / "inbox" / "cur").iterdir()] == ["early.eml:2,S"]


def test_damaged_task_events_pages_make_serve_answer_451_not_250(settings):
    """The store's event table is corrupt: runs cannot start, so the engine reports itself unhealthy and the
    gateway stops answering 250 for work that will not run (it used to accept and process nothing)."""
    from test_store_faults import damage_table

    SqliteRunStore(settings.store).close()  # a real store, then its event table's root page overwritten
    damage_table(settings.store.path, "task_events")
    with started(settings) as service:
        port = service.settings.gateway.port
        code, reply = smtp_data(port, fx.email_with([], message_id="<first@x>"))  # the engine finds out now
        assert code in (250, 451), reply
        assert wait_until(lambda: not service.engine.healthy, timeout_s=60), "engine never reported the damage"
        code, reply = smtp_data(port, fx.email_with([], message_id="<second@x>"))
        assert code == 451 and reply.startswith("4.3.0 "), reply
        assert "corrupt" in (service.engine.health_problem or "").lower() or \
            "malformed" in (service.engine.health_problem or "").lower(), service.engine.health_problem


def test_a_parse_that_fails_for_a_full_disk_keeps_no_partial_attachment(tmp_path):
    """A prober's find: a 5 MB mail on a work disk with 1.6 MB left kept the 1.6 MB it had written of its PDF
    while it waited for room, so no other run could get any, and serve answered 451 for good."""
    from pipeline.config import IngestConfig
    from pipeline.stages import parse

    raw = fx.email_with([("small.pdf", fx.text_pdf(1)), ("big.pdf", os.urandom(2 << 20))], message_id="<big@x>")
    with tmpfs(tmp_path / "work", "1m") as work_dir:
        with pytest.raises(OSError) as err:
            parse.summarize_message(raw, work_dir, IngestConfig())
        assert err.value.errno == errno.ENOSPC
        assert list((work_dir / "attachments").iterdir()) == []  # neither the whole small one nor half the big one


INGEST_ON_A_FULL_DISK = """
import sys
from pathlib import Path
from pipeline.config import Settings
from pipeline.errors import RunNotFinishedError
from pipeline.ingest_command import ingest_files
try:
    ingest_files(Settings.for_data_dir(Path(sys.argv[1])), [Path(sys.argv[2])], unhealthy_s=1.0)
except RunNotFinishedError as exc:
    print(exc)
    sys.exit(2)
"""


def test_an_ingest_whose_one_run_waits_for_a_full_disk_gives_up_saying_why(tmp_path):
    """A prober's find: with one file, ingest waited its whole 600 s on a full work disk: one run alone waiting for
    the machine no longer makes serve unhealthy (it may just not fit), and ingest watched only that verdict.
    For ingest its one run is all the evidence there is."""
    pdf = tmp_path / "one.pdf"
    pdf.write_bytes(fx.text_pdf(2))
    data = tmp_path / "data"
    with tmpfs(data / "work") as work_dir:
        filler = fill(work_dir)
        try:
            done = subprocess.run([sys.executable, "-c", INGEST_ON_A_FULL_DISK, str(data), str(pdf)],
                                  capture_output=True, text=True, timeout=300)
        finally:
            filler.unlink()
    assert done.returncode == 2, (done.stdout, done.stderr[-2000:])
    assert done.stdout.startswith("run 1 cannot go on: tasks fail for the machine (1 run(s)"), done.stdout
    assert "No space left on device" in done.stdout
