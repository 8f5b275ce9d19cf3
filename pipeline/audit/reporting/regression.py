"""Regression gate: is a candidate session slower than a baseline session beyond the noise?

For every timing series present in both sessions (same scenario, metric, variant and identifying
tags, at least ``min_samples`` each), bootstrap the ratio of medians candidate/baseline. Throughputs
(``1/s`` units) are inverted so that "higher ratio" always means "slower". Three verdicts, never two:

- **regressed**: the whole confidence interval lies above ``1 + min_effect`` (real and large enough);
- **unchanged**: the whole interval lies at or below ``1 + min_effect`` (no slowdown that matters);
- **inconclusive**: the interval straddles the threshold: the measurements cannot tell at this noise,
  which a gate must say instead of passing (wall time on a loaded 2-core VM often cannot).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..base.recorder import AuditRecorder

TIME_UNITS = {"s": 1, "ms": 1, "1/s": -1, "instructions": 1}  # +1: lower is better; -1: higher is better
VERDICTS = ("unchanged", "regressed", "inconclusive")
EXIT_CODES = {"unchanged": 0, "regressed": 1, "inconclusive": 3}  # 2 is bad input
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
    verdict: str  # one of VERDICTS
    measure: str = "wall"  # what the values are: wall time, CPU time or instruction counts

    @property
    def regressed(self) -> bool:
        return self.verdict == "regressed"


def judge(low: float, high: float, min_effect: float) -> str:
    """The verdict of a slowness-ratio interval at the threshold ``1 + min_effect``."""
    if low > 1 + min_effect:
        return "regressed"
    return "unchanged" if high <= 1 + min_effect else "inconclusive"


def overall(verdicts: list[SeriesVerdict]) -> str:
    """One verdict for many series: regressed if any is, else inconclusive if any is, else unchanged."""
    found = {v.verdict for v in verdicts}
    return next((name for name in ("regressed", "inconclusive") if name in found), "unchanged")


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
                                      judge(low, high, min_effect)))
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
    return [{**v.__dict__, "regressed": v.regressed} for v in verdicts]
