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
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from . import errors
from .dag import task_of

log = logging.getLogger(__name__)
REGISTRY = CollectorRegistry(auto_describe=True)
EXTRACT_WORKER = "pipeline.stages.extract_worker"  # in the command line of every extraction worker process
GATEWAY_PROCESS = "pipeline.gatewaychild"  # in the command line of serve's gateway process
STAGE_POOL = "multiprocessing.forkserver"  # the runner's process pool (build_digest, deliver) and its fork server

_MS_TO_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

SMTP_REPLIES = Counter("pipeline_smtp_replies", "SMTP replies to MAIL, RCPT and DATA by reply code",
                       ["command", "code"], registry=REGISTRY)
ACCEPTED_BYTES = Counter("pipeline_accepted_bytes", "Bytes of messages spooled and queued as runs",
                         registry=REGISTRY)
TRIGGER_SECONDS = Histogram("pipeline_trigger_seconds", "From the end of a message's DATA to its run being queued",
                            buckets=_MS_TO_S, registry=REGISTRY)
ACCEPTS_IN_PROGRESS = Gauge("pipeline_gateway_accepts_in_progress", "Messages received whose spooling and queueing "
                            "has not finished (the spool backlog of the gateway)", registry=REGISTRY)
RUN_OUTCOMES = Counter("pipeline_run_outcomes", "Runs that ended, by state and typed reason", ["state", "reason"],
                       registry=REGISTRY)
TASK_SECONDS = Histogram("pipeline_task_duration_seconds", "Duration of a task instance's last try, by task name",
                         ["task"], buckets=_TASK_BUCKETS, registry=REGISTRY)
TASK_RETRIES = Counter("pipeline_task_retries", "Task tries that failed and are tried again", ["task"],
                       registry=REGISTRY)
WORKER_RESTARTS = Counter("pipeline_extract_worker_restarts", "Extraction worker processes that died or were "
                          "killed mid-request, by cause", ["cause"], registry=REGISTRY)
TASK_FAILURES = Counter("pipeline_task_failures", "Task instances that failed for good, by task name and typed "
                        "reason (a run that digested around them still ends a partial success)", ["task", "reason"],
                        registry=REGISTRY)
STORE_TX_SECONDS = Histogram("pipeline_store_transaction_seconds", "Run store write transactions, BEGIN to COMMIT",
                             ["kind"], buckets=_MS_TO_S, registry=REGISTRY)
STORE_TX = {False: STORE_TX_SECONDS.labels("write"), True: STORE_TX_SECONDS.labels("lazy")}

_RUN_FAMILIES = ("pipeline_runs", "pipeline_queue_depth")
_children: dict[tuple[Any, ...], Any] = {}  # label children bound once; a plain dict: reads take no lock


def reason_codes() -> frozenset[str]:
    """The typed reason codes of the error tree, plus the runner's and engine's own."""
    found, todo = set(), [errors.PipelineError]
    while todo:
        cls = todo.pop()
        found.add(str(cls.reason))
        todo.extend(cls.__subclasses__())
    return frozenset(found | {"internal", "bad_output", "upstream_failed"})


REASONS = reason_codes()


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def smtp_reply(command: str, reply: str) -> str:
    """Count ``reply`` (its three-digit code) as the answer to ``command``; return it unchanged."""
    _child(SMTP_REPLIES, command, reply[:3]).inc()
    return reply


def message_accepted(size: int, trigger_s: float) -> None:
    """Count one message spooled and queued: its bytes and its DATA-end to queued latency."""
    ACCEPTED_BYTES.inc(size)
    TRIGGER_SECONDS.observe(max(trigger_s, 0.0))


def task_name(instance_id: str) -> str:
    """The task of a task instance: ``ingest_pdf[3]`` is ``ingest_pdf``."""
    return task_of(instance_id)


def task_finished(instance_id: str, duration_s: float) -> None:
    """Observe the duration of a task instance's last try."""
    _child(TASK_SECONDS, task_name(instance_id)).observe(duration_s)


def task_retried(instance_id: str) -> None:
    """Count a failed try that will be tried again."""
    _child(TASK_RETRIES, task_name(instance_id)).inc()


def task_failed(instance_id: str, reason: str) -> None:
    """Count a task instance that failed for good with the typed ``reason`` of its last try."""
    _child(TASK_FAILURES, task_name(instance_id), reason if reason in REASONS else "other").inc()


def reason_code(reason: str | None) -> str:
    """The bounded reason label of a run's stored reason (``"ingest_pdf[0]: encrypted: ..."`` is ``encrypted``)."""
    if not reason:
        return "none"
    parts = reason.split(": ", 2)
    if parts[0] in ("internal", "partial"):  # the engine's "internal: ...", a success's "partial: 1 of 2 ..."
        return parts[0]
    return parts[1] if len(parts) > 1 and parts[1] in REASONS else "other"


def run_finished(state: str, reason: str | None) -> None:
    """Count a run that ended in ``state`` (success or failed) with its stored reason."""
    _child(RUN_OUTCOMES, state, reason_code(reason)).inc()


