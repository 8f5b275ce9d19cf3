"""Tables and charts of the hostile-sender figures (scenario ``hostile``, notebook 10) for the report.

Like ``views``: each function takes the measurement frame and returns a DataFrame or a Figure; no rows give
an empty table, never invented figures. Before/after parts read as a comparison: one row per figure, one
column per mode.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from ..base.harness import percentile
from .views import rows

_PHASES = {"held": 0, "after_release": 1, "churn": 2}


def _part(m: pd.DataFrame, part: str) -> pd.DataFrame:
    r = rows(m, "hostile")
    return r[r.variant == part] if len(r) else r


def _replies(group: pd.DataFrame) -> str:
    """``220 ×20, 421 ×5`` from reply-count rows."""
    counts = group.groupby("reply").value.sum() if len(group) else pd.Series(dtype=float)
    return ", ".join(f"{reply} ×{int(n)}" for reply, n in counts.items())


def _count(figures: pd.Series, metric: str) -> int | str:
    return int(figures[metric]) if metric in figures else ""


def sessions_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per number of idle sessions held open and phase (held, after freeing some, churn with the slots full):
    what those connections got first, how many serve held, what the normal client got and its latency, and
    what serve logged."""
    r = _part(m, "sessions")
    if r.empty or "phase" not in r:
        return pd.DataFrame()
    out: list[dict[str, Any]] = []
    for (level, phase), g in r.dropna(subset=["level", "phase"]).groupby(["level", "phase"]):
        figure = g.groupby("metric").value.max()
        latency = g[g.metric == "normal_latency_ms"].value
        out.append({"idle sessions": int(level), "phase": phase,
                    "connections got": _replies(g[g.metric.isin(["idle_replies", "churn_replies"])]),
                    "serve holds": _count(figure, "serve_connections"),
                    "normal client got": _replies(g[g.metric == "normal_replies"]),
                    "median ms": round(latency.median(), 1) if len(latency) else "",
                    "p95 ms": round(percentile(latency, 95), 1) if len(latency) else "",
                    "log bytes": _count(figure, "log_bytes"), "tracebacks": _count(figure, "tracebacks_logged")})
    table = pd.DataFrame(out)
    return table.sort_values(["idle sessions", "phase"], key=lambda c: c.map(_PHASES) if c.name == "phase" else c,
                             ignore_index=True)


def comparison_table(m: pd.DataFrame, part: str) -> pd.DataFrame:
    """One row per figure of ``part`` (``memory``, ``head_of_line``, ``spool``), one column per mode (before,
    after), the median over repetitions; reply counts per code (``first_replies 452``)."""
    r = _part(m, part)
    if r.empty:
        return pd.DataFrame()
    replies = r["reply"].fillna("").astype(str) if "reply" in r else pd.Series("", index=r.index)
    mode = r["mode"].fillna("value") if "mode" in r else "value"  # spool has no modes: one column, "value"
    r = r.assign(figure=(r.metric + " " + replies).str.strip(), mode=mode)
    table = r[r.metric != "error"].pivot_table(index="figure", columns="mode", values="value", aggfunc="median")
    ordered = [c for c in ("before", "after", "value") if c in table]
    table = table[ordered + [c for c in table if c not in ordered]]
    return table.reset_index().rename_axis(columns=None)


def notes(m: pd.DataFrame) -> str:
    """The parts whose harness failed, with the reason ("" when none did)."""
    r = rows(m, "hostile", "error")
    if r.empty:
        return ""
    return "Parts whose harness failed: " + "; ".join(f"{v}: {why}" for v, why in zip(r.variant, r.reason,
                                                                                         strict=True))


def fig_hostile_senders(m: pd.DataFrame) -> Figure:
    """A normal client's latency against idle sessions held open, and serve's peak RSS before and after."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3), layout="constrained")
    r = _part(m, "sessions")
    latency = r[(r.metric == "normal_latency_ms") & (r.phase == "held")] if len(r) else r
    if len(latency):
        by_level = latency.groupby("level").value
        left.plot(by_level.median().index, by_level.median().values, "o-", label="median")
        left.plot(by_level.quantile(0.95).index, by_level.quantile(0.95).values, "s--", label="p95")
        left.axvline(float(latency.limit.max()), color="grey", linestyle=":", label="session limit")
        left.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    left.set(xlabel="idle sessions held open (count)", ylabel="connect → 250 (ms)", title="A normal client")
    memory = comparison_table(m, "memory")
    if len(memory):
        picked = memory.set_index("figure").reindex(["serve_peak_rss_mb", "workers_peak_rss_mb"]).dropna(how="all")
        picked = picked.rename(index={"serve_peak_rss_mb": "serve", "workers_peak_rss_mb": "its workers"})
        picked.T.reindex([c for c in ("before", "after") if c in picked]).plot.bar(ax=right, rot=0)
        right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    right.set(xlabel="mode (switches off: before, on: after)", ylabel="peak RSS (MB)", title="Large mails at once")
    return fig
