"""Tables, charts and plain statements of the scale-out figures (scenario ``scale_out``, notebook 11).

Like ``views``: each function takes the measurement frame and returns a DataFrame, a Figure or a string; no
rows give an empty table or say "not measured", never invented figures. The capacity table is
``scale_out.capacity_model`` fed with figures read from the rows (``measured_figures``).
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from ..base.harness import percentile
from ..scenarios.scale_out import VARIANTS, capacity_model, store_ceiling
from .views import rows

SCENARIO = "scale_out"
RATES = [1.0, 5.0, 10.0, 50.0, 100.0, 500.0]  # mails/s the capacity table answers for
POINT_QUERIES = ["list_latest_50_of_workflow", "list_page_mid_history", "list_latest_failed", "get_run_with_tasks",
                 "count_by_state_all", "task_p50_p95_last_day"]


def _part(m: pd.DataFrame, *variants: str) -> pd.DataFrame:
    r = rows(m, SCENARIO)
    return r[r.variant.isin(variants)].copy() if len(r) else r


def _median(r: pd.DataFrame, metric: str) -> float:
    picked = r[r.metric == metric].value if len(r) else pd.Series(dtype=float)
    return float(picked.median()) if len(picked) else math.nan


def _tag_max(r: pd.DataFrame, tag: str) -> int | str:
    values = r[tag].dropna() if tag in r else pd.Series(dtype=float)
    return int(values.max()) if len(values) else ""


def notes(m: pd.DataFrame) -> str:
    """Parts or variants that failed or were skipped, with the reason ("" when none)."""
    r = rows(m, SCENARIO)
    if r.empty or "reason" not in r:
        return ""
    bad = r[r.metric.isin(["error", "skipped"])]
    return "; ".join(f"{v} {metric} ({why})" for v, metric, why in zip(bad.variant, bad.metric, bad.reason,
                                                                       strict=True))


def pipeline_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per variant, in the order measured: runs/s (median over rounds), e2e latency median and p95 over all
    runs, accepts/s, and what became of the acked mails."""
    r = _part(m, *VARIANTS)
    out: list[dict[str, Any]] = []
    for variant in [v for v in VARIANTS if len(r) and v in set(r.variant)]:
        g = r[r.variant == variant]
        latency = g[g.metric == "e2e_latency_s"].value
        out.append({"variant": variant, "rounds": int((g.metric == "acked").sum()),
                    "mails at once": _tag_max(g, "concurrency"),
                    "runs/s": _median(g, "throughput_runs_per_s"),
                    "e2e median s": float(latency.median()) if len(latency) else math.nan,
                    "e2e p95 s": percentile(latency, 95),
                    "accepts/s": _median(g, "accepts_per_s"), "acked": int(g[g.metric == "acked"].value.sum()),
                    "succeeded": int(g[g.metric == "runs_succeeded"].value.sum()),
                    "not ended": int(g[g.metric == "runs_not_ended"].value.sum())})
    return pd.DataFrame(out)


def store_rows(m: pd.DataFrame) -> pd.DataFrame:
    """The store rows of both backends: this notebook's, and SQLite's from notebook 06 (``store_queries``) when
    this notebook left SQLite out (the batch does: 06 measures the same queries at the same sizes)."""
    r = _part(m, "store")
    if len(r) and (r.backend == "sqlite").any():
        return r
    sqlite = rows(m, "store_queries")
    sqlite = sqlite.assign(backend="sqlite") if len(sqlite) else sqlite
    return pd.concat([r, sqlite], ignore_index=True) if len(r) or len(sqlite) else r


def store_table(m: pd.DataFrame) -> pd.DataFrame:
    """Median query milliseconds and transitions/s per backend and size (one column per backend and size)."""
    r = store_rows(m)
    if r.empty:
        return pd.DataFrame()
    r = r[r.stat == "median"]
    table = r.pivot_table(index="metric", columns=["backend", "runs"], values="value", aggfunc="first")
    table.columns = [f"{backend} {int(runs):,} runs" for backend, runs in table.columns]
    return table.round(3)


