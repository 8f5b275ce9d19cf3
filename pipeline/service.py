"""PipelineService: one process with the engine, the SMTP gateway and the drop folder.

This is what ``python -m pipeline serve`` runs and what ``ingest`` uses
without the listeners. A ``role`` splits it for several machines (issue 12):
``"gateway"`` accepts and queues (SMTP, drop folder, spool reconciliation)
and never claims a run; ``"workers"`` claims and runs queued runs and never
listens. Every role of one installation shares the run store and the data dir
(spool, work dirs, outbox): runs name their files by path, so the data dir is
made absolute here and must be mounted at the same path on every host.

On start a gateway (and a full serve) also reconciles the spool with the run
store: a message fsynced just before a crash, whose run was never committed,
still gets its run (deduplicated, so never two). A spool file that some run
names, or that purge dropped (it deletes the file and, until the file is
gone, keeps a tombstone), is never queued again, however old.

Start-up order matters: open the store and the spool, reconcile, bind the
SMTP port, and only then start the engine, which claims queued runs. A port
in use therefore fails start-up before any run was claimed. Every start-up
failure is a ``PipelineError`` (``StartupError`` when nothing more specific
applies), and whatever was already opened is closed again.

``serve_forever`` (what ``serve`` runs) puts the gateway in a child process
of its own by default (``[serve] gateway_process``, issue 17: see
``pipeline.gatewayprocess``): this process binds the port and starts the
engine, then the child reconciles the spool, listens and watches the drop
folder (once it answers SMTP, serve is all up). ``start()`` alone keeps
everything in one process, as the tests and the audit's in-process harnesses
want.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

from . import metrics
from .config import Settings
from .datadir_watch import DataDirWatch
from .dropfolder import DropFolder
from .engine import WorkflowEngine
from .errors import ConfigurationError, StartupError
from .gateway import EmailGateway, bind_problem
from .gatewayprocess import STOP_SIGNALS, GatewayProcess
from .housekeeping import LEGACY_GRACE_S, unknown_spool_files
from .spool import Spool, SpooledMessage
from .store import RUN_STATES, open_store
from .workflows import email_digest_dag

log = logging.getLogger(__name__)
ALL, GATEWAY, WORKERS = "all", "gateway", "workers"  # the roles of a serve process
ROLES = (ALL, GATEWAY, WORKERS)
_ROLE_NAMES = {ALL: "gateway and workers", GATEWAY: "gateway only", WORKERS: "workers only"}


def _abort_relay_sessions() -> None:
    """End relay sessions still open past the grace period: a stuck relay must not hold serve's exit."""
    from .stages.deliver import abort_relay_sessions

    ended = abort_relay_sessions()
    if ended:
        log.warning("ended %d relay session(s) still open; their digests are sent at the next start", ended)


