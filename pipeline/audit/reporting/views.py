"""Tables and charts for the report, computed from one session's measurement rows.

Each function takes the measurement frame (``AuditRecorder.measurements``) and
returns a DataFrame or a matplotlib Figure, so the report notebook only
arranges them. Empty inputs give empty tables, never invented figures.
"""

from __future__ import annotations

import json
import re
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from ..base.harness import percentile
from ..scenarios.concurrency import STAGES


def rows(m: pd.DataFrame, scenario: str, metric: str | None = None) -> pd.DataFrame:
    """Rows of one scenario (and metric), with their tags as columns."""
    picked = m[(m.scenario == scenario) & ((m.metric == metric) if metric else True)].reset_index(drop=True)
    tags = pd.json_normalize(picked.tags.tolist()) if len(picked) else pd.DataFrame()
    return pd.concat([picked.drop(columns=["tags"]), tags], axis=1)


def _q(series: pd.Series, q: float) -> float:
    return percentile(series, q * 100)


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
    fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
    ax.barh(table.stage, table.p95_s * 1000, color="#c8d7ea", label="p95")
    ax.barh(table.stage, table.median_s * 1000, color="#2f6db5", label="median")
    ax.invert_yaxis()
    ax.set_xlabel("time per mail (ms)")
    ax.set_ylabel("stage")
    ax.set_title("Where a mail's time goes: Email → Ingestion → Digest → Delivery")
    _legend_right(ax)
    return fig


