"""serve's gateway in a process of its own (issue 17): real serve processes, real SMTP, real SQLite wake-ups.

Behaviour only: which process answers, what survives a kill, what a signal stops. The one bound on time
(a run claimed before a 30 s poll would have found it) leaves 10 s for a loaded machine.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import platform
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from helpers import wait_until

from pipeline import priority
from pipeline.audit.base import fixtures as fx
from pipeline.audit.base.serveproc import ServeProcess
from pipeline.config import GatewayConfig
from pipeline.gatewayprocess import GatewayProcess
from pipeline.metrics import GATEWAY_PROCESS
from pipeline.sqlite_store import SqliteRunStore
from pipeline.store import FAILED, SUCCESS


def gateway_children(serve: ServeProcess) -> list[psutil.Process]:
    """Serve's live gateway processes (by command line)."""
    found = []
    for proc in serve.descendants():
        try:
            if any(GATEWAY_PROCESS in part for part in proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def data_reply(port: int, message_id: str) -> tuple[int, str]:
    """One small mail on its own connection; the DATA reply (raises what smtplib raises)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo()
        code, reply = smtp.mail("alice@example.com")  # an unhealthy serve answers 451 here, before the data
        if code != 250:
            return code, reply.decode()
        smtp.rcpt("digest@pipeline.local")
        code, reply = smtp.data(fx.email_with([], message_id=message_id))
    return code, reply.decode()


def send(port: int, message_id: str) -> str:
    """One small mail that must be answered 250; the reply's text."""
    code, reply = data_reply(port, message_id)
    assert code == 250, reply
    return reply


def runs_by_key(data_dir: Path) -> dict[str, list]:
    with SqliteRunStore(data_dir / "runs.sqlite3", create=False) as store:
        runs = store.list_runs(limit=10_000)
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.dedup_key, []).append(run)
    return found


def all_finished(data_dir: Path, keys: list[str]) -> bool:
    runs = runs_by_key(data_dir)
    return all(runs.get(k) and all(r.state in (SUCCESS, FAILED) for r in runs[k]) for k in keys)


@pytest.fixture
def serve(tmp_path: Path):
    serve = ServeProcess(tmp_path / "data", tmp_path / "serve")
    # serve started under nohup keeps ignoring SIGHUP, as documented: a suite run under nohup (a CI job kept
    # alive past a closed session) must still start serve as a terminal would, or the hangup test waits 60 s
    ignored = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield taken(serve.start())
    finally:
        signal.signal(signal.SIGHUP, ignored)
        serve.stop()


def taken(serve: ServeProcess) -> ServeProcess:
    """``serve`` once it has taken its gateway process as started (its log says so). The child answers SMTP a
    moment before serve reads its "ready": killed in between, it is a failed start, which ends serve (on a busy
    machine a test that killed it at once saw "exited with code -35 before it listened")."""
    def logged() -> bool:
        children = gateway_children(serve)
        return len(children) == 1 and f"gateway process {children[0].pid} accepts SMTP" in serve.log_tail(50_000)
    assert wait_until(logged, timeout_s=60), serve.log_tail()
    return serve


def test_a_default_serve_accepts_in_a_child_process_and_finishes_the_runs(serve):
    children = gateway_children(serve)
    assert len(children) == 1 and children[0].pid != serve.proc.pid
    keys = [f"<child-{i}@example.com>" for i in range(3)]
    for key in keys:
        assert "queued as run" in send(serve.port, key)
    assert wait_until(lambda: all_finished(serve.data_dir, keys), timeout_s=120), serve.log_tail()
    assert {r.state for k in keys for r in runs_by_key(serve.data_dir)[k]} == {SUCCESS}
    assert f"the gateway in process {children[0].pid}" in serve.log_tail(20_000)


