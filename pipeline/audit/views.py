"""Tables and charts for the report, computed from one session's measurement rows.

Each function takes the measurement frame (``AuditRecorder.measurements``) and
returns a DataFrame or a matplotlib Figure, so the report notebook only
arranges them. Empty inputs give empty tables, never invented figures.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from .scenarios import STAGES


def rows(m: pd.DataFrame, scenario: str, metric: str | None = None) -> pd.DataFrame:
    """Rows of one scenario (and metric), with their tags as columns."""
    picked = m[(m.scenario == scenario) & ((m.metric == metric) if metric else True)].reset_index(drop=True)
    tags = pd.json_normalize(picked.tags.tolist()) if len(picked) else pd.DataFrame()
    return pd.concat([picked.drop(columns=["tags"]), tags], axis=1)


def _q(series: pd.Series, q: float) -> float:
    return float(series.quantile(q)) if len(series) else float("nan")


def stage_breakdown(m: pd.DataFrame) -> pd.DataFrame:
    """Median and p95 seconds per seed stage, and each stage's share of the median total."""
    r = rows(m, "pipeline_profile", "stage_seconds")
    if r.empty:
        return pd.DataFrame(columns=["stage", "median_s", "p95_s", "share"])
    table = r.groupby("stage").value.agg(median_s="median", p95_s=lambda s: _q(s, 0.95)).reindex(
        [s for s in STAGES if s in set(r.stage)]).reset_index()
    table["share"] = (table.median_s / table.median_s.sum()).map("{:.0%}".format)
    return table


