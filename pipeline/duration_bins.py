"""Duration histograms: how both run stores answer percentiles over millions of task tries (issue 16).

Reading every try of the last day at 1M runs (165k rows) took 110 ms. So the store also keeps, per
measure, hour of the try's end and task name (``ingest_pdf`` for ``ingest_pdf[3]``), how many
successful tries fell into each log-spaced bin, with the smallest and largest value seen there.
Measure 0 bins the tries that waited for no worker (their duration is their run time), 1 the
durations and 2 the run times (duration less ``wait_s``) of those that waited: a try costs one row
update, two if it waited; durations read measures 0 and 1, run times 0 and 2. Triggers keep these
rows as task instances succeed and are purged, whoever writes them. A window's percentiles read the
bins of its whole hours and, through the covering index, the raw tries of its two partial hours.

Bin ``b`` holds ``[r^b, r^(b+1))`` seconds, r = ``store.DURATION_BIN_RATIO``; values under 1 microsecond
(and negative ones, from a clock step) share ``ZERO_BIN``. Both schemas embed ``bin_sql`` in their
migrations: a different ratio needs a new migration that rebuilds the table.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Any

from .store import DURATION_BIN_RATIO

ZERO_BIN = -1_000_000
HOUR_S = 3600.0
_LN_RATIO = math.log(DURATION_BIN_RATIO)


def value_sql(run_time: bool, row: str = "") -> str:
    """SQL for a try's duration, or its run time, from the columns of ``row`` (a trigger's NEW or OLD)."""
    col = f"{row}." if row else ""
    duration = f"{col}ended_at - {col}started_at"
    return f"{duration} - {col}wait_s" if run_time else duration


def binned_measures(row: str = "") -> list[tuple[str, str, str]]:
    """(measure, value, condition) of each histogram row a try of ``row`` (a trigger's NEW or OLD) counts in."""
    waited = f"{row}.wait_s > 0" if row else "wait_s > 0"
    return [(f"CASE WHEN {waited} THEN 1 ELSE 0 END", value_sql(False, row), "1 = 1"),
            ("2", value_sql(True, row), waited)]


def bin_sql(value: str) -> str:
    """SQL (SQLite and PostgreSQL alike) for the bin of the duration ``value``."""
    return f"CASE WHEN {value} >= 1e-06 THEN CAST(floor(ln({value}) / {_LN_RATIO!r}) AS INTEGER) ELSE {ZERO_BIN} END"


def hour_sql(ended: str) -> str:
    """SQL for the hour (since the epoch) a try that ended at ``ended`` counts in."""
    return f"CAST(floor({ended} / {HOUR_S}) AS BIGINT)"


def window_sql(task_name_sql: str, index_hint: str, run_time: bool) -> str:
    """SQL for a window's histogram: rows (task, bin, n, smallest, largest) in task and bin order.

    Its parameters are ``window_params``. ``task_name_sql`` maps ``task_id`` to its task in the
    backend's dialect; ``index_hint`` follows ``FROM task_runs`` (SQLite's INDEXED BY).
    """
    value = value_sql(run_time)
    raw = (f"SELECT task_id, {bin_sql(value)} AS bin, {value} AS v FROM task_runs{index_hint} "
           "WHERE state = 'success' AND started_at IS NOT NULL AND ended_at >= ? AND ended_at < ? "
           f"AND {hour_sql('ended_at')}")
    # the raw tries are grouped by instance id first: the task of an id is then worked out per group, not per try
    return ("SELECT task, bin, CAST(sum(n) AS BIGINT), min(lo), max(hi) FROM ("
            "SELECT task, bin, n, lo, hi FROM task_duration_bins WHERE measure IN (0, ?) AND hour >= ? AND hour < ? "
            f"UNION ALL SELECT {task_name_sql}, bin, count(*), min(v), max(v) "
            f"FROM ({raw} < ? UNION ALL {raw} >= ?) AS raw GROUP BY task_id, bin"
            ") AS tries GROUP BY task, bin ORDER BY task, bin")


def window_params(since: float, until: float, run_time: bool) -> tuple[Any, ...]:
    """Parameters of ``window_sql``: the whole hours inside ``[since, until)`` come from the bins, the
    tries before the first and from the last (hours cut by the window's edges) from ``task_runs``.

    The raw ranges reach a second into the whole hours and are cut by the same hour expression as the
    bins, so a try on an hour's boundary is counted once whatever the float division rounds to.
    """
    first = math.ceil(since / HOUR_S)
    end = max(first, math.floor(until / HOUR_S))
    return (2 if run_time else 1, first, end,
            since, min(until, first * HOUR_S + 1), first,
            max(since, end * HOUR_S - 1), until, end)


def percentiles_by_task(rows: list[tuple[Any, ...]]) -> dict[str, dict[str, float]]:
    """``{task: {"n", "p50", "p95"}}`` from ``window_sql`` rows."""
    return {task: percentiles([(int(n), lo, hi) for _, _, n, lo, hi in group])
            for task, group in itertools.groupby(rows, key=lambda row: row[0])}


def percentiles(bins: list[tuple[int, float, float]]) -> dict[str, float]:
    """n, median and 95th percentile (linear interpolation, like percentile_cont) of binned values.

    ``bins``: (count, smallest, largest) per bin, in bin order. An order statistic is read as its bin's
    value: exact when the bin's values are equal, else the geometric mean of its extremes (see the module).
    """
    ends = list(itertools.accumulate(n for n, _, _ in bins))

    def order_statistic(k: int) -> float:
        _, lo, hi = bins[bisect.bisect_right(ends, k)]
        if lo == hi:
            return lo
        return math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2

    def interpolated(q: float) -> float:
        h = (ends[-1] - 1) * q
        k = int(h)
        low = order_statistic(k)
        return low if h == k else low + (h - k) * (order_statistic(k + 1) - low)

    return {"n": ends[-1], "p50": interpolated(0.5), "p95": interpolated(0.95)}
