"""Figures read when Prometheus scrapes serve's ``/metrics``: the run store, the engine, memory, the gateway process.

``ScrapeCollector`` reads each source so that one that fails or hangs leaves only its own figures out (counted
in ``pipeline_scrape_errors_total``); ``merged`` adds the gateway process's samples to this process's families.
``pipeline.metrics`` re-exports every name here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .metrics_counts import GATEWAY_RESTART_CAUSES, REGISTRY

log = logging.getLogger("pipeline.metrics")  # the /metrics lines under one name, as before the split
EXTRACT_WORKER = "pipeline.stages.extract_worker"  # in the command line of every extraction worker process
GATEWAY_PROCESS = "pipeline.gatewaychild"  # in the command line of serve's gateway process
STAGE_POOL = "multiprocessing.forkserver"  # the runner's process pool (build_digest, deliver) and its fork server

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
