"""The audit's mail loops (a part of ``bad_input``): digests that come back to the gateway as new mail, each
way a loop can start in the wild, and whether one does.

The relay is the gateway itself, or a responder that ignores RFC 3834 answers every digest
(``base.responder``: a ticket system, a rule forwarding each mail as an attachment). One mail should make 2
runs (the mail and what came back, which gets no digest of its own); a loop keeps adding runs.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ... import store as s
from ..base import fixtures as fx
from ..base import responder
from ..base.faultcheck import TERMINAL_RUN_STATES, Rows, runs_by_message
from ..base.harness import row
from ..base.serveproc import Senders, ServeProcess, free_port, toml_text

LOOP_WATCH_S = 20.0  # long enough to see a loop grow: before stages.autoreply, 624 runs per mail (slas.toml)


def mail_loop(work: Path, mails: int = 3, quiet_s: float = 1.5, timeout_s: float = LOOP_WATCH_S) -> Rows:
    """Digests that come back as new mail, each way a loop can start (``LOOPS``): send ``mails`` mails and
    count runs until none has been added for ``quiet_s`` and all ended (or ``timeout_s``): 2 per mail (the mail
    and what came back, which gets no digest of its own), or a loop that keeps growing."""
    return [r for how in LOOPS for r in _one_loop(work / how, how, mails, quiet_s, timeout_s)]


# how a digest comes back: the relay is the gateway itself, or a responder that ignores RFC 3834 answers it (a
# ticket system; a rule forwarding it as an attachment: base.responder), each answer capped at 5 (a real loop
# has no cap: 21 digests of one mail in 6 s before the answers were recognised)
LOOPS = ("gateway", *responder.HOWS)


def _one_loop(work: Path, how: str, mails: int, quiet_s: float, timeout_s: float) -> Rows:
    serve = ServeProcess(work / "data", work)
    relay_port = serve.port if how == "gateway" else free_port()
    serve.config_path.write_text(toml_text({"delivery": {"relay": f"smtp://127.0.0.1:{relay_port}"}}))
    messages = [(f"<loop-{how}-{i}@faults.audit>", fx.email_with(
        [("a.pdf", fx.text_pdf(1))], sender=f"sender{i}@example.com", message_id=f"<loop-{how}-{i}@faults.audit>"))
        for i in range(mails)]
    runs: list[s.Run] = []
    with contextlib.ExitStack() as stack:
        answering = None if how == "gateway" else stack.enter_context(
            responder.responding(serve.port, relay_port, how, cap=5 * mails))
        try:
            serve.start()
            with Senders(serve.port, messages, work, 1) as sending:
                sending.wait(timeout_s)
            runs = _until_quiet(serve.data_dir, quiet_s, timeout_s)
        finally:
            serve.kill()
    ended = sum(r.state in TERMINAL_RUN_STATES for r in runs)
    digests = len(answering.digests) if answering else float("nan")
    return [row("mail_loop", "runs_per_mail", len(runs) / mails, "runs", 0, mails=mails, watched_s=timeout_s,
                loop=how),
            row("mail_loop", "runs_not_ended", len(runs) - ended, "runs", 0, mails=mails, loop=how),
            *([] if how == "gateway" else [row("mail_loop", "digests_per_mail", digests / mails, "digests", 0,
                                               mails=mails, loop=how)])]


def _until_quiet(data_dir: Path, quiet_s: float, timeout_s: float) -> list[s.Run]:
    """Every run in serve's store once none has been added for ``quiet_s`` and all ended (or ``timeout_s``)."""
    deadline, last, quiet_since = time.monotonic() + timeout_s, -1, time.monotonic()
    runs: list[s.Run] = []
    while time.monotonic() < deadline:
        runs = [r for found in runs_by_message(data_dir).values() for r in found]
        if len(runs) != last:
            last, quiet_since = len(runs), time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s and all(r.state in TERMINAL_RUN_STATES for r in runs):
            break
        time.sleep(0.1)
    return runs
