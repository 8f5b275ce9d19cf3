"""Fair sharing of the worker processes between documents (issue 11, item 5).

Before, a document took its workers for as long as it needed them: one slow
hostile PDF split across both workers held them for its whole timeout, and a
2 KB PDF that came a second later waited a minute. Here every piece of work is
a ``Job`` cut into chunks (a few pages, or one MIME parse), and a free worker
slot (a lane) always takes the next chunk of the job whose run (mail) holds
the fewest lanes right now, then of the job that holds the fewest; ties go to a
parse (it unblocks a whole run), then to a run (all its jobs so far), then to a
job, that has had less worker time by level: under ``newcomer_s`` (the job's, from
``[ingest] newcomer_s``, about one slice), under ``LONG_JOB_S``, or more; then to
the oldest. (With the one level at ``LONG_JOB_S``, ten mails of slow PDFs each had
5 s of the workers before a one-page mail after them had any: the audit's
``head_of_line_crowd`` measures it with ``newcomer_s`` and ``[runner] extract_pool``
both off and both on.)
(Fair by job alone, a mail of several slow PDFs took both lanes from a
one-page PDF mailed a second after it, which waited while they all took their
turns: the audit's hostile part ``head_of_line_many`` measures both ways. A
job's run is its try's ``WaitClock.owner``, a ``RunShare``; a job without one,
such as a shard of the baseline below, is a run of its own.) (Ties to
the oldest alone made it first come, first served as soon as as many long
documents as workers were queued: a 2-page PDF waited 97 s behind six dense
ones. Ties to the least worker time alone shared the workers round robin
between documents of a second each, and every one of them ended later: the
end-to-end median of mails with a 1 MB PDF went from 1.6 to 2.8 s.) A job
holds at most ``max_workers`` lanes, and a second one only when no job of a run
holding fewer lanes, nor of its own run holding fewer itself, has a chunk
waiting. A chunk runs for a short time
slice, so a newcomer waits at most about one slice for a lane.

A parse is one request that cannot be cut into slices, so parses together hold
at most all lanes but one (``lanes - 1``; with a single lane, that lane): two
hostile mails parsed for their whole timeout leave a lane for PDF chunks, and
the other parses wait. Below that cap a parse keeps its priority.

Time is a budget per job, not a wall clock: ``budget_s`` is the worker time a
job may use in total (the sum of its chunks' durations, parallel chunks
counted each), so waiting for a lane under load costs a document nothing. The
budget left (``left``) counts the chunks running now by their time so far, and
a lane kills its worker (replaced) once that is below ``-GRACE_S``: chunks
running side by side spend it together, and a chunk whose sibling ended early
may use the rest (a prober's 21 KB PDF whose pages each take PDFium minutes
held both workers for the whole 60 s each, 122 worker-seconds, while other mail
waited; a fixed half for each would cut short a slow page alone). Once the budget
is spent with chunks left, the job fails with ``timeout_error()`` and its
queued chunks are dropped. The first error of any chunk fails the job the
same way; chunks already running end their slice and their results are
thrown away. A run's documents also share a budget (``run_budget_s``, from
``[ingest] mail_timeout_s``; parses do not count): once they have used it in
all, its jobs not done fail with ``run_budget_error()``, their running chunks'
workers stopped ``GRACE_S`` later, and so does every job it queues after. A
mail of a thousand tiny slow PDFs cost a thousand budgets before.

Queue wait (issue 14): a try's duration included its time waiting for a lane
(a 200 KB PDF "took" 18.8 s behind two slow ones). A task try that runs inside
``timing_waits(clock)`` has the wait of each job it submits counted on its
``WaitClock``, from the submission until a lane first takes a chunk of the job;
the runner reads the clock when the try ends and stores it as ``wait_s``.

This module knows nothing of processes or PDFs: the pool in ``extract_worker``
runs the lanes, and the job subclasses say what a chunk's request is and what
its reply means.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PRIORITY_PARSE, PRIORITY_EXTRACT = 0, 1
LONG_JOB_S = 5.0  # worker time after which a job yields ties to jobs that have had less (a few slices)


class RunShare:
    """One run's part in the lanes: the jobs of its tries share them as one (``FairQueue``), and the worker time
    they have used in all (``spent_s``, jobs that ended included) is held against ``run_budget_s`` of each job."""

    def __init__(self) -> None:
        self.spent_s = 0.0


class WaitClock:
    """Seconds one task try waited for a lane; read at any time, it includes a wait still under way.

    ``owner``: the run the try belongs to, if any (its ``RunShare``).
    """

    def __init__(self, owner: RunShare | None = None) -> None:
        self.owner = owner
        self._lock = threading.Lock()
        self._waited = 0.0
        self._since: float | None = None  # monotonic start of the wait under way

    def start(self) -> None:
        """A job of the try was queued: its wait begins (if none is under way)."""
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()

    def stop(self) -> None:
        """A lane took the job's first chunk, or the job ended unstarted: add the wait under way."""
        with self._lock:
            if self._since is not None:
                self._waited += time.monotonic() - self._since
                self._since = None

    def seconds(self) -> float:
        """The waits so far, one still under way included (a try that timed out in the queue waited all along)."""
        with self._lock:
            return self._waited + (0.0 if self._since is None else time.monotonic() - self._since)


