"""Faults of the scale-out engines, injected under a real ``python -m pipeline serve`` and judged like the others
(``faults``, ``faultcheck``): the PostgreSQL run store's server stopped mid-burst, and the Dask scheduler killed
or frozen (SIGSTOP) mid-burst. All are the machine's fault, never the mail's: senders should see 451 while it
lasts and 250 once it is back, and every acked mail should end in exactly one successful run with one digest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ... import store as s
from ...config import StoreConfig
from ..base.faultcheck import Rows, burst_messages, figures, judge, runs_by_message, skipped
from ..base.harness import row
from ..base.serveproc import Replies, Senders, free_port, serving

DASK = Path(sys.executable).parent / "dask"  # the CLI of the project's environment (extra [dask])


def store_server_down(work: Path, messages: int = 200, senders: int = 4, down_s: float = 5.0,
                      busy_timeout_ms: int = 1000, timeout_s: float = 300.0, margin_s: float = 2.0) -> Rows:
    """Serve on a PostgreSQL run store whose server is stopped (``pg_ctl stop -m immediate``: a crash, with
    recovery at the next start) for ``down_s`` while senders keep sending at a steady pace, from about
    ``margin_s`` before the outage to ``margin_s`` after it."""
    fault = "store_server_down"
    from ..base.pgserver import TemporaryPostgres

    try:
        server = TemporaryPostgres(durable=True).start()
    except Exception as exc:  # not installed, or would not start here: the row says why
        return skipped(fault, f"{type(exc).__name__}: {exc}")
    try:
        store = StoreConfig(url=server.create_database("faults"))
        gap = (down_s + 2 * margin_s) * senders / messages  # sending spans the outage with a margin either side
        with serving(work / "data", work, {"store": {"url": store.url, "busy_timeout_ms": busy_timeout_ms}}) as serve:
            with Senders(serve.port, burst_messages("pgdown", messages), work, senders, gap_s=gap) as sending:
                sending.wait_acked(max(1, messages // 10), timeout_s)
                server.pg_ctl("stop", "-m", "immediate", "-w")
                stopped = time.time()  # down from here (a 250 read just after may be of a commit just before)
                time.sleep(down_s)
                server.pg_ctl("start")
                restarted = time.time()
                replies = sending.wait(timeout_s)
            verdict = judge(serve.data_dir, replies, messages, timeout_s, store_config=store)
    finally:
        server.stop()
    return figures(fault, verdict, replies, restarted, down_s=down_s) + _outage_rows(fault, replies, stopped,
                                                                                     restarted)


def scheduler_killed(work: Path, messages: int = 60, senders: int = 4, down_s: float = 5.0,
                     timeout_s: float = 300.0, margin_s: float = 2.0) -> Rows:
    """Serve sending every PDF to a Dask cluster (``dask scheduler`` and one ``dask worker``, as the README deploys
    them) whose scheduler is killed with SIGKILL mid-burst; ``down_s`` later a new cluster starts on the same
    address, as a supervisor would restart it. Every mail carries a one-page PDF."""
    fault = "scheduler_killed"
    if not DASK.exists():
        return skipped(fault, f"no Dask CLI at {DASK} (install the [dask] extra)")
    port = free_port()
    config = {"executor": {"kind": "dask", "scheduler": f"tcp://127.0.0.1:{port}"}}
    gap = (down_s + 2 * margin_s) * senders / messages
    with DaskCluster(port, work / "cluster-1") as first, serving(work / "data", work, config) as serve:
        with Senders(serve.port, burst_messages("daskdown", messages, pdf_every=1), work, senders,
                     gap_s=gap) as sending:
            _wait_succeeded(serve.data_dir, max(1, messages // 5), timeout_s)  # the executor is connected
            killed = time.time()
            first.scheduler.kill()
            first.stop()  # its worker too: a supervisor restarts the cluster as a whole
            time.sleep(max(0.0, down_s - (time.time() - killed)))
            with DaskCluster(port, work / "cluster-2"):
                restarted = time.time()
                replies = sending.wait(timeout_s)
                verdict = judge(serve.data_dir, replies, messages, timeout_s)
    return figures(fault, verdict, replies, restarted, down_s=down_s) + _outage_rows(fault, replies, killed,
                                                                                     restarted)


def scheduler_frozen(work: Path, messages: int = 60, senders: int = 4, down_s: float = 15.0, silent_s: float = 5.0,
                     timeout_s: float = 300.0, margin_s: float = 2.0) -> Rows:
    """As ``scheduler_killed``, the scheduler stopped with SIGSTOP for ``down_s`` instead, then continued: its TCP
    connections stay open, so only its silence shows it. Serve refuses to send tasks to a scheduler silent for
    ``[executor] scheduler_silent_s`` (``silent_s`` here; 30 s by default, the same path) and answers 451 once two
    runs wait for it; the tries sent before that wait at the scheduler and end once it continues."""
    fault = "scheduler_frozen"
    if not DASK.exists():
        return skipped(fault, f"no Dask CLI at {DASK} (install the [dask] extra)")
    port = free_port()
    config = {"executor": {"kind": "dask", "scheduler": f"tcp://127.0.0.1:{port}", "scheduler_silent_s": silent_s}}
    gap = (down_s + 2 * margin_s) * senders / messages
    with DaskCluster(port, work / "cluster") as cluster, serving(work / "data", work, config) as serve:
        with Senders(serve.port, burst_messages("daskfrozen", messages, pdf_every=1), work, senders,
                     gap_s=gap) as sending:
            _wait_succeeded(serve.data_dir, max(1, messages // 5), timeout_s)  # the executor is connected
            frozen = time.time()
            cluster.scheduler.send_signal(signal.SIGSTOP)
            try:
                time.sleep(down_s)
            finally:
                cluster.scheduler.send_signal(signal.SIGCONT)
            continued = time.time()
            replies = sending.wait(timeout_s)
            verdict = judge(serve.data_dir, replies, messages, timeout_s)
    return figures(fault, verdict, replies, continued, down_s=down_s) + _outage_rows(fault, replies, frozen,
                                                                                     continued)


def _wait_succeeded(data_dir: Path, count: int, timeout_s: float) -> None:
    """Wait until ``count`` runs in serve's store succeeded."""
    deadline = time.monotonic() + timeout_s
    while sum(r.state == s.SUCCESS for runs in runs_by_message(data_dir).values() for r in runs) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} runs succeeded within {timeout_s} s")
        time.sleep(0.1)


