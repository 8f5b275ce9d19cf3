"""EmailGateway benchmark: real SMTP clients on loopback against a real gateway.

Clients run in their own processes, as real senders would. Latency
"trigger" is what the store says: a run's ``queued_at`` minus the
``data_end_at`` the gateway stamped when DATA ended. Client latency is what a
sender waits for its 250. Workers are not started, so only acceptance is
measured (end-to-end runs are the pipeline_profile scenario's job).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...config import GatewayConfig, Settings
from ...service import PipelineService
from ..base import fixtures as fx
from ..base.serveproc import free_port
from ..base.smtpclients import send_batch
from .store_queries import summarize


@contextmanager
def accepting_gateway(data_dir: Path, **gateway: Any) -> Iterator[PipelineService]:
    """A gateway on a free loopback port whose runs are queued but not executed (``gateway``: settings)."""
    settings = replace(Settings.for_data_dir(data_dir),
                       gateway=GatewayConfig(port=free_port(), drop_folder=False, **gateway))
    service = PipelineService(settings).start(run_workers=False)
    try:
        yield service
    finally:
        service.stop(grace_s=0)


def send_all(port: int, batches: list[list[bytes]]) -> list[float]:
    """Send each batch from its own client process (so clients do not share the server's GIL)."""
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=len(batches), mp_context=context) as pool:
        futures = [pool.submit(send_batch, port, batch) for batch in batches]
        return [latency for future in futures for latency in future.result()]


def trigger_latencies(service: PipelineService) -> list[float]:
    """Seconds from DATA end to run queued, for every run in the store."""
    runs = service.store.list_runs(limit=10**9)
    return [r.queued_at - r.payload["data_end_at"] for r in runs if "data_end_at" in r.payload]


def small_messages(data_dir: Path, messages: int = 2000, senders: int = 8) -> list[dict[str, Any]]:
    """Many small messages from ``senders`` concurrent clients: trigger latency and durable messages/s."""
    raws = [fx.email_with([], message_id=f"<small-{i}@bench>") for i in range(messages)]
    with accepting_gateway(data_dir) as service:
        send_all(service.settings.gateway.port, [raws[:20]])  # warm-up, not counted
        warm = len(trigger_latencies(service))
        t0 = time.perf_counter()
        client = send_all(service.settings.gateway.port, [raws[20 + i::senders] for i in range(senders)])
        elapsed = time.perf_counter() - t0
        trigger = sorted(trigger_latencies(service))[:]
    counted = len(trigger) - warm
    tags: dict[str, Any] = {"senders": senders, "messages": len(client)}
    return [summarize("small_trigger_latency", trigger, **tags), summarize("small_client_latency", client, **tags),
            {"metric": "small_durable_messages_per_s", "median": counted / elapsed, "unit": "1/s", "n": counted,
             **tags}]


def large_pdf(size_mb: float, cache_dir: Path | None = None) -> bytes:
    """The attachment that makes a message of about ``size_mb`` MB (base64 adds a third), cached in
    ``cache_dir`` when given: generating 3.7 MB of text PDF takes seconds."""
    pdf_mb = round(size_mb * 0.74, 3)
    if cache_dir is None:
        return fx.text_pdf_of_size(pdf_mb)
    return fx.cached(cache_dir, f"gateway-large-{pdf_mb:g}mb.pdf", {"mb": pdf_mb},
                     lambda: fx.text_pdf_of_size(pdf_mb)).read_bytes()


def large_messages(data_dir: Path, size_mb: float = 5.0, concurrent: int = 4, rounds: int = 5,
                   small_senders: int = 2, small_mails: int = 150, pdf: bytes | None = None,
                   **gateway: Any) -> list[dict[str, Any]]:
    """``concurrent`` large messages at once, ``rounds`` times, while ``small_senders`` send ``small_mails`` each
    (``pdf``: the large messages' attachment, default ``large_pdf(size_mb)``; ``gateway``: settings of the
    gateway under test, e.g. ``bulk_data=False``)."""
    pdf = large_pdf(size_mb) if pdf is None else pdf
    large = [[fx.email_with([("big.pdf", pdf)], message_id=f"<large-{c}-{r}@bench>") for r in range(rounds)]
             for c in range(concurrent)]
    small = [[fx.email_with([], message_id=f"<during-{s}-{i}@bench>") for i in range(small_mails)]
             for s in range(small_senders)]
    with accepting_gateway(data_dir, **gateway) as service:
        port = service.settings.gateway.port
        result: dict[str, list[float]] = {}
        background = threading.Thread(target=lambda: result.setdefault("small", send_all(port, small)))
        background.start()
        result["large"] = send_all(port, large)
        background.join()
        runs = service.store.list_runs(limit=10**9)
    by_kind = {"large": [], "small": []}  # type: dict[str, list[float]]
    for r in runs:
        kind = "large" if (r.dedup_key or "").startswith("<large") else "small"
        by_kind[kind].append(r.queued_at - r.payload["data_end_at"])
    size = len(large[0][0]) / 1024 / 1024
    tags: dict[str, Any] = {"message_mb": round(size, 2), "concurrent": concurrent}
    return [summarize("large_client_latency", result["large"], **tags),
            summarize("large_trigger_latency", by_kind["large"], **tags),
            summarize("small_client_latency_during_large", result["small"], **tags),
            summarize("small_trigger_latency_during_large", by_kind["small"], **tags)]