_this_thread = threading.local()  # .clock: the WaitClock of the task try running on this thread, if any


@contextmanager
def timing_waits(clock: WaitClock) -> Iterator[WaitClock]:
    """Count the lane waits of the jobs this thread submits inside the block on ``clock``."""
    outer = getattr(_this_thread, "clock", None)
    _this_thread.clock = clock
    try:
        yield clock
    finally:
        _this_thread.clock = outer


class Job:
    """One unit of work shared fairly: its queued chunks, its lanes in use, its spent budget and its outcome."""

    what = "document"  # what the job reads, for messages ("the document needed memory over ...")

    def __init__(self, name: str, budget_s: float, chunks: list[Any], max_workers: int = 1,
                 priority: int = PRIORITY_EXTRACT, by_run: bool = True, run_budget_s: float | None = None,
                 newcomer_s: float = 0.0) -> None:
        """``by_run``: share the lanes with the other jobs of its run, as one (False: as a run of its own).
        ``run_budget_s``: fail the job (``run_budget_error``) once its run's jobs have used that much worker time
        in all, checked when it is queued and between its chunks; None: no such bound. ``newcomer_s``: below
        that much worker time, its run and itself go ahead of those that have had more (0: only ``LONG_JOB_S``)."""
        self.name, self.budget_s, self.max_workers, self.priority = name, budget_s, max(1, max_workers), priority
        self.by_run, self.run_budget_s, self.newcomer_s = by_run, run_budget_s, newcomer_s
        self.chunks: deque[Any] = deque(chunks)
        self.running = 0
        self.spent_s = 0.0
        self.started: list[tuple[Any, float]] = []  # each running chunk and when it started (the queue's clock)
        self.error: BaseException | None = None
        self.seq = 0  # submission order, set by the queue
        self.clock: WaitClock | None = None  # of the task try that submitted the job, if it counts its waits
        self.waiting = False  # queued, and no lane has taken a chunk of it yet
        self.cut_at: float | None = None  # when its run's budget failed it (the queue's clock): running chunks stop
        self.owner: RunShare | Job = self  # the run the job is for (its try's WaitClock says), or the job alone

    def request(self, chunk: Any, remaining_s: float) -> dict[str, Any]:
        """The JSON request that runs ``chunk`` in a worker, given the budget left."""
        raise NotImplementedError

    def absorb(self, chunk: Any, reply: dict[str, Any]) -> list[Any]:
        """Take in a chunk's successful reply; return follow-up chunks to run before the queued ones."""
        raise NotImplementedError

    def timeout_error(self) -> BaseException:
        """The error for a job whose budget is spent (or whose chunk ran past it)."""
        raise NotImplementedError

    def run_budget_error(self, run_budget_s: float) -> BaseException:
        """The error for a job whose run used ``run_budget_s`` of worker time before it could end."""
        raise NotImplementedError

    def run_spent_s(self) -> float:
        """Worker time its run has used (the job's own, for a job that is a run of its own)."""
        return self.owner.spent_s

    def level(self, spent_s: float) -> int:
        """0 under ``newcomer_s`` of worker time, 1 up to ``LONG_JOB_S``, 2 past it: lower goes first."""
        return 0 if spent_s < self.newcomer_s else 1 if spent_s <= LONG_JOB_S else 2

    def over_run_budget(self) -> bool:
        return self.run_budget_s is not None and self.run_spent_s() >= self.run_budget_s

    def settled(self) -> bool:
        """True when nothing of the job runs and nothing more will: it succeeded or failed."""
        return self.running == 0 and (self.error is not None or not self.chunks)


def _without_one(started: list[tuple[Any, float]], chunk: Any) -> list[tuple[Any, float]]:
    """``started`` without the first entry of ``chunk`` (the object itself: two chunks may be equal)."""
    at = next((i for i, (c, _) in enumerate(started) if c is chunk), None)
    return started if at is None else started[:at] + started[at + 1:]


