"""Mails share the extraction workers as mails (``[ingest] fair_by_mail``): one mail's many PDFs neither take
every runner thread nor every turn at the workers from the mails that come after it."""

from __future__ import annotations

import smtplib
import time
from dataclasses import replace
from typing import Any

import pytest
from helpers import wait_until

from pipeline import store as s
from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig, Settings
from pipeline.workflows import EMAIL_DIGEST, email_digest_dag

HOSTILE_PDFS = 10


@pytest.fixture
def mail_timeout_s() -> float:
    """``[ingest] mail_timeout_s``: the default, unless a test is parametrized with its own."""
    return IngestConfig.mail_timeout_s


@pytest.fixture
def thread_workers() -> int:
    """``[runner] thread_workers``: the tests' 8, unless a test is parametrized with its own."""
    return 8


@pytest.fixture
def settings(settings: Settings, mail_timeout_s: float, thread_workers: int) -> Settings:
    """A short budget per document: each hostile PDF stops after 2 s of worker time, ten of them after 10 s
    of both workers."""
    return replace(settings, ingest=replace(settings.ingest, timeout_s=2.0, mail_timeout_s=mail_timeout_s),
                   runner=replace(settings.runner, thread_workers=thread_workers))


def _send(service: Any, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=60) as smtp:
        assert not smtp.sendmail("alice@example.com", ["digest@pipeline.local"], raw)


def _ingests(store: s.DAGRunStore, run_id: int) -> list[s.TaskRun]:
    return [t for t in store.get_tasks(run_id) if t.task_id.startswith("ingest_pdf[")]


def test_a_one_pdf_mail_is_not_queued_behind_every_pdf_of_a_mail_of_many(service_factory):
    service = service_factory()
    store = service.store
    slow = fx.slow_pdf(1200, draws=2000)  # minutes of PDFium: each one runs its whole 2 s budget
    _send(service, fx.email_with([(f"slow{i}.pdf", fx.distinct(slow, i)) for i in range(HOSTILE_PDFS)], subject="many",
                                 message_id="<many@example.com>"))
    assert wait_until(lambda: (run := store.find_run(EMAIL_DIGEST, "<many@example.com>")) is not None
                      and any(t.state == s.RUNNING for t in _ingests(store, run.run_id)), 60)
    _send(service, fx.email_with([("a.pdf", fx.text_pdf(1))], subject="one", message_id="<one@example.com>"))
    many, one = (service.engine.wait(store.find_run(EMAIL_DIGEST, mid).run_id, timeout=240)
                 for mid in ("<many@example.com>", "<one@example.com>"))
    assert one.state == s.SUCCESS and one.reason is None
    assert many.state == s.SUCCESS and many.reason == f"partial: {HOSTILE_PDFS} of {HOSTILE_PDFS} ingest_pdf " \
                                                      "failed (too_large)"
    assert one.ended_at is not None
    ended_first = [t for t in _ingests(store, many.run_id) if t.ended_at is not None and t.ended_at < one.ended_at]
    # by mail: the one-PDF mail takes the next free worker (two of the ten may end meanwhile, on a busy machine
    # a few more); by PDF, it waited for all ten to start, at least eight of them to end
    assert len(ended_first) <= HOSTILE_PDFS // 2, f"{len(ended_first)} of the many PDFs ended first"
    held = max(sum(t.started_at is not None and t.started_at <= u.started_at and (t.ended_at or 1e18) > u.started_at
                   for t in _ingests(store, many.run_id)) for u in _ingests(store, many.run_id))
    assert held <= service.settings.ingest.workers  # never more of its PDFs at once than workers



