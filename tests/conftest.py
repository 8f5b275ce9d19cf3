"""Shared fixtures: real SQLite files and real engines in temp directories."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from leaks import (
    SESSION_SERVERS,
    become_subreaper,
    descendants,
    describe,
    fds_opened_since,
    in_session_server,
    kill_and_wait,
    listening_sockets,
    open_fds,
    process_wide_pids,
    reap_zombies,
)

from pipeline.audit.base.serveproc import free_port  # noqa: F401  (one free_port, shared with the audit)
from pipeline.config import EngineConfig, RunnerConfig, Settings, StoreConfig
from pipeline.engine import WorkflowEngine
from pipeline.sqlite_store import SqliteRunStore


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings rooted in a temp data dir, with fast retries for tests."""
    base = Settings.for_data_dir(tmp_path / "data")
    return replace(base, runner=RunnerConfig(thread_workers=8, retry_base_delay_s=0.01, retry_max_delay_s=0.05),
                   engine=EngineConfig(max_active_runs=8, heartbeat_interval_s=0.2, stale_after_s=2.0,
                                       shutdown_grace_s=5.0))


@pytest.fixture
def pdf(tmp_path: Path):
    """Write PDF bytes under tmp_path and return the path: ``pdf(data, name="doc.pdf")``."""
    def write(data: bytes, name: str = "doc.pdf") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path
    return write


@pytest.fixture
def store(settings: Settings) -> Iterator[SqliteRunStore]:
    """A real SQLite run store under tmp_path."""
    st = SqliteRunStore(settings.store)
    yield st
    st.close()


@pytest.fixture
def make_engine(store: SqliteRunStore, settings: Settings) -> Iterator:
    """Build started engines on the store; every one is shut down after the test."""
    engines: list[WorkflowEngine] = []

    def make(*dags, **engine_overrides) -> WorkflowEngine:
        cfg = replace(settings, engine=replace(settings.engine, **engine_overrides)) if engine_overrides else settings
        engine = WorkflowEngine(store, cfg)
        for dag in dags:
            engine.register(dag)
        engines.append(engine.start())
        return engine

    yield make
    for engine in engines:
        engine.shutdown(grace_s=5)


@pytest.fixture(scope="session", autouse=True)
def process_wide_helpers() -> Iterator[None]:
    """Start the process-wide helpers up front: multiprocessing's forkserver and resource tracker (the
    runner's process executor and the audit's client processes use them) and jupyter_core's event loop
    (papermill reuses it for every notebook). They live for the whole process by design, so their
    descriptors are not a test's leak. At the end, stop them and kill whatever process is still below us:
    nothing a test started may outlive the session (a timed-out test once left forkserver workers running
    under pid 1)."""
    from multiprocessing import forkserver, resource_tracker

    from jupyter_core.utils import ensure_event_loop

    become_subreaper()
    resource_tracker.ensure_running()
    forkserver.ensure_running()
    ensure_event_loop()
    yield
    from pipeline.stages.extract_worker import close_pools

    close_pools()
    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()
    kill_and_wait(descendants())
    reap_zombies()


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a process running (its own child, or an orphan re-parented to us), after
    killing and reaping it; processes that exit within a few seconds (workers that see their parent's
    pipe close) are not leaks. The session's PostgreSQL server and its backends are not a test's."""
    before = {p.pid for p in descendants()}
    yield
    wide = process_wide_pids()
    new = [p for p in descendants() if p.pid not in before and p.pid not in wide and not in_session_server(p)]
    _, alive = psutil.wait_procs(new, timeout=10) if new else ([], [])
    names = describe(alive)
    kill_and_wait(alive)
    reap_zombies()
    assert not names, f"processes outlived the test (killed now): {names}"


@pytest.fixture(autouse=True)
def no_leaked_threads_sockets_or_fds() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads, listening sockets or open file descriptors behind."""
    before = set(threading.enumerate())
    listening = listening_sockets()
    fds = open_fds()
    yield
    sockets = listening_sockets() - listening
    assert not sockets, f"listening sockets outlived the test: {sockets}"
    leaked_fds = fds_opened_since(fds)
    assert not leaked_fds, f"file descriptors outlived the test: {leaked_fds}"
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads outlived the test: {still}"




class SinkHandler:
    """A real SMTP receiver (like aiosmtpd's ReceivingHandler) that keeps every message."""

    def __init__(self) -> None:
        self.messages: list = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        import email
        from email import policy

        with self.arrived:
            self.messages.append(email.message_from_bytes(envelope.original_content or envelope.content,
                                                          policy=policy.default))
            self.arrived.notify_all()
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 30.0) -> list:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages) >= count, timeout), \
                f"sink got {len(self.messages)} of {count} messages"
            return list(self.messages)


@pytest.fixture
def smtp_sink() -> Iterator[tuple[SinkHandler, str]]:
    """A real aiosmtpd relay on loopback; yields (handler, 'smtp://127.0.0.1:PORT')."""
    from aiosmtpd.controller import Controller

    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, f"smtp://127.0.0.1:{port}"
    controller.stop()


@pytest.fixture
def service_factory(settings: Settings, smtp_sink) -> Iterator:
    """Start PipelineServices (gateway on a free port, digests relayed to the sink); all stopped after."""
    from pipeline.config import DeliveryConfig, GatewayConfig
    from pipeline.service import PipelineService

    services = []

    def make(**gateway_overrides):
        gateway = GatewayConfig(port=free_port(), **gateway_overrides)
        delivery = DeliveryConfig(relay=smtp_sink[1], outbox=settings.data_dir / "outbox")
        service = PipelineService(replace(settings, gateway=gateway, delivery=delivery)).start()
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop(grace_s=10)


# -- a real PostgreSQL server for the session -------------------------------------------------------

_PG_DB_NUMBERS = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator:
    """One real PostgreSQL server (fsync off) for the whole session, stopped at its end.

    Skips when PostgreSQL is not installed, but fails under CI (env var CI set): there the tests must run.
    """
    from pipeline.audit.base.pgserver import PostgresUnavailableError, TemporaryPostgres

    try:
        server = TemporaryPostgres(durable=False)
    except PostgresUnavailableError:
        reason = "PostgreSQL not installed (Debian: apt-get install postgresql; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run", pytrace=False)
        pytest.skip(reason)
    SESSION_SERVERS.append(server)
    try:
        yield server.start()
    finally:
        server.stop()
        SESSION_SERVERS.remove(server)


@pytest.fixture
def pg_url(pg_server) -> Iterator[str]:
    """A fresh, empty database on the session's server (its URL), dropped after the test."""
    if pg_server.pid is None:  # a fault-injection test stopped it and failed before starting it again
        pg_server.pg_ctl("start")
    name = f"t{os.getpid()}_{next(_PG_DB_NUMBERS)}"
    url = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)

@pytest.fixture(params=["sqlite", "postgres"])
def store_config(request, tmp_path) -> StoreConfig:
    """A StoreConfig for a fresh, empty store of each backend (the PostgreSQL one needs ``pg_url``)."""
    if request.param == "sqlite":
        return StoreConfig(path=tmp_path / "runs.sqlite3")
    return StoreConfig(url=request.getfixturevalue("pg_url"), pool_size=4)