def _legend_right(ax: Axes, **options: Any) -> None:
    """The axes' legend to the right of its data area, so that it never covers a bar or a line."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, **options)


def hot_lines(m: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """The ``top`` most expensive lines per stage from the line profile."""
    r = rows(m, "line_profile", "line_seconds")
    if r.empty:
        return r
    r = r.sort_values("value", ascending=False).groupby("stage").head(top)
    return r[["stage", "function", "line", "hits", "value", "code"]].rename(columns={"value": "seconds"})


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
    fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
    ax.plot(series.runs, series.rss_mb, label=f"RSS ({slopes.get('rss', 0) / 1024:+.2f} KiB/run)")
    ax.plot(series.runs, series.traced_mb, label=f"traced ({slopes.get('traced', 0) / 1024:+.2f} KiB/run)")
    ax.set_xlabel("runs after warm-up (count)")
    ax.set_ylabel("memory (MB)")
    ax.set_title("Memory over the soak (sampled after gc)")
    _legend_right(ax)
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


def capacity_lines(m: pd.DataFrame) -> list[str]:
    """Figures a reader can plan with: where concurrency throughput peaks, and how many small mails a
    serve processed per second (and per hour) while a burst drained, with the conditions of each."""
    lines = []
    table = concurrency_table(m)
    if len(table) and "runs/s" in table:
        peak = table.loc[table["runs/s"].idxmax()]
        after = table[table.level > peak.level]
        lines.append(f"- Throughput peaks at {human_number(peak['runs/s'])} runs/s with {int(peak.level)} workflows at "
                     f"once (one-page PDF each, in-kernel pipeline, `max_active_runs` raised to the level): about "
                     f"{human_number(round(peak['runs/s'] * 3600, -2))} mails an hour"
                     + (f"; with more at once (up to {int(after.level.max())}) it is "
                        f"{human_number(after['runs/s'].min())}–{human_number(after['runs/s'].max())} runs/s: more "
                        "concurrency only adds contention for the cores." if len(after) else "."))
    burst = rows(m, "email_burst")
    if len(burst) and "mode" in burst:
        single = burst[(burst["mode"] == "burst") & burst.metric.isin(["accepted", "backlog_peak", "drain_seconds"])]
        values = single.groupby("metric").value.first()
        if {"accepted", "backlog_peak", "drain_seconds"} <= set(values.index) and values["drain_seconds"] > 0:
            rate = values["backlog_peak"] / values["drain_seconds"]
            lines.append(f"- A `python -m pipeline serve` with the shipped defaults, sent {int(values['accepted']):,} "
                         f"small mails (no attachment) at once, worked off its backlog of "
                         f"{int(values['backlog_peak']):,} runs in {human_number(values['drain_seconds'])} s after the "
                         f"last was accepted: about {human_number(rate)} runs/s "
                         f"({human_number(round(rate * 3600, -2))} an hour). Acceptance is faster than processing, "
                         "so a longer burst grows the backlog (issue 16 is about raising this)." + _drain_rounds(m))
    return lines


def _drain_rounds(m: pd.DataFrame) -> str:
    """The shipped defaults' drain over all their rounds (``small_mail_drain``): what the one burst above is
    one sample of, and the figure the SLA reads; empty when that scenario did not run."""
    r = rows(m, "small_mail_drain")
    rates = r[(r.metric == "runs_per_s") & (r.variant == "default")].value if len(r) else r
    if not len(rates):
        return ""
    return (f" That is one round; {len(rates)} rounds of the same kind (bursts of small mails to a fresh serve with "
            f"the shipped defaults) gave a median of {human_number(rates.median())} runs/s "
            f"({human_number(rates.min())}–{human_number(rates.max())}), the figure the SLA reads.")


def fig_concurrency(table: pd.DataFrame) -> Figure:
    """Throughput and p95 latency against concurrency."""
    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    ax.plot(table.level, table["runs/s"], marker="o", color="#2f6db5", label="throughput (runs/s)")
    ax.set_xscale("log")
    ax.set_xlabel("workflows started at once (count, log scale)")
    ax.set_ylabel("throughput (runs/s)")
    other = ax.twinx()
    other.plot(table.level, table["p95 s"], marker="s", color="#c0392b", label="p95 latency (s)")
    other.set_ylabel("p95 end-to-end latency (s)")
    ax.set_title("Concurrency: throughput and p95 latency")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    return fig


def pdf_scaling_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per document kind and size: median and p95 seconds, pages, pages/s, the extraction workers' peak RSS
    (``workers_peak_rss_mb``, summed over the workers) and what they held before the document, whether the
    variant is the shipped default, errors."""
    r = rows(m, "pdf_scaling")
    if r.empty:
        return r
    keys = ["variant", "kind", "nominal_mb", "file_mb"]
    timing = r[r.metric == "ingest_seconds"].groupby(keys).value.agg(median_s="median", p95_s=lambda s: _q(s, 0.95),
                                                                        reps="count")
    pages = r[r.metric == "pages"].groupby(keys).value.max().rename("pages")
    rss = [r[r.metric == metric].groupby(keys).value.max().rename(metric)
           for metric in ("workers_peak_rss_mb", "workers_rss_before_mb")]
    table = pd.concat([timing, pages, *rss], axis=1).reset_index()
    table["pages/s"] = table.pages / table.median_s
    for column in ("default", "error"):  # default: the shipped engine setting (sessions since issue 13)
        if column in r:
            first = r[r.metric == "ingest_seconds"].groupby(keys)[column].first().rename(column)
            table = table.merge(first.reset_index(), on=keys, how="left")
    if "default" in table:
        table["default"] = table["default"].fillna(False).astype(bool)
    return table.sort_values(["variant", "kind", "nominal_mb"])


Line = tuple[Any, Any, str, dict[str, Any]]  # x, y, label, plot options


