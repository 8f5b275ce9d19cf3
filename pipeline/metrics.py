"""Prometheus metrics of a serve process, and the ``/metrics`` HTTP endpoint that exposes them.

The core counts as it goes (``SMTP_REPLIES``, ``TASK_SECONDS`` ...): module-level
metrics on a registry of our own (``REGISTRY``, not prometheus_client's global
one, so nothing a library registers there leaks into our endpoint). Counting
is always on and costs a dict lookup and a locked add; ``serve --metrics-port``
only decides whether an HTTP server exposes the figures. Label children are
bound once and cached in plain dicts, so the hot path never builds label tuples.

Figures that live elsewhere are read when Prometheus scrapes (``ScrapeCollector``):
runs by state from the store's counter table, the engine's active runs, and the
resident memory of this process, its gateway process and its extraction workers.
A store that fails then does not fail the scrape: the run figures are left out and
``pipeline_scrape_errors_total{source="store"}`` counts it.

Serve's gateway process (issue 17) counts its SMTP replies in its own registry
and serves it on a loopback port of its own; serve's endpoint, the one target
Prometheus scrapes, adds those samples to its own families at each scrape
(``merged``). While that process restarts its figures are left out and
``source="gateway"`` is counted; a restarted one counts from zero again, which
Prometheus's ``rate()`` reads as a counter reset.

Labels are bounded sets: SMTP command and reply code, task name with mapped
instances collapsed (``ingest_pdf[3]`` is ``ingest_pdf``), run state, and the
typed reason codes of ``errors`` (anything else is ``other``). Never run ids,
message ids or addresses.

The counters and hooks live in ``metrics_counts``, the scrape-time figures in ``metrics_scrape``; this module
serves them over HTTP and re-exports both, so ``metrics.smtp_reply`` and the rest are used from here.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from .metrics_counts import (  # noqa: F401 - re-exported: the core calls these as metrics.<name>
    ACCEPTED_BYTES,
    ACCEPTS_IN_PROGRESS,
    GATEWAY_RESTART_CAUSES,
    REASONS,
    REGISTRY,
    RUN_OUTCOMES,
    SMTP_REPLIES,
    STORE_TX,
    STORE_TX_SECONDS,
    TASK_FAILURES,
    TASK_RETRIES,
    TASK_SECONDS,
    TRIGGER_SECONDS,
    WORKER_RESTART_CAUSES,
    WORKER_RESTARTS,
    message_accepted,
    reason_code,
    reason_codes,
    run_finished,
    smtp_reply,
    task_failed,
    task_finished,
    task_name,
    task_retried,
    worker_restarted,
    zero_alerted_series,
)
from .metrics_scrape import (  # noqa: F401 - re-exported
    EXTRACT_WORKER,
    GATEWAY_PROCESS,
    STAGE_POOL,
    STORE_READ_S,
    BoundedRead,
    ScrapeCollector,
    memory_families,
    merged,
)

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

log = logging.getLogger(__name__)


class MetricsServer:
    """The ``/metrics`` HTTP server on its own thread; ``close()`` stops it and frees its port."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread

    @property
    def port(self) -> int:
        """The TCP port it listens on (useful with port 0)."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving, wait for the thread, close the socket; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()


def start_metrics_server(port: int, host: str = "127.0.0.1", *,
                         runs_by_state: Callable[[], dict[str, int]] | None = None,
                         active_runs: Callable[[], int] | None = None, states: tuple[str, ...] = (),
                         gateway: Callable[[], str] | None = None, health: Callable[[], str | None] | None = None,
                         gateway_restarts: Callable[[], dict[str, int]] | None = None,
                         wal_bytes: Callable[[], int | None] | None = None) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` from a thread; return the server (close it on stop).

    ``runs_by_state``, ``active_runs``, ``gateway`` (the gateway process's exposition), ``health`` (serve's
    problem, None when healthy), ``gateway_restarts`` (by cause) and ``wal_bytes`` (the store's WAL; None for
    a store without one here) are read at each scrape (a role without a store, engine or gateway process passes
    None); ``states`` are the run states shown even at 0. Raises ``OSError`` if the address cannot be bound.
    """
    from prometheus_client import disable_created_metrics
    from prometheus_client.exposition import make_wsgi_app

    disable_created_metrics()  # the *_created series double every family and no alert needs them
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector(runs_by_state, active_runs, states, gateway, health, gateway_restarts,
                                      wal_bytes))
    server = _bounded_server(host, port, make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


MAX_SCRAPERS = 8  # connections served at once; more are closed at once (a scraper needs one)
SCRAPE_READ_TIMEOUT_S = 10.0  # a connection silent this long while sending its request is closed
SCRAPE_DEADLINE_S = 30.0  # and none is served longer, however it trickles its request


def _bounded_server(host: str, port: int, app: Any) -> Any:
    """prometheus_client's threaded WSGI server, with a cap on connections and a read timeout.

    Its own ``start_http_server`` starts a thread per connection and waits for a request for ever: idle
    connections (a slowloris, or scrapers that hang) then took a thread and a file descriptor each until the
    process ran out of them, and a mail answered 250 lost its PDF to "Too many open files". Here at most
    ``MAX_SCRAPERS`` are served at once, each closed after ``SCRAPE_READ_TIMEOUT_S`` of silence or
    ``SCRAPE_DEADLINE_S`` in all. Clients that hold all of them can still keep scrapes out for that long
    (the endpoint is on loopback by default); they can no longer starve the pipeline.
    """
    from wsgiref.simple_server import make_server

    return make_server(host, port, app, _bounded_server_class(host, port), handler_class=_quiet_handler_class())


def _quiet_handler_class() -> type[WSGIRequestHandler]:
    """A request handler that closes a connection silent for ``SCRAPE_READ_TIMEOUT_S`` and logs no request."""
    from wsgiref.simple_server import WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        timeout = SCRAPE_READ_TIMEOUT_S

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
            """Log nothing: a scrape every few seconds is not news."""

    return QuietHandler


def _bounded_server_class(host: str, port: int) -> type[WSGIServer]:
    """A threaded WSGI server class for ``host``'s address family that serves at most ``MAX_SCRAPERS``
    connections at once, each for at most ``SCRAPE_DEADLINE_S``."""
    from prometheus_client.exposition import ThreadingWSGIServer

    class BoundedServer(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        slots = threading.BoundedSemaphore(MAX_SCRAPERS)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)  # full: this scraper tries again at its next interval
                return
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread started: the slot is not taken
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            deadline = threading.Timer(SCRAPE_DEADLINE_S, _cut, (request,))
            deadline.name, deadline.daemon = "metrics-connection-deadline", True
            deadline.start()
            try:
                super().process_request_thread(request, client_address)
            finally:
                deadline.cancel()
                self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            """A client that went silent or away is no error of ours (socketserver would print a traceback)."""
            log.debug("metrics endpoint: a connection from %s ended badly", client_address, exc_info=True)

    return BoundedServer


def _cut(conn: socket.socket) -> None:
    """End a connection past its deadline: a blocked read or write in its thread returns at once."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed meanwhile
        pass
