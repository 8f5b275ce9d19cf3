"""The audit's pipelining flood (a hostile-senders part): a normal client's mail beside a client that writes
commands without pause, with ``[gateway] fair_share_replies`` off (aiosmtpd's way: a session answers every
line it has buffered before another runs) and on (the default), interleaved; and a flood of commands that carry
no mail, which ``[gateway] max_junk_commands`` ends with 421.

A prober found one such client held every other sender: a normal mail waited 9 s beside it, and 45 of them
kept a client's EHLO unanswered until its idle timer closed it.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path
from typing import cast

from ..base import fixtures as fx
from ..base.faultcheck import Rows
from ..base.harness import percentile, row
from ..base.serveproc import serving, timed_sends
from .hostile_checks import in_clients

NESTED_MAIL = b"MAIL FROM:<flood@hostile.audit>\r\n"  # after the first, each is answered 503 (nested MAIL)
FLOOD_CAP_S = 300.0  # a flooder stops by itself after this, whatever happens to the normal client


def pipelining(work: Path, sends: int = 10, reps: int = 2, chunk_lines: int = 5000) -> Rows:
    """For each repetition, both modes in turn (before: ``fair_share_replies = 0``; after: the default), each on a
    serve of its own: one flooder pipelines ``chunk_lines`` nested MAIL commands per write, reading its replies,
    while a normal client sends ``sends`` small mails, each on a new connection (connect → final 250).
    The junk limit is lifted there (it would close the flooder after 100 refusals); then, with the default
    limits, NOOPs and then refused commands are pipelined until the gateway closes the session."""
    rows: Rows = []
    for rep in range(reps):
        for mode, fair in (("before", 0), ("after", None)):
            # the junk limit lifted: it closes this flooder after 100 refusals, and fairness is what is measured
            gateway: dict[str, object] = {"max_junk_commands": 1_000_000}
            if fair is not None:
                gateway["fair_share_replies"] = fair
            config = {"gateway": gateway}
            with serving(work / f"data-{mode}-{rep}", work, config) as serve:
                stop = work / f"stop-{mode}-{rep}"
                mails = [fx.email_with([], subject="normal client", message_id=f"<pipe-{mode}-{rep}-{i}@hostile.audit>")
                         for i in range(sends)]
                flooded, timed = in_clients(_client, [("flood", serve.port, str(stop), chunk_lines),
                                                      ("send", serve.port, str(stop), mails)])
            flood_replies, sent = cast(int, flooded), cast(list[tuple[str, float]], timed)
            tags = {"mode": mode, "chunk_lines": chunk_lines}
            latencies = [seconds * 1000 for reply, seconds in sent if reply == "250"]
            rows += [row("pipelining", "normal_latency_ms", ms, "ms", rep, send=i, **tags)
                     for i, ms in enumerate(latencies)]
            rows += [row("pipelining", "normal_p95_ms", percentile(latencies, 95) if latencies else math.nan, "ms",
                         rep, **tags),
                     row("pipelining", "normal_acked", len(latencies), "mails", rep, sends=sends, **tags),
                     row("pipelining", "flood_replies", flood_replies, "replies", rep, **tags)]
    with serving(work / "data-junk", work) as serve:  # the default limits
        answered, last = in_clients(junk_flood, [(serve.port, b"NOOP")])[0]
        refused, last_refused = in_clients(junk_flood, [(serve.port, NESTED_MAIL.strip())])[0]
    return rows + [row("pipelining", "junk_answered", answered, "commands", 0, last_reply=last[:80]),
                   row("pipelining", "junk_closed_421", float(last.startswith("421 4.7.0")), "bool", 0),
                   row("pipelining", "refusals_answered", refused, "commands", 0, last_reply=last_refused[:80]),
                   row("pipelining", "refusals_closed_421", float(last_refused.startswith("421 4.7.0")), "bool", 0)]


def _client(kind: str, port: int, stop_path: str, arg: object) -> object:
    """One client process: the flooder (returns the replies it read) or the normal client (its timed sends;
    it creates ``stop_path`` when done, which stops the flooder)."""
    if kind == "flood":
        return flood(port, stop_path, int(arg))  # type: ignore[call-overload]
    time.sleep(0.5)  # the flood is under way
    try:
        return timed_sends(port, list(arg))  # type: ignore[call-overload]
    finally:
        Path(stop_path).touch()


def flood(port: int, stop_path: str, chunk_lines: int) -> int:
    """Write nested MAIL commands without pause until ``stop_path`` exists, reading every reply on a thread of
    its own (a flooder that does not read is cut off by the command timeout); return the replies read."""
    replies = [0]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.recv(512)  # the greeting
        reader = threading.Thread(target=_count_replies, args=(sock, replies), daemon=True)
        reader.start()
        chunk = NESTED_MAIL * chunk_lines
        deadline = time.monotonic() + FLOOD_CAP_S
        try:
            while not Path(stop_path).exists() and time.monotonic() < deadline:
                sock.sendall(chunk)
        except OSError:
            pass  # closed by the gateway
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already
        reader.join(10)
    return replies[0]


def _count_replies(sock: socket.socket, replies: list[int]) -> None:
    try:
        while chunk := sock.recv(1 << 16):
            replies[0] += chunk.count(b"\r\n")
    except OSError:
        pass


def junk_flood(port: int, command: bytes, count: int = 1000) -> tuple[int, str]:
    """Pipeline ``count`` of ``command`` after one MAIL FROM (so a second MAIL is refused 503); return how many
    were answered before the last reply (421 once the limit hit), and that last reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock, sock.makefile("rb") as replies:
        replies.readline()  # the greeting
        sock.sendall(NESTED_MAIL)
        replies.readline()  # 250
        sock.sendall(command + b"\r\n" + (command + b"\r\n") * (count - 1))
        answered, last = -1, ""
        try:
            while line := replies.readline():
                last = line.decode("ascii", "replace").strip()
                answered += 1
        except OSError:
            pass  # reset: the gateway closed while commands were still arriving
        return answered, last