def ingestion_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per Dask cluster size: pages/s (median and range over rounds), batch seconds, and the no-op round trip."""
    r = _part(m, "ingestion")
    if r.empty or "workers" not in r:
        return pd.DataFrame()
    out = []
    for n, g in r.dropna(subset=["workers"]).groupby("workers"):
        rates, trips = g[g.metric == "pages_per_s"].value, g[g.metric == "dask_task_overhead_ms"].value
        out.append({"workers": int(n), "rounds": len(rates), "pages/s median": rates.median(),
                    "pages/s range": f"{rates.min():.0f}–{rates.max():.0f}" if len(rates) else "",
                    "batch s median": _median(g, "batch_seconds"),
                    "speedup": _median(g, f"speedup_{int(n)}_vs_1_workers"),
                    "task round trip ms median": trips.median(), "p95": percentile(trips, 95),
                    "bare Dask round trip ms median": _median(g, "dask_bare_round_trip_ms")})
    return pd.DataFrame(out)


def writers_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per backend and writer count: transitions/s one per commit (median and range over rounds), and one
    client's bare SELECT 1 calls per second beside the single writer (a round trip each on PostgreSQL)."""
    r = _part(m, "writers")
    if r.empty or "writers" not in r:
        return pd.DataFrame()
    out = []
    for (backend, n), g in r.dropna(subset=["writers"]).groupby(["backend", "writers"]):
        rates = g[g.metric == "task_transitions_per_s_one_per_commit"].value
        if rates.empty:
            continue
        peak = g[g.metric == "task_transitions_per_s_peak"]
        out.append({"backend": backend, "runs in store": _tag_max(g, "runs"), "writers": int(n),
                    "rounds": len(rates), "transitions/s median": rates.median(),
                    "range": f"{rates.min():,.0f}–{rates.max():,.0f}",
                    "one client's SELECT 1/s": _median(g, "select_1_per_s"), "peak": "yes" if len(peak) else ""})
    return pd.DataFrame(out)


def gateways_table(m: pd.DataFrame) -> pd.DataFrame:
    """The three-gateway burst: acked, duplicated and lost messages, counted from the store."""
    r = _part(m, "gateways")
    if r.empty:
        return pd.DataFrame()
    return r.pivot_table(index="metric", values="value", aggfunc="sum").reset_index()


def measured_figures(m: pd.DataFrame) -> dict[str, float]:
    """The capacity model's inputs from the rows: per-worker pages/s (1-worker cluster), pages per mail (the
    mails' PDF), accepts/s of one gateway (pg_local), transitions per mail (2 per task instance, from the
    store), and each store's transitions/s one per commit: the peak over several writer processes when measured
    (part ``writers``), else one writer's at the largest size. Missing ones are NaN."""
    ingest, pipeline, store = _part(m, "ingestion"), _part(m, "pg_local", "sqlite_local"), store_rows(m)
    one = ingest[(ingest.metric == "pages_per_s") & (ingest.workers == 1)] if "workers" in ingest else ingest[:0]
    figures = {"pages_per_s_per_worker": float(one.value.median()) if len(one) else math.nan,
               "accepts_per_s_per_gateway": _median(pipeline[pipeline.variant == "pg_local"], "accepts_per_s"),
               "transitions_per_mail": 2 * _median(pipeline, "tasks_per_run"),
               "pages_per_mail": float(pipeline.pages.median()) if "pages" in pipeline else math.nan}
    writers = _part(m, "writers")
    for backend in ("pg", "sqlite"):
        name = "postgres" if backend == "pg" else "sqlite"
        peak = writers[(writers.metric == "task_transitions_per_s_peak") & (writers.backend == name)] \
            if len(writers) else writers
        picked = store[(store.metric == "task_transitions_per_s_one_per_commit") & (store.stat == "median") &
                       (store.backend == name)] if len(store) else store
        largest = picked[picked.runs == picked.runs.max()] if len(picked) else picked
        chosen = peak if len(peak) else largest  # several writers' peak when measured, else one writer's rate
        figures[f"{backend}_transitions_per_s"] = float(chosen.value.median()) if len(chosen) else math.nan
    return figures


def capacity_table(m: pd.DataFrame, rates: list[float] | None = None) -> pd.DataFrame:
    """Workers, gateways and store load per mail rate from the measured figures (empty if any is missing)."""
    figures = measured_figures(m)
    if any(math.isnan(v) or v <= 0 for v in figures.values()):
        return pd.DataFrame()
    return capacity_model(figures, rates or RATES).round(3)