def _side_by_side(left: list[Line], right: list[Line], left_axes: dict[str, Any],
                  right_axes: dict[str, Any]) -> Figure:
    """Two line charts next to each other; one legend below both (the left chart's lines) serves both."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for ax, lines, settings in ((axes[0], left, left_axes), (axes[1], right, right_axes)):
        for x, y, label, options in lines:
            ax.plot(x, y, label=label, **options)
        ax.set(**settings)
    if left:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=7,
                   ncol=min(len(left), 6))
    return fig


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (0.2, 30, not 2×10⁻¹, 3×10¹); which ticks get one is LogFormatter's
    choice (minor ticks too when the axis spans about a decade or less)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


PDF_MEMORY = "workers_peak_rss_mb"  # the extraction workers' RSS, summed; the kernel's own is not ingestion's


def fig_pdf_scaling(table: pd.DataFrame) -> Figure:
    """Small multiples, one column per document kind: median ingest time (top row) and the extraction workers'
    peak RSS (bottom row) against file size, one line per engine variant, one legend below the panels."""
    kinds, variants = sorted(table.kind.unique()), sorted(table.variant.unique())
    colours = {variant: f"C{i}" for i, variant in enumerate(variants)}
    fig, axes = plt.subplots(2, len(kinds), figsize=(max(5.0, 2.6 * len(kinds)), 5.6), squeeze=False,
                             layout="constrained")
    for column, kind in enumerate(kinds):
        time_ax, memory_ax = axes[0, column], axes[1, column]
        for variant, g in table[table.kind == kind].sort_values("file_mb").groupby("variant"):
            time_ax.plot(g.file_mb, g.median_s, marker="o", color=colours[variant])
            if PDF_MEMORY in g:
                memory_ax.plot(g.file_mb, g[PDF_MEMORY], marker="o", color=colours[variant])
        time_ax.set(title=kind, xscale="log", yscale="log", xlabel="file size (MB, log)",
                    ylabel="median time (s, log)")
        memory_ax.set(xscale="log", xlabel="file size (MB, log)", ylabel="workers' peak RSS (MB)")
        memory_ax.set_ylim(0, memory_ax.get_ylim()[1] * 1.1)  # from zero, with room above the highest point
        for axis, thresholds in ((time_ax.xaxis, (1, 0.4)), (memory_ax.xaxis, (1, 0.4)), (time_ax.yaxis, (2, 0.8))):
            axis.set_major_formatter(_PlainLogFormatter())  # times: some labels between decades (tall panels)
            axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=thresholds))
    handles = [Line2D([], [], marker="o", color=colours[v], label=v) for v in variants]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(variants), fontsize=8,
               title="engine variant", title_fontsize=8)
    fig.suptitle("PDF ingestion per document kind: time, and the extraction workers' memory (RSS summed)")
    return fig


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
        cdfs.append((values, 100 * (values.index + 1) / len(values), str(label), {}))
    backlog: list[Line] = [(g.t, g.value, str(label), {}) for label, g in r[r.metric == "backlog"].groupby("round")]
    return _side_by_side(
        cdfs, backlog,
        {"xscale": "log", "xlabel": "DATA end → run queued (ms, log)", "ylabel": "mails triggered within (%)",
         "title": "Trigger latency"},
        {"xlabel": "time since first send (s)", "ylabel": "runs queued or running (count)",
         "title": "Backlog and drain"})


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


def engines_not_measured(session_params: str | dict[str, Any] | None) -> str:
    """The engine table's blanks explained from the session's notebook parameters: which documents the engines
    other than the default skipped (``others_max_mb`` of notebook 02); '' when they ran on every document."""
    params = json.loads(session_params) if isinstance(session_params, str) else (session_params or {})
    cap = params.get("02_pdf_ingestion", {}).get("others_max_mb")
    if cap is None:
        return ""
    return (f"; a blank cell was not measured: this profile runs the engines other than the default on documents "
            f"up to {cap:g} MB only, and `--profile full` on every document")


def hostile_table(m: pd.DataFrame) -> pd.DataFrame:
    """What each hostile input did: outcome, seconds, and the extraction workers' peak RSS (summed over the
    workers) with what they held before the file."""
    r = rows(m, "hostile_inputs")
    if r.empty:
        return r
    seconds = r[r.metric == "seconds"].set_index("name")
    memory = [r[r.metric == metric].set_index("name").value.rename(metric)
              for metric in ("workers_peak_rss_mb", "workers_rss_before_mb")]
    return pd.concat([seconds[["outcome", "value", "message"]].rename(columns={"value": "seconds"}), *memory],
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


_MARKDOWN_SPECIAL = str.maketrans({"|": "\\|", "*": "\\*", "_": "\\_"})
_TAG_LIKE = re.compile(r"<(?=[A-Za-z/!])")  # "<frozen ...>" would vanish as an HTML tag; "<= 20 ms" stays


def _escape(text: str) -> str:
    return _TAG_LIKE.sub("&lt;", text.translate(_MARKDOWN_SPECIAL))


def human_number(value: float, digits: int = 3) -> str:
    """``1,560`` not ``1.56e+03``; ``0.000123`` not ``1.23e-04``; ``3`` not ``3.0``; below 1,000 ``digits``
    significant digits."""
    if value != value:
        return ""
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return np.format_float_positional(value, precision=digits, unique=False, fractional=False, trim="-")


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | float | np.integer | np.floating):
        return human_number(float(value), digits)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = str(value)
    return text if "`" in text else _escape(text)  # a code span shows its text as is


def markdown(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """A DataFrame as a GitHub markdown table for people: no scientific notation, no all-empty columns,
    markdown-special characters in text escaped (``re/__init__.py`` is not bold); '(no rows)' when empty."""
    if frame is None or frame.empty:
        return "_(no rows in this session)_"
    frame = frame.dropna(axis=1, how="all")
    digits = int(floatfmt.strip(".g") or 3)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    cells = frame.apply(lambda column: column.map(lambda v: _cell(v, digits)))
    cells.columns = [_escape(str(c)) for c in frame.columns]
    return cells.to_markdown(index=False, disable_numparse=True,  # tabulate would reformat "1,560" as 1560
                             colalign=["right" if n else "left" for n in numeric])


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
                  "untyped": "untyped", "failed_runs": "failed runs", "refused_after_s": "4xx after s",
                  "recover_s": "recover s", "drain_s": "drain s", "scrape_max_s": "slowest scrape s",
                  "wal_peak_mb": "WAL peak MB", "wal_after_mb": "WAL after MB",
                  "acked_while_replaced": "acked meanwhile", "stop_s": "stop s",
                  "digested_while_hung": "digested while hung", "waiting_runs": "waiting",
                  "waiting_unexplained": "waiting, no reason"}


def fault_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per fault: sent, acked, lost, duplicated, untyped, failed runs, how long the gateway acked mail before
    refusing it (a disk full under the work dir or the outbox), time to recover and drain, the slowest scrape of
    serve's ``/metrics`` during the fault (where it was scraped), what senders saw, and a note (why a fault was
    skipped, or why its harness failed)."""
    r = rows(m, "faults")
    if r.empty:
        return pd.DataFrame()
    out = []
    for fault, group in r.groupby("variant", sort=False):
        if not group.metric.isin(["sent", "skipped", "error"]).any():  # a part with figures of its own (mail_loop)
            continue
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
    counts = ["sent", "acked (250)", "lost", "duplicated", "untyped", "failed runs"]
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
                           "pages_failed", "pdfs", "digests") if c in table]
    return table[columns].rename(columns={"variant": "fault"}).reset_index(drop=True)


