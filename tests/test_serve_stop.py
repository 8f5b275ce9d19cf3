"""How `python -m pipeline serve` stops, as a user at a terminal sees it: a real process, real signals."""

import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

import psutil
from conftest import free_port
from helpers import wait_until

from pipeline.audit.base import fixtures as fx
from pipeline.sqlite_store import SqliteRunStore

ROOT = Path(__file__).resolve().parent.parent


class Serve:
    """``python -m pipeline serve`` on ``data``, its stderr collected line by line as it comes."""

    def __init__(self, data: Path, config: Path, port: int) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--data-dir", str(data), "--config",
                                      str(config), "serve", "--port", str(port), "--no-drop-folder"], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
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
                          fx.email_with([("slow.pdf", fx.slow_pdf(100))], message_id="<twice@stop.test>"))
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
        assert wait_until(lambda: run_state(data, 1) == "success", 300), again.stderr()
        again.proc.send_signal(signal.SIGTERM)
        assert again.end() == 0, again.stderr()
    finally:
        again.end(0)