def fig_stage_breakdown(table: pd.DataFrame) -> Figure:
    """Horizontal bars of median and p95 per stage."""
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(table.stage, table.p95_s * 1000, color="#c8d7ea", label="p95")
    ax.barh(table.stage, table.median_s * 1000, color="#2f6db5", label="median")
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per mail")
    ax.set_title("Where a mail's time goes: Email → Ingestion → Digest → Delivery")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def hot_lines(m: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """The ``top`` most expensive lines per stage from the line profile."""
    r = rows(m, "line_profile", "line_seconds")
    if r.empty:
        return r
    r = r.sort_values("value", ascending=False).groupby("stage").head(top)
    return r[["stage", "function", "line", "hits", "value", "code"]].rename(columns={"value": "seconds"})


def peak_rss_by_stage(m: pd.DataFrame) -> pd.DataFrame:
    """Peak RSS (pipeline process plus extraction workers) while each task kind ran."""
    r = rows(m, "pipeline_profile", "peak_rss_mb")
    return r[["stage", "value"]].rename(columns={"stage": "task", "value": "peak_rss_mb"}) if len(r) else r


def soak_series(m: pd.DataFrame, variant: str = "email_digest") -> pd.DataFrame:
    """Traced and RSS megabytes against runs completed, for one soak variant."""
    traced = rows(m, "soak", "traced_bytes")
    rss = rows(m, "soak", "rss_bytes")
    if traced.empty:
        return pd.DataFrame(columns=["runs", "traced_mb", "rss_mb"])
    traced, rss = traced[traced.variant == variant], rss[rss.variant == variant]
    return pd.DataFrame({"runs": traced.runs.values, "traced_mb": traced.value.values / 2**20,
                         "rss_mb": rss.value.values / 2**20})


def fig_soak(series: pd.DataFrame, slopes: dict[str, float]) -> Figure:
    """RSS and traced memory over the soak, with the fitted slopes in the legend."""
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(series.runs, series.rss_mb, label=f"RSS ({slopes.get('rss', 0) / 1024:+.2f} KiB/run)")
    ax.plot(series.runs, series.traced_mb, label=f"traced ({slopes.get('traced', 0) / 1024:+.2f} KiB/run)")
    ax.set_xlabel("runs after warm-up")
    ax.set_ylabel("MB")
    ax.set_title("Memory over the soak (sampled after gc)")
    ax.legend()
    fig.tight_layout()
    return fig


def top_allocations(m: pd.DataFrame, variant: str = "email_digest") -> pd.DataFrame:
    """The allocation sites that grew most during the soak."""
    r = rows(m, "soak", "top_growth_bytes")
    if r.empty:
        return r
    r = r[r.variant == variant]
    return r[["site", "value", "count_diff"]].rename(columns={"value": "bytes_grown"})


def concurrency_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per concurrency level: throughput, p50/p95 end-to-end latency, peak active runs, failures."""
    r = rows(m, "concurrency")
    if r.empty or "level" not in r:
        return pd.DataFrame()
    r = r.dropna(subset=["level"])
    table = r.pivot_table(index="level", columns="metric", values="value", aggfunc="first").reset_index()
    return table.rename(columns={"throughput_runs_per_s": "runs/s", "latency_p50_s": "p50 s", "latency_p95_s": "p95 s",
                                 "peak_active_runs": "peak active", "failed_runs": "failed"})


def fig_concurrency(table: pd.DataFrame) -> Figure:
    """Throughput and p95 latency against concurrency."""
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(table.level, table["runs/s"], marker="o", color="#2f6db5", label="throughput (runs/s)")
    ax.set_xscale("log")
    ax.set_xlabel("workflows started at once (log)")
    ax.set_ylabel("runs/s")
    other = ax.twinx()
    other.plot(table.level, table["p95 s"], marker="s", color="#c0392b", label="p95 latency (s)")
    other.set_ylabel("p95 end-to-end s")
    ax.set_title("Concurrency: throughput and p95 latency")
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.88))
    fig.tight_layout()
    return fig


def pdf_scaling_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per document kind and size: median and p95 seconds, pages, pages/s, peak RSS, errors."""
    r = rows(m, "pdf_scaling")
    if r.empty:
        return r
    keys = ["variant", "kind", "nominal_mb", "file_mb"]
    timing = r[r.metric == "ingest_seconds"].groupby(keys).value.agg(median_s="median", p95_s=lambda s: _q(s, 0.95),
                                                                        reps="count")
    pages = r[r.metric == "pages"].groupby(keys).value.max().rename("pages")
    rss = r[r.metric == "peak_rss_mb"].groupby(keys).value.max().rename("peak_rss_mb")
    table = pd.concat([timing, pages, rss], axis=1).reset_index()
    table["pages/s"] = table.pages / table.median_s
    if "error" in r:
        errors = r[r.metric == "ingest_seconds"].groupby(keys).error.first().rename("error")
        table = table.merge(errors.reset_index(), on=keys, how="left")
    return table.sort_values(["variant", "kind", "nominal_mb"])


Line = tuple[Any, Any, str, dict[str, Any]]  # x, y, label, plot options


def _side_by_side(left: list[Line], right: list[Line], left_axes: dict[str, Any],
                  right_axes: dict[str, Any]) -> Figure:
    """Two line charts next to each other; the legend on the left one serves both."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, lines, settings in ((axes[0], left, left_axes), (axes[1], right, right_axes)):
        for x, y, label, options in lines:
            ax.plot(x, y, label=label, **options)
        ax.set(**settings)
    axes[0].legend(fontsize=7, ncol=2 if len(left) > 8 else 1)
    fig.tight_layout()
    return fig


def fig_pdf_scaling(table: pd.DataFrame) -> Figure:
    """Ingest time and peak RSS against file size: colour is the document kind, line style the engine."""
    kinds, variants = sorted(table.kind.unique()), sorted(table.variant.unique())
    groups = [(f"{kind} ({variant})", g, {"marker": "o", "color": f"C{kinds.index(kind)}",  # colour: kind
                                          "linestyle": ["-", "--", ":", "-."][variants.index(variant) % 4]})
              for (variant, kind), g in table.groupby(["variant", "kind"])]
    return _side_by_side(
        [(g.file_mb, g.median_s, label, style) for label, g, style in groups],
        [(g.file_mb, g.peak_rss_mb, label, style) for label, g, style in groups],
        {"xlabel": "file MB", "ylabel": "median seconds", "title": "Ingestion time"},
        {"xlabel": "file MB", "ylabel": "peak RSS MB (extraction workers)", "title": "Ingestion memory"})


def burst_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per burst round: trigger latency percentiles, accepted, lost, backlog peak, drain time."""
    r = rows(m, "email_burst")
    if r.empty:
        return r
    lat = r[r.metric == "trigger_latency_ms"].groupby("round").value.agg(
        p50_ms="median", p95_ms=lambda s: _q(s, 0.95), p99_ms=lambda s: _q(s, 0.99))
    single = r[r.metric.isin(["accepted", "lost", "backlog_peak", "drain_seconds"])].pivot_table(
        index="round", columns="metric", values="value", aggfunc="first")
    return pd.concat([lat, single], axis=1).reset_index()


def fig_burst(m: pd.DataFrame) -> Figure:
    """Trigger-latency CDF per round, and the backlog over time."""
    r = rows(m, "email_burst")
    cdfs: list[Line] = []
    for label, group in r[r.metric == "trigger_latency_ms"].groupby("round"):
        values = group.value.sort_values().reset_index(drop=True)
        cdfs.append((values, (values.index + 1) / len(values), str(label), {}))
    backlog: list[Line] = [(g.t, g.value, str(label), {}) for label, g in r[r.metric == "backlog"].groupby("round")]
    return _side_by_side(
        cdfs, backlog,
        {"xscale": "log", "xlabel": "DATA end → run queued (ms, log)", "ylabel": "fraction of mails",
         "title": "Trigger latency"},
        {"xlabel": "seconds since first send", "ylabel": "runs queued or running", "title": "Backlog and drain"})


def store_table(m: pd.DataFrame) -> pd.DataFrame:
    """Median query times (and write throughput) at each store size."""
    r = rows(m, "store_queries")
    if r.empty:
        return r
    r = r[r.stat == "median"]
    return r.pivot_table(index="metric", columns="runs", values="value", aggfunc="first")


def optimization_table(m: pd.DataFrame) -> pd.DataFrame:
    """Each switch: baseline and optimized median and spread (min–max over reps), and their ratio."""
    r = rows(m, "optimizations")
    if r.empty:
        return r
    out = []
    for (switch, metric), group in r.groupby(["switch", "metric"], sort=False):
        stats = group.groupby("variant").value.agg(["median", "min", "max", "count"])
        base = stats[stats.index.str.startswith("baseline")]
        best = stats[stats.index.str.startswith("optimized")]
        if base.empty or best.empty:
            continue
        b, o = base.iloc[0], best.iloc[0]
        out.append({"switch": switch, "metric": metric, "before": base.index[0].split(": ", 1)[1],
                    "before median": b["median"], "before spread": f"{b['min']:.3g}–{b['max']:.3g}",
                    "after": best.index[0].split(": ", 1)[1], "after median": o["median"],
                    "after spread": f"{o['min']:.3g}–{o['max']:.3g}",
                    "after/before": o["median"] / b["median"] if b["median"] else float("nan"),
                    "reps": int(b["count"])})
    return pd.DataFrame(out)


def engine_table(m: pd.DataFrame) -> pd.DataFrame:
    """PDF ingestion: median seconds per engine variant for each document, and the speed-up over pypdf."""
    r = rows(m, "pdf_scaling", "ingest_seconds")
    if r.empty or r.variant.nunique() < 2:
        return pd.DataFrame()
    table = r.pivot_table(index=["kind", "nominal_mb"], columns="variant", values="value", aggfunc="median")
    if "pypdf" in table:
        for variant in [c for c in table.columns if c != "pypdf"]:
            table[f"pypdf/{variant}"] = table["pypdf"] / table[variant]
    return table.reset_index()


def hostile_table(m: pd.DataFrame) -> pd.DataFrame:
    """What each hostile input did: outcome, seconds, peak RSS."""
    r = rows(m, "hostile_inputs")
    if r.empty:
        return r
    seconds = r[r.metric == "seconds"].set_index("name")
    rss = r[r.metric == "peak_rss_mb"].set_index("name").value.rename("peak_rss_mb")
    return pd.concat([seconds[["outcome", "value", "message"]].rename(columns={"value": "seconds"}), rss],
                     axis=1).reset_index()


def baselines_table(m: pd.DataFrame) -> pd.DataFrame:
    """Expected range per operation type: median, p95 and the interquartile spread."""
    specs: list[tuple[str, pd.Series, str]] = []
    profile = rows(m, "pipeline_profile", "stage_seconds")
    if len(profile):
        specs += [(f"stage: {stage}", group.value * 1000, "ms") for stage, group in profile.groupby("stage")]
    burst = rows(m, "email_burst", "trigger_latency_ms")
    if len(burst):
        specs.append(("email → trigger", burst.value, "ms"))
    runner = rows(m, "runner_overhead", "ms_per_task")
    if len(runner):
        specs += [(f"runner: per no-op task ({dag})", group.value, "ms") for dag, group in runner.groupby("dag")]
    scaling = rows(m, "pdf_scaling", "pages_per_second")
    if len(scaling):
        specs += [(f"ingest {kind}", group.value, "pages/s") for kind, group in scaling.groupby("kind")]
    out: list[dict[str, Any]] = []
    for name, values, unit in specs:
        out.append({"operation": name, "unit": unit, "median": values.median(), "p95": _q(values, 0.95),
                    "p25": _q(values, 0.25), "p75": _q(values, 0.75), "n": len(values)})
    return pd.DataFrame(out)


def markdown(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """A DataFrame as a GitHub markdown table ('(no rows)' when empty)."""
    if frame is None or frame.empty:
        return "_(no rows in this session)_"
    return frame.to_markdown(index=False, floatfmt=floatfmt)


def code_quality_tables(m: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tool counts (ruff, mypy, coverage, log survey) and the error-handling table per module."""
    r = rows(m, "code_quality")
    if r.empty:
        return r, r
    counts = r[r.metric != "error_handling_entry"]
    counts = counts.assign(detail=counts.get("rule", pd.Series(index=counts.index, dtype=object)).fillna(""))
    table = counts[["tool", "metric", "detail", "value"]]
    errors = r[r.metric == "error_handling_entry"][["module", "raises", "reasons", "retried", "user sees"]]
    return table, errors


_FAULT_FIGURES = {"sent": "sent", "acked": "acked (250)", "lost": "lost", "duplicated": "duplicated",
                  "untyped": "untyped", "recover_s": "recover s", "drain_s": "drain s"}


def fault_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per fault: sent, acked, lost, duplicated, untyped, time to recover and drain, what senders saw, and a note
    (why a fault was skipped, or why its harness failed)."""
    r = rows(m, "faults")
    if r.empty:
        return pd.DataFrame()
    out = []
    for fault, group in r.groupby("variant", sort=False):
        figures: dict[str, Any] = {"fault": fault}
        for metric, column in _FAULT_FIGURES.items():
            picked = group[group.metric == metric].value
            figures[column] = picked.max() if len(picked) else float("nan")
        replies = group[group.metric == "replies"]
        figures["senders saw"] = ", ".join(f"{reply} ×{int(count)}" for reply, count in
                                           zip(replies.get("reply", []), replies.value, strict=True))
        notes = group[group.metric.isin(["skipped", "error"])]
        figures["note"] = "; ".join(f"{m_}: {reason}" for m_, reason in
                                    zip(notes.metric, notes.get("reason", [""] * len(notes)), strict=True))
        out.append(figures)
    table = pd.DataFrame(out)
    counts = ["sent", "acked (250)", "lost", "duplicated", "untyped"]
    table[counts] = table[counts].round().astype("Int64")  # message counts print as 1000, not 1e+03
    return table


def fault_cases(m: pd.DataFrame) -> pd.DataFrame:
    """Per judged case (bad inputs, the killed worker's run, the mail after it): state, typed or not, reason."""
    r = rows(m, "faults")
    if r.empty:
        return pd.DataFrame()
    r = r[r.metric.isin(["case_typed", "victim_run_typed"])]
    if r.empty:
        return pd.DataFrame()
    table = r.assign(typed=r.value.map({1.0: "yes", 0.0: "NO"}))
    columns = [c for c in ("variant", "case", "state", "typed", "typed_reason", "reason", "task_errors",
                           "pages_failed", "digests") if c in table]
    return table[columns].rename(columns={"variant": "fault"}).reset_index(drop=True)


def fig_fault_replies(m: pd.DataFrame) -> Figure:
    """What senders saw under each fault: reply counts stacked per fault (log scale: 250s outnumber the rest)."""
    r = rows(m, "faults", "replies")
    fig, ax = plt.subplots(figsize=(7, 3))
    if len(r):
        table = r.pivot_table(index="variant", columns="reply", values="value", aggfunc="sum").fillna(0)
        table.plot.barh(ax=ax, stacked=False, logx=True)
        ax.invert_yaxis()
    ax.set_xlabel("replies (log)")
    ax.set_ylabel("")
    ax.set_title("What senders saw under each fault")
    fig.tight_layout()
    return fig