def relay_cases(m: pd.DataFrame) -> pd.DataFrame:
    """Per relay behaviour (notebook 09's ``bad_relay``): the run's state, the copies the relay took, the deliver
    task's tries, what was expected, and the run's reason."""
    r = rows(m, "faults", "relay_case_as_expected")
    if r.empty:
        return pd.DataFrame()
    table = r.assign(**{"as expected": r.value.map({1.0: "yes", 0.0: "NO"})})
    columns = [c for c in ("case", "state", "copies", "deliver_tries", "expected", "as expected", "reason")
               if c in table]
    return table[columns].rename(columns={"deliver_tries": "deliver tries"}).reset_index(drop=True)


def wild_mail_line(m: pd.DataFrame) -> str:
    """One sentence on mail as real clients write it and the mail loop (notebook 09), or "" if not measured."""
    r = rows(m, "faults")
    figures = {metric: r[r.metric == metric].value.max() for metric in
               ("wild_mail_pdfs_missed", "automatic_mail_answered", "runs_per_mail", "runs_not_ended")
               if not r.empty and (r.metric == metric).any()}
    if len(figures) < 4:
        return ""
    answered = r[r.metric == "digests_per_mail"]
    responders = (f"; answered by a responder that ignores RFC 3834 (a ticket system, a forward-as-attachment rule), "
                  f"at most {answered.value.max():g} digest per mail" if len(answered) else "")
    missed = r[r.metric == "wild_mail_pdfs_missed"]
    shapes = int(missed.cases.max()) if "cases" in missed and missed.cases.notna().any() else 0
    return (f"Mail as real clients write it ({shapes or 'several'} shapes, one PDF each: a scanner's unindented fold, "
            f"a base64 forward, an automatic reply; a damaged ZIP beside the PDF, a stray Content-Type above the "
            f"multipart one, base64 in padded pieces, yEnc in the body, a gzip file, a DMARC report): "
            f"{figures['wild_mail_pdfs_missed']:g} PDFs missed, {figures['automatic_mail_answered']:g} "
            f"machine-made mails answered. Digests that come back as mail (a relay routing them to the gateway"
            f"{', or a responder answering each' if len(answered) else ''}): at most {figures['runs_per_mail']:g} "
            f"runs per mail ({figures['runs_not_ended']:g} not ended) until no run was added (a loop would keep "
            f"growing){responders}.")