class PipelineService:
    """Compose store, engine, gateway and drop folder from one Settings."""

    def __init__(self, settings: Settings, *, listen: bool = True, role: str = ALL,
                 sockets: list[socket.socket] | None = None) -> None:
        """Open the store and the spool; raises a ``PipelineError`` (with nothing left open) if either fails.

        ``role`` is ``"all"``, ``"gateway"`` (no engine loops) or ``"workers"`` (no SMTP, no drop folder).
        ``sockets``: SMTP sockets already bound (by the serve that started this gateway process); None:
        bind the configured host and port at start.
        """
        if role not in ROLES:
            raise ConfigurationError(f"serve role must be one of {', '.join(ROLES)}, not {role!r}")
        # runs record their spool file and task outputs as paths: absolute, so any process can follow them
        settings = replace(settings.validate(), data_dir=Path(settings.data_dir).absolute())
        self.settings = settings
        self.role = role
        self.listen = listen and role != WORKERS
        self._stop = threading.Event()
        self.sockets = sockets
        self.metrics_server: metrics.MetricsServer | None = None  # serve's /metrics, when [metrics] port is set
        self.gateway_process: GatewayProcess | None = None  # the gateway's own process, when start() made one
        data_dir = Path(settings.data_dir)
        with ExitStack() as opened, _as_startup_error("cannot open the data dir"):
            data_dir.mkdir(parents=True, exist_ok=True)
            self.store = open_store(settings.store)
            opened.callback(self.store.close)
            self.spool = Spool(data_dir / "spool")
            opened.callback(self.spool.close)
            self.engine = WorkflowEngine(self.store, settings)
            self.engine.register(dag := email_digest_dag(settings, self.store))
            metrics.zero_alerted_series(tasks=[t.id for t in dag.tasks] if self.role != GATEWAY else [],
                                        smtp=self.listen)
            self.gateway = EmailGateway(self.engine, self.spool, settings.gateway)
            opened.callback(self.gateway.stop)  # its accept pool
            self.datadir = DataDirWatch(self.spool if self.listen else None,
                                        None if settings.store.is_postgres else Path(settings.store.path))
            self.gateway.health = self._accepting_problem
            self.drop_folder = DropFolder(data_dir / "inbox", lambda raw: self.gateway.accept(raw, source="dropfolder"),
                                          settings.gateway) if self.listen and settings.gateway.drop_folder else None
            opened.pop_all()  # all opened: stop() closes them from now on

    def start(self, run_workers: bool = True, gateway_process: bool = False, reconcile: bool = True) -> PipelineService:
        """Reconcile the spool, bind the SMTP port, then start the engine and the drop folder.

        ``run_workers=False`` (or the gateway role) only accepts and queues; the workers role neither
        reconciles nor listens. ``gateway_process`` (the full role only) binds the port here and starts
        the gateway, which reconciles and watches the drop folder too, in a child process. Raises a
        ``PipelineError`` (``StartupError`` for a port in use) after closing everything this service opened.
        ``reconcile=False`` (``ingest``) leaves the spool's lost messages to serve.
        """
        run_workers = run_workers and self.role != GATEWAY
        in_child = gateway_process and self.listen and self.role == ALL
        try:
            with _as_startup_error("cannot start"):
                if in_child:  # bound here, before the engine claims anything: a taken port changes nothing
                    self.gateway_process = GatewayProcess(self.settings, self._accepting_problem).bind()
                elif self.role != WORKERS and reconcile:  # the gateways' side: they make its lost messages runs
                    self.reconcile_spool()
                if self.listen and not in_child:
                    self.gateway.start(self.sockets)  # bind before the engine claims anything (as above)
                if self.settings.metrics.port and (self.listen or self.role == WORKERS):  # serve, not `ingest`
                    self.metrics_server = self._start_metrics()
                if run_workers:
                    self.engine.start()
                if (self.listen or self.role == WORKERS) and self.sockets is None:  # serve; not `ingest`, nor
                    self.datadir.start()  # a gateway process (serve watches for it: each change was logged twice)
                if self.gateway_process is not None:  # last: once it answers SMTP, serve is all up
                    self.gateway_process.start()
                    self._lower_engine_priority()
                elif self.drop_folder is not None:
                    self.drop_folder.start()
        except BaseException:
            self._close_after_failed_start()
            raise
        return self

    def _lower_engine_priority(self) -> None:
        """``[serve] engine_nice``: the engine and its workers yield the CPU to the gateway process."""
        nice, child = self.settings.serve.engine_nice, self.gateway_process
        if not nice or child is None:
            return
        from .priority import lower_priority  # serve only

        keep_threads = [child.supervisor_thread] if child.supervisor_thread is not None else []
        keep_pids = [child.pid] if child.pid is not None else []
        try:
            changed = lower_priority(nice, keep_threads=keep_threads, keep_pids=keep_pids)
        except Exception as exc:  # a priority is a preference: serve runs without it rather than not at all
            log.warning("could not lower the engine's CPU priority ([serve] engine_nice): %s: %s",
                        type(exc).__name__, exc)
            return
        if changed:
            log.info("engine and extraction workers %d nice steps below the gateway process (%d threads)",
                     nice, changed)

    def _start_metrics(self) -> metrics.MetricsServer:
        """Serve ``/metrics`` (runs by state from the store; active runs if this role runs any); log its URL."""
        host, port = self.settings.metrics.host, self.settings.metrics.port
        active = None if self.role == GATEWAY else (lambda: len(self.engine.active_runs()))
        gateway = self.gateway_process
        child = gateway.exposition if gateway is not None else None
        restarts = (lambda: dict(gateway.restart_causes)) if gateway is not None else None
        try:
            server = metrics.start_metrics_server(port, host, runs_by_state=self.store.count_runs_by_state,
                                                  active_runs=active, states=RUN_STATES, gateway=child,
                                                  health=lambda: self.health_problem, gateway_restarts=restarts,
                                                  wal_bytes=self.store.wal_bytes)
        except OSError as exc:
            raise StartupError(bind_problem(host, port, exc, "metrics", "--metrics-port", "[metrics] port")) from exc
        log.info("metrics on http://%s:%d/metrics", host, server.port)
        return server

    def reconcile_spool(self) -> int:
        """Queue every spool file that no run names and no purge dropped; return how many runs this created.

        Such a file is a message fsynced just before a crash whose run was never committed. Files are
        matched to runs by name, a few hundred per query, before any is read: a spool of thousands of
        processed messages costs one directory listing and a few index lookups. A file older than the
        store's tombstones (less ``LEGACY_GRACE_S``) is left alone: an earlier version's purge deleted
        runs but not their files (the next ``purge`` deletes it). A file that cannot be read is logged
        and skipped.
        """
        legacy_before = self.store.spool_tracked_since() - LEGACY_GRACE_S
        created = legacy = 0
        for mtime, path in unknown_spool_files(self.store, self.spool.directory):
            if mtime < legacy_before:
                legacy += 1
                continue
            try:
                spooled = self.spool.load(path)
            except OSError as exc:  # one unreadable file must not keep the service down
                log.warning("spool reconciliation: skipped %s: %s", path.name, exc)
                continue
            created += self._queue_spooled(spooled)
        if legacy:
            log.info("spool reconciliation: left alone %d spool file(s) from before this store tracked purges", legacy)
        if created:
            log.warning("spool reconciliation queued %d message(s) whose run was missing", created)
            self.engine.wake()
        return created

    def _queue_spooled(self, spooled: SpooledMessage) -> int:
        """Queue a spool file found without a run by the gateway's rule; 1 if that made a new run, else 0."""
        return int(self.gateway.queue(spooled, source="spool")[1])

    def stop(self, grace_s: float | None = None) -> None:
        """Close the listeners, let running tasks finish within the grace period, close the store.

        Every step runs even if an earlier one fails; the first failure is raised at the end. Safe to call twice.
        """
        steps: list[Callable[[], None]] = [self.datadir.stop, self.gateway.stop, lambda: self.engine.shutdown(grace_s),
                                           self._end_abandoned_extractions, _abort_relay_sessions,
                                           self.store.close, self.spool.close]
        if self.gateway_process is not None:  # first: no new messages, and those accepted are committed
            steps.insert(0, self.gateway_process.stop)
        if self.drop_folder is not None:
            steps.insert(0, self.drop_folder.stop)
        if self.metrics_server is not None:
            steps.insert(0, self.metrics_server.close)
        failures = []
        for step in steps:
            try:
                step()
            except Exception as exc:  # close the rest all the same
                failures.append(exc)
        if failures:
            raise failures[0]

    def _end_abandoned_extractions(self) -> None:
        """Stop the extraction workers when tasks outlived the grace period: their runs are requeued (another
        process may take them at once), so nothing is gained by waiting, and the process would not exit until
        each one ended (a 5,000-page PDF kept serve 12 s past a 1 s grace). The pools belong to the process:
        serve has one service; a second one in the same process (tests) would see its extractions end too."""
        if self.engine.abandoned:
            from .stages import extract_worker

            extract_worker.close_pools()

    def _close_after_failed_start(self) -> None:
        try:
            self.stop(grace_s=0)
        except Exception as exc:  # the start-up error is the one to report
            log.warning("while closing after a failed start: %s: %s", type(exc).__name__, exc)

    @property
    def health_problem(self) -> str | None:
        """Why this service cannot do its whole job now (its gateway process is down, an engine loop keeps
        failing); None when healthy."""
        gateway = self.gateway_process
        child = (gateway.problem or gateway.down or gateway.storing) if gateway is not None else None
        return child or self._accepting_problem() or self.gateway.storing.problem()

    def _accepting_problem(self) -> str | None:
        """Why the gateway must answer 451 now: the engine's problem, or the data dir's (``DataDirWatch``)."""
        return self.engine.health_problem or self.datadir.problem

    def serve_forever(self) -> None:
        """Run until SIGINT, SIGTERM or SIGHUP, then stop gracefully (no traceback on a normal stop).

        SIGHUP (a closed terminal or ssh session) stops like SIGTERM, unless it was ignored when serve started
        (``nohup``): killed by it, serve would leave its runs to the next start's recovery. The gateway runs
        in a child process of its own unless ``[serve] gateway_process`` is false.
        """
        signalled: list[int] = []  # a handler must not take a lock: Event.set() there can deadlock with wait()
        stopping = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            stopping.append(signal.SIGHUP)
        handlers = {sig: signal.signal(sig, lambda number, _: signalled.append(number)) for sig in stopping}
        try:
            if self.role != GATEWAY:
                with _as_startup_error("cannot start multiprocessing's fork server"):  # out of processes or fds
                    _start_fork_server_blocking_stops()
            self.start(gateway_process=self.settings.serve.gateway_process)
            where = f", the gateway in process {self.gateway_process.pid}" if self.gateway_process else ""
            log.info("pipeline serving (%s%s); data in %s; runs in %s. Ctrl-C to stop.", _ROLE_NAMES[self.role],
                     where, self.settings.data_dir, store_location(self.settings))
            while not signalled and not self._stop.is_set():
                time.sleep(0.2)  # a signal interrupts the sleep; its handler runs, then the loop ends
            for sig in stopping:  # a second stop signal (Ctrl-C again) does not wait for the grace
                signal.signal(sig, _exit_at_once)
            log.info("stopping%s: no new messages; letting running tasks finish (grace %.0f s; Ctrl-C again to stop "
                     "at once)", f" on {signal.Signals(signalled[0]).name}" if signalled else "",
                     self.settings.engine.shutdown_grace_s)
            margin = self.settings.serve.stop_margin_s
            watch = exit_if_stop_overruns(self.settings.engine.shutdown_grace_s + margin if margin else None)
            try:
                self.stop()
            finally:
                if watch is not None:
                    watch.cancel()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


