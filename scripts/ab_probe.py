#!/usr/bin/env python3
"""One probe of an interleaved commit A/B (run by ``pipeline.audit.reporting.abcommits``, not by hand).

    PYTHONPATH=<tree> python scripts/ab_probe.py trigger|drain|accept|ingest|transitions [--small PASSES]

Imports ``pipeline`` from whichever tree is on PYTHONPATH and uses only long-standing APIs, so the
same probe runs against an older commit. Prints one JSON object: the probe's value and unit (wall
clock), and ``cpu_s``, the CPU seconds (user + system) the probe's process tree spent on the measured
work: CPU time barely moves when other jobs share the machine, wall time does. ``--small PASSES`` is
the workload sized for a run under valgrind's cachegrind, which counts the instructions of the whole
process: the caller runs it with two pass counts and takes the difference, which is the measured work
alone (interpreter start-up and imports cancel out).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def cpu_s() -> float:
    """CPU seconds of this process and every descendant, live or reaped (a reaped one is in its parent's
    children_* times, a live one only in its own, so nothing is counted twice)."""
    import psutil

    me, total = psutil.Process(), 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:  # exited between the listing and the read: its time moved to its parent
            continue
    return total


def trigger(small: int) -> tuple[float, str, float]:
    """Median email-to-queued latency of 600 small mails sent at 200/s over SMTP."""
    try:
        from pipeline.audit.scenarios.email_bursts import email_burst
    except ImportError:  # a commit from before the audit was grouped by notebook (issue 14)
        from pipeline.audit.scenarios import email_burst

    before = cpu_s()
    df = email_burst([200], duration_s=1.0 if small else 3.0, burst=20, senders=2)
    spent = cpu_s() - before
    rows = df[(df.metric == "trigger_latency_ms") & (df.tags.map(lambda t: t.get("mode")) == "rate")]
    return statistics.median(rows.value), "ms", spent


def drain(small: int) -> tuple[float, str, float]:  # no small form: ``small`` is unused
    """Small mails processed per second: a fresh serve sent 400 small mails (no attachment) at once, its
    backlog's peak over the time from the last send until every run ended (issue 16)."""
    try:
        from pipeline.audit.scenarios.email_bursts import email_burst
    except ImportError:  # a commit from before the audit was grouped by notebook (issue 14)
        from pipeline.audit.scenarios import email_burst

    before = cpu_s()
    df = email_burst([], burst=400, senders=4)
    spent = cpu_s() - before
    value = df[df.metric.isin(["backlog_peak", "drain_seconds"])].groupby("metric").value.first()
    if value["drain_seconds"] <= 0 or value["backlog_peak"] <= 0:
        raise SystemExit(f"drain: no backlog left after the last send ({dict(value)}): nothing to time")
    return float(value["backlog_peak"] / value["drain_seconds"]), "1/s", spent


def accept(small: int) -> tuple[float, str, float]:  # no small form: ``small`` is unused
    """Small mails accepted per second by our gateway alone (``serve --gateway-only``): 8 closed-loop sender
    processes, a new connection per mail, 100 mails each, after a warm-up; the median of 2 rounds (issue 17)."""
    from pipeline.audit.scenarios.client_latency import VARIANTS, client_latency

    before = cpu_s()
    with tempfile.TemporaryDirectory(prefix="ab-accept-") as tmp:
        df = client_latency(Path(tmp), senders=(8,), per_sender=100, reps=2, large_mb=None, warmup_mails=40,
                            variants={"gateway_only": VARIANTS["gateway_only"]})
    spent = cpu_s() - before
    return statistics.median(df[df.metric == "accepted_per_s"].value), "1/s", spent


def ingest(small: int) -> tuple[float, str, float]:
    """Median seconds to ingest a 1 MB text PDF with the default settings (3 times after a warm-up)."""
    try:
        from pipeline.audit.base import fixtures as fx
    except ImportError:  # a commit from before the audit was grouped by notebook (issue 14)
        from pipeline.audit import fixtures as fx
    from pipeline.config import IngestConfig
    from pipeline.stages.ingest import ingest_pdf

    with tempfile.TemporaryDirectory(prefix="ab-ingest-") as tmp:
        pdf = Path(tmp) / "text.pdf"
        pdf.write_bytes(fx.text_pdf(2) if small else fx.text_pdf_of_size(1))
        samples, spent = [], 0.0
        for i in range(1 + small if small else 4):
            t0, c0 = time.perf_counter(), cpu_s()
            ingest_pdf(pdf, Path(tmp) / f"{i}.txt", IngestConfig())
            samples.append(time.perf_counter() - t0)
            spent += (cpu_s() - c0) if i else 0.0  # the first is the warm-up
    return statistics.median(samples[1:] or samples), "s", spent


def transitions(small: int) -> tuple[float, str, float]:
    """Task transitions per second, one per commit, on a fresh store: the median of 5 passes of 1000.
    (The loop of ``store_queries.transitions_per_s``, written out: older commits do not have that function.)"""
    from pipeline.sqlite_store import SqliteRunStore
    from pipeline.store import Transition

    rates, spent = [], 0.0
    with tempfile.TemporaryDirectory(prefix="ab-store-") as tmp:
        store = SqliteRunStore(Path(tmp) / "runs.sqlite3")
        for rep in range(1 + small if small else 6):
            run = store.create_run("ab", {})[0]
            ids = [f"t{i}" for i in range(500)]
            store.create_tasks(run.run_id, ids)
            rows = [Transition(run.run_id, t, s, 1, 1.0) for t in ids for s in ("running", "success")]
            t0, c0 = time.perf_counter(), cpu_s()
            for r in rows:
                store.record_transitions([r])
            rates.append(len(rows) / (time.perf_counter() - t0))
            spent += (cpu_s() - c0) if rep else 0.0
        store.close()
    return statistics.median(rates[1:] or rates), "1/s", spent


PROBES = {"trigger": trigger, "drain": drain, "accept": accept, "ingest": ingest, "transitions": transitions}

if __name__ == "__main__":
    passes = int(sys.argv[3]) if sys.argv[2:3] == ["--small"] and len(sys.argv) > 3 else 0
    value, unit, spent = PROBES[sys.argv[1]](passes)
    print(json.dumps({"value": value, "unit": unit, "cpu_s": spent}))