def test_a_killed_gateway_process_is_restarted_and_no_accepted_mail_is_lost(serve):
    acked: list[str] = []
    stop = threading.Event()

    def sender() -> None:  # an MTA: retries what was not answered 250
        i = 0
        while not stop.is_set():
            key = f"<kill-{i}@example.com>"
            try:
                send(serve.port, key)
                acked.append(key)
                i += 1
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)

    first = gateway_children(serve)[0]
    thread = threading.Thread(target=sender)
    thread.start()
    try:
        assert wait_until(lambda: len(acked) >= 5, timeout_s=60)
        first.kill()
        assert wait_until(lambda: [p.pid for p in gateway_children(serve)] not in ([], [first.pid]),
                          timeout_s=60), serve.log_tail()
        after = len(acked)
        assert wait_until(lambda: len(acked) >= after + 5, timeout_s=60), serve.log_tail()  # the new one answers
    finally:
        stop.set()
        thread.join()
    log = serve.log_tail(50_000)
    assert "was killed by SIGKILL" in log and "listening again" in log
    assert wait_until(lambda: all_finished(serve.data_dir, acked), timeout_s=180), serve.log_tail()
    runs = runs_by_key(serve.data_dir)
    assert all(len(runs[key]) == 1 and runs[key][0].state == SUCCESS for key in acked)


def test_a_gateway_process_whose_event_loop_hangs_is_killed_and_restarted(tmp_path):
    """A hung child (here stopped with SIGSTOP; in the wild a deadlock or a callback that never returns) used to
    stay for ever: alive, so never restarted, while senders timed out and serve looked healthy."""
    serve = taken(ServeProcess(tmp_path / "data", tmp_path / "serve", {"serve": {"gateway_hung_after_s": 2}}).start())
    try:
        first = gateway_children(serve)[0]
        os.kill(first.pid, signal.SIGSTOP)
        assert wait_until(lambda: [p.pid for p in gateway_children(serve)] not in ([], [first.pid]),
                          timeout_s=60), serve.log_tail()
        assert "queued as run" in send(serve.port, "<after-hang@example.com>")
        log = serve.log_tail(50_000)
        assert "gave no sign of life" in log and "hung (silent for 2 s) and was killed" in log, log
        assert "listening again" in log
    finally:
        serve.stop()


def test_a_paused_serve_does_not_kill_its_gateway_process_when_it_resumes(tmp_path):
    """Ctrl-Z or a frozen container pauses serve and its gateway together: on resume the silence spans the pause,
    but nobody was watching then, so it is not the child's: it must not be killed (cutting its senders)."""
    serve = taken(ServeProcess(tmp_path / "data", tmp_path / "serve", {"serve": {"gateway_hung_after_s": 2}}).start())
    try:
        first = gateway_children(serve)[0]
        os.killpg(serve.proc.pid, signal.SIGSTOP)
        time.sleep(4)
        os.killpg(serve.proc.pid, signal.SIGCONT)
        assert "queued as run" in send(serve.port, "<after-pause@example.com>")
        time.sleep(3)  # past the limit again: a child judged by the paused span would be gone by now
        assert [p.pid for p in gateway_children(serve)] == [first.pid], serve.log_tail()
        assert "gave no sign of life" not in serve.log_tail(50_000)
    finally:
        serve.stop()