def fig_fault_replies(m: pd.DataFrame) -> Figure:
    """What senders saw under each fault: reply counts per fault, side by side (log scale: 250s outnumber the
    rest)."""
    r = rows(m, "faults", "replies")
    fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
    if len(r):
        table = r.pivot_table(index="variant", columns="reply", values="value", aggfunc="sum").fillna(0)
        table.plot.barh(ax=ax, stacked=False, logx=True)
        ax.invert_yaxis()
        _legend_right(ax, title="reply")
    ax.set_xlabel("replies (count, log)")
    ax.set_ylabel("fault")
    ax.set_title("What senders saw under each fault")
    return fig


def bottleneck_line(stages: pd.DataFrame) -> str:
    """The stage with the largest median time per mail, as a sentence ('' without stages)."""
    if stages.empty:
        return ""
    worst = stages.sort_values("median_s").iloc[-1]
    return (f"**Bottleneck: {worst.stage}**, {worst.median_s * 1000:.1f} ms median per mail "
            f"({worst.share} of the total).")


def limit_lines(m: pd.DataFrame) -> list[str]:
    """Section 5's bullets: the largest concurrency without failure, each size limit a document hit, the slowest
    extraction (shipped default first), then the capacity figures."""
    lines = []
    concurrency = concurrency_table(m)
    if len(concurrency):
        ok, failing = concurrency[concurrency.failed == 0].level, concurrency[concurrency.failed > 0]
        lines.append(f"- Concurrency: no failure up to {int(ok.max()) if len(ok) else 0} workflows at once"
                     + (f"; failures from {int(failing.level.min())} on." if len(failing) else
                        " (the largest level measured; the full profile raises it until something breaks)."))
    scaling = pdf_scaling_table(m)
    if len(scaling) and "error" in scaling:
        lines += [f"- {r.kind} {r.nominal_mb} MB: {r.error}" for r in scaling.dropna(subset=["error"]).itertuples()]
    if len(scaling):
        shipped = scaling[scaling["default"]] if "default" in scaling and scaling["default"].any() else scaling
        slowest, overall = shipped.sort_values("pages/s").iloc[0], scaling.sort_values("pages/s").iloc[0]
        lines.append(f"- Slowest extraction with the shipped default ({slowest.variant}): {slowest.kind} at "
                     f"{slowest['pages/s']:.0f} pages/s (slowest of any variant: {overall.kind} with "
                     f"{overall.variant} at {overall['pages/s']:.0f} pages/s); time follows pages, so a document's "
                     "cost is bounded by the page cap and the per-document timeout.")
    return lines + capacity_lines(m)
