"""serve's /metrics (pipeline.metrics): scraped during and after a real SMTP burst, checked against the run store."""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families

from pipeline import metrics
from pipeline import store as s
from pipeline.audit.base import fixtures as fx
from pipeline.audit.base.serveproc import ROOT, ServeProcess
from pipeline.audit.scenarios import monitoring
from pipeline.config import StoreConfig
from pipeline.errors import StoreUnavailableError
from pipeline.sqlite_store import SqliteRunStore

MAILS, PDF_EVERY, SENDERS = 30, 10, 3
LIMIT = 200_000  # the serve's max message size: the oversized mail is over it


def _scrape(port: int) -> dict[str, list]:
    """``{sample name: [(labels, value), ...]}`` of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == w for k, w in labels.items()))


def _send(port: int, raw: bytes) -> int:
    """One message on its own connection; the SMTP code of the DATA reply (or of the refusal)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            smtp.sendmail("alice@example.com", ["digest@pipeline.local"], raw)
        return 250
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    except smtplib.SMTPRecipientsRefused as exc:
        return next(iter(exc.recipients.values()))[0]


def _send_undeclared(port: int, raw: bytes) -> int:
    """Send without SIZE= at MAIL (aiosmtpd refuses a declared oversize itself): the DATA reply's code."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail("alice@example.com")
        smtp.rcpt("digest@pipeline.local")
        code, _ = smtp.data(raw)
    return code


def _mails() -> list[bytes]:
    pdf = fx.text_pdf(1)
    return [fx.email_with([("r.pdf", pdf)] if i % PDF_EVERY == 0 else [], subject=f"burst {i}",
                          message_id=f"<burst-{i}@example.com>") for i in range(MAILS)]


def _store(serve: ServeProcess) -> s.DAGRunStore:
    return s.open_store(StoreConfig(path=serve.data_dir / "runs.sqlite3"), create=False)


@pytest.fixture
def serve(tmp_path: Path):
    port = free_port()
    serve = ServeProcess(tmp_path / "data", tmp_path / "serve", {"gateway": {"max_message_bytes": LIMIT}},
                         args=("--metrics-port", str(port)))
    serve.metrics_port = port  # type: ignore[attr-defined]
    try:
        yield serve.start()
    finally:
        serve.stop()


def test_metrics_match_the_run_store_after_an_smtp_burst(serve):
    port = serve.metrics_port
    assert f"metrics on http://127.0.0.1:{port}/metrics" in serve.log_tail(5000)
    with ThreadPoolExecutor(SENDERS) as pool:
        sent = [pool.submit(_send, serve.port, raw) for raw in _mails()]
        during = _scrape(port)  # while the burst arrives: a valid exposition
        oversized = _send_undeclared(serve.port, fx.email_with([("big.bin", fx.random_bytes(2 * LIMIT))],
                                                               message_id="<big@example.com>"))
        codes = Counter(f.result() for f in sent)
    assert "pipeline_queue_depth" in during and _value(during, "pipeline_scrape_errors_total") == 0
    assert codes == {250: MAILS} and oversized == 552
    with _store(serve) as store:
        assert wait_until(lambda: sum(store.count_runs_by_state().get(x, 0) for x in (s.SUCCESS, s.FAILED)) == MAILS,
                          timeout_s=300), store.count_runs_by_state()
        by_state = store.count_runs_by_state()
        runs = store.list_runs(limit=1000)
        tasks = [t for r in runs for t in store.get_tasks(r.run_id)]
    after = _scrape(port)

    gauge = {labels["state"]: v for labels, v in after["pipeline_runs"]}
    assert gauge == {**dict.fromkeys(s.RUN_STATES, 0), **by_state}
    assert _value(after, "pipeline_queue_depth") == 0
    assert _value(after, "pipeline_smtp_replies_total", command="DATA", code="250") == len(runs) == MAILS
    assert _value(after, "pipeline_smtp_replies_total", command="DATA", code="552") == 1
    assert _value(after, "pipeline_accepted_bytes_total") == sum(r.payload["size"] for r in runs)
    assert _value(after, "pipeline_trigger_seconds_count") == MAILS
    ran = Counter(metrics.task_name(t.task_id) for t in tasks  # an empty map never starts
              if t.state in (s.SUCCESS, s.FAILED) and t.started_at is not None)
    observed = {labels["task"]: v for labels, v in after["pipeline_task_duration_seconds_count"]}
    assert observed == dict(ran)
    outcomes = Counter((r.state, metrics.reason_code(r.reason)) for r in runs)
    counted = {(labels["state"], labels["reason"]): v for labels, v in after["pipeline_run_outcomes_total"] if v}
    assert counted == outcomes  # besides the series alerts count, shown at 0 from the start
    assert _value(after, "pipeline_processes", role="extract_worker") >= 1  # a PDF was extracted
    assert _value(after, "pipeline_healthy") == 1 and _value(after, "pipeline_gateway_restarts_total") == 0
    assert _value(after, "pipeline_process_resident_memory_bytes", role="serve", stat="sum") > 10 * 2**20
    _assert_bounded_labels(after)


def _assert_bounded_labels(samples: dict[str, list]) -> None:
    """No label value is a run id, a message id, an address or a task instance."""
    for name, found in samples.items():
        for labels, _ in found:
            for key, value in labels.items():
                if key == "le":
                    continue
                assert not re.search(r"[@<>\[]|^\d{3,}$", value) or (key == "code" and re.fullmatch(r"\d{3}", value)), \
                    f"{name}{{{key}={value!r}}}"


def test_metrics_off_opens_no_port_but_smtp(tmp_path):
    serve = ServeProcess(tmp_path / "data", tmp_path / "serve").start()
    try:
        listening = {c.laddr.port for c in psutil.Process(serve.proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {serve.port}
        assert "metrics on" not in serve.log_tail(5000)
    finally:
        serve.stop()


def test_workers_only_exposes_runs_and_active_runs_without_smtp_counts(tmp_path):
    port = free_port()
    log_path = tmp_path / "workers.log"
    with open(log_path, "wb") as log:  # workers-only listens for no SMTP: ServeProcess.start's NOOP cannot wait
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--data-dir", str(tmp_path / "data"), "serve",
                                 "--workers-only", "--metrics-port", str(port)], cwd=ROOT, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    try:
        def up() -> bool:
            try:
                return "pipeline_active_runs" in _scrape(port)
            except OSError:
                return False
        assert wait_until(up, timeout_s=120), log_path.read_text()
        samples = _scrape(port)
        assert _value(samples, "pipeline_active_runs") == 0 and "pipeline_runs" in samples
        assert "pipeline_smtp_replies_total" not in samples  # no SMTP here: no series
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_store_error_during_a_scrape_is_counted_not_a_500(tmp_path):
    store = SqliteRunStore(tmp_path / "runs.sqlite3")
    calls = []

    def failing_then_real() -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:  # the store's own error type, as a locked or vanished database raises it
            raise StoreUnavailableError("database is locked")
        return store.count_runs_by_state()

    server = metrics.start_metrics_server(0, runs_by_state=failing_then_real, active_runs=lambda: 0,
                                          states=s.RUN_STATES)
    try:
        first = _scrape(server.port)
        assert "pipeline_runs" not in first
        assert _value(first, "pipeline_scrape_errors_total", source="store") == 1
        second = _scrape(server.port)
        assert _value(second, "pipeline_queue_depth") == 0 and "pipeline_runs" in second
        assert _value(second, "pipeline_scrape_errors_total", source="store") == 1
    finally:
        server.close()
        store.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)


def test_a_store_that_does_not_answer_costs_a_scrape_two_seconds_not_its_busy_timeout():
    """A prober's find: a scrape read the store through the engine's connection while it waited out a lock,
    so scrapes took 10-19 s, past Prometheus's 10 s timeout, every series went stale and the endpoint's
    connection slots filled. The read now waits at most STORE_READ_S, is counted, and is never doubled."""
    release, calls = threading.Event(), []

    def locked() -> dict[str, int]:
        calls.append(1)
        release.wait(30)
        return {"queued": 3}

    collector = metrics.ScrapeCollector(runs_by_state=locked, active_runs=lambda: 0, health=lambda: None)
    try:
        for scrape in (1, 2):
            started = time.monotonic()
            families = {family.name: family for family in collector.collect()}
            assert time.monotonic() - started < metrics.STORE_READ_S + 5  # not the 30 s the read blocks
            assert "pipeline_runs" not in families and "pipeline_healthy" in families
            errors = {s_.labels["source"]: s_.value for s_ in families["pipeline_scrape_errors"].samples}
            assert errors["store"] == scrape
        assert len(calls) == 1  # the second scrape waited for the read in flight, it did not start another
    finally:
        release.set()
    assert wait_until(lambda: "pipeline_runs" in {f.name for f in collector.collect()}, timeout_s=10)


def test_a_fresh_serve_shows_the_series_its_alerts_count_at_zero(tmp_path):
    """A series born at its first event starts at 1, and Prometheus's increase() sees no rise: the first
    gateway restart, task_io failure or untyped run paged no one. They exist at 0 from the start."""
    port = free_port()
    serve = ServeProcess(tmp_path / "data", tmp_path / "serve", args=("--metrics-port", str(port))).start()
    try:
        samples = _scrape(port)
    finally:
        serve.stop()
    zero = {"pipeline_gateway_restarts_total": [{"cause": "hung"}, {"cause": "died"}],
            "pipeline_task_failures_total": [{"task": "deliver", "reason": "task_io"},
                                             {"task": "ingest_pdf", "reason": "task_io"}],
            "pipeline_run_outcomes_total": [{"state": "failed", "reason": "other"},
                                            {"state": "failed", "reason": "internal"}],
            "pipeline_task_retries_total": [{"task": "deliver"}],
            "pipeline_extract_worker_restarts_total": [{"cause": "worker_crashed"}],
            "pipeline_smtp_replies_total": [{"command": "DATA", "code": "451"}]}
    assert [v for _, v in samples["pipeline_store_wal_bytes"]][0] >= 0  # the store's WAL, as serve sees it
    for name, label_sets in zero.items():
        for labels in label_sets:
            found = [v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
            assert found == [0.0], (name, labels, samples.get(name))


def test_out_of_descriptors_a_scrape_still_answers_and_counts_what_it_could_not_read():
    """serve out of file descriptors answered every scrape with 500 (psutil's OSError reading /proc), so every
    series went stale while every PDF failed; now the rest goes out and the failing source is counted."""
    import os
    import resource

    collector = metrics.ScrapeCollector(runs_by_state=lambda: {"queued": 1}, active_runs=lambda: 0,
                                        health=lambda: "claiming runs failed 3 times: OSError: too many open files")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new descriptor takes the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no number left for a new one
    try:
        families = {family.name: family for family in collector.collect()}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "pipeline_runs" in families and "pipeline_process_resident_memory_bytes" not in families
    assert [sample.value for sample in families["pipeline_healthy"].samples] == [0]
    errors = {sample.labels["source"]: sample.value for sample in families["pipeline_scrape_errors"].samples}
    assert errors["memory"] == 1


def test_a_source_that_raises_is_counted_and_the_rest_of_the_scrape_still_goes_out():
    """A prober's find: a collector source that raised (a gateway process cut off mid-reply raises
    http.client.IncompleteRead, not an OSError) answered the whole scrape with 500 and a traceback on serve's
    stderr, and ``pipeline_healthy`` vanished with it."""
    import http.client

    def cut_off() -> str:
        raise http.client.IncompleteRead(b"# HELP pipeline_")

    def broken() -> str | None:
        raise RuntimeError("health cannot be read")

    collector = metrics.ScrapeCollector(runs_by_state=lambda: {"queued": 1}, active_runs=lambda: 0,
                                        gateway=cut_off, health=broken)
    families = {family.name: family for family in collector.collect()}
    assert "pipeline_runs" in families and "pipeline_active_runs" in families
    assert [sample.value for sample in families["pipeline_healthy"].samples] == [0]  # unknown counts as unhealthy
    errors = {sample.labels["source"]: sample.value for sample in families["pipeline_scrape_errors"].samples}
    assert (errors["gateway"], errors["serve"]) == (1, 1)


def test_reason_codes_are_bounded():
    assert metrics.reason_code(None) == "none"
    assert metrics.reason_code("ingest_pdf[0]: encrypted: the PDF needs a password") == "encrypted"
    assert metrics.reason_code("internal: database disk image is malformed") == "internal"
    assert metrics.reason_code("deliver: SomeRandomError: x") == "other"
    assert metrics.reason_code("partial: 1 of 2 ingest_pdf failed (corrupt)") == "partial"
    assert metrics.task_name("ingest_pdf[12]") == "ingest_pdf"


def test_metrics_ab_records_trigger_rows_ratio_and_families(tmp_path):
    result = monitoring.metrics_ab(tmp_path, mails=4, senders=2, reps=2, warmup_mails=1, scrape_every_s=0.2,
                                     timeout_s=240)
    trigger = result[result.metric == "trigger_seconds"]
    assert Counter(trigger.variant) == {"metrics_on": 8, "metrics_off": 8}
    assert (trigger.value >= 0).all()
    ratio = result[result.metric == "trigger_p99_ratio"].value
    assert len(ratio) == 1 and ratio.iloc[0] > 0
    names = set(result[result.metric == "metric_family"].name)
    assert {"pipeline_trigger_seconds", "pipeline_runs", "pipeline_smtp_replies"} <= names
    cpu = result[result.metric == "cpu_ms_per_mail"]
    assert Counter(cpu.variant) == {"metrics_on": 2, "metrics_off": 2} and (cpu.value > 0).all()
    judged = result[result.metric == "cpu_per_mail_ratio"].iloc[0]
    assert judged.low <= judged.value <= judged.high and judged.verdict in ("unchanged", "regressed", "inconclusive")
    summary = monitoring.summary(result.assign(scenario=monitoring.SCENARIO))
    assert summary["runs"] == 16 and summary["ratio"] == pytest.approx(ratio.iloc[0])
    assert summary["cpu_verdict"] == judged.verdict


@pytest.mark.parametrize(("on", "verdict"), [
    ([10.0, 10.1, 9.9, 10.0], "unchanged"),  # the same CPU per mail
    ([13.0, 13.2, 12.9, 13.1], "regressed"),  # 30 % more, every turn
    ([8.0, 13.0, 9.0, 14.0], "inconclusive"),  # too spread to say at 5 %
])
def test_the_metrics_overhead_is_judged_on_cpu_per_mail_with_its_interval(on, verdict):
    rows = {r["metric"]: r for r in monitoring.overhead_rows({"metrics_off": [10.0, 10.05, 9.95, 10.0],
                                                              "metrics_on": on})}
    assert rows["cpu_per_mail_ratio"]["tags"]["verdict"] == verdict
    assert rows["overhead_regressed"]["value"] == float(verdict == "regressed")


@pytest.mark.parametrize("profile", ["quick", "standard", "full"])
def test_every_profile_gives_notebook_12_parameters_metrics_ab_accepts(profile):
    import inspect

    from pipeline.audit.batch import PROFILES

    params = PROFILES[profile]["12_monitoring"]
    source = (ROOT / "notebooks" / "12_monitoring.py").read_text()
    cell = source.split('tags=["parameters"]')[1].split("# %%")[0]
    assert set(params) <= set(re.findall(r"^(\w+) =", cell, re.M))
    assert set(params) <= set(inspect.signature(monitoring.metrics_ab).parameters)


def test_in_process_service_serves_metrics_and_a_taken_port_fails_start_up(settings):
    from dataclasses import replace

    from pipeline.config import GatewayConfig, MetricsConfig
    from pipeline.errors import StartupError
    from pipeline.service import PipelineService

    first = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port()),
                                    metrics=MetricsConfig(port=free_port()))).start()
    try:
        assert first.metrics_server is not None
        taken = first.metrics_server.port
        assert "pipeline_queue_depth" in _scrape(taken)
        second = PipelineService(replace(settings, gateway=GatewayConfig(port=free_port()),
                                         metrics=MetricsConfig(port=taken)))
        with pytest.raises(StartupError, match=f"^metrics port {taken} on 127.0.0.1 is in use"):
            second.start()
    finally:
        first.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{taken}/metrics", timeout=5)


def test_metrics_refuse_a_remote_host_unless_allowed():
    from pipeline.config import MetricsConfig
    from pipeline.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="refusing to serve metrics on 0.0.0.0"):
        MetricsConfig(port=9108, host="0.0.0.0").validate()
    MetricsConfig(port=9108, host="0.0.0.0", allow_remote=True).validate()


def test_idle_connections_to_the_endpoint_hold_a_bounded_number_of_threads_and_are_timed_out(monkeypatch):
    """A slowloris against /metrics (connections that send half a request and wait) took a thread and a file
    descriptor each until the process had none left for its mail. Now at most MAX_SCRAPERS are served, the
    rest closed at once, and a silent one is closed after the read timeout, so scrapes get through again."""
    monkeypatch.setattr(metrics, "SCRAPE_READ_TIMEOUT_S", 3.0)
    server = metrics.start_metrics_server(0)
    idle: list[socket.socket] = []
    try:
        for _ in range(metrics.MAX_SCRAPERS + 20):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line that ends it
            idle.append(conn)
        assert wait_until(lambda: sum(_closed_by_server(c) for c in idle) >= 20, timeout_s=10)
        serving = [t for t in threading.enumerate() if "process_request_thread" in t.name]  # the server's own
        assert len(serving) <= metrics.MAX_SCRAPERS  # (counting all threads counted other tests' too)
        assert wait_until(lambda: all(_closed_by_server(c) for c in idle), timeout_s=30)  # the held ones too
        assert "pipeline_accepted_bytes_total" in _scrape(server.port)
    finally:
        for conn in idle:
            conn.close()
        server.close()


def _closed_by_server(conn: socket.socket) -> bool:
    """True once the server closed ``conn`` (a read returns EOF or the connection was reset)."""
    conn.setblocking(False)
    try:
        return conn.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_connection_that_trickles_its_request_is_closed_at_the_deadline(monkeypatch):
    """A byte every 0.2 s never trips the read timeout; the per-connection deadline ends it all the same."""
    monkeypatch.setattr(metrics, "SCRAPE_READ_TIMEOUT_S", 5.0)
    monkeypatch.setattr(metrics, "SCRAPE_DEADLINE_S", 1.0)
    server = metrics.start_metrics_server(0)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")
            ended = None
            for i in range(100):  # 20 s at most
                try:
                    conn.sendall(b"X")
                except OSError:
                    ended = i
                    break
                if _closed_by_server(conn):
                    ended = i
                    break
                conn.setblocking(True)
                time.sleep(0.2)
            assert ended is not None and ended < 50  # cut after about 1 s of trickling, far before 10 s
    finally:
        server.close()
    # the connection's own thread closes its socket a moment after the client saw it cut (it failed the fd check
    # once under load): wait for it, as serve's exit would
    deadline = time.monotonic() + 10
    while any("process_request_thread" in t.name for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