class FairQueue:
    """The jobs waiting for lanes, and the rule that picks which chunk a free lane runs next."""

    def __init__(self, lanes: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        """``lanes``: how many lanes take from this queue; parses may hold all of them but one."""
        self._parse_cap = max(1, lanes - 1)
        self._clock = clock
        self._cond = threading.Condition()
        self._jobs: list[Job] = []
        self._seq = itertools.count()
        self._closed: BaseException | None = None  # the error jobs get while closed

    def submit(self, job: Job) -> None:
        """Queue a job's chunks for the lanes."""
        with self._cond:
            job.seq = next(self._seq)
            job.clock, job.waiting = getattr(_this_thread, "clock", None), True
            if job.by_run and job.clock is not None and job.clock.owner is not None:
                job.owner = job.clock.owner
            if job.clock is not None:
                job.clock.start()
            self._jobs.append(job)
            if self._closed is not None:
                self._fail(job, self._closed)
            elif job.over_run_budget():
                self._cut(job)
            self._cond.notify_all()

    def take(self) -> tuple[Job, Any, float] | None:
        """Block until a chunk may run; return (job, chunk, budget left), or None once the queue is closed."""
        with self._cond:
            while self._closed is None:
                parsing = sum(j.running for j in self._jobs if j.priority == PRIORITY_PARSE)
                ready = [j for j in self._jobs if j.chunks and j.error is None and j.running < j.max_workers
                         and (j.priority != PRIORITY_PARSE or parsing < self._parse_cap)]
                if ready:
                    job = min(ready, key=self._turn_key())
                    left = self._left(job)
                    job.running += 1
                    self._started(job)
                    chunk = job.chunks.popleft()
                    job.started.append((chunk, self._clock()))
                    return job, chunk, max(0.0, left)
                self._cond.wait()
            return None

    def finish(self, job: Job, chunk: Any, elapsed_s: float, reply: dict[str, Any] | None = None,
               error: BaseException | None = None) -> None:
        """Record how a chunk ended: its reply (absorbed unless the job failed meanwhile) or its error."""
        with self._cond:
            job.running -= 1
            job.spent_s += elapsed_s
            if isinstance(job.owner, RunShare) and job.priority != PRIORITY_PARSE:  # the budget is the documents'
                job.owner.spent_s += elapsed_s
            job.started = _without_one(job.started, chunk)
            if error is None and job.error is None and reply is not None:
                try:
                    job.chunks.extendleft(reversed(job.absorb(chunk, reply)))
                except Exception as exc:  # a reply that does not fit the job is its failure, not the lane's
                    error = exc
            if error is not None:
                self._fail(job, error)
            elif job.chunks and job.spent_s >= job.budget_s:
                self._fail(job, job.timeout_error())
            if job.over_run_budget():  # every job of the run with chunks queued or running ends now
                for other in self._jobs:
                    if other.owner is job.owner and (other.chunks or other.running) and other.over_run_budget():
                        self._cut(other)
            self._cond.notify_all()

    def _turn_key(self) -> Callable[[Job], tuple[Any, ...]]:
        """The order of the ready jobs (the lock held): fewest lanes held by the job's run, then by the job, then a
        parse, then a run and a job on a lower ``level`` of worker time, then the oldest."""
        lanes: dict[object, int] = {}
        for j in self._jobs:
            lanes[j.owner] = lanes.get(j.owner, 0) + j.running
        return lambda j: (lanes[j.owner], j.running, j.priority, j.level(j.run_spent_s()), j.level(j.spent_s),
                          j.seq)

    def left(self, job: Job) -> float:
        """Seconds of ``job``'s budget left, its running chunks counted by their time so far (may be < 0)."""
        with self._cond:
            return self._left(job)

    def _left(self, job: Job) -> float:
        """A job cut by its run's budget has none left since then: its running chunks' workers are stopped after
        ``GRACE_S`` (a page that takes minutes would hold its worker to the job's own budget)."""
        now = self._clock()
        left = job.budget_s - job.spent_s - sum(now - started for _, started in job.started)
        return left if job.cut_at is None else min(left, job.cut_at - now)

    def _cut(self, job: Job) -> None:
        """Fail ``job`` for its run's budget, once (a job that failed for another cause keeps that error)."""
        if job.error is None:
            assert job.run_budget_s is not None
            job.cut_at = self._clock()
            self._fail(job, job.run_budget_error(job.run_budget_s))

    def wait(self, job: Job) -> None:
        """Block until ``job`` is settled and forget it; raise its error if it failed."""
        with self._cond:
            self._cond.wait_for(job.settled)
            self._jobs.remove(job)
            self._started(job)  # a job failed before any lane took it waited until now
        if job.error is not None:
            raise job.error

    def close(self, error: BaseException) -> None:
        """Fail every job with ``error`` and let the lanes' ``take`` return None."""
        with self._cond:
            self._closed = error
            for job in self._jobs:
                self._fail(job, error)
            self._cond.notify_all()

    def reopen(self) -> None:
        """Accept work again after ``close`` (a pool is reusable after it stopped its workers)."""
        with self._cond:
            self._closed = None

    @staticmethod
    def _started(job: Job) -> None:
        """End the job's wait for a lane (once): from now on its try is working, not waiting."""
        if job.waiting:
            job.waiting = False
            if job.clock is not None:
                job.clock.stop()

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.error is None:
            job.error = error
        job.chunks.clear()
