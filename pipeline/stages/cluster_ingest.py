"""Ingestion on a Dask worker: one document's text, extracted in the worker process itself.

The Dask worker's memory limit is the cap here (its nanny restarts a worker over it, and the engine's
``DaskExecutor`` turns that into ``too_large``), so the local extraction pool of ``extract_worker`` is not
used: a worker is already a capped process, and one more process per document would only cost a start.
A worker without a memory limit bounds nothing, so it is refused.

Paths, not bytes: the worker reads the PDF from the run's work dir and writes the text file beside it
(shared storage; see ``dask_executor``). A document over ``pages_per_task`` pages is split: this task
extracts the first range itself, submits the others as futures of their own (``get_client``), leaves its
worker thread while they run (``secede``/``rejoin``, so even a one-thread worker can run them), and joins
the part files in page order. As in ``ingest``, a failed document leaves no text: its part files and text
file are deleted once every range has ended. Each range runs under ``limits.timeout_s``; the whole task
under the runner's task timeout.

Every task the pipeline sends to a worker runs in ``run_announced``, which first tells the scheduler
(event topic ``STARTED_TOPIC``) that it started on this worker: when the nanny kills a worker for memory,
only the tasks that had started there were using that memory (``too_large``); a task merely queued behind
them died innocent and is retried.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import IngestConfig
from ..errors import ClusterUnavailableError, ConfigurationError
from .ingest import join_parts, remove_files
from .pdf_text import PdfText, extract_text, require_a_readable_page

log = logging.getLogger(__name__)
STARTED_TOPIC = "pipeline-task-started"  # {"key", "worker"}, logged by run_announced


def run_announced(fn: Callable[..., Any], *args: Any) -> Any:
    """On a Dask worker: announce that this task starts here (``STARTED_TOPIC``), then return ``fn(*args)``."""
    from distributed import get_worker

    worker = get_worker()
    # sent on the worker's batched stream at its next flush (every few ms): ordered before the task's end, but a
    # worker killed before that flush takes it along (dask_executor's module docstring)
    worker.log_event(STARTED_TOPIC, {"key": worker.get_current_task(), "worker": worker.address})
    try:
        return fn(*args)
    except ImportError as exc:  # the worker's environment, not the document: the run waits, serve answers 451
        raise ClusterUnavailableError(  # (a worker without pypdfium2 failed every document untyped, a prober's find)
            f"Dask worker {worker.address} cannot import {exc.name or exc}: install the project and its "
            "dependencies in every worker's Python environment") from None
    except RecursionError as exc:  # its traceback, about a thousand frames deep, cannot be pickled back: Dask then
        message = str(exc)  # never completed the future, and the try ended "timeout" after its whole try timeout
    raise RecursionError(message)  # outside the handler: no context, no deep traceback


def ingest_on_worker(pdf_path: Path, text_path: Path, limits: IngestConfig, pages_per_task: int) -> PdfText:
    """Extract a document's text on this Dask worker, over ``pages_per_task`` pages as page-range futures.

    Raises an IngestError subclass like ``ingest.ingest_pdf``; ConfigurationError when the PDF is not on this
    host's storage or the worker has no memory limit.
    """
    _require_capped_worker(pdf_path)
    parts = [Path(f"{text_path}.p{0:06d}")]
    results: list[PdfText] = []
    try:
        results.append(extract_range(pdf_path, parts[0], limits, (0, pages_per_task)))
        ranges = [(p, min(p + pages_per_task, results[0].pages)) for p in range(pages_per_task, results[0].pages,
                                                                                  pages_per_task)]
        parts += [Path(f"{text_path}.p{first:06d}") for first, _ in ranges]
        if ranges:
            results += _extract_ranges(pdf_path, parts[1:], limits, ranges)
        joined = join_parts(parts, results, Path(text_path), seconds=sum(r.seconds for r in results))
    except BaseException:
        remove_files([*parts, Path(text_path)])
        raise
    if joined.pages_failed:
        log.warning("%s: %d of %d pages could not be read (first: %s)", Path(pdf_path).name, joined.pages_failed,
                    joined.pages, joined.page_error)
    return require_a_readable_page(joined, Path(pdf_path).name)


def extract_range(pdf_path: Path, part: Path, limits: IngestConfig, pages: tuple[int, int]) -> PdfText:
    """Extract the pages from ``pages[0]`` up to ``pages[1]`` into the part file (a task of its own)."""
    return extract_text(Path(pdf_path), Path(part), limits, chunk=pages)


def _extract_ranges(pdf_path: Path, parts: list[Path], limits: IngestConfig,
                    ranges: list[tuple[int, int]]) -> list[PdfText]:
    """Run the ranges as futures on the cluster; wait for all (none writes after a failure cleans up)."""
    from distributed import get_client, rejoin, secede, wait

    client = get_client()
    name = Path(pdf_path).name
    futures = [client.submit(run_announced, extract_range, pdf_path, part, limits, pages, pure=False,
                             key=f"pages-{pages[0]}-{pages[1]}-{name}-{uuid.uuid4().hex[:12]}")
               for part, pages in zip(parts, ranges, strict=True)]
    secede()  # while seceded this thread holds no slot of the worker: a range may run here meanwhile
    try:
        wait(futures)
        # results are taken before rejoining: a range whose result was lost with a killed worker is computed
        # again when asked for, possibly here, and this thread must not hold the worker's only slot then
        return [future.result() for future in futures]  # the first failed range's error, in page order
    finally:
        rejoin()


def _require_capped_worker(pdf_path: Path) -> None:
    from distributed import get_worker

    worker = get_worker()
    if not Path(pdf_path).exists():
        raise ConfigurationError(f"{pdf_path} is not on Dask worker {worker.address}'s storage: the data dir "
                                 "must be shared storage mounted at the same path on every host")
    if not worker.memory_manager.memory_limit:
        raise ConfigurationError(f"Dask worker {worker.address} has no memory limit, so nothing bounds a PDF "
                                 "bomb: start it with --memory-limit")
    # only a nanny enforces the limit: a prober's worker without one reached 1.7 GB under a 600 MiB limit
    if getattr(worker, "nanny", None) is None:
        raise ConfigurationError(f"Dask worker {worker.address} runs without a nanny, so its memory limit is "
                                 "not enforced and nothing bounds a PDF bomb: start it without --no-nanny")
