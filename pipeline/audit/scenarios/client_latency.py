"""The sender's wait (issue 17): SMTP transactions timed by client processes against a real, busy serve.

The trigger latency the store records starts at the end of DATA. A sender
waits longer: the greeting, ``MAIL``, ``RCPT``, ``DATA``/``354``, the data
and the final ``250`` each need serve's event loop. Here sender processes
(smtplib, like an MTA) send small mails in a closed loop, each on a new
connection, to a real ``python -m pipeline serve`` that processes the runs
at the same time, and time every transaction from the client: connect to
the final ``250`` of DATA (``client_txn_ms``), and ``MAIL`` to that ``250``
(``client_mail_ms``). The store gives the server's figure for the same mail
(``server_trigger_ms``: DATA end to run committed). A round may carry one
5 MB PDF mail beside the small ones (``large=True``), sent once the small
senders are under way.

Variants are serve configurations, one serve each (alive only for its turns): by
default the shipped settings, ``[serve] engine_nice = 0``, ``[serve]
gateway_slice_us = 100``, ``[serve] gateway_process = false``, ``serve --gateway-only`` (the same gateway with
nothing processed behind it), and ``bare_sink``: not a serve but ``baresink``
(aiosmtpd, fsync, commit, 250, nothing behind it), the floor these clients
and this machine give any gateway. Variants take turns (A B, then B A),
and only the one whose turn it is runs: each turn starts its serve, warms it
up with a round that is not recorded, runs the measured rounds, and stops it.
Every round waits until its runs ended, so one variant's work never overlaps
another's measurement. One serve at a time is how serve runs on a machine,
and it is fair: with all serves alive side by side, identical serves did not
measure alike (the one started last measured best in 4 of 4 one-off runs,
the others spending 5-7 % more CPU per mail; cause not found), and the
shipped default, started first, paid for it in every audit session.

Rows (harness ``row``): per mail ``client_txn_ms``, ``client_mail_ms`` and
``server_trigger_ms`` (tags ``senders``, ``large``, ``kind`` small/large), per
round ``accepted_per_s`` (small mails answered 250 per second, first send to
last reply) and ``refused`` (replies other than 250). ``summary`` turns them
into median / p99 per variant and load.
"""

from __future__ import annotations

import multiprocessing
import os
import smtplib
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..base import fixtures as fx
from ..base.baresink import BareSink
from ..base.faultcheck import runs_by_message, wait_terminal
from ..base.harness import frame, percentile, row
from ..base.recorder import AuditRecorder
from ..base.serveproc import RECIPIENT, SENDER, ServeProcess, reply_of

Rows = list[dict[str, Any]]
SCENARIO = "client_latency"
Variant = tuple[dict[str, dict[str, Any]], tuple[str, ...]]  # (serve's TOML sections, extra serve flags)
INLINE_BYTES = 64 * 1024  # [gateway] inline_accept_bytes where a variant turns it on: small mails, not 5 MB ones
# the shipped default (gateway process, engine 12 nice steps below it; still named "gateway_process", which the
# SLA rows select), the same layout without the priority step ([serve] engine_nice = 0), with the gateway asking
# for 100 µs scheduler slices ([serve] gateway_slice_us = 100), and the gateway in serve's own process
VARIANTS: dict[str, Variant] = {"gateway_process": ({}, ()),
                                "same_priority": ({"serve": {"gateway_process": True, "engine_nice": 0}}, ()),
                                "short_slice": ({"serve": {"gateway_slice_us": 100}}, ()),
                                "one_process": ({"serve": {"gateway_process": False}}, ()),
                                # small mails accepted on the gateway's event loop (off by default)
                                "inline_accept": ({"gateway": {"inline_accept_bytes": INLINE_BYTES}}, ()),
                                "gateway_only": ({}, ("--gateway-only",)),
                                "bare_sink": ({}, ())}
BARE = "bare_sink"  # not a serve: ``baresink``, the floor (aiosmtpd, fsync, commit, 250; no pipeline)
PRESTART_TIMEOUT_S = 120.0  # for every sender process to start (a loaded 2-core machine)
START_DELAY_S = 0.5  # senders start together this long after being handed their mails (process start-up)


