"""Queue wait apart from run time (issue 14): a try's wait for a free extraction worker is recorded as wait_s."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from helpers import send_for_run_id, wait_until

from pipeline.audit.base import fixtures as fx
from pipeline.cli import main
from pipeline.config import Settings
from pipeline.stages.worker_pool import FairQueue, Job, WaitClock, timing_waits
from pipeline.store import Transition


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Two extraction workers, each document holding one to its end (the baseline, so a wait is long and
    certain); the MIME parse in the pipeline process, so it never waits for a worker."""
    return replace(settings, ingest=replace(settings.ingest, workers=2, page_workers=1, fair_extraction=False,
                                            parse_isolate=False, timeout_s=120.0))


def test_a_small_pdf_behind_two_slow_ones_records_its_wait_apart_from_its_run_time(service_factory):
    service = service_factory()
    work = service.settings.data_dir / "work"
    slow = [send_for_run_id(service, fx.email_with([(f"slow{i}.pdf", fx.slow_pdf(6))], subject=f"slow {i}",
                                                   message_id=f"<slow{i}@example.com>")) for i in range(2)]
    # both workers are busy with a slow document before the small one is sent
    assert wait_until(lambda: len(list(work.glob("*/text/000-*.txt"))) == 2, 120)
    small = send_for_run_id(service, fx.email_with([("small.pdf", fx.text_pdf(1))], subject="small",
                                                   message_id="<small@example.com>"))
    for run_id in [*slow, small]:
        assert service.engine.wait(run_id, timeout=300).state == "success"

    tasks = {t.task_id: t for t in service.store.get_tasks(small)}
    waited = tasks["ingest_pdf[0]"]
    assert waited.wait_s > 0
    assert waited.run_time_s < waited.wait_s, "the small PDF's run time still holds its wait for a worker"
    assert waited.wait_s < waited.duration_s
    for task_id in ("parse_email", "build_digest", "deliver"):  # none of them waits for a worker
        assert tasks[task_id].wait_s == 0.0, task_id


def test_show_prints_each_task_instances_wait_next_to_its_duration(store, settings, capsys):
    run = store.create_run("wf", {})[0]
    store.create_tasks(run.run_id, ["ingest_pdf[0]", "deliver"])
    store.record_transitions([Transition(run.run_id, "ingest_pdf[0]", "running", 1, 10.0),
                              Transition(run.run_id, "ingest_pdf[0]", "success", 1, 14.0, wait_s=3.5)])
    assert main(["--data-dir", str(settings.data_dir), "show", str(run.run_id)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "4.000s wait 3.500s" in next(line for line in lines if "ingest_pdf[0]" in line)
    assert "wait" not in next(line for line in lines if "deliver" in line)  # never ran: no duration, no wait


class _Sleeper(Job):
    """A job of one chunk the test runs by hand."""

    def __init__(self, name: str) -> None:
        super().__init__(name, budget_s=60.0, chunks=[name])

    def absorb(self, chunk, reply):
        return []


def test_the_queue_counts_a_jobs_wait_for_a_lane_on_the_submitting_tries_clock():
    queue = FairQueue(lanes=1)
    busy = _Sleeper("busy")
    queue.submit(busy)  # submitted outside any try: no clock
    assert queue.take()[0] is busy  # the one lane is taken
    clock = WaitClock()
    waiting = _Sleeper("waiting")
    with timing_waits(clock):
        queue.submit(waiting)
    assert wait_until(lambda: clock.seconds() > 0.05)  # a wait under way counts already
    queue.finish(busy, "busy", 0.1, reply={})
    assert queue.take()[0] is waiting
    stopped = clock.seconds()
    assert stopped > 0.05 and clock.seconds() == stopped  # stopped once a lane took it
    queue.finish(waiting, "waiting", 0.1, reply={})
    queue.wait(waiting)
    assert clock.seconds() == stopped


def test_a_job_that_fails_before_any_lane_takes_it_stops_its_clock():
    queue = FairQueue(lanes=1)
    clock = WaitClock()
    job = _Sleeper("doomed")
    with timing_waits(clock):
        queue.submit(job)
    closer = threading.Timer(0.05, queue.close, args=(RuntimeError("closed"),))
    closer.start()
    with pytest.raises(RuntimeError):
        queue.wait(job)
    closer.join()
    waited = clock.seconds()
    assert waited >= 0.04 and clock.seconds() == waited
