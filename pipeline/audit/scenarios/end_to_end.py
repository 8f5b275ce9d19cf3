"""A mail's digest as its sender waits for it (issue 16): closed-loop senders against a real serve.

The pipeline profile sends its mails all at once, so its stage times are mostly
queueing behind one another. Here, for each count N in ``senders``, N
senders each send one mail with the same PDF, wait until its run has ended
(for a successful run: its digest is in serve's Maildir outbox), then send the
next: at most N runs
are in the pipeline at any time, as with that many users each waiting for a
reply. Per mail: end to end (DATA end → run ended, from serve's store) and the
stage times (``concurrency.stage_times``: Email, Queue, Lane wait, Ingestion,
Digest, Delivery), so a slow end to end says where its time went. After a
warm-up mail; several variants (serve configurations) take turns, one serve
each, round by round.

Rows (harness ``row``, scenario ``end_to_end``): ``end_to_end_seconds`` (tags
``arrived``, ``ended``: the epoch seconds it spans) and ``stage_seconds`` (tag
``stage``) per mail, tags ``senders``, ``pdf``, ``pdf_mb``; ``runs_failed`` per
variant and round; per variant, round and sender count ``cpu_seconds_per_mail``
(serve and its workers, psutil), the same by process (``process_cpu_seconds_per_mail``, tag ``process``:
``servemem.PROCESSES``) and ``cpu_floor_seconds`` (tag ``cores``).

The floor is what the CPU alone allows: N senders keep N mails in flight, and
C cores finish at most C / (CPU seconds per mail) mails a second, so by
Little's law a mail's mean end to end is at least N x CPU per mail / C, however
the work is scheduled. An end to end near its floor is CPU-bound: only less
CPU per mail makes it faster. Two things make the floor a little loose: a
sender's time between a run's end and its next DATA end (its poll of the
store, up to ``POLL_S``, and the SMTP hand-off) is outside the measured end to
end, and the senders' own CPU on the same cores is not counted; so a ratio
slightly under 1 is possible.
"""

from __future__ import annotations

import os
import smtplib
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd

from ...config import Settings
from ...store import SUCCESS, open_store
from ...workflows import EMAIL_DIGEST
from ..base import fixtures as fx
from ..base.faultcheck import TERMINAL_RUN_STATES
from ..base.harness import frame, row
from ..base.recorder import AuditRecorder
from ..base.servemem import TreeWatch
from ..base.serveproc import RECIPIENT, SENDER, ServeProcess
from .concurrency import stage_times

SCENARIO = "end_to_end"
Rows = list[dict[str, Any]]
POLL_S = 0.005  # how often a waiting sender looks at the store: well under the figures measured
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {"default": {}}
# the cores serve may use, as the floor counts them (no affinity call on macOS)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def end_to_end(pdf: Path, work: Path, senders: tuple[int, ...] = (1, 4), per_sender: int = 10, rounds: int = 1,
               variants: dict[str, dict[str, dict[str, Any]]] | None = None, timeout_s: float = 300.0,
               recorder: AuditRecorder | None = None, name: str | None = None) -> pd.DataFrame:
    """Mail ``pdf`` from closed-loop senders to one serve per variant: per round, for each count in ``senders``,
    that many senders of ``per_sender`` mails each; variants take turns for ``rounds`` rounds. Return the rows
    (module docstring). ``name`` is the ``pdf`` tag (default: the file's name; the audit passes the fixture's
    name without its content hash)."""
    variants = variants or VARIANTS
    raw = Path(pdf).read_bytes()
    tags = {"pdf": name or Path(pdf).name, "pdf_mb": round(len(raw) / 2**20, 2)}
    rows: Rows = []
    with ExitStack() as stack:
        serves = {}
        for variant, config in variants.items():
            serve = ServeProcess(Path(work) / variant / "data", Path(work) / variant, config)
            stack.callback(serve.stop)
            serves[variant] = serve.start()
            _closed_loop(serve, raw, f"warmup-{variant}", 1, 1, timeout_s)  # workers up, code paths hot
        for turn in range(rounds):
            for variant in (list(serves) if turn % 2 == 0 else list(serves)[::-1]):
                for count in senders:
                    with TreeWatch(serves[variant]) as watch:
                        ids = _closed_loop(serves[variant], raw, f"{variant}-{turn}-{count}", count, per_sender,
                                           timeout_s)
                    rows += _rows(serves[variant].data_dir, ids, variant, turn, {**tags, "senders": count})
                    per_mail = sum(watch.cpu_seconds().values()) / max(1, len(ids))
                    rows += [row(variant, "cpu_seconds_per_mail", per_mail, "s", turn, **tags, senders=count),
                             row(variant, "cpu_floor_seconds", cpu_floor_s(per_mail, count, CORES), "s", turn,
                                 **tags, senders=count, cores=CORES)]
                    rows += [row(variant, "process_cpu_seconds_per_mail", seconds / max(1, len(ids)), "s", turn,
                                 **tags, senders=count, process=process)
                             for process, seconds in watch.cpu_seconds_by_process().items()]
    result = frame(rows)
    if recorder is not None:
        recorder.record(SCENARIO, result)
    return result