def test_a_gateway_process_whose_serve_is_frozen_answers_451_until_serve_speaks_again(tmp_path):
    """A probe's find: serve stopped (SIGSTOP) while its gateway process went on answering 250 to mail no engine
    ran, for as long as the freeze lasted. Serve tells the child its health every second; silent for
    ``gateway_hung_after_s``, the child answers 451, and 250 again once serve speaks."""
    serve = taken(ServeProcess(tmp_path / "data", tmp_path / "serve", {"serve": {"gateway_hung_after_s": 2}}).start())
    try:
        tries = itertools.count()
        os.kill(serve.proc.pid, signal.SIGSTOP)  # serve alone: its gateway process runs on
        try:  # (the first mails may still be taken: the child waits 2 s of silence)
            assert wait_until(lambda: data_reply(serve.port, f"<frozen-{next(tries)}@example.com>")[0] == 451,
                              timeout_s=60)
            assert wait_until(lambda: "frozen or stuck" in serve.log_tail(50_000), timeout_s=30), serve.log_tail()
        finally:
            os.kill(serve.proc.pid, signal.SIGCONT)
        refused = f"<frozen-{next(tries) - 1}@example.com>"
        assert wait_until(lambda: data_reply(serve.port, "<thawed@example.com>")[0] == 250, timeout_s=60)
        assert refused not in runs_by_key(serve.data_dir)  # refused, not taken
    finally:
        serve.stop()


def test_a_gateway_process_killed_by_a_signal_python_has_no_name_for_is_restarted(serve):
    """Real-time signal 35 is no member of ``signal.Signals``: naming it must not end supervision."""
    first = gateway_children(serve)[0]
    os.kill(first.pid, 35)  # SIGRTMIN + 1: the default action ends the process
    assert wait_until(lambda: [p.pid for p in gateway_children(serve)] not in ([], [first.pid]),
                      timeout_s=60), serve.log_tail()
    assert "queued as run" in send(serve.port, "<after-rt-signal@example.com>")
    # two processes write that log: under load a line can land a moment after the reply it precedes
    assert wait_until(lambda: all(line in serve.log_tail(50_000) for line in ("was killed by signal 35",
                                                                          "listening again")), timeout_s=30), \
        serve.log_tail(50_000)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_or_a_closed_terminal_stops_serve_and_its_gateway_process_gracefully(serve, sig):
    """Ctrl-C, systemd's stop (SIGTERM to the whole cgroup) and a hangup (a closed terminal or ssh session) signal
    the whole process group: serve stops, and its gateway process, workers and multiprocessing's fork server,
    which ignore all three, are stopped by serve. (A hangup used to kill serve outright, leaving its runs to the
    next start's recovery; SIGTERM killed the fork server, which broke the process pool under running tries.)"""
    child = gateway_children(serve)[0]
    send(serve.port, f"<{sig.name}@example.com>")
    os.killpg(serve.proc.pid, sig)
    assert serve.proc.wait(60) == 0, serve.log_tail()
    assert wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout_s=30)
    log = serve.log_tail(20_000)
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert f"stopping on {sig.name}" in log and "process pool broken" not in log  # its fork server lived