STOP_OVERRUN_EXIT = 1
STOPPED_AT_ONCE_EXIT = 130  # 128 + SIGINT, whichever signal came second: what `ingest` exits with when interrupted


def _exit_at_once(number: int, _frame: object) -> None:
    """A second stop signal while serve stops (Ctrl-C pressed again): exit now, as the user asks, rather than at the
    end of the grace period. Nothing acked is lost: the runs still running stay in this process's name, and the
    next start's recovery requeues them (its pid is gone), as after a stop that overruns."""
    _exit_now(f"error: stopped at once on a second {signal.Signals(number).name}, without waiting for running tasks; "
              "the runs still running are requeued by the next start\n", STOPPED_AT_ONCE_EXIT)


def _exit_now(message: str, code: int) -> None:
    """Write ``message`` to stderr and end the process at once (no clean-up that could wait on a stuck thread)."""
    try:
        os.write(2, message.encode())  # not logging: its lock may be held by a thread that hangs
    finally:
        os._exit(code)


def exit_if_stop_overruns(limit_s: float | None) -> threading.Timer | None:
    """End the process if the stop has not finished within ``limit_s`` (None: never). Each part of a stop that
    waits on the run store can wait as long as a store that does not answer: a frozen PostgreSQL server held a
    SIGTERM'd serve for 100-150 s, until it came back (a prober's find). Exiting leaves the runs serve held
    running in its name; the next start's recovery requeues them (its pid is gone), so nothing acked is lost."""
    if limit_s is None:
        return None

    def overrun() -> None:
        _exit_now(f"error: the stop did not finish within {limit_s:g} s (a run store, relay or task that does not "
                  "answer?); exiting now: the runs still running are requeued by the next start\n", STOP_OVERRUN_EXIT)

    timer = threading.Timer(limit_s, overrun)
    timer.daemon = True
    timer.start()
    return timer  # cancelled once the stop has finished


