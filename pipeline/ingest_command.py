"""``pipeline ingest``: the digest workflow run now on .eml and .pdf files, with a service of its own that
listens nowhere and runs only the runs it makes."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from . import store as s
from .config import Settings
from .errors import ConfigurationError, PipelineError, RunNotFinishedError
from .service import PipelineService
from .stages.parse import wrap_pdf

log = logging.getLogger(__name__)


@contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, as Ctrl-C is, so ``finally`` blocks stop the service.

    Without this a ``kill`` ends the process on the spot: claimed runs stay running until another
    process finds them stale. Only the main thread can set handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    handlers = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


INGEST_UNHEALTHY_S = 30.0  # ingest gives up on an engine unhealthy this long: its user waits, serve would not


def _as_mails(path: Path) -> list[bytes]:
    """A file's bytes as mails: a bare PDF wrapped in one, an mbox split into its messages (a probe's mbox of three
    was read as its first, the other two lost in its body); ConfigurationError naming a file that cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw.startswith(b"From "):  # an mbox's envelope line: the file may hold several messages
        return [message for message in _ENVELOPE.split(raw) if message.strip()]
    return [wrap_pdf(raw, path.name) if path.suffix.lower() == ".pdf" or raw[:5] == b"%PDF-" else raw]


# an mbox's envelope line ("From alice@example.com Mon Nov 30 10:00:00 2026"), at the start or after a blank line:
# a body line that merely starts "From " is not one (mailbox.mbox split a saved mail at "From the board: ...")
_ENVELOPE = re.compile(rb"(?:\A|(?<=\n\n)|(?<=\n\r\n))From \S+ +[A-Z][a-z]{2} [A-Z][a-z]{2} +\d{1,2} \d{1,2}:\d{2}"
                       rb"[^\n]*\n")


def _check_readable(paths: list[Path], max_bytes: int) -> None:
    """Open every input before any run is made: an unreadable last file must not leave the first ones queued.
    One over ``max_bytes`` (``[gateway] max_message_bytes``, what SMTP and the drop folder take) is refused: a
    probe's 60 MB file took 703 MB of memory, and a 100 GB one ended in a MemoryError traceback."""
    for path in paths:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if size > max_bytes:
            raise ConfigurationError(f"cannot ingest {path}: {size:,} bytes, over the {max_bytes:,}-byte limit "
                                     "([gateway] max_message_bytes)")


def ingest_files(settings: Settings, paths: list[Path], timeout_s: float = 600.0,
                 unhealthy_s: float = INGEST_UNHEALTHY_S) -> list[int]:
    """Run the workflow synchronously on .eml files (bare .pdf files, mbox files of many); return the run ids in
    order.

    Always makes new runs (no dedup), so this is also how a message is reprocessed. Runs only the runs it
    makes: other runs queued in the store, and the spool's messages without a run, are left to serve.
    SIGTERM and SIGHUP raise KeyboardInterrupt (like Ctrl-C) after stopping the service: its runs are requeued.
    RunNotFinishedError once a run has not ended in ``timeout_s``, or the engine stayed unhealthy for
    ``unhealthy_s``.
    """
    if settings.runner.stage_executor == "auto":  # a few runs end before a process pool would have started
        settings = replace(settings, runner=replace(settings.runner, stage_executor="thread"))
    with _stop_signals_interrupt():
        service = PipelineService(settings, listen=False)
        # only the runs made here: a backlog a serve queued in this store is that serve's (its digests would go
        # out with this command's settings), and neither are the spool's lost messages (serve's start queues them)
        service.engine.claim_only = set()
        service.engine.machine_witnesses = 1  # its one run waiting for the machine is all the evidence there is
        run_ids: list[int] = []
        try:
            service.start(reconcile=False)
            _check_readable(paths, settings.gateway.max_message_bytes)
            for path in map(Path, paths):
                for raw in _as_mails(path):
                    run_ids.append(service.gateway.accept(raw, source="cli", dedup=False).run_id)
                    service.engine.claim_also(run_ids[-1])
            for run_id in run_ids:
                _wait_for(service, run_id, timeout_s, unhealthy_s)
            return run_ids
        except KeyboardInterrupt:
            _say_what_is_left(service, run_ids)
            raise
        finally:
            service.stop()


def _say_what_is_left(service: PipelineService, run_ids: list[int]) -> None:
    """One line for an interrupted ``ingest``: the runs it made that have not ended stay queued, and a serve on
    the data dir delivers their digests (it exited silently, and ingesting again sent a second digest)."""
    try:
        left = [r for r in run_ids if service.store.get_run(r).state not in (s.SUCCESS, s.FAILED)]
    except PipelineError:
        left = run_ids  # the store does not answer: say what may be left
    if left:
        log.warning("interrupted: run(s) %s left queued; serve on this data dir finishes them and sends their "
                    "digests (ingesting the files again would send a second one)", ", ".join(map(str, left)))


def _wait_for(service: PipelineService, run_id: int, timeout_s: float, unhealthy_s: float = INGEST_UNHEALTHY_S) -> None:
    """Wait for an ingest run to end; RunNotFinishedError saying why once ``timeout_s`` passed, or the engine
    stayed unhealthy for ``unhealthy_s`` (a work dir that cannot be written: it would wait out all of timeout_s)."""
    deadline, sick_since = time.monotonic() + timeout_s, None
    while True:
        try:
            service.engine.wait(run_id, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return
        except TimeoutError:
            pass
        now, problem = time.monotonic(), service.engine.health_problem
        sick_since = None if problem is None else sick_since or now
        left = "; it stays in the store, and serve on this data dir finishes it"
        if sick_since is not None and now - sick_since >= unhealthy_s:
            raise RunNotFinishedError(f"run {run_id} cannot go on: {problem}{left}")
        if now >= deadline:
            raise RunNotFinishedError(f"run {run_id} did not end within {timeout_s:g} s ({_where(service, run_id)})"
                                      f"{left}")


def _where(service: PipelineService, run_id: int) -> str:
    """Where a run is: its state and its latest task's error, for a user who waited."""
    try:
        run, tasks = service.store.get_run(run_id), service.store.get_tasks(run_id)
    except PipelineError as exc:
        return f"its state cannot be read: {exc}"
    errors = [t for t in tasks if t.error_type]
    last = f"; {errors[-1].task_id} {errors[-1].state}: {errors[-1].error_type}: {errors[-1].error_message}" \
        if errors else ""
    return f"{run.state}{last}"[:400]