@pytest.mark.parametrize("mail_timeout_s", [3.0])
def test_a_mails_documents_share_one_budget_and_those_past_it_fail_without_being_read(service_factory):
    """``[ingest] mail_timeout_s`` 3 s with 2 s per document: ten slow PDFs cost about 4 s of worker time, not 20."""
    service = service_factory()
    assert service.settings.ingest.mail_timeout_s == 3.0
    store = service.store
    slow = fx.slow_pdf(1200, draws=2000)
    _send(service, fx.email_with([(f"slow{i}.pdf", fx.distinct(slow, i)) for i in range(HOSTILE_PDFS)], subject="many",
                                 message_id="<capped@example.com>"))
    assert wait_until(lambda: store.find_run(EMAIL_DIGEST, "<capped@example.com>") is not None, 60)
    run = service.engine.wait(store.find_run(EMAIL_DIGEST, "<capped@example.com>").run_id, timeout=240)
    assert run.state == s.SUCCESS and run.reason in (
        f"partial: {HOSTILE_PDFS} of {HOSTILE_PDFS} ingest_pdf failed (not_read)",
        f"partial: {HOSTILE_PDFS} of {HOSTILE_PDFS} ingest_pdf failed (not_read, too_large)")  # two may time out first
    tasks = _ingests(store, run.run_id)
    cut = [t for t in tasks if t.error_type == "not_read"]
    assert len(cut) >= HOSTILE_PDFS - 4, [t.error_message for t in tasks]
    assert all("used all the time one mail may take (3 s of worker time)" in (t.error_message or "") for t in cut)
    assert not list((service.settings.data_dir / "work" / str(run.run_id)).glob("text/*"))  # no partial text left



@pytest.mark.parametrize("thread_workers", [4])
def test_mails_of_slow_pdfs_waiting_for_a_worker_hold_no_thread_the_next_mail_needs(service_factory):
    """``[runner] extract_pool``: three mails of slow PDFs, two of each extracting or waiting for a worker at a time,
    would hold all four runner threads; the next mail's parse and PDF would wait in the threads' queue behind
    theirs, and most of their PDFs would end first."""
    service = service_factory()
    store = service.store
    assert service.settings.runner.thread_workers == 4 and service.settings.runner.extract_pool
    slow = fx.slow_pdf(1200, draws=2000)
    crowd = [f"<crowd{i}@example.com>" for i in range(3)]
    for message_id in crowd:
        _send(service, fx.email_with([(f"slow{j}.pdf", fx.distinct(slow, j)) for j in range(4)], message_id=message_id))
    def waiting() -> int:
        return sum(t.state == s.RUNNING for mid in crowd if (run := store.find_run(EMAIL_DIGEST, mid))
                   for t in _ingests(store, run.run_id))

    # four on threads at least (six with the pool); then the rest of the crowd's submissions settle
    assert wait_until(lambda: waiting() >= 4, 60), f"{waiting()} of the crowd's PDFs extracting or waiting"
    time.sleep(0.5)
    _send(service, fx.email_with([("a.pdf", fx.text_pdf(1))], subject="one", message_id="<after@example.com>"))
    one = service.engine.wait(store.find_run(EMAIL_DIGEST, "<after@example.com>").run_id, timeout=240)
    assert one.state == s.SUCCESS and one.ended_at is not None
    runs = [service.engine.wait(store.find_run(EMAIL_DIGEST, mid).run_id, timeout=240) for mid in crowd]
    ended_first = [t for run in runs for t in _ingests(store, run.run_id)
                   if t.ended_at is not None and t.ended_at < one.ended_at]
    # its PDF takes the next free worker: the two being extracted may end first, on a busy machine a few more
    assert len(ended_first) <= 4, f"{len(ended_first)} of the crowd's 12 PDFs ended first"


def test_ingest_pdf_waits_on_threads_of_its_own_only_where_a_mails_pdfs_are_released_a_few_at_a_time(settings):
    """Without fair_by_mail every PDF of a mail is submitted at once: one mail of 200 PDFs would take all the extract
    threads and the others' PDFs would queue behind it first come, first served (a reviewer's find)."""
    def executor(**changes: Any) -> str:
        ingest = replace(settings.ingest, **{k: v for k, v in changes.items() if k != "extract_pool"})
        runner = replace(settings.runner, extract_pool=changes.get("extract_pool", True))
        dag = email_digest_dag(replace(settings, ingest=ingest, runner=runner))
        return next(t.executor for t in dag.tasks if t.id == "ingest_pdf")

    assert executor() == "extract"
    assert executor(extract_pool=False) == executor(fair_by_mail=False) == executor(isolate=False) == "thread"