def cpu_floor_s(cpu_s_per_mail: float, in_flight: int, cores: int) -> float:
    """The least mean end to end the CPU allows ``in_flight`` closed-loop mails on ``cores`` (module docstring)."""
    if cores < 1 or in_flight < 1:
        raise ValueError(f"cpu_floor_s needs cores and in_flight >= 1, not {cores} and {in_flight}")
    return in_flight * cpu_s_per_mail / cores


def _closed_loop(serve: ServeProcess, pdf: bytes, tag: str, senders: int, per_sender: int,
                 timeout_s: float) -> list[str]:
    """Each sender thread: send a mail, wait for its run to end, repeat; return the Message-IDs in send order."""
    sent: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def sender(index: int) -> None:
        store = open_store(Settings.for_data_dir(serve.data_dir).store, create=False)
        try:
            for i in range(per_sender):
                mid = f"<e2e-{tag}-{index}-{i}@audit>"
                with smtplib.SMTP("127.0.0.1", serve.port, timeout=60) as smtp:
                    smtp.sendmail(SENDER, [RECIPIENT], fx.email_with([("doc.pdf", pdf)], message_id=mid))
                with lock:
                    sent.append(mid)
                _wait_ended(store, mid, timeout_s)
        except BaseException as exc:  # reported below, in the caller's thread
            failures.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=sender, args=(i,), name=f"e2e-sender-{i}") for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"end_to_end: a sender failed: {failures[0]!r}\n{serve.log_tail()}") from failures[0]
    return sent


def _wait_ended(store: Any, message_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = store.find_run(EMAIL_DIGEST, message_id)
        if run is not None and run.state in TERMINAL_RUN_STATES:
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"no finished run for {message_id} after {timeout_s:.0f} s")


def _rows(data_dir: Path, message_ids: list[str], variant: str, turn: int, tags: dict[str, Any]) -> Rows:
    store = open_store(Settings.for_data_dir(data_dir).store, create=False)
    rows: Rows = []
    try:
        runs = [store.find_run(EMAIL_DIGEST, mid) for mid in message_ids]
        for rep, run in enumerate(r for r in runs if r is not None and r.ended_at is not None):
            arrived, ended = run.payload["data_end_at"], run.ended_at
            rows.append(row(variant, "end_to_end_seconds", ended - arrived, "s", rep, turn=turn, run_state=run.state,
                            arrived=arrived, ended=ended, **tags))
            rows += [row(variant, "stage_seconds", seconds, "s", rep, turn=turn, stage=stage, **tags)
                     for stage, seconds in stage_times(store, run).items()]
        failed = sum(r is None or r.state != SUCCESS for r in runs)
    finally:
        store.close()
    return rows + [row(variant, "runs_failed", failed, "runs", turn, runs=len(runs), **tags)]

