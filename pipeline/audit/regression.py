"""Regression gate: is a candidate session slower than a baseline session beyond the noise?

For every timing series present in both sessions (same scenario, metric, variant and identifying
tags, at least ``min_samples`` each), bootstrap the ratio of medians candidate/baseline. A series
regresses when the whole confidence interval lies above ``1 + min_effect``: the slowdown is both
real (not resampling noise) and large enough to matter. Throughputs (``1/s`` units) are inverted
so that "higher ratio" always means "slower".
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .recorder import AuditRecorder

TIME_UNITS = {"s": 1, "ms": 1, "1/s": -1}  # +1: lower is better; -1: higher is better
IDENTIFYING_TAGS = ("stage", "kind", "nominal_mb", "level", "round", "runs", "stat", "mode", "notebook")


@dataclass(frozen=True)
class SeriesVerdict:
    """One series' comparison."""

    key: str
    baseline_median: float
    candidate_median: float
    ratio: float  # candidate/baseline "slowness" (inverted for throughputs)
    low: float
    high: float
    regressed: bool


def series(frame: pd.DataFrame, min_samples: int) -> dict[str, tuple[int, list[float]]]:
    """Timing series of a session: key -> (direction, values)."""
    out: dict[str, tuple[int, list[float]]] = {}
    timed = frame[frame.unit.isin(list(TIME_UNITS)) & (frame.scenario != "batch")]
    for r in timed.itertuples():
        ident = {k: r.tags[k] for k in IDENTIFYING_TAGS if k in r.tags}
        key = f"{r.scenario}/{r.metric}/{r.variant}/{json.dumps(ident, sort_keys=True)}"
        out.setdefault(key, (TIME_UNITS[r.unit], []))[1].append(float(r.value))
    return {k: v for k, v in out.items() if len(v[1]) >= min_samples}


def bootstrap_ratio(base: list[float], cand: list[float], direction: int, rounds: int = 2000,
                    confidence: float = 0.95, seed: int = 1) -> tuple[float, float, float]:
    """Point ratio of medians and its percentile-bootstrap interval (direction -1 inverts the ratio)."""
    rng = random.Random(seed)

    def ratio(b: list[float], c: list[float]) -> float:
        mb, mc = statistics.median(b), statistics.median(c)
        if min(mb, mc) <= 0:
            return 1.0
        return mc / mb if direction > 0 else mb / mc

    draws = sorted(ratio(rng.choices(base, k=len(base)), rng.choices(cand, k=len(cand))) for _ in range(rounds))
    tail = (1 - confidence) / 2
    return ratio(base, cand), draws[int(tail * rounds)], draws[int((1 - tail) * rounds) - 1]


def compare_sessions(recorder: AuditRecorder, baseline: str, candidate: str, min_effect: float = 0.10,
                     min_samples: int = 5) -> list[SeriesVerdict]:
    """Compare every common timing series of two sessions."""
    base = series(recorder.measurements(session_id=baseline), min_samples)
    cand = series(recorder.measurements(session_id=candidate), min_samples)
    verdicts = []
    for key in sorted(set(base) & set(cand)):
        direction, b = base[key]
        c = cand[key][1]
        point, low, high = bootstrap_ratio(b, c, direction)
        verdicts.append(SeriesVerdict(key, statistics.median(b), statistics.median(c), point, low, high,
                                      low > 1 + min_effect))
    return verdicts


def same_machine(recorder: AuditRecorder, baseline: str, candidate: str) -> tuple[bool, str]:
    """Whether two sessions ran on the same host and CPU (timings are only comparable then)."""
    rows = recorder.query("SELECT session_id, host, cpu, cpus FROM session WHERE session_id IN (?, ?)",
                          [baseline, candidate])
    if len(rows) != 2:
        return False, "a session id was not found"
    a, b = rows.iloc[0], rows.iloc[1]
    same = (a.host, a.cpu, a.cpus) == (b.host, b.cpu, b.cpus)
    return same, "" if same else f"{a.host}/{a.cpu}/{a.cpus} vs {b.host}/{b.cpu}/{b.cpus}"


def as_rows(verdicts: list[SeriesVerdict]) -> list[dict[str, Any]]:
    """Verdicts as plain dicts (for JSON output)."""
    return [v.__dict__ for v in verdicts]
