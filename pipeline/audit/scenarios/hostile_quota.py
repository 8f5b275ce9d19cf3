"""The audit's digest flood (a hostile-senders part): a client that claims one address as its envelope sender for
every mail, so the relay mails that address a digest of each. Whoever can connect can claim any sender; with
``[delivery] max_digests_per_hour`` off (0: before) every mail makes a digest to that address, and on
(after) at most the quota within the hour, the rest of the runs succeeding with a skipped digest. Both modes on a
serve of their own, delivering through a scripted relay (``fakerelay``: the relay is outside the machine).
"""

from __future__ import annotations

from pathlib import Path

from ... import store as s
from ..base.fakerelay import Relay, running
from ..base.faultcheck import Rows, burst_messages, wait_terminal
from ..base.harness import row
from ..base.serveproc import SENDER, Senders, serving


def digest_flood(work: Path, mails: int = 20, quota: int = 5, senders: int = 2, timeout_s: float = 240.0) -> Rows:
    """``mails`` small mails, all from one envelope sender (the senders' ``SENDER``), with the quota off and at
    ``quota``: the digests the relay took for that address, and the runs that ended and succeeded."""
    rows: Rows = []
    for mode, limit in (("before", 0), ("after", quota)):
        here = work / mode
        here.mkdir(parents=True, exist_ok=True)
        relay = Relay([{}])
        messages = burst_messages(f"flood-{mode}", mails, pdf_every=0)
        with running(relay):
            config = {"delivery": {"relay": relay.url, "max_digests_per_hour": limit}}
            with serving(here / "data", here, config) as serve, Senders(serve.port, messages, here, senders) as sent:
                acked = list(sent.wait(timeout_s).acked)
                runs = wait_terminal(serve.data_dir, acked, timeout_s)
        ended = [r for m in acked for r in runs.get(m, []) if r.state in (s.SUCCESS, s.FAILED)]
        tags = {"mode": mode, "quota": limit, "address": SENDER}
        rows += [row("digest_flood", "digests_to_one_address", len(relay.messages), "digests", 0, **tags),
                 row("digest_flood", "acked", len(acked), "messages", 0, **tags),
                 row("digest_flood", "runs_succeeded", sum(r.state == s.SUCCESS for r in ended), "runs", 0, **tags)]
    return rows