def _start_fork_server_blocking_stops() -> None:
    """Start multiprocessing's fork server (and its resource tracker) with SIGHUP, SIGTERM and SIGINT blocked,
    as they then keep them.

    A hangup (a closed terminal or ssh session), Ctrl-C and systemd's stop (SIGTERM to the whole cgroup) reach
    the whole process group. Serve stops on them, and its own children ignore them until serve stops them, but
    these two come from the standard library and would die of SIGHUP or SIGTERM (the fork server ignores
    only SIGINT itself), breaking the process pool while serve finishes its runs. A blocked signal stays
    blocked in the processes they fork (the pool's workers, which ignore all three anyway). The fork server
    ends when serve does: it watches a pipe from serve.

    Blocked, not ignored: serve ignored them meanwhile, and a stop that came then was lost (serve went on
    serving after a SIGTERM in 2 of 3 tries, a prober's find). Blocked, it waits for serve's handler, installed
    before. The resource tracker goes first on its own: the standard library unblocks SIGINT and SIGTERM once
    it has started it, so they are blocked again for the fork server.
    """
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    stops = STOP_SIGNALS
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # a stop that came meanwhile reaches serve's handler


def store_location(settings: Settings) -> str:
    """Where the runs live, for a log line: the PostgreSQL URL without its password, or the SQLite file."""
    if not settings.store.is_postgres:
        return str(Path(settings.store.path).absolute())  # as the data dir is logged (a relative --data-dir)
    from .postgres_store import redact  # imports no driver

    return redact(settings.store.url)


@contextmanager
def _as_startup_error(what: str) -> Iterator[None]:
    """Turn an ``OSError`` (a data dir that cannot be made, a watch that cannot be set) into a one-line
    ``StartupError`` naming ``what``; ``PipelineError`` passes unchanged."""
    try:
        yield
    except OSError as exc:
        detail = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else (exc.strerror or exc)
        if isinstance(exc, FileExistsError) and exc.filename:  # mkdir of a path that is a file said "File exists"
            detail = f"{exc.filename} is not a directory"
        raise StartupError(f"{what}: {detail}") from exc