GATEWAY_RESTART_CAUSES = ("died", "hung")
WORKER_RESTART_CAUSES = ("timeout", "too_large", "worker_crashed", "other")


def zero_alerted_series(tasks: Iterable[str] = (), smtp: bool = False) -> None:
    """Create at 0 the labelled series the alert rules count with ``increase()`` (docs/performance/alerts.yml):
    of the tasks named (those this process runs) and, with ``smtp``, of the gateway's refusals. A series born
    at its first event starts at 1, and Prometheus's increase() sees no rise before it: the first gateway
    restart, task_io failure or untyped run paged no one (a prober's finding)."""
    tasks = list(tasks)
    if tasks:
        for reason in ("other", "internal"):
            _child(RUN_OUTCOMES, "failed", reason)
        for cause in WORKER_RESTART_CAUSES:
            _child(WORKER_RESTARTS, cause)
    if smtp:
        for code in ("421", "451", "452"):
            _child(SMTP_REPLIES, "DATA", code)
    for task in tasks:
        _child(TASK_FAILURES, task, "task_io")
        _child(TASK_RETRIES, task)


def worker_restarted(cause: str) -> None:
    """Count an extraction worker lost mid-request (``timeout``, ``too_large``, ``worker_crashed``)."""
    _child(WORKER_RESTARTS, cause if cause in REASONS else "other").inc()


STORE_READ_S = 2.0  # a scrape waits this long for the run store, then leaves the run figures out (counted)


class BoundedRead:
    """``read()`` on a thread of its own, waited for at most ``timeout_s``; one call in flight at a time.

    A scrape read the store through the connection the engine holds while it waits out a lock (10 s busy
    timeout) or a PostgreSQL server that is down: scrapes took 10-19 s, past Prometheus's 10 s scrape timeout,
    so every series went stale, ``pipeline_healthy`` with them, and the endpoint's connection slots filled
    with waiting scrapes. A read still running when the next scrape comes is waited for again, never doubled.
    """

    def __init__(self, read: Callable[[], Any], timeout_s: float = STORE_READ_S) -> None:
        self.read, self.timeout_s = read, timeout_s
        self._pending: Future[Any] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            pending = self._pending
            if pending is None or pending.done():
                pending = self._pending = Future()
                threading.Thread(target=self._run, args=(pending,), name="metrics-store-read", daemon=True).start()
        try:
            return pending.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"no answer within {self.timeout_s:g} s (the store is locked, or its server "
                               "does not answer)") from None

    def _run(self, pending: Future[Any]) -> None:
        try:
            pending.set_result(self.read())
        except BaseException as exc:  # handed to the scrape that waits, which counts it
            pending.set_exception(exc)