def send_timed(port: int, messages: list[tuple[str, bytes]], start_at: float) -> list[tuple[str, str, float, float,
                                                                                            float, float]]:
    """Send each message on a new connection, one after the other, from ``start_at`` (wall time).

    Per message: (Message-ID, reply, connect -> 250 s, MAIL -> 250 s, wall time sent, wall time of the reply).
    Runs in a sender process; the reply is the SMTP code, ``refused`` or ``disconnected``.
    """
    time.sleep(max(0.0, start_at - time.time()))
    out = []
    for message_id, raw in messages:
        sent_at, started = time.time(), time.perf_counter()
        mail_at = started
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                smtp.ehlo()
                mail_at = time.perf_counter()
                smtp.sendmail(SENDER, [RECIPIENT], raw)
                ended = time.perf_counter()
                reply = "250"
        except (OSError, smtplib.SMTPException) as exc:
            ended, reply = time.perf_counter(), reply_of(exc)
        out.append((message_id, reply, ended - started, ended - mail_at, sent_at, time.time()))
    return out


def mails(tag: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` small mails (no attachment) with Message-IDs unique to ``tag``."""
    return [(f"<cl-{tag}-{i}@audit.example>",
             fx.email_with([], subject=f"latency {tag} {i}", message_id=f"<cl-{tag}-{i}@audit.example>"))
            for i in range(count)]


def large_mail(tag: str, pdf: bytes) -> tuple[str, bytes]:
    """One mail carrying ``pdf`` (base64 makes it a third larger), with a Message-ID unique to ``tag``."""
    message_id = f"<cl-{tag}-large@audit.example>"
    return message_id, fx.email_with([("big.pdf", pdf)], subject="large", message_id=message_id)


def prestart(pool: ProcessPoolExecutor, workers: int, context: Any) -> set[int]:
    """Start all ``workers`` sender processes of ``pool`` now; return their pids.

    The pool starts a process only when a task finds none idle. Without this, the warm-up (at most 4 senders)
    left the rest to start during the first measured round of 8 senders: the first variant in the order (the
    shipped default, in the first rep) paid for their start-up, and its p99 was about twice its second rep's
    in three audit sessions (98-113 against 40-47 ms). Each task waits at a barrier until all have started,
    so no process takes two."""
    with context.Manager() as manager:
        barrier = manager.Barrier(workers)
        return set(pool.map(_pid_at_barrier, [barrier] * workers))


def _pid_at_barrier(barrier: Any) -> int:
    """This process's pid, once every prestart task has reached ``barrier`` (one per process)."""
    barrier.wait(PRESTART_TIMEOUT_S)
    return os.getpid()


def _round(pool: ProcessPoolExecutor, serve: ServeProcess | BareSink, variant: str, rep: int, senders: int,
           per_sender: int, large_pdf: bytes | None, settle: bool, timeout_s: float) -> Rows:
    """One round: ``senders`` closed-loop sender processes (plus the large mail), then its rows."""
    tag = f"{variant}-{rep}-{senders}{'-large' if large_pdf else ''}"
    small = mails(tag, senders * per_sender)
    start_at = time.time() + START_DELAY_S
    futures = [pool.submit(send_timed, serve.port, small[i::senders], start_at) for i in range(senders)]
    if large_pdf is not None:  # arrives once the small senders are under way
        futures.append(pool.submit(send_timed, serve.port, [large_mail(tag, large_pdf)], start_at + 0.2))
    sent = [one for future in futures for one in future.result(timeout=timeout_s)]
    ids = [message_id for message_id, *_ in sent]
    runs = wait_terminal(serve.data_dir, ids, timeout_s) if settle else runs_by_message(serve.data_dir)
    tags: dict[str, Any] = {"senders": senders, "large": large_pdf is not None}
    out: Rows = []
    for message_id, reply, txn_s, mail_s, _, _ in sent:
        kind = {"kind": "large" if message_id.endswith("-large@audit.example>") else "small", **tags}
        if reply != "250":
            continue
        out += [row(variant, "client_txn_ms", txn_s * 1000, "ms", rep, **kind),
                row(variant, "client_mail_ms", mail_s * 1000, "ms", rep, **kind)]
        out += [row(variant, "server_trigger_ms", (r.queued_at - float(r.payload["data_end_at"])) * 1000, "ms", rep,
                    **kind) for r in runs.get(message_id, [])[:1] if "data_end_at" in r.payload]
    smalls = [s for s in sent if not s[0].endswith("-large@audit.example>")]
    accepted = [s for s in smalls if s[1] == "250"]
    span = max(s[5] for s in smalls) - min(s[4] for s in smalls)
    out.append(row(variant, "accepted_per_s", len(accepted) / span if span > 0 else 0.0, "1/s", rep, **tags))
    out.append(row(variant, "refused", len(smalls) - len(accepted), "mails", rep, **tags))
    return out


def _turn(pool: ProcessPoolExecutor, serve: ServeProcess | BareSink, variant: str, rep: int,
          rounds: Sequence[tuple[int, bytes | None]], senders: tuple[int, ...], per_sender: int, warmup_mails: int,
          settle: bool, timeout_s: float) -> Rows:
    """One variant's turn: start its serve, warm it up (workers spawned, code paths hot; not recorded), run
    ``rounds``, stop it. The data dir stays, so the store grows turn by turn as a long-running serve's would."""
    serve.start()
    try:
        _round(pool, serve, variant, -1 - rep, min(max(senders), 4), max(1, warmup_mails // 4), None, settle,
               timeout_s)
        return [one for count, big in rounds
                for one in _round(pool, serve, variant, rep, count, per_sender, big, settle, timeout_s)]
    finally:
        serve.stop()


def pick_variants(variants: dict[str, Variant] | list[str] | None) -> dict[str, Variant]:
    """``variants`` as a dict: all of ``VARIANTS`` for None, those named for a list (a notebook's parameter)."""
    if variants is None:
        return VARIANTS
    if isinstance(variants, dict):
        return variants
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown client_latency variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    return {name: VARIANTS[name] for name in variants}


def client_latency(work: Path, senders: tuple[int, ...] = (1, 8), per_sender: int = 50, reps: int = 2,
                   large_mb: float | None = 5.0, warmup_mails: int = 20, timeout_s: float = 600.0,
                   variants: dict[str, Variant] | list[str] | None = None,
                   recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Time SMTP transactions from client processes against real serves, one per variant (module docstring).

    Each rep runs, per variant in turn (A B, then B A), one round per entry of ``senders``
    (``per_sender`` mails each), and with ``large_mb`` one more round of the largest sender count
    with a mail of that size beside the small ones. A variant whose flags include ``--gateway-only``
    processes nothing: its runs are read as queued. Returns the rows as a DataFrame (``harness.frame``),
    recorded as scenario ``client_latency`` when a ``recorder`` is given. ``variants``: serve configurations by
    name (``VARIANTS``), or a dict of them; all of ``VARIANTS`` by default.
    """
    variants = pick_variants(variants)
    work.mkdir(parents=True, exist_ok=True)
    pdf = fx.text_pdf_of_size(large_mb * 0.74) if large_mb else None  # base64 adds a third: a mail of large_mb
    rounds = [(n, None) for n in senders] + ([(max(senders), pdf)] if pdf is not None else [])
    rows: Rows = []
    context = multiprocessing.get_context("forkserver")  # senders never share a GIL with each other or serve
    with tempfile.TemporaryDirectory(prefix="client-latency-", dir=work) as tmp, ExitStack() as stack:
        serves: dict[str, ServeProcess | BareSink] = {
            name: BareSink(Path(tmp) / name / "data", Path(tmp) / name) if name == BARE
            else ServeProcess(Path(tmp) / name / "data", Path(tmp) / name, config, args)
            for name, (config, args) in variants.items()}
        for serve in serves.values():
            stack.callback(serve.stop)
        pool = stack.enter_context(ProcessPoolExecutor(max(senders) + 1, mp_context=context))
        prestart(pool, max(senders) + 1, context)
        settle = {name: name != BARE and "--gateway-only" not in args for name, (_, args) in variants.items()}
        for rep in range(reps):
            order = list(serves) if rep % 2 == 0 else list(serves)[::-1]  # A B C, then C B A
            for name in order:
                rows += _turn(pool, serves[name], name, rep, rounds, senders, per_sender, warmup_mails,
                              settle[name], timeout_s)
    result = frame(rows)
    if recorder is not None:
        recorder.record(SCENARIO, result)
    return result


def summary(measurements: pd.DataFrame) -> pd.DataFrame:
    """Median and p99 of each per-mail metric, and the median accepted msg/s, by variant, senders, large, kind."""
    m = measurements
    if m.empty or "senders" not in m:
        return pd.DataFrame()
    per_mail = m[m.metric.isin(["client_txn_ms", "client_mail_ms", "server_trigger_ms"])]
    out = []
    for (variant, senders, large, kind, metric), group in per_mail.groupby(
            ["variant", "senders", "large", "kind", "metric"]):
        out.append({"variant": variant, "senders": senders, "large": large, "kind": kind, "metric": metric,
                    "n": len(group), "median": float(np.median(group.value)),
                    "p99": percentile(group.value, 99)})
    rates = m[m.metric == "accepted_per_s"]
    for (variant, senders, large), group in rates.groupby(["variant", "senders", "large"]):
        out.append({"variant": variant, "senders": senders, "large": large, "kind": "small", "metric": "accepted_per_s",
                    "n": len(group), "median": float(np.median(group.value)), "p99": float("nan")})
    return pd.DataFrame(out)
