"""A relay that hangs after the data, under a real ``python -m pipeline serve``, judged like the other faults
(``faults``, ``faultcheck``).

A prober's relay took the data and never answered the final dot: each session then waits 10 minutes (RFC 5321),
and relay sessions ran on the task threads every run's parse and ingest use, so with 16 hung no mail that came
after was parsed, while serve answered 250. They now run on ``[runner] io_workers`` threads of their own.

Here every session hangs: the first ``thread_workers`` mails (16) fill what sessions serve opens (``io_workers``,
8; all 16 on the shared threads before); then ``messages`` more are sent, and ``hung_s`` later the rows say how many
of those were parsed and digested while the relay hung (each then waits for a session), and, once the relay
answers, whether every digest arrived once. Runs waiting for delivery count against ``[engine] max_active_runs``
(32): past it, later mail waits queued, accepted and spooled.
"""

from __future__ import annotations

import time
from pathlib import Path

from ... import store as s
from ...config import RunnerConfig
from ..base.fakerelay import Relay, running
from ..base.faultcheck import Rows, burst_messages, figures, judge, task_instances
from ..base.harness import row
from ..base.serveproc import Replies, Senders, serving

SETTLED_S = 1.0  # the hung sessions' count unchanged this long: serve opens no more


def relay_hung(work: Path, messages: int = 16, senders: int = 2, hung_s: float = 10.0,
               timeout_s: float = 300.0) -> Rows:
    """Serve delivering through a relay whose sessions hold their final dot's reply until ``hung_s`` after the
    first ``thread_workers`` mails' sessions hung (then 250); ``messages`` small mails sent meanwhile."""
    fault = "relay_hung"
    first = burst_messages("relayhung-first", RunnerConfig().thread_workers, pdf_every=0)
    later = burst_messages("relayhung-later", messages, pdf_every=0)
    mailbox_dir = work / "relay-mailbox"
    relay = Relay([{"hold": "1"}], mailbox=mailbox_dir)
    with running(relay), serving(work / "data", work, {"delivery": {"relay": relay.url}}) as serve:
        with Senders(serve.port, first, _dir(work / "first"), senders) as sending_first:
            held = _settled(relay, timeout_s)
            hung_at = time.time()
            with Senders(serve.port, later, _dir(work / "later"), senders) as sending_later:
                time.sleep(max(0.0, hung_s))
                digested = sum(_digested(serve.data_dir, mid) for mid, _ in later)
                relay.release.set()
                released = time.time()
                replies = Replies(sorted([*sending_first.wait(timeout_s).events,
                                          *sending_later.wait(timeout_s).events], key=lambda e: e[2]))
        verdict = judge(serve.data_dir, replies, len(first) + messages, timeout_s, outbox=mailbox_dir)
    return figures(fault, verdict, replies, released, hung_s=hung_s) + [
        row(fault, "sessions_hung", held, "sessions", 0),
        row(fault, "digested_while_hung", digested, "messages", 0, of=messages,
            hung_for_s=round(released - hung_at, 1))]


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _settled(relay: Relay, timeout_s: float) -> int:
    """Wait until some sessions hang and their count holds for ``SETTLED_S``; return it."""
    deadline = time.monotonic() + timeout_s
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if relay.held != seen:
            seen, since = relay.held, time.monotonic()
        elif seen > 0 and time.monotonic() - since >= SETTLED_S:
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"no relay session hung within {timeout_s} s")


def _digested(data_dir: Path, message_id: str) -> bool:
    """Whether the latest run of ``message_id`` has built its digest."""
    _, digests = task_instances(data_dir, message_id, "build_digest")
    return bool(digests) and digests[0]["state"] == s.SUCCESS