class ScrapeCollector(Collector):
    """Figures read at scrape time: runs by state, active runs, this process tree's resident memory, and the
    counts of serve's gateway process (``gateway``: its exposition text; raises ``OSError`` while it is down)."""

    def __init__(self, runs_by_state: Callable[[], dict[str, int]] | None = None,
                 active_runs: Callable[[], int] | None = None, states: tuple[str, ...] = (),
                 gateway: Callable[[], str] | None = None, health: Callable[[], str | None] | None = None,
                 gateway_restarts: Callable[[], dict[str, int]] | None = None,
                 wal_bytes: Callable[[], int | None] | None = None) -> None:
        self.runs_by_state = BoundedRead(runs_by_state) if runs_by_state is not None else None
        self.active_runs, self.gateway = active_runs, gateway
        self.health, self.gateway_restarts, self.wal_bytes = health, gateway_restarts, wal_bytes
        self.states = states  # shown as 0 when the store has no run in them, so every series always exists
        self._errors = {"store": 0, "memory": 0, "serve": 0, **({"gateway": 0} if gateway is not None else {})}
        self._lock = threading.Lock()  # two scrapes at once must not lose a count

    def collect(self) -> Iterator[Any]:
        yield from self._own_and_gateway()
        yield from self._runs()
        active = self._read("serve", self.active_runs)
        if active is not None:
            yield GaugeMetricFamily("pipeline_active_runs", "Runs this process is running now", value=active)
        try:
            yield from memory_families()
        except OSError as exc:  # out of descriptors (/proc unreadable): the other figures still go out
            self._count_error("memory", exc)
        if self.health is not None:  # what makes the gateway answer 451 (serve's health_problem)
            problem = self._read("serve", self.health, "its health cannot be read")
            yield GaugeMetricFamily("pipeline_healthy", "1 while serve is healthy, 0 while it answers 451 "
                                    "(a failing loop, a damaged store, its gateway down)",
                                    value=0 if problem else 1)
        wal = self._read("store", self.wal_bytes)
        if wal is not None:
            yield GaugeMetricFamily("pipeline_store_wal_bytes", "Size of the SQLite run store's write-ahead log "
                                    "(it grows while a reader holds an old snapshot)", value=wal)
        restarts_by_cause = self._read("serve", self.gateway_restarts)
        if restarts_by_cause is not None:
            restarts = CounterMetricFamily("pipeline_gateway_restarts", "Gateway processes serve restarted, by "
                                           "cause (died, hung)", labels=["cause"])
            for cause, n in sorted({**dict.fromkeys(GATEWAY_RESTART_CAUSES, 0), **restarts_by_cause}.items()):
                restarts.add_metric([cause], n)
            yield restarts
        errors_family = CounterMetricFamily("pipeline_scrape_errors", "Scrapes that could not read a source",
                                            labels=["source"])
        for source, count in self._errors.items():
            errors_family.add_metric([source], count)
        yield errors_family

    def _read(self, source: str, read: Callable[[], Any] | None, failed: Any = None) -> Any:
        """``read()``, or ``failed`` (counted and logged) if it raises: one source must not fail the whole scrape
        (it answered 500, with a traceback on serve's stderr per scrape, and ``pipeline_healthy`` vanished)."""
        if read is None:
            return None
        try:
            return read()
        except Exception as exc:
            self._count_error(source, exc)
            return failed

    def _own_and_gateway(self) -> Iterator[Any]:
        if self.gateway is None:
            yield from REGISTRY.collect()
            return
        text = self._read("gateway", self.gateway, "")  # restarting, or cut off mid-reply: its figures left out
        try:
            yield from list(merged(REGISTRY.collect(), text or ""))
        except ValueError as exc:  # an exposition cut short that still parsed in part
            self._count_error("gateway", exc)
            yield from REGISTRY.collect()

    def _count_error(self, source: str, exc: Exception) -> None:
        with self._lock:
            self._errors[source] += 1
        log.warning("metrics: cannot read the %s: %s: %s", source, type(exc).__name__, exc)

    def _runs(self) -> Iterator[Any]:
        if self.runs_by_state is None:
            return
        try:
            counts = self.runs_by_state()
        except Exception as exc:  # a broken store must not fail the scrape: count it, leave the figures out
            self._count_error("store", exc)
            return
        runs = GaugeMetricFamily("pipeline_runs", "Runs in the store by state (all processes)", labels=["state"])
        for state, n in sorted({**dict.fromkeys(self.states, 0), **counts}.items()):
            runs.add_metric([state], n)
        yield runs
        yield GaugeMetricFamily("pipeline_queue_depth", "Queued runs waiting for a worker",
                                value=counts.get("queued", 0))


def merged(local: Iterable[Metric], text: str) -> Iterator[Metric]:
    """``local`` families with the samples of the same families in ``text`` (another process's exposition)
    added, sample by sample: counters, gauges and histogram buckets of two processes summed."""
    other = {family.name: family for family in text_string_to_metric_families(text)}
    for family in local:
        extra = other.get(family.name)
        if extra is None:
            yield family
            continue
        sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for sample in [*family.samples, *extra.samples]:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            sums[key] = sums.get(key, 0.0) + sample.value
        both = Metric(family.name, family.documentation, family.type, family.unit)
        for (name, labels), value in sums.items():
            both.add_sample(name, dict(labels), value)
        yield both


def memory_families() -> Iterator[Any]:
    """Resident memory of this process (role ``serve``), its gateway process and its extraction workers
    (sum and max, no pids)."""
    import psutil  # imported here: the hooks in the core never pay for it

    rss: dict[str, list[int]] = {"serve": [], "gateway": [], "extract_worker": [], "stage_pool": []}
    try:
        me = psutil.Process(os.getpid())
        rss["serve"].append(me.memory_info().rss)
        for child in me.children(recursive=True):
            try:
                command = child.cmdline()
                role = next((r for r, m in (("extract_worker", EXTRACT_WORKER), ("gateway", GATEWAY_PROCESS),
                                            ("stage_pool", STAGE_POOL)) if any(m in part for part in command)), None)
                if role is not None:
                    rss[role].append(child.memory_info().rss)
            except psutil.Error:  # it ended meanwhile
                continue
    except psutil.Error as exc:
        log.debug("metrics: cannot read memory: %s", exc)
    # an OSError (out of descriptors: /proc cannot be opened) reaches the collector, which counts it
    family = GaugeMetricFamily("pipeline_process_resident_memory_bytes", "Resident memory by process role",
                               labels=["role", "stat"])
    count = GaugeMetricFamily("pipeline_processes", "Live processes by role", labels=["role"])
    for role, values in rss.items():
        family.add_metric([role, "sum"], sum(values))
        family.add_metric([role, "max"], max(values, default=0))
        count.add_metric([role], len(values))
    yield family
    yield count


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
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class QuietHandler(WSGIRequestHandler):
        timeout = SCRAPE_READ_TIMEOUT_S

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
            """Log nothing: a scrape every few seconds is not news."""

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

    return make_server(host, port, app, BoundedServer, handler_class=QuietHandler)


def _cut(conn: socket.socket) -> None:
    """End a connection past its deadline: a blocked read or write in its thread returns at once."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed meanwhile
        pass
