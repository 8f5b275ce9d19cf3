"""Extraction faults: a damaged page costs a page, a dead worker is told apart by cause, workers ignore stop signals."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from functools import partial

import psutil
import pytest

from pipeline import metrics
from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig, Settings
from pipeline.dag import TaskContext
from pipeline.errors import CorruptPdfError, PdfTooLargeError, TaskIOError, WorkerCrashedError
from pipeline.stages import digest
from pipeline.stages.extract_worker import _Worker, death_error, pool_for
from pipeline.stages.ingest import ingest_pdf
from pipeline.workflows import email_digest_dag, ingest_pdf_task

MB = 1024 * 1024
# each damage is one a given engine really raises on for that page only (see fixtures.damaged_page_pdf)
DAMAGES = [("pdfium", "object", 1), ("pdfium", "object", 2), ("pypdf", "filter", 1), ("pypdf", "filter", 2)]


@pytest.fixture
def own_pool():
    """Limits with a worker pool of their own (pools are keyed by workers and memory cap), closed afterwards."""
    made: list[IngestConfig] = []

    def make(memory_mb: int, **fields) -> IngestConfig:
        limits = IngestConfig(workers=1, page_workers=1, memory_limit_bytes=memory_mb * MB, **fields)
        made.append(limits)
        return limits
    yield make
    for limits in made:
        pool_for(limits).close()


def _workers(limits: IngestConfig) -> list[psutil.Process]:
    return [p for p in psutil.Process().children()
            if "pipeline.stages.extract_worker" in p.cmdline() and str(limits.memory_limit_bytes) in p.cmdline()]


@pytest.mark.parametrize(("engine", "damage", "page_workers"), DAMAGES)
def test_a_damaged_page_is_skipped_and_counted(pdf, tmp_path, engine, damage, page_workers):
    limits = IngestConfig(engine=engine, page_workers=page_workers)
    result = ingest_pdf(pdf(fx.damaged_page_pdf(4, damaged=2, damage=damage)), tmp_path / "t.txt", limits)
    intact = ingest_pdf(pdf(fx.kerned_pdf(4), "intact.pdf"), tmp_path / "i.txt", limits)
    pages = (tmp_path / "t.txt").read_text().split("\f")
    assert (result.pages, result.pages_failed) == (4, 1) and result.has_text
    assert pages[2] == "" and pages[:2] == (tmp_path / "i.txt").read_text().split("\f")[:2]  # page order kept
    assert 0 < result.words < intact.words
    assert result.page_error.startswith("page 3: ")


def test_in_process_extraction_counts_a_damaged_page_too(pdf, tmp_path):
    limits = IngestConfig(engine="pypdf", isolate=False, page_workers=1)
    result = ingest_pdf(pdf(fx.damaged_page_pdf(3, damaged=0, damage="filter")), tmp_path / "t.txt", limits)
    assert (result.pages, result.pages_failed) == (3, 1) and "NotImplementedError" in result.page_error


@pytest.mark.parametrize(("engine", "damage"), [("pdfium", "object"), ("pypdf", "filter")])
def test_a_document_fails_as_corrupt_only_when_no_page_can_be_read(pdf, tmp_path, engine, damage):
    limits = IngestConfig(engine=engine, page_workers=1)
    with pytest.raises(CorruptPdfError, match=r"none of the 1 pages could be read: page 1: ") as err:
        ingest_pdf(pdf(fx.damaged_page_pdf(1, damaged=0, damage=damage)), tmp_path / "t.txt", limits)
    assert err.value.reason == "corrupt"


def test_a_shard_with_no_readable_page_does_not_fail_the_document(pdf, tmp_path):
    limits = IngestConfig(engine="pdfium", page_workers=2)  # shard 0 is page 1 alone, and it is the damaged one
    result = ingest_pdf(pdf(fx.damaged_page_pdf(2, damaged=0)), tmp_path / "t.txt", limits)
    assert (result.pages, result.pages_failed) == (2, 1) and result.words > 0


def test_a_worker_killed_mid_document_is_worker_crashed_and_replaced(pdf, tmp_path, own_pool):
    limits = own_pool(901, engine="pypdf")  # pypdf: slow enough per page to be killed mid-document
    path, text = pdf(fx.kerned_pdf(40)), tmp_path / "t.txt"
    killed: list[int] = []

    def kill_once_started() -> None:
        deadline = time.monotonic() + 120
        # the worker creates its text file (fair extraction: a part file next to it) before the first page
        while not list(tmp_path.glob("t.txt*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        for worker in _workers(limits):
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)

    def restarts() -> float:  # serve's /metrics counter of workers lost mid-request, by cause
        return metrics.REGISTRY.get_sample_value("pipeline_extract_worker_restarts_total",
                                                 {"cause": "worker_crashed"}) or 0.0

    counted = restarts()
    killer = threading.Thread(target=kill_once_started, daemon=True)
    killer.start()
    with pytest.raises(WorkerCrashedError, match=r"exit code -9, SIGKILL") as err:
        ingest_pdf(path, text, limits)
    killer.join()
    assert killed and err.value.reason == "worker_crashed" and err.value.retryable and err.value.exit_code == -9
    assert counted + 1 <= restarts() <= counted + len(killed)  # each killed mid-request, once
    assert ingest_pdf(pdf(fx.text_pdf(1), "after.pdf"), tmp_path / "a.txt", limits).pages == 1  # a new worker
    assert [w.pid for w in _workers(limits)] != killed


def test_a_bomb_under_a_small_cap_aborts_pdfium_and_is_too_large(pdf, tmp_path, own_pool):
    limits = own_pool(300, engine="pdfium")
    with pytest.raises(PdfTooLargeError, match=r"over the 314,572,800-byte memory cap.*SIGABRT") as err:
        ingest_pdf(pdf(fx.bomb_pdf(600 * MB)), tmp_path / "t.txt", limits)
    assert err.value.reason == "too_large"


@pytest.mark.parametrize(("code", "stderr", "error"), [
    (-signal.SIGABRT, ["Fatal Python error: Aborted"], PdfTooLargeError),
    (1, ["MemoryError"], PdfTooLargeError),
    (-signal.SIGKILL, [], WorkerCrashedError),
    (-signal.SIGSEGV, ["Fatal Python error: Segmentation fault"], WorkerCrashedError),
    (1, ["ModuleNotFoundError: No module named 'pypdf'"], WorkerCrashedError),
])
def test_a_dead_worker_is_judged_by_its_exit_and_its_stderr(code, stderr, error):
    judged = death_error(code, stderr, 300 * MB, "doc.pdf")
    assert type(judged) is error and judged.filename == "doc.pdf"
    if error is WorkerCrashedError:
        assert judged.exit_code == code and f"exit code {code}" in str(judged)


def test_a_spool_file_gone_when_the_worker_parses_it_is_a_file_gone_error_retried_for_a_while(tmp_path, own_pool):
    """A parse's spool file not there (its directory moved aside in a restore) is FileGoneError, from the real
    worker: task_io, retried about 30 s, not a malformed mail nor a one-retry task_io."""
    from pipeline.errors import FileGoneError

    limits = own_pool(903)
    with pytest.raises(FileGoneError, match="FileNotFoundError") as err:
        pool_for(limits).parse(tmp_path / "spool" / "gone.eml", tmp_path / "work", limits)
    assert err.value.reason == "task_io" and err.value.retryable and err.value.min_retries == 6


def test_an_os_error_in_the_worker_is_a_retryable_task_io_error_and_the_worker_survives(pdf, tmp_path, own_pool):
    """The disk failing under extraction (full, a folder gone) is the machine's fault, not the document's: typed
    task_io and retried, never reported to the sender as an unreadable PDF."""
    limits = own_pool(902, engine="pypdf")
    (tmp_path / "plain").write_text("")  # the text file's directory cannot be made: FileExistsError in the worker
    with pytest.raises(TaskIOError, match="FileExistsError") as err:
        ingest_pdf(pdf(fx.text_pdf(1)), tmp_path / "plain" / "t.txt", limits)
    assert err.value.reason == "task_io" and err.value.retryable
    before = [w.pid for w in _workers(limits)]
    assert ingest_pdf(pdf(fx.text_pdf(1), "b.pdf"), tmp_path / "b.txt", limits).pages == 1
    assert [w.pid for w in _workers(limits)] == before  # the same worker answered


def test_workers_ignore_stop_signals_in_their_own_process_group(pdf, tmp_path, own_pool):
    limits = own_pool(903, engine="pypdf")
    ingest_pdf(pdf(fx.text_pdf(1)), tmp_path / "a.txt", limits)
    [worker] = _workers(limits)
    assert os.getpgid(worker.pid) != os.getpgid(0)  # the terminal's Ctrl-C goes to our (foreground) group
    assert os.getsid(worker.pid) == os.getsid(0)  # one session: one scheduling autogroup with its parent
    worker.send_signal(signal.SIGINT)
    worker.send_signal(signal.SIGTERM)  # systemd signals the whole cgroup
    assert ingest_pdf(pdf(fx.text_pdf(1), "b.pdf"), tmp_path / "b.txt", limits).pages == 1
    assert [w.pid for w in _workers(limits)] == [worker.pid]


def test_a_stopped_worker_exits_quietly_when_its_stdin_closes(pdf, tmp_path):
    worker = _Worker(904 * MB)
    try:
        request = {"pdf": str(pdf(fx.text_pdf(1))), "text": str(tmp_path / "t.txt"), "shard": [0, 1],
                   "limits": dataclasses.asdict(IngestConfig(engine="pypdf"))}
        assert "ok" in (worker.request(request, lambda: 120.0) or {})
        worker.proc.send_signal(signal.SIGINT)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.stdin is not None
        worker.proc.stdin.close()
        assert worker.proc.wait(timeout=60) == 0
    finally:
        worker.close()
    assert not [line for line in worker.stderr_tail if "Traceback" in line or "KeyboardInterrupt" in line]


def test_the_digest_says_how_many_pages_could_not_be_read(tmp_path):
    (tmp_path / "t.txt").write_text("The pipeline reads documents. It summarises their text well. " * 5)
    result = {"pages": 412, "words": 9000, "has_text": True, "text_path": str(tmp_path / "t.txt"), "pages_failed": 3}
    docs = digest.describe_documents([{"name": "a.pdf", "size": 1}], [result], {}, 2)
    rendered = digest.render_digest({"subject": "s", "from": "alice@example.com"}, docs)
    assert "a.pdf: 412 pages, 9,000 words (3 of 412 pages could not be read)" in rendered.text
    assert "<p>412 pages, 9,000 words; 3 of 412 pages could not be read</p>" in rendered.html
    whole = digest.render_digest({"subject": "s", "from": "a@example.com"},
                                 digest.describe_documents([{"name": "a.pdf", "size": 1}],
                                                           [{**result, "pages_failed": 0}], {}, 2))
    assert "could not be read" not in whole.text + whole.html


def test_the_ingest_task_reports_failed_pages_and_is_retried_once(pdf, tmp_path):
    settings = replace(Settings.for_data_dir(tmp_path / "data"), ingest=IngestConfig(engine="pdfium"))
    path = pdf(fx.damaged_page_pdf(3, damaged=1))
    ctx = TaskContext(1, "ingest_pdf[0]", {}, {}, {}, str(tmp_path / "work"), 1,
                      {"name": "doc.pdf", "path": str(path), "size": path.stat().st_size}, 0)
    out = partial(ingest_pdf_task, settings=settings)(ctx)
    assert (out["pages"], out["pages_failed"]) == (3, 1)
    assert email_digest_dag(settings).task("ingest_pdf").retries == 1


class _GarblingWorker(_Worker):
    """A real worker process that answers one request with a reply cut short, as a worker dying mid-write does."""

    def __init__(self, memory_limit: int) -> None:
        import subprocess
        import sys

        script = "import sys; sys.stdin.readline(); print('{\"ok\": {\"pa')"
        self.proc = subprocess.Popen([sys.executable, "-c", script],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.documents, self.garbled = 0, None
        self.stderr_tail = __import__("collections").deque(maxlen=5)
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()


def test_an_unreadable_reply_is_worker_crashed_not_an_untyped_error(pdf, tmp_path, monkeypatch):
    from pipeline.stages import extract_worker

    pool = extract_worker.ExtractionPool(1, 512 * MB)
    monkeypatch.setattr(extract_worker, "_Worker", _GarblingWorker)  # the fault: a reply cut short mid-line
    try:
        with pytest.raises(WorkerCrashedError, match="unreadable reply") as err:
            pool.extract(pdf(fx.text_pdf(1)), tmp_path / "t.txt", IngestConfig(workers=1, page_workers=1))
        assert err.value.retryable and err.value.reason == "worker_crashed"
    finally:
        pool.close()


def test_closing_a_dead_worker_with_unflushed_input_does_not_raise():
    """close() flushes stdin: a worker that died first makes that a broken pipe, which must not escape."""
    worker = _Worker(256 * 1024 * 1024)
    worker.proc.kill()
    worker.proc.wait()
    assert worker.proc.stdin is not None
    worker.proc.stdin.write("x" * 100)  # buffered, not flushed: close() is what writes it
    worker.close()
    assert worker.proc.stdin.closed and worker.proc.stdout is not None and worker.proc.stdout.closed



def test_a_settled_worker_heap_leaves_only_new_objects_to_the_collector():
    code = ("import gc; from pipeline.stages.extract_worker import _settle_heap; before = len(gc.get_objects()); "
            "_settle_heap(); print(before, len(gc.get_objects()), gc.get_freeze_count())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, frozen = map(int, done.stdout.split())
    assert frozen > 1000 and after < before / 10  # a full collection now walks only what came later