def capacity_statement(m: pd.DataFrame) -> str:
    """The model's inputs and where each store runs out, in one paragraph."""
    f = measured_figures(m)
    missing = [k for k, v in f.items() if math.isnan(v) or v <= 0]
    if missing:
        return f"Capacity model: not computed, figures not measured in this session: {', '.join(missing)}."
    ceiling = store_ceiling(f)
    return (f"Capacity model inputs (measured here): one ingestion worker extracts {f['pages_per_s_per_worker']:.0f} "
            f"pages/s; a mail carries {f['pages_per_mail']:.0f} pages; one gateway accepted "
            f"{f['accepts_per_s_per_gateway']:.1f} mails/s at this size; a mail costs "
            f"{f['transitions_per_mail']:.0f} task transitions. PostgreSQL commits {f['pg_transitions_per_s']:,.0f} "
            f"transitions/s one per commit ({_capacity_source(m, 'postgres')}), so one PostgreSQL store is used up "
            f"at about "
            f"{ceiling['pg_mails_per_s']:,.0f} mails/s (SQLite: {ceiling['sqlite_mails_per_s']:,.0f} mails/s, and "
            f"only within one machine); below that, adding workers and gateways scales, above it the store is the "
            f"bottleneck.")


def _capacity_source(m: pd.DataFrame, backend: str) -> str:
    """Where a store's transitions/s in the capacity model come from, in words."""
    writers = _part(m, "writers")
    peak = writers[(writers.metric == "task_transitions_per_s_peak") & (writers.backend == backend)] \
        if len(writers) else writers
    if len(peak):
        return f"its peak, reached with {int(peak.writers.iloc[0])} writer process(es) at once"
    return "one writer process"


def machine_statement(m: pd.DataFrame, cpus: int) -> str:
    """What this machine can and cannot show about scale-out, with the measured ratios."""
    ingest = ingestion_table(m)
    pipe = pipeline_table(m).set_index("variant") if len(pipeline_table(m)) else pd.DataFrame()
    speed = ingest[ingest.workers == 2]["speedup"].iloc[0] if len(ingest) and (ingest.workers == 2).any() else math.nan
    whole = (pipe.loc["pg_dask_2", "runs/s"] / pipe.loc["pg_dask_1", "runs/s"]
             if {"pg_dask_1", "pg_dask_2"} <= set(pipe.index) else math.nan)
    gates = (pipe.loc["pg_2_gateways", "runs/s"] / pipe.loc["pg_local", "runs/s"]
             if {"pg_local", "pg_2_gateways"} <= set(pipe.index) else math.nan)

    def ratio(x: float) -> str:
        return "not measured" if math.isnan(x) else f"{x:.2f}x"

    return (f"This machine has {cpus} CPU core(s). Every engine of the scale-out runs on it at once: PostgreSQL, "
            f"the Dask scheduler and its workers, the gateways, the engine and the audit's own SMTP clients. It can "
            f"show that the engines work together (the same runs succeed on every variant), what each part costs "
            f"(queries, transitions/s, Dask's per-task round trip, per-worker pages/s), that several gateways on "
            f"one store neither duplicate nor lose a message, and the capacity model built from those parts. It "
            f"cannot show scale-out itself: a second worker or gateway gets no core of its own, so added processes "
            f"mostly share the same {cpus} cores. Measured anyway (2 against 1): CPU-bound ingestion on Dask workers, "
            f"pages/s {ratio(speed)}; the whole email_digest on Dask workers, runs/s {ratio(whole)}; gateways, "
            f"runs/s {ratio(gates)}. "
            f"On a machine with a core per process these ratios are what the capacity model assumes; here they "
            f"are bounded by {cpus} cores shared by everything.")


def fig_scale_out(m: pd.DataFrame) -> Figure:
    """Runs/s per pipeline variant, and median query ms on SQLite and PostgreSQL at the largest size."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    pipe = pipeline_table(m)
    if len(pipe):
        left.bar(pipe.variant, pipe["runs/s"], color="tab:blue")
        left.tick_params(axis="x", rotation=30, labelsize=8)
    left.set(xlabel="variant", ylabel="throughput (runs/s, median of rounds)", title="email_digest at concurrency")
    store = store_rows(m)
    if len(store):
        store = store[(store.stat == "median") & store.metric.isin(POINT_QUERIES)]
        largest = store[store.runs == store.runs.max()]
        table = largest.pivot_table(index="metric", columns="backend", values="value", aggfunc="first")
        table.plot.barh(ax=right, logx=True)
        right.set(xlabel=f"median query time at {int(largest.runs.max()):,} runs (ms, log)")
        right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="store")
    else:
        right.set(xlabel="median query time (ms)")
    right.set(ylabel="query", title="Store queries")
    return fig
