"""Task callables for tests (module-level so process pools can import them), and small shared helpers."""

from __future__ import annotations

import os
import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.dag import TaskContext


def at_once(fn: Callable[[], object], count: int) -> tuple[list, list[Exception]]:
    """Call ``fn`` from ``count`` threads released together by a barrier; return (results, errors raised)."""
    barrier = threading.Barrier(count, timeout=30)
    results: list = []
    errors: list[Exception] = []

    def one() -> None:
        try:
            barrier.wait()
            results.append(fn())
        except Exception as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def send_for_run_id(service, raw: bytes, sender: str = "alice@example.com") -> int:
    """Send one message to ``service``'s gateway over SMTP; return the run id its 250 names."""
    with smtplib.SMTP(service.settings.gateway.host, service.settings.gateway.port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        smtp.rcpt("digest@pipeline.local")
        code, reply = smtp.data(raw)
    assert code == 250, reply
    return int(reply.decode().rsplit(" ", 1)[1])


def wait_until(predicate, timeout_s: float = 30.0) -> bool:
    """Poll ``predicate`` every 20 ms; True once it holds, False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def noop(ctx: TaskContext) -> None:
    return None


def write_while_disk_full(ctx: TaskContext) -> int:
    """Write to /dev/full (a real ENOSPC) while the payload's ``full`` file exists, then to the work dir."""
    target = "/dev/full" if Path(ctx.payload["full"]).exists() else str(Path(ctx.work_dir) / "out")
    with open(target, "wb", buffering=0) as fh:
        fh.write(b"digest")
    return ctx.try_number


def write_while_denied(ctx: TaskContext) -> int:
    """Write to a read-only sysctl (a real EACCES, even as root) while the payload's ``denied`` file exists; the
    file goes after the payload's ``denied_tries`` tries (a chmod undone), if it gives them."""
    denied = Path(ctx.payload["denied"])
    if ctx.try_number > ctx.payload.get("denied_tries", ctx.try_number):
        denied.unlink(missing_ok=True)
    target = "/proc/sys/kernel/ostype" if denied.exists() else str(Path(ctx.work_dir) / "out")
    with open(target, "wb", buffering=0) as fh:
        fh.write(b"digest")
    return ctx.try_number


def write_to_a_directory(ctx: TaskContext) -> None:
    """Open the run's work dir as a file for writing: EISDIR, an OS error about this file, not the machine."""
    with open(ctx.work_dir, "wb"):
        pass


def square_in_process(ctx: TaskContext) -> dict:
    return {"pid": os.getpid(), "value": ctx.payload["n"] ** 2}


def record_call(ctx: TaskContext) -> str:
    """Log this call to the payload's log file and return the task id.

    Tasks named in ``hold`` wait while the payload's ``gate`` file exists (30 s at most).
    """
    log = Path(ctx.payload["log"])
    with log.open("a") as fh:
        fh.write(f"{ctx.task_id} start\n")
    deadline = time.monotonic() + 30
    while ctx.task_id.split("[")[0] in ctx.payload.get("hold", ()) and Path(ctx.payload["gate"]).exists():
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    with log.open("a") as fh:
        fh.write(f"{ctx.task_id} done\n")
    return ctx.task_id


def recovery_dag(flaky_b: bool = False):
    """a -> b (fan-out over two items) -> c; each call is logged to the payload's log file. ``flaky_b``: each
    b instance's first call fails (retryably; a marker file beside the log remembers it), and b has one retry."""
    from pipeline.dag import DAG, Task

    return DAG("recover", [
        Task("a", lambda ctx: record_call(ctx) and [1, 2]),
        Task("b", fail_once_then_record if flaky_b else record_call, deps=("a",), map_over="a",
             retries=1 if flaky_b else None),
        Task("c", record_call, deps=("b",)),
    ])


def fail_once_then_record(ctx: TaskContext) -> str:
    """``record_call``, except that each task instance's first call (per log directory) raises a retryable
    error."""
    marker = Path(ctx.payload["log"]).with_name(f"{ctx.task_id}.failed-once")
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"{ctx.task_id}: failing once")
    return record_call(ctx)


def die_on_first_try(ctx: TaskContext) -> dict:
    """Kill this process-pool worker outright on the first try (as the OOM killer would); succeed after."""
    if ctx.try_number == 1:
        os.kill(os.getpid(), 9)
    return {"pid": os.getpid(), "try": ctx.try_number}


def own_row_logged_in_process(ctx: TaskContext) -> dict:
    """``own_row_in_process``, after logging "<task> <try>" to the payload's log file: which tries were launched."""
    with Path(ctx.payload["log"]).open("a") as fh:
        fh.write(f"{ctx.task_id} {ctx.try_number}\n")
    return own_row_in_process(ctx)


def own_row_in_process(ctx: TaskContext) -> dict:
    """Read this try's own task row from the store file over a fresh connection (what a crash would leave)."""
    import sqlite3

    with sqlite3.connect(ctx.payload["db"]) as conn:
        state, tries = conn.execute("SELECT state, try_number FROM task_runs WHERE run_id = ? AND task_id = ?",
                                    (ctx.run_id, ctx.task_id)).fetchone()
    return {"state": state, "try": tries}


def fill_disk(path: Path) -> Path:
    """Write ``path`` until its disk is full, to the last few bytes (unbuffered: nothing is left to fail at
    close); return it."""
    with path.open("wb", buffering=0) as fh:
        chunk = b"\0" * 65536
        while chunk:
            try:
                fh.write(chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 4] if len(chunk) > 512 else b""
    return path


def smtp_answers(port: int) -> bool:
    """Whether an SMTP server answers on ``port`` (loopback)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
            smtp.noop()
        return True
    except OSError:
        return False