def _outage_rows(fault: str, replies: Replies, began: float, ended: float) -> Rows:
    """Mails acked while the engine was away (each must still end in one run), and how soon senders were refused."""
    refused = next((at for _, reply, at in replies.events if reply != "250" and at >= began), None)
    return [row(fault, "acked_while_down", sum(began <= at < ended for at in replies.acked_events), "messages", 0),
            *([row(fault, "refused_after_s", refused - began, "s", 0, to="first refusal")] if refused else [])]


class DaskCluster:
    """``dask scheduler`` on ``port`` and one ``dask worker`` (one process, one thread, 1 GiB, as the README
    deploys them) as separate processes, logging into ``logs``; ``with`` starts them and waits until the worker
    has joined, and stops both on leaving (``stop`` is idempotent)."""

    def __init__(self, port: int, logs: Path) -> None:
        self.address = f"tcp://127.0.0.1:{port}"
        self.port, self.logs = port, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def scheduler(self) -> subprocess.Popen[bytes]:
        return self.procs[0]

    def __enter__(self) -> DaskCluster:
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
               "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
        try:
            self.procs.append(_spawn(self.logs / "scheduler.log", env, "scheduler", "--host", "127.0.0.1", "--port",
                                     str(self.port), "--no-dashboard", "--dashboard-address", "127.0.0.1:0"))
            self.procs.append(_spawn(self.logs / "worker.log", env, "worker", self.address, "--nworkers", "1",
                                     "--nthreads", "1", "--memory-limit", "1GiB", "--no-dashboard", "--host",
                                     "127.0.0.1"))
            self._wait_for_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the worker, then the scheduler (SIGTERM, SIGKILL after 20 s); reap both."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError):  # what it started (a nanny's worker) goes with it
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _wait_for_worker(self, timeout_s: float = 120.0) -> None:
        import distributed

        deadline = time.monotonic() + timeout_s
        while True:
            dead = [name for name, p in zip(("scheduler", "worker"), self.procs, strict=True) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"dask {dead[0]} exited before the cluster was up (see {self.logs})")
            try:
                with distributed.Client(self.address, timeout=5, set_as_default=False) as client:
                    client.wait_for_workers(1, timeout=max(1.0, deadline - time.monotonic()))
                    return
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _spawn(log: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([str(DASK), *args], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)

