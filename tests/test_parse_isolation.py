"""MIME parsing in a capped worker process (issue 11, item 2): the pipeline process never holds the message."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import signal
import threading
import tracemalloc
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig, Settings
from pipeline.dag import TaskContext
from pipeline.errors import ParseError, PdfTooLargeError, TaskIOError, WorkerCrashedError
from pipeline.stages.extract_worker import pool_for
from pipeline.stages.ingest import ingest_pdf
from pipeline.workflows import parse_email_task

MB = 1024 * 1024
BIG_PDF = b"%PDF-1.4\n" + random.Random(11).randbytes(32 * MB)  # a 32 MB attachment: a 44 MB message


@pytest.fixture
def parse_settings(tmp_path):
    """Settings whose ingest limits have a worker pool of their own: ``parse_settings(memory_mb, **ingest)``."""
    made: list[IngestConfig] = []

    def make(memory_mb: int, **fields) -> Settings:
        limits = IngestConfig(**{"workers": 1, "page_workers": 1, **fields}, memory_limit_bytes=memory_mb * MB)
        made.append(limits)
        return replace(Settings.for_data_dir(tmp_path / "data"), ingest=limits)
    yield make
    for limits in made:
        pool_for(limits).close()


def _big_mail(path: Path) -> Path:
    """Write a 44 MB message with BIG_PDF as a base64 attachment, built line by line (quicker than EmailMessage)."""
    with open(path, "wb") as out:
        out.write(b"From: alice@example.com\r\nTo: digest@pipeline.local\r\nSubject: big\r\n"
                  b"Message-ID: <big@example.com>\r\nMIME-Version: 1.0\r\n"
                  b"Content-Type: multipart/mixed; boundary=\"BB\"\r\n\r\n--BB\r\nContent-Type: text/plain\r\n\r\n"
                  b"The report.\r\n--BB\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
                  b"Content-Disposition: attachment; filename=\"big.pdf\"\r\n\r\n")
        out.write(base64.encodebytes(BIG_PDF).replace(b"\n", b"\r\n"))
        out.write(b"--BB--\r\n")
    return path


def _ctx(spool: Path, work: Path) -> TaskContext:
    return TaskContext(1, "parse_email", {"spool": str(spool)}, {}, {}, str(work))


def _parse(settings: Settings, spool: Path, work: Path) -> dict:
    return parse_email_task(_ctx(spool, work), settings)


def test_a_44mb_mail_is_parsed_in_the_worker_and_this_process_stays_small(tmp_path, parse_settings):
    spool = _big_mail(tmp_path / "big.eml")
    assert spool.stat().st_size > 43 * MB
    settings = parse_settings(906, max_attachment_bytes=40 * MB)  # the default 30 MB would reject it
    tracemalloc.start()
    try:
        info = _parse(settings, spool, tmp_path / "work")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MB, f"the pipeline process's Python heap peaked at {peak / MB:.1f} MB"
    [item] = info["attachments"]
    assert item["name"] == "big.pdf" and item["size"] == len(BIG_PDF)
    assert hashlib.sha256(Path(item["path"]).read_bytes()).digest() == hashlib.sha256(BIG_PDF).digest()
    # the baseline parses here: its heap holds the message and more
    tracemalloc.start()
    try:
        baseline = _parse(replace(settings, ingest=replace(settings.ingest, parse_isolate=False)), spool,
                          tmp_path / "work2")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > 40 * MB and baseline["attachments"][0]["size"] == len(BIG_PDF)


def test_the_worker_parses_as_the_pipeline_process_does(tmp_path, parse_settings):
    raw = fx.email_with([("a.pdf", fx.text_pdf(1)), ("notes.txt", b"plain words")], subject="Two files")
    (tmp_path / "m.eml").write_bytes(raw)
    settings = parse_settings(907)
    isolated = _parse(settings, tmp_path / "m.eml", tmp_path / "w1")
    inline = _parse(replace(settings, ingest=replace(settings.ingest, parse_isolate=False)), tmp_path / "m.eml",
                    tmp_path / "w2")
    assert isolated == {**inline, "attachments": [{**a, "path": a["path"].replace("/w2/", "/w1/")}
                                                  for a in inline["attachments"]]}
    assert isolated["subject"] == "Two files" and len(isolated["attachments"]) == 1


def test_a_parse_error_in_the_worker_comes_back_as_the_same_parse_error(tmp_path, parse_settings):
    (tmp_path / "junk.eml").write_bytes(b"this is not an email at all, no header block\r\n")
    settings = parse_settings(908)
    with pytest.raises(ParseError) as isolated:
        _parse(settings, tmp_path / "junk.eml", tmp_path / "w1")
    with pytest.raises(ParseError) as inline:
        _parse(replace(settings, ingest=replace(settings.ingest, parse_isolate=False)), tmp_path / "junk.eml",
               tmp_path / "w2")
    assert type(isolated.value) is ParseError and isolated.value.reason == "malformed_email"
    assert str(isolated.value) == str(inline.value) and not isolated.value.retryable


def test_a_worker_over_its_memory_cap_while_parsing_ends_too_large(tmp_path, parse_settings):
    spool = _big_mail(tmp_path / "big.eml")
    settings = parse_settings(200)  # the 44 MB message needs several hundred MB to parse
    with pytest.raises(PdfTooLargeError, match="209,715,200") as err:
        _parse(settings, spool, tmp_path / "work")
    assert err.value.reason == "too_large" and not err.value.retryable
    (tmp_path / "small.eml").write_bytes(fx.email_with([("a.pdf", fx.text_pdf(1))]))
    assert len(_parse(settings, tmp_path / "small.eml", tmp_path / "w2")["attachments"]) == 1  # the pool recovered


def test_a_worker_killed_while_parsing_is_worker_crashed(tmp_path, parse_settings):
    settings = parse_settings(909)
    fifo = tmp_path / "spool.eml"
    os.mkfifo(fifo)  # the worker blocks reading it until the test has killed it
    outcome: list[BaseException] = []

    def parse_in_thread() -> None:
        try:
            _parse(settings, fifo, tmp_path / "work")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=parse_in_thread)
    thread.start()
    writer: list[int] = []

    def worker_has_opened_it() -> bool:  # opening the write end without blocking works once a reader has it
        try:
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return False
        return True

    try:
        assert wait_until(worker_has_opened_it, 120)
        [worker] = [p for p in psutil.Process().children() if str(909 * MB) in p.cmdline()]
        worker.send_signal(signal.SIGKILL)
    finally:
        for fd in writer:
            os.close(fd)
        thread.join(timeout=120)
    [error] = outcome
    assert isinstance(error, WorkerCrashedError) and error.retryable and error.reason == "worker_crashed"
    assert error.exit_code == -signal.SIGKILL and "while reading the email" in str(error)


def test_a_parse_is_not_queued_behind_a_slow_pdf(pdf, tmp_path, parse_settings):
    settings = parse_settings(910, timeout_s=20.0)
    (tmp_path / "m.eml").write_bytes(fx.email_with([("a.pdf", fx.text_pdf(1))]))
    failed: list[BaseException] = []

    def slow() -> None:
        try:
            ingest_pdf(pdf(fx.slow_pdf(1200, draws=2000), "slow.pdf"), tmp_path / "slow.txt", settings.ingest)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        assert wait_until(lambda: bool(list(tmp_path.glob("slow.txt.p*"))) or not thread.is_alive(), 120)
        info = _parse(settings, tmp_path / "m.eml", tmp_path / "work")
        parsed_first = thread.is_alive()
    finally:
        thread.join(timeout=120)
    assert len(info["attachments"]) == 1 and parsed_first, "the parse waited for the slow PDF's whole budget"
    assert [type(e) for e in failed] == [PdfTooLargeError]


def _open_writers(fifos: list[Path], writers: dict[Path, int]) -> int:
    """Open the write end of each FIFO a worker is reading (that works without blocking once a reader has it)."""
    for fifo in fifos:
        if fifo not in writers:
            try:
                writers[fifo] = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                pass
    return len(writers)


class _SlowParse:
    """A parse of ``spool`` in a thread of its own; ``outcome`` is its result or what it raised."""

    def __init__(self, spool: Path, work: Path, limits: IngestConfig) -> None:
        self.outcome: object = None
        self.thread = threading.Thread(target=self._run, args=(spool, work, limits))
        self.thread.start()

    def _run(self, spool: Path, work: Path, limits: IngestConfig) -> None:
        try:
            self.outcome = pool_for(limits).parse(spool, work, limits)
        except BaseException as exc:
            self.outcome = exc


def test_two_slow_parses_leave_a_worker_for_a_pdf(pdf, tmp_path, parse_settings):
    limits = parse_settings(911, workers=2, page_workers=2, timeout_s=120.0).ingest
    fifos = [tmp_path / "slow1.eml", tmp_path / "slow2.eml"]
    for fifo in fifos:
        os.mkfifo(fifo)  # a worker parsing it blocks reading until the test writes the mail
    parses = [_SlowParse(fifo, tmp_path / fifo.stem, limits) for fifo in fifos]
    writers: dict[Path, int] = {}
    try:
        assert wait_until(lambda: _open_writers(fifos, writers) > 0, 120)  # one parse holds a worker
        result = ingest_pdf(pdf(fx.text_pdf(1)), tmp_path / "n.txt", limits)
        assert [p.thread.is_alive() for p in parses] == [True, True], "the PDF waited for the parses to end"
        assert _open_writers(fifos, writers) == 1, "the two parses held both workers"  # nobody reads the other
        mail = fx.email_with([("a.pdf", fx.text_pdf(1))])
        while fifos:  # the queued parse starts once the first has its mail
            assert wait_until(lambda: _open_writers(fifos, writers) > 0, 120)
            fifo, fd = writers.popitem()
            try:
                os.write(fd, mail)  # a few KB: the pipe takes it whole
            finally:
                os.close(fd)
            fifos.remove(fifo)
        for p in parses:
            p.thread.join(timeout=120)
    finally:
        for fd in writers.values():
            os.close(fd)
        pool_for(limits).close()  # after a failure: a parse still blocked on its FIFO ends
        for p in parses:
            p.thread.join(timeout=120)
    assert result.pages == 1
    for p in parses:
        assert isinstance(p.outcome, dict) and len(p.outcome["attachments"]) == 1, p.outcome


def test_an_os_error_while_the_worker_parses_is_a_typed_retryable_task_io_error(tmp_path, parse_settings):
    (tmp_path / "m.eml").write_bytes(fx.email_with([("a.pdf", fx.text_pdf(1))]))
    work = tmp_path / "work"
    work.mkdir()
    (work / "attachments").write_bytes(b"")  # a file where the attachments' folder goes: mkdir fails (EEXIST)
    with pytest.raises(TaskIOError, match="FileExistsError") as err:
        _parse(parse_settings(909), tmp_path / "m.eml", work)
    assert err.value.reason == "task_io" and err.value.retryable
