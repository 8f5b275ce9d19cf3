#!/usr/bin/env python3
"""One probe of an interleaved commit A/B (run by ``pipeline.audit.abcommits``, not by hand).

    PYTHONPATH=<tree> python scripts/ab_probe.py trigger|ingest|transitions

Imports ``pipeline`` from whichever tree is on PYTHONPATH and uses only long-standing APIs, so the
same probe runs against an older commit. Prints one JSON object: the probe's value and unit.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def trigger() -> tuple[float, str]:
    """Median email-to-queued latency of 600 small mails sent at 200/s over SMTP."""
    from pipeline.audit import scenarios

    df = scenarios.email_burst([200], duration_s=3.0, burst=20, senders=2)
    rows = df[(df.metric == "trigger_latency_ms") & (df.tags.map(lambda t: t.get("mode")) == "rate")]
    return statistics.median(rows.value), "ms"


def ingest() -> tuple[float, str]:
    """Median seconds to ingest a 1 MB text PDF with the default settings (3 times after a warm-up)."""
    from pipeline.audit import fixtures as fx
    from pipeline.config import IngestConfig
    from pipeline.stages.ingest import ingest_pdf

    with tempfile.TemporaryDirectory(prefix="ab-ingest-") as tmp:
        pdf = Path(tmp) / "text.pdf"
        pdf.write_bytes(fx.text_pdf_of_size(1))
        samples = []
        for i in range(4):
            t0 = time.perf_counter()
            ingest_pdf(pdf, Path(tmp) / f"{i}.txt", IngestConfig())
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples[1:]), "s"


def transitions() -> tuple[float, str]:
    """Task transitions per second, one per commit, on a fresh store: the median of 5 passes of 1000.
    (The loop of ``storebench.transitions_per_s``, written out: older commits do not have that function.)"""
    from pipeline.sqlite_store import SqliteRunStore
    from pipeline.store import Transition

    rates = []
    with tempfile.TemporaryDirectory(prefix="ab-store-") as tmp:
        store = SqliteRunStore(Path(tmp) / "runs.sqlite3")
        for _ in range(6):
            run = store.create_run("ab", {})[0]
            ids = [f"t{i}" for i in range(500)]
            store.create_tasks(run.run_id, ids)
            rows = [Transition(run.run_id, t, s, 1, 1.0) for t in ids for s in ("running", "success")]
            t0 = time.perf_counter()
            for r in rows:
                store.record_transitions([r])
            rates.append(len(rows) / (time.perf_counter() - t0))
        store.close()
    return statistics.median(rates[1:]), "1/s"


PROBES = {"trigger": trigger, "ingest": ingest, "transitions": transitions}

if __name__ == "__main__":
    value, unit = PROBES[sys.argv[1]]()
    print(json.dumps({"value": value, "unit": unit}))