def test_ctrl_c_while_the_gateway_process_starts_stops_serve_gracefully(tmp_path):
    """A helper's find: the gateway process ignores the stop signals once its imports are done, half a second
    after it starts; a Ctrl-C before that killed it, and serve failed "the gateway process exited with code -2
    before it listened". It now starts with them blocked."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--data-dir", str(tmp_path / "data"),
                             "--port", "0", "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        def child_started() -> bool:
            try:
                return any(GATEWAY_PROCESS in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children())
            except psutil.Error:  # a child gone between the two looks
                return False
        assert wait_until(child_started, timeout_s=60)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"exited with code" not in err and b"KeyboardInterrupt" not in err, err.decode()[-2000:]


def test_a_gateway_process_whose_serve_died_stops_by_itself(serve):
    child = gateway_children(serve)[0]
    serve.proc.send_signal(signal.SIGKILL)  # serve only, not its process group
    serve.proc.wait()
    assert wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout_s=30)


def test_a_run_the_gateway_process_queues_is_claimed_at_once_not_at_the_next_poll(tmp_path):
    serve = ServeProcess(tmp_path / "data", tmp_path / "serve", {"engine": {"queue_poll_s": 30.0}}).start()
    try:
        time.sleep(1)  # the engine is idle, waiting out its 30 s poll
        key = "<wake@example.com>"
        send(serve.port, key)
        assert wait_until(lambda: runs_by_key(serve.data_dir)[key][0].started_at is not None, timeout_s=10)
    finally:
        serve.stop()


def test_one_process_serve_keeps_the_gateway_in_serve(tmp_path):
    serve = ServeProcess(tmp_path / "data", tmp_path / "serve", {"serve": {"gateway_process": False}}).start()
    try:
        assert gateway_children(serve) == []
        send(serve.port, "<one@example.com>")
        assert wait_until(lambda: all_finished(serve.data_dir, ["<one@example.com>"]), timeout_s=120)
    finally:
        serve.stop()


def test_the_gateway_process_answers_451_while_the_engine_is_unhealthy(settings):
    problem: list[str | None] = [None]
    gateway = GatewayProcess(replace(settings, gateway=GatewayConfig(port=free_port(), drop_folder=False)),
                             health=lambda: problem[0])
    gateway.start()
    codes: list[int] = []

    def reply_code() -> int:
        codes.append(data_reply(gateway.settings.gateway.port, f"<mail-{len(codes)}@example.com>")[0])
        return codes[-1]
    try:
        assert reply_code() == 250
        problem[0] = "claiming runs failed 3 times: StoreBusyError: database is locked"
        assert wait_until(lambda: reply_code() == 451, timeout_s=30)  # the child hears of it within moments
        problem[0] = None
        assert wait_until(lambda: reply_code() == 250, timeout_s=30)
    finally:
        gateway.stop()
    with SqliteRunStore(settings.store) as store:  # a mail answered 451 was neither spooled nor queued
        assert store.count_runs_by_state() == {"queued": codes.count(250)}
    assert set(codes) == {250, 451}


def test_a_failing_look_at_the_engine_is_reported_and_supervision_goes_on(settings):
    """The health callback raising (a bug) makes serve report the problem; once it works again the problem
    clears, and a gateway process killed after that is still restarted."""
    failing = threading.Event()

    def health() -> str | None:
        if failing.is_set():
            raise RuntimeError("injected: health check broke")
        return None

    gateway = GatewayProcess(replace(settings, gateway=GatewayConfig(port=free_port(), drop_folder=False)),
                             health=health)
    gateway.start()
    try:
        failing.set()
        assert wait_until(lambda: (gateway.problem or "").startswith("supervising the gateway process failed"),
                          timeout_s=30)
        failing.clear()
        assert wait_until(lambda: gateway.problem is None, timeout_s=30)
        first = gateway.pid
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: gateway.pid != first and gateway.problem is None, timeout_s=60)
        assert data_reply(gateway.settings.gateway.port, "<after-broken-look@example.com>")[0] == 250
    finally:
        gateway.stop()


def test_a_dead_gateway_process_is_reported_even_while_supervision_is_stuck(settings):
    """A prober's find: with the supervisor stuck in a call (here: the engine's health check, which it makes every
    look) and the gateway process killed, no SMTP was answered for 10 s while serve said it was healthy: only
    the supervisor set ``problem``. ``down`` looks at the process itself."""
    stuck, release = threading.Event(), threading.Event()

    def health() -> str | None:
        if stuck.is_set():
            release.wait(60)
        return None

    gateway = GatewayProcess(replace(settings, gateway=GatewayConfig(port=free_port(), drop_folder=False)),
                             health=health)
    gateway.start()
    try:
        stuck.set()
        time.sleep(1.0)  # the supervisor's next look calls health() and stays there
        os.kill(gateway.pid, signal.SIGKILL)
        assert wait_until(lambda: gateway.down is not None, timeout_s=30)
        assert gateway.problem is None  # what the stuck supervisor would have said
    finally:
        stuck.clear()
        release.set()
    try:
        assert wait_until(lambda: gateway.down is None and gateway.problem is None, timeout_s=60)
    finally:
        gateway.stop()


def test_the_audit_counts_the_gateway_process_as_serve_not_as_a_worker(serve):
    """Memory and CPU figures of "serve" cover the process that accepts the mail and the stage pool, everything
    but the extraction workers (pipeline/audit/base/servemem.py)."""
    from pipeline.audit.base.servemem import sample_tree

    [child] = gateway_children(serve)
    counted = {p.pid for p in serve.serve_processes()}
    workers = {p.pid for p in serve.extract_workers()}
    assert {serve.proc.pid, child.pid} <= counted and not counted & workers
    assert counted | workers == {serve.proc.pid} | {p.pid for p in serve.descendants()}
    assert child.pid not in workers
    sample = sample_tree(serve)
    main_rss = psutil.Process(serve.proc.pid).memory_info().rss
    assert sample.serve_rss > main_rss  # the child's RSS is in it
    assert child.pid not in sample.worker_pids


def slices_us(proc: psutil.Process) -> set[int]:
    """The scheduler slices (µs) ``proc``'s threads asked for (``sched_getattr``)."""
    libc, calls = ctypes.CDLL(None, use_errno=True), priority.SCHED_ATTR_CALLS[platform.machine()]
    return {priority._runtime(libc, calls, t.id) // 1000 for t in proc.threads()}


SLICE_US = 100  # [serve] gateway_slice_us asked for (the default, 0, asks for nothing)


def takes_slices() -> bool:
    """Whether this kernel keeps a slice a thread asks for (Linux 6.12+), read back in a child process."""
    code = "from pipeline.priority import request_slice; print(request_slice(300))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    return int(out) > 0


@pytest.mark.skipif(platform.machine() not in priority.SCHED_ATTR_CALLS or not sys.platform.startswith("linux"),
                    reason="slices are asked for on Linux x86_64 and aarch64 only")
def test_the_gateway_process_asks_for_short_slices_and_the_engine_keeps_the_kernels(tmp_path):
    if not takes_slices():
        pytest.skip(f"this kernel ({platform.release()}) ignores slice requests (Linux 6.12+ takes them)")
    config = {"serve": {"gateway_slice_us": SLICE_US}}
    serve = taken(ServeProcess(tmp_path / "data", tmp_path / "serve", config).start())
    try:
        send(serve.port, "<slice-1@example.com>")  # the gateway's accept threads are up once a mail went through
        assert wait_until(lambda: all_finished(serve.data_dir, ["<slice-1@example.com>"]), timeout_s=120)
        child = gateway_children(serve)[0]
        assert len(child.threads()) > 1 and slices_us(child) == {SLICE_US}
        assert SLICE_US not in slices_us(psutil.Process(serve.proc.pid))  # the engine's: kernel's
        child.kill()  # a restarted gateway process asks again, once it has read its orders
        assert wait_until(lambda: [p.pid for p in gateway_children(serve)] not in ([], [child.pid]), timeout_s=60)
        assert wait_until(lambda: slices_us(gateway_children(serve)[0]) == {SLICE_US},
                          timeout_s=60)
    finally:
        serve.stop()


INHERITED = """
import ctypes, platform, threading
from pipeline import priority
asked = priority.request_slice(250)
libc, calls = ctypes.CDLL(None, use_errno=True), priority.SCHED_ATTR_CALLS.get(platform.machine())
seen = []
later = threading.Thread(target=lambda: seen.append(priority._runtime(libc, calls, threading.get_native_id())))
later.start()
later.join()
print(asked, seen[0] if calls else -1)
"""


def test_a_slice_asked_for_is_inherited_by_threads_started_later():
    out = subprocess.run([sys.executable, "-c", INHERITED], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    asked, later = int(out[0]), int(out[1])
    if asked == 0:
        pytest.skip("no slice requests here (not Linux 6.12+ on x86_64 or aarch64)")
    assert later == 250_000


def thread_nices(proc: psutil.Process) -> set[int]:
    """The nice values of ``proc``'s threads (Linux keeps one per thread)."""
    return {os.getpriority(os.PRIO_PROCESS, t.id) for t in proc.threads()}


def test_engine_nice_lowers_the_engine_and_its_workers_and_keeps_the_gateway_first(tmp_path):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    serve = ServeProcess(tmp_path / "data", tmp_path / "serve", {"serve": {"engine_nice": 5}}).start()
    try:
        send(serve.port, "<nice-1@example.com>")  # the extraction workers are up once a run went through
        assert wait_until(lambda: all_finished(serve.data_dir, ["<nice-1@example.com>"]), timeout_s=120)
        child = gateway_children(serve)[0]
        assert thread_nices(child) == {base}
        serve_threads = {t.id: os.getpriority(os.PRIO_PROCESS, t.id) for t in psutil.Process(serve.proc.pid).threads()}
        assert sorted(serve_threads.values()).count(base) == 1  # the thread that restarts the gateway process
        assert set(serve_threads.values()) == {base, min(19, base + 5)}
        workers = [p for p in serve.descendants() if p.pid != child.pid and p.ppid() != child.pid]
        assert workers and all(thread_nices(p) == {min(19, base + 5)} for p in workers)
        child.kill()  # a restarted gateway process starts at serve's own priority again
        assert wait_until(lambda: [p.pid for p in gateway_children(serve)] not in ([], [child.pid]), timeout_s=60)
        assert thread_nices(gateway_children(serve)[0]) == {base}
    finally:
        serve.stop()


@pytest.mark.timeout(900)  # a slow PDF extracted once and a half: minutes beside two busy processes
def test_a_stop_past_the_grace_ends_the_extraction_it_abandons_and_the_run_is_finished_once_later(tmp_path):
    """A document still extracting when the grace ends: its run is requeued, and the extraction is ended then,
    not waited for (a 5,000-page PDF kept serve 12 s past a 1 s grace, its try writing into the work dir while
    another serve had taken the run over). The abandoned try leaves no text behind; the next start extracts
    the whole document, once."""
    # its time limit far off: beside two busy processes its 60 pages took longer than the default 60 s
    config = {"engine": {"shutdown_grace_s": 0.5}, "ingest": {"timeout_s": 3600}}
    serve = taken(ServeProcess(tmp_path / "data", tmp_path / "serve", config).start())
    try:
        send_pdf = fx.email_with([("slow.pdf", fx.slow_pdf(60))], message_id="<abandoned@example.com>")
        with smtplib.SMTP("127.0.0.1", serve.port, timeout=60) as smtp:
            smtp.sendmail("alice@example.com", ["digest@pipeline.local"], send_pdf)
        text_dir = serve.data_dir / "work" / "1" / "text"
        assert wait_until(lambda: text_dir.is_dir() and any(text_dir.iterdir()), timeout_s=120)  # extracting
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(120) == 0, serve.log_tail()
        log = serve.log_tail(50_000)
        assert "still running after 0.5 s grace, requeued" in log
        assert list(text_dir.iterdir()) == []  # ended, not finished: its parts removed, no text joined
        taken(serve.start())
        assert wait_until(lambda: all_finished(serve.data_dir, ["<abandoned@example.com>"]), timeout_s=300)
        runs = runs_by_key(serve.data_dir)["<abandoned@example.com>"]
        assert [r.state for r in runs] == ["success"] and not runs[0].partial
        db = sqlite3.connect(f"file:{serve.data_dir / 'runs.sqlite3'}?mode=ro", uri=True)
        try:
            [(output,)] = db.execute("SELECT output FROM task_runs WHERE run_id = ? AND task_id = 'ingest_pdf[0]'",
                                     (runs[0].run_id,)).fetchall()
        finally:
            db.close()
        assert json.loads(output)["pages"] == 60  # all of them, by the one try that finished
        assert wait_until(lambda: not text_dir.exists(), timeout_s=30)  # the ended run's text is shed
    finally:
        serve.stop()
