"""How `python -m pipeline serve` stops, as a user at a terminal sees it: a real process, real signals."""

import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from helpers import wait_until

from pipeline.audit.base import fixtures as fx
from pipeline.sqlite_store import SqliteRunStore

ROOT = Path(__file__).resolve().parent.parent


class Serve:
    """``python -m pipeline serve`` on ``data``, its stderr collected line by line as it comes."""

    def __init__(self, data: Path, config: Path, port: int, *options: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--data-dir", str(data), "--config",
                                      str(config), "serve", "--port", str(port), "--no-drop-folder", *options],
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for(self, text: str, timeout_s: float = 60) -> None:
        assert wait_until(lambda: self.said(text) or self.proc.poll() is not None, timeout_s) and self.said(text), \
            self.stderr()

    def end(self, timeout_s: float = 60) -> int | None:
        """Wait for the exit; return the exit code, or None if it took over ``timeout_s`` (then SIGKILL)."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.proc.kill()
            self.proc.wait()
            self.reader.join(30)
            self.proc.stderr.close()

    def stderr(self) -> str:
        return "".join(self.lines)


def ingest_running(data: Path, run_id: int) -> bool:
    db = SqliteRunStore(data / "runs.sqlite3", read_only=True)
    try:
        return any(t.state == "running" and t.task_id.startswith("ingest_pdf") for t in db.get_tasks(run_id))
    finally:
        db.close()


def run_state(data: Path, run_id: int) -> str:
    db = SqliteRunStore(data / "runs.sqlite3", read_only=True)
    try:
        return db.get_run(run_id).state
    finally:
        db.close()


@pytest.mark.timeout(900)  # two extractions of a slow PDF: minutes on a machine with two busy processes beside
def test_a_second_ctrl_c_during_the_stop_ends_serve_at_once_and_the_next_start_requeues_its_runs(tmp_path):
    """A second Ctrl-C while serve waited out its grace for a long extraction was ignored: the user could only
    wait, or kill -9. Now it ends serve at once (exit 130, one line), and the next start finishes the run."""
    config = tmp_path / "serve.toml"  # a grace longer than the test: only the second Ctrl-C can end this stop
    config.write_text("[engine]\nshutdown_grace_s = 3600\n[ingest]\ntimeout_s = 3600\n")
    data, port = tmp_path / "data", free_port()
    serve = Serve(data, config, port)
    try:
        serve.wait_for("Ctrl-C to stop")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("alice@example.com", ["d@pipeline.local"],
                          fx.email_with([("slow.pdf", fx.slow_pdf(40))], message_id="<twice@stop.test>"))
        assert wait_until(lambda: ingest_running(data, 1), 60), serve.stderr()
        children = psutil.Process(serve.proc.pid).children(recursive=True)
        serve.proc.send_signal(signal.SIGINT)
        serve.wait_for("stopping on SIGINT")
        assert ingest_running(data, 1)  # the stop waits for it
        serve.proc.send_signal(signal.SIGINT)
        code = serve.end()
        _, alive = psutil.wait_procs(children, timeout=30)  # the gateway process and the workers end too
        assert not alive, [" ".join(c.cmdline()) for c in alive]
    finally:
        serve.end(0)
    assert code == 130, serve.stderr()
    assert "error: stopped at once on a second SIGINT, without waiting for running tasks; the runs still running " \
           "are requeued by the next start" in serve.stderr()
    assert "Traceback" not in serve.stderr(), serve.stderr()
    assert run_state(data, 1) == "running"  # left in the dead process's name

    config.write_text("[engine]\nshutdown_grace_s = 5\n[ingest]\ntimeout_s = 3600\n")
    again = Serve(data, config, port)
    try:
        again.wait_for("requeued 1 run(s) left running by a dead process")
        assert wait_until(lambda: run_state(data, 1) == "success", 600), again.stderr()
        again.proc.send_signal(signal.SIGTERM)
        assert again.end() == 0, again.stderr()
    finally:
        again.end(0)


def accepts_in_progress(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        lines = page.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("pipeline_gateway_accepts_in_progress "))


def test_ctrl_c_while_an_accept_waits_on_the_store_leaves_no_task_pending(tmp_path):
    """Ctrl-C while a sender's accept waited in the pool (here: on a store another process holds) logged "Task was
    destroyed but it is pending!": the gateway's event loop was stopped before the cancelled session could end.
    Now the session ends (its sender sees the connection close, and retries), and the stop is clean, exit 0."""
    config = tmp_path / "serve.toml"
    config.write_text("")
    data, port, metrics_port = tmp_path / "data", free_port(), free_port()
    serve = Serve(data, config, port, "--metrics-port", str(metrics_port))
    holder = None
    try:
        serve.wait_for("Ctrl-C to stop")
        holder = sqlite3.connect(data / "runs.sqlite3", timeout=30, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # the accept's commit waits for it

        def send() -> None:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
                    smtp.sendmail("alice@example.com", ["d@pipeline.local"],
                                  fx.email_with([("a.pdf", fx.text_pdf(1))], message_id="<pending@stop.test>"))
            except (OSError, smtplib.SMTPException):
                pass  # cut off by the stop: its MTA tries again

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        assert wait_until(lambda: accepts_in_progress(metrics_port) == 1, 60), serve.stderr()
        serve.proc.send_signal(signal.SIGINT)
        sender.join(120)  # until the stop closes its connection (before the fix: once the accept gave up)
        assert not sender.is_alive()
        holder.rollback()
        code = serve.end()
    finally:
        if holder is not None:
            holder.close()
        serve.end(0)
    assert code == 0, serve.stderr()
    assert "Task was destroyed but it is pending" not in serve.stderr(), serve.stderr()
    assert "Traceback" not in serve.stderr(), serve.stderr()
