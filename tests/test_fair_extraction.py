"""Fair extraction (issue 11, item 5): documents share the workers chunk by chunk, under a time budget each."""

from __future__ import annotations

import smtplib
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from unittest import mock

import pytest
from helpers import wait_until

from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig, Settings
from pipeline.errors import PdfTooLargeError, WorkerCrashedError
from pipeline.stages import ingest
from pipeline.stages.extract_worker import pool_for
from pipeline.stages.ingest import ingest_pdf
from pipeline.stages.worker_pool import PRIORITY_PARSE, FairQueue, Job, RunShare, WaitClock, timing_waits
from pipeline.workflows import EMAIL_DIGEST

MB = 1024 * 1024


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The services of this module extract with a short budget, so a slow PDF ends within seconds."""
    return replace(settings, ingest=replace(settings.ingest, timeout_s=15.0))


@pytest.fixture
def own_pool():
    """Limits with a worker pool of their own (pools are keyed by workers and memory cap), closed afterwards."""
    made: list[IngestConfig] = []

    def make(memory_mb: int, **fields) -> IngestConfig:
        limits = IngestConfig(memory_limit_bytes=memory_mb * MB, **fields)
        made.append(limits)
        return limits
    yield make
    for limits in made:
        pool_for(limits).close()


class _Background:
    """``ingest_pdf`` in a thread of its own; ``error`` is what it raised, ``done`` when it ended."""

    def __init__(self, *args: Any) -> None:
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=args)
        self.thread.start()

    def _run(self, *args: Any) -> None:
        try:
            ingest_pdf(*args)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


# 1,200 pages of 2,000 draws: over a minute of PDFium on any core we have seen, so the budget (15-20 s) ends it;
# 300 pages (about 18-26 s) ended within the budget on a fast day, and the tests expecting a timeout failed
def test_a_normal_pdf_finishes_while_a_slow_one_holds_both_workers(pdf, tmp_path, own_pool):
    limits = own_pool(905, workers=2, page_workers=2, timeout_s=20.0)
    slow = _Background(pdf(fx.slow_pdf(1200, draws=2000), "slow.pdf"), tmp_path / "slow.txt", limits)
    try:
        # both of its shards are being read: the slow document holds both workers now
        both = [tmp_path / "slow.txt.s000", tmp_path / "slow.txt.s001"]
        assert wait_until(lambda: all(p.exists() for p in both) or slow.done.is_set(), 120)
        assert not slow.done.is_set(), f"the slow PDF ended before the test could start: {slow.error!r}"
        result = ingest_pdf(pdf(fx.text_pdf(1), "normal.pdf"), tmp_path / "normal.txt", limits)
        normal_first = not slow.done.is_set()
    finally:
        slow.thread.join(timeout=120)
    assert result.pages == 1 and result.words > 0 and (tmp_path / "normal.txt").exists()
    assert normal_first, "the normal PDF waited until the slow one ended"
    assert isinstance(slow.error, PdfTooLargeError) and slow.error.reason == "too_large"
    assert "longer than 20 s" in str(slow.error)
    assert not list(tmp_path.glob("slow.txt*")), "a timed-out document left partial text behind"


@pytest.mark.parametrize("engine", ["pdfium", "pypdf"])
def test_pages_cut_into_many_slices_are_joined_in_page_order(pdf, tmp_path, monkeypatch, engine):
    monkeypatch.setattr(ingest, "SLICE_S", 0.002)  # a few pages per request: many chunk remainders
    path = pdf(fx.kerned_pdf(120))
    fair = ingest_pdf(path, tmp_path / "fair.txt", IngestConfig(engine=engine))
    whole = ingest_pdf(path, tmp_path / "whole.txt", IngestConfig(engine=engine, page_workers=1,
                                                                   fair_extraction=False))
    assert (tmp_path / "fair.txt").read_text() == (tmp_path / "whole.txt").read_text()
    assert (fair.pages, fair.words, fair.chars, fair.pages_failed) == (120, whole.words, whole.chars, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.pdf", "fair.txt", "whole.txt"]  # parts joined


def test_a_document_over_its_page_limit_fails_from_its_first_chunk(pdf, tmp_path):
    with pytest.raises(PdfTooLargeError, match="over the 3-page limit"):
        ingest_pdf(pdf(fx.text_pdf(4)), tmp_path / "t.txt", IngestConfig(max_pages=3))
    assert not list(tmp_path.glob("t.txt*"))


class _Pages(Job):
    """A job of named chunks that records what it was given (the queue's rule, without worker processes)."""

    def __init__(self, name: str, chunks: int, budget_s: float = 60.0, **kw: Any) -> None:
        super().__init__(name, budget_s, [f"{name}{i}" for i in range(chunks)], **kw)
        self.replies: list[Any] = []

    def request(self, chunk: Any, remaining_s: float) -> dict[str, Any]:
        return {}

    def absorb(self, chunk: Any, reply: dict[str, Any]) -> list[Any]:
        self.replies.append(chunk)
        return []

    def timeout_error(self) -> BaseException:
        return PdfTooLargeError(f"{self.name} took too long", self.name)

    def run_budget_error(self, run_budget_s: float) -> BaseException:
        return PdfTooLargeError(f"{self.name}: its run used its {run_budget_s:g} s", self.name)


def _take(queue: FairQueue) -> tuple[Job, Any]:
    picked = queue.take()
    assert picked is not None
    return picked[0], picked[1]


def test_a_free_worker_serves_the_document_holding_the_fewest_workers():
    queue = FairQueue()
    big = _Pages("big", 10, max_workers=2)
    queue.submit(big)
    assert _take(queue) == (big, "big0")
    assert _take(queue) == (big, "big1")  # nobody else waits: the second worker goes to the same document
    small, parse = _Pages("small", 1), _Pages("parse", 1, priority=PRIORITY_PARSE)
    queue.submit(small)
    queue.submit(parse)
    queue.finish(big, "big0", 0.1, reply={})
    assert _take(queue) == (parse, "parse0")  # neither holds a worker: a parse goes first
    queue.finish(parse, "parse0", 0.1, reply={})
    assert _take(queue) == (small, "small0")  # big still holds one worker, small none
    queue.finish(big, "big1", 0.1, reply={})
    queue.submit(later := _Pages("later", 1))
    assert _take(queue) == (big, "big2")  # both hold none, neither has had LONG_JOB_S: the older document
    assert _take(queue) == (later, "later0")  # big holds one now


def test_a_newcomer_goes_before_long_documents_that_each_hold_no_lane_between_slices():
    """A prober's find: with as many long documents as lanes, the tie went to the oldest, so a 2-page PDF
    waited 97 s behind six dense ones. Between slices each long one holds no lane; the newcomer, with under
    LONG_JOB_S of worker time, takes the next free lane (short documents keep their order: mean latency)."""
    queue = FairQueue(lanes=2)
    longs = [_Pages(f"long{i}", 50, max_workers=2) for i in range(3)]
    for job in longs:
        queue.submit(job)
    for _ in range(6):  # every long document has had slices, over LONG_JOB_S of worker time
        job, chunk = _take(queue)
        queue.finish(job, chunk, 3.0, reply={})
    queue.submit(small := _Pages("small", 1))
    assert _take(queue) == (small, "small0")


def _submit_for(queue: FairQueue, run: RunShare, job: Job) -> Job:
    """Submit ``job`` as a try of ``run`` does (its WaitClock names the run)."""
    with timing_waits(WaitClock(owner=run)):
        queue.submit(job)
    return job


@pytest.mark.parametrize("by_run", [True, False])
def test_a_free_worker_serves_the_mail_holding_the_fewest_workers(by_run):
    """A mail of many PDFs holds a lane with one of them; a one-PDF mail mailed after it goes next, not after
    every PDF of the first (``by_run`` False, the baseline: the many PDFs' older jobs go first)."""
    queue = FairQueue(lanes=2)
    run = RunShare()
    many = [_submit_for(queue, run, _Pages(f"m{i}", 2, by_run=by_run)) for i in range(4)]
    assert _take(queue) == (many[0], "m00")
    assert _take(queue) == (many[1], "m10")
    one = _submit_for(queue, RunShare(), _Pages("one", 1, by_run=by_run))
    queue.finish(many[0], "m00", 0.5, reply={})
    if by_run:
        assert _take(queue) == (one, "one0")  # "many" holds a lane still, "one" none
    else:
        assert _take(queue) == (many[0], "m01")  # by job: m0 and "one" hold none, m0 is older
        queue.finish(many[0], "m01", 0.5, reply={})
        assert _take(queue) == (many[2], "m20")


def test_jobs_without_a_run_each_share_as_a_run_of_their_own():
    """Outside the runner (``ingest``, the audit's direct calls) no clock names a run: each job is a run of its
    own, not one run of all of them (a reviewer's find: the first version of this test passed either way)."""
    queue = FairQueue(lanes=3)
    first, second = _Pages("a", 3), _Pages("b", 1)
    queue.submit(first)
    queue.submit(second)
    assert _take(queue) == (first, "a0")
    third = _submit_for(queue, RunShare(), _Pages("c", 1))
    # "b" holds no lane; as one run with "a" it would hold one, and "c", of a run that holds none, would go first
    assert _take(queue) == (second, "b0")
    assert _take(queue) == (third, "c0")


def test_a_run_that_had_more_than_long_job_s_in_all_yields_ties_though_each_of_its_documents_had_less():
    """A reviewer's find: counting only a run's jobs still queued, a mail of many PDFs read one after another
    never looked long, and its next PDF kept winning ties over a newcomer's."""
    queue, many, other = FairQueue(lanes=1), RunShare(), RunShare()
    for i in range(3):  # three documents of 2 s each, one after another: 6 s in all, each under LONG_JOB_S
        job = _submit_for(queue, many, _Pages(f"d{i}", 1))
        assert _take(queue) == (job, f"d{i}0")
        queue.finish(job, f"d{i}0", 2.0, reply={})
        queue.wait(job)
    fourth = _submit_for(queue, many, _Pages("d3", 1))
    newcomer = _submit_for(queue, other, _Pages("n", 1))
    assert _take(queue) == (newcomer, "n0")
    assert _take(queue) == (fourth, "d30")


def test_a_runs_jobs_share_one_budget_past_which_every_one_of_them_fails():
    queue, mail, other = FairQueue(lanes=2), RunShare(), RunShare()
    first = _submit_for(queue, mail, _Pages("a", 5, run_budget_s=3.0))
    queued = _submit_for(queue, mail, _Pages("b", 5, run_budget_s=3.0))
    elsewhere = _submit_for(queue, other, _Pages("c", 5, run_budget_s=3.0))
    assert _take(queue) == (first, "a0")
    queue.finish(first, "a0", 2.0, reply={})  # 2 of the run's 3 s: on
    assert not first.error and mail.spent_s == 2.0
    assert _take(queue) == (first, "a1")  # neither run holds a lane nor has had LONG_JOB_S: the oldest
    assert _take(queue) == (elsewhere, "c0")  # "mail" holds a lane, "other" none
    queue.finish(first, "a1", 1.5, reply={})  # 3.5 s in all: both of the run's jobs with chunks left fail,
    assert not queued.chunks and queued.running == 0  # the one no lane took yet too
    for job in (first, queued):
        with pytest.raises(PdfTooLargeError, match="its run used its 3 s"):
            queue.wait(job)
    late = _submit_for(queue, mail, _Pages("d", 1, run_budget_s=3.0))  # queued after: fails at once
    with pytest.raises(PdfTooLargeError, match="its run used its 3 s"):
        queue.wait(late)
    queue.finish(elsewhere, "c0", 2.0, reply={})
    assert elsewhere.error is None and len(elsewhere.chunks) == 4 and other.spent_s == 2.0


def test_a_job_cut_by_its_runs_budget_has_no_time_left_so_its_running_chunk_is_stopped_soon():
    """A reviewer's find: a running chunk of a job the run's budget failed kept its worker until the job's own
    budget (a page that takes minutes: up to timeout_s), its result thrown away."""
    now = [0.0]
    queue, mail = FairQueue(lanes=2, clock=lambda: now[0]), RunShare()
    first = _submit_for(queue, mail, _Pages("a", 1, budget_s=60.0, run_budget_s=3.0))
    second = _submit_for(queue, mail, _Pages("b", 1, budget_s=60.0, run_budget_s=3.0))
    assert {_take(queue)[0], _take(queue)[0]} == {first, second}
    now[0] = 3.5
    queue.finish(first, "a0", 3.5, reply={})  # its last chunk: done; the run is over its 3 s with b running
    assert first.error is None and isinstance(second.error, PdfTooLargeError)
    assert queue.left(second) <= 0  # was 56.5 s: the lane stops its worker after GRACE_S
    now[0] = 4.0
    assert queue.left(second) == -0.5
    queue.finish(second, "b0", 4.0, error=PdfTooLargeError("the lane's timeout", "b"))
    with pytest.raises(PdfTooLargeError, match="its run used its 3 s"):  # the first cause stays
        queue.wait(second)
    parse = _submit_for(queue, mail, _Pages("p", 1, priority=PRIORITY_PARSE))
    assert _take(queue)[0] is parse
    queue.finish(parse, "p0", 9.0, reply={})
    assert mail.spent_s == 7.5  # a parse's time is not the documents'


def test_a_spent_budget_fails_the_job_and_drops_its_queued_chunks():
    queue = FairQueue()
    job = _Pages("slow", 5, budget_s=1.0)
    queue.submit(job)
    job_, chunk = _take(queue)
    queue.finish(job, chunk, 1.5, reply={})
    assert not job.chunks and job.settled()
    with pytest.raises(PdfTooLargeError, match="slow took too long"):
        queue.wait(job)
    assert job.replies == ["slow0"]


class _Clock:
    """The queue's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_chunks_running_side_by_side_spend_the_budget_together():
    """A prober's PDF whose pages each take PDFium minutes ran on both workers with the whole 60 s each:
    122 worker-seconds of a 60 s budget, with other mail waiting. The budget left counts running chunks by
    their time so far, so two chunks side by side exhaust it in 30 s."""
    clock = _Clock()
    queue = FairQueue(lanes=2, clock=clock)
    job = _Pages("hostile", 6, budget_s=60.0, max_workers=2)
    queue.submit(job)
    first, second = queue.take(), queue.take()
    assert first is not None and second is not None and first[2] == second[2] == 60.0
    clock.now += 29.0
    assert queue.left(job) == pytest.approx(2.0)
    clock.now += 1.0
    assert queue.left(job) == pytest.approx(0.0)  # lanes kill their workers GRACE_S past this


def test_a_chunk_whose_sibling_ended_early_may_use_the_rest_of_the_budget():
    """A slow page alone: its empty sibling shard ends at once, and the page may take nearly the whole
    budget, not a fixed half of it."""
    clock = _Clock()
    queue = FairQueue(lanes=2, clock=clock)
    job = _Pages("slow-page", 2, budget_s=60.0, max_workers=2)
    queue.submit(job)
    slow, empty = queue.take(), queue.take()
    assert slow is not None and empty is not None
    clock.now += 0.5
    queue.finish(job, empty[1], 0.5, reply={})
    clock.now += 50.0
    assert queue.left(job) == pytest.approx(9.0)  # 60 - 0.5 (the sibling) - 50.5 (this one so far)
    queue.finish(job, slow[1], 50.5, reply={})
    assert job.spent_s == pytest.approx(51.0) and queue.left(job) == pytest.approx(9.0)


def test_a_job_alone_on_one_lane_gets_the_whole_budget_left():
    queue = FairQueue()
    job = _Pages("doc", 2, budget_s=8.0)
    queue.submit(job)
    first = queue.take()
    assert first is not None and first[2] == 8.0
    queue.finish(job, first[1], 3.0, reply={})
    second = queue.take()
    assert second is not None and second[2] == pytest.approx(5.0)


def test_an_error_of_one_chunk_fails_the_job_once_its_running_chunks_end():
    queue = FairQueue()
    job = _Pages("doc", 4, max_workers=2)
    queue.submit(job)
    first, second = _take(queue)[1], _take(queue)[1]
    queue.finish(job, first, 0.1, error=PdfTooLargeError("a limit", "doc"))
    assert not job.chunks and not job.settled()  # its other chunk still runs
    queue.finish(job, second, 0.1, reply={})
    assert job.settled() and job.replies == []  # a late reply of a failed job is not taken in
    with pytest.raises(PdfTooLargeError, match="a limit"):
        queue.wait(job)


def test_closing_fails_waiting_jobs_and_stops_the_lanes():
    queue = FairQueue()
    job = _Pages("doc", 2)
    queue.submit(job)
    queue.close(PdfTooLargeError("closed", "doc"))
    assert queue.take() is None
    with pytest.raises(PdfTooLargeError, match="closed"):
        queue.wait(job)
    queue.reopen()
    again = _Pages("again", 1)
    queue.submit(again)
    assert _take(queue) == (again, "again0")


def test_parses_leave_one_lane_for_documents():
    queue = FairQueue(lanes=2)
    mail_a, mail_b = _Pages("a", 1, priority=PRIORITY_PARSE), _Pages("b", 1, priority=PRIORITY_PARSE)
    doc = _Pages("doc", 2)
    for job in (mail_a, mail_b, doc):
        queue.submit(job)
    assert _take(queue) == (mail_a, "a0")
    assert _take(queue) == (doc, "doc0")  # mail b would take the last lane: it waits
    queue.finish(doc, "doc0", 0.1, reply={})
    assert _take(queue) == (doc, "doc1")  # still, while mail a holds a lane
    queue.finish(mail_a, "a0", 0.1, reply={})
    assert _take(queue) == (mail_b, "b0")
    single = FairQueue(lanes=1)  # one lane: a parse goes first, as before
    single.submit(doc := _Pages("doc", 1))
    single.submit(mail := _Pages("mail", 1, priority=PRIORITY_PARSE))
    assert _take(single) == (mail, "mail0")


def test_a_close_between_queueing_a_job_and_starting_lanes_never_strands_it(pdf, tmp_path, own_pool):
    limits = own_pool(912, workers=1, page_workers=1)
    pool = pool_for(limits)
    closers: list[threading.Thread] = []

    def then_close(step: Callable[..., Any]) -> Callable[..., Any]:
        """After the first of run()'s two steps (queue the job, start the lanes), close the pool from another
        thread (the fault: the test's only mock)."""
        def wrapper(*args: Any) -> Any:
            result = step(*args)
            if not closers:
                closers.append(threading.Thread(target=pool.close))
                closers[0].start()
                closers[0].join(timeout=2)  # a close not held off by run() ends here, between the steps
            return result
        return wrapper

    with mock.patch.object(pool._queue, "submit", then_close(pool._queue.submit)), \
            mock.patch.object(pool, "_start_lanes", then_close(pool._start_lanes)):
        job = _Background(pdf(fx.text_pdf(1)), tmp_path / "t.txt", limits)
        job.done.wait(timeout=120)
    stranded = not job.done.is_set()
    if stranded:
        pool.close()  # fails the stranded job, so its thread ends
    job.thread.join(timeout=120)
    closers[0].join(timeout=120)
    assert not stranded, "the job was queued with no lane to run it"
    assert job.error is None or isinstance(job.error, WorkerCrashedError), job.error
    assert ingest_pdf(pdf(fx.text_pdf(1), "again.pdf"), tmp_path / "again.txt", limits).pages == 1


def test_the_baseline_still_splits_whole_shards(pdf, tmp_path):
    limits = IngestConfig(fair_extraction=False)
    result = ingest_pdf(pdf(fx.text_pdf(4)), tmp_path / "t.txt", limits)
    reference = ingest_pdf(pdf(fx.text_pdf(4), "r.pdf"), tmp_path / "r.txt", replace(limits, page_workers=1))
    assert (result.pages, result.words) == (reference.pages, reference.words)
    assert (tmp_path / "t.txt").read_text() == (tmp_path / "r.txt").read_text()


def _send(service: Any, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=60) as smtp:
        assert not smtp.sendmail("alice@example.com", ["digest@pipeline.local"], raw)


def test_over_smtp_a_normal_mail_is_answered_while_a_slow_pdf_is_still_extracted(service_factory, smtp_sink):
    service = service_factory()
    work = service.settings.data_dir / "work"
    _send(service, fx.email_with([("slow.pdf", fx.slow_pdf(1200, draws=2000))], subject="slow one",
                                 message_id="<slow@example.com>"))
    assert wait_until(lambda: bool(list(work.glob("*/text/*.p*"))), 120)  # its extraction has begun
    _send(service, fx.email_with([("a.pdf", fx.text_pdf(1))], subject="normal one", message_id="<n@example.com>"))
    first, second = smtp_sink[0].wait_for(2, timeout=180)
    assert first["Subject"] == "Digest: normal one", "the normal mail's digest waited for the slow PDF"
    assert second["Subject"] == "Digest: slow one" and "longer than 15 s" in second.get_body(("plain",)).get_content()
    # the run's own dir, by its Message-ID: its attachments may already be shed, the run having ended
    slow_run = work / str(service.store.find_run(EMAIL_DIGEST, "<slow@example.com>").run_id)
    assert not list(slow_run.glob("text/*")), "the timed-out document left partial text behind"


@pytest.mark.parametrize("newcomer_s", [0.0, 1.0])
def test_a_run_past_newcomer_s_yields_to_a_newer_run_that_had_less(newcomer_s):
    """``[ingest] newcomer_s``: ten mails of slow PDFs each had ``LONG_JOB_S`` of the workers before a one-page
    mail after them had any. With it, a mail that had its first slice waits behind one that had none."""
    queue, crowd, newcomer = FairQueue(lanes=1), [RunShare() for _ in range(3)], RunShare()
    first = [_submit_for(queue, run, _Pages(f"h{i}", 5, newcomer_s=newcomer_s)) for i, run in enumerate(crowd)]
    taken = [_take(queue), _take(queue)]  # two of the crowd have a slice each (a lane serves the one holding none)
    assert taken == [(first[0], "h00"), (first[1], "h10")]
    for job, chunk in taken:
        queue.finish(job, chunk, 1.0, reply={})
    late = _submit_for(queue, newcomer, _Pages("n", 1, newcomer_s=newcomer_s))
    order = [_take(queue)[1] for _ in range(2)]
    # with it: the one that had nothing yet (the oldest such), then the newcomer, then the two that had 1 s;
    # without it, the oldest first, whatever each had
    expected = ["h20", "n0"] if newcomer_s else ["h01", "h11"]
    assert order == expected, (order, late)
