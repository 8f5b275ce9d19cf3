"""Tables and charts of the soak and the email bursts measured on a real ``python -m pipeline serve``.

Processes are named by role: *serve* (the main process) and *workers* (its
extraction workers: the sum over the live ones, or the largest live one).
Empty inputs give empty tables, never invented figures.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from ...config import MB
from ..base.memory import slope
from ..scenarios.memory_soak import SETTLED_RUNS
from .views import rows

KIB = 1024
# (metric, process) of a serve soak series -> its label in tables and charts
SERIES = {("rss_bytes", "serve"): "serve RSS", ("uss_bytes", "serve"): "serve USS",
          ("rss_bytes", "workers"): "workers RSS (sum)", ("uss_bytes", "workers"): "workers USS (sum)",
          ("max_worker_rss_bytes", "workers"): "largest worker RSS"}


def serve_soak_series(m: pd.DataFrame) -> pd.DataFrame:
    """MB of each serve-soak series (columns as in ``SERIES``) against runs completed."""
    soak = rows(m, "soak")
    if soak.empty or "serve" not in set(soak.variant):
        return pd.DataFrame(columns=["runs"])
    soak = soak[soak.variant == "serve"]
    out = {}
    for (metric, process), label in SERIES.items():
        picked = soak[(soak.metric == metric) & (soak.process == process)].sort_values("rep")
        if len(picked):
            out[label] = pd.Series(picked.value.to_numpy() / MB, index=picked.runs.to_numpy())
    return pd.DataFrame(out).rename_axis("runs").reset_index() if out else pd.DataFrame(columns=["runs"])


def serve_slopes(m: pd.DataFrame) -> pd.DataFrame:
    """Leak slope (KiB per run, second half of the serve soak) per series and role, and workers replaced."""
    soak = rows(m, "soak")
    if soak.empty or "serve" not in set(soak.variant):
        return pd.DataFrame(columns=["process", "series", "KiB_per_run"])
    soak = soak[soak.variant == "serve"]
    leak = soak[soak.metric.str.startswith("leak_")]
    table = pd.DataFrame({
        "process": leak.process,
        "series": [SERIES.get((metric.removeprefix("leak_").removesuffix("_per_run"), process), metric)
                   for metric, process in zip(leak.metric, leak.process, strict=True)],
        "KiB_per_run": leak.value / KIB})
    return table.reset_index(drop=True)


def serve_slope(m: pd.DataFrame, process: str, metric: str = "leak_rss_bytes_per_run") -> float | None:
    """One role's fitted slope in bytes per run (None when the session has no serve soak)."""
    soak = rows(m, "soak", metric)
    if soak.empty or "process" not in soak:
        return None
    picked = soak[(soak.variant == "serve") & (soak.process == process)]
    return float(picked.value.max()) if len(picked) else None


def serve_soak_fact(m: pd.DataFrame, name: str) -> float | None:
    """A single serve-soak figure such as ``worker_restarts`` or ``runs_failed`` (None if not measured)."""
    soak = rows(m, "soak", name)
    picked = soak[soak.variant == "serve"] if len(soak) else soak
    return float(picked.value.max()) if len(picked) else None


def fig_serve_soak(series: pd.DataFrame, slopes: pd.DataFrame) -> Figure:
    """RSS of serve and of its workers (sum and largest) over the serve soak, slopes in the legend."""
    fig, ax = plt.subplots(figsize=(9, 3.2))
    per = dict(zip(slopes.series, slopes.KiB_per_run, strict=True)) if len(slopes) else {}
    for label in ("serve RSS", "workers RSS (sum)", "largest worker RSS", "serve USS"):
        if label in series:
            ax.plot(series.runs, series[label], marker=".", label=f"{label} ({per.get(label, 0):+.2f} KiB/run)")
    ax.set_xlabel("runs completed (after warm-up)")
    ax.set_ylabel("MB (sampled after each batch)")
    ax.set_title("python -m pipeline serve over the soak, by process")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    return fig


def burst_resources(m: pd.DataFrame) -> pd.DataFrame:
    """Per burst round: peak RSS (MB) and CPU seconds of serve and of its workers, and workers replaced."""
    r = rows(m, "email_burst")
    if r.empty or "process" not in r:
        return pd.DataFrame(columns=["round"])
    r = r[r.metric.isin(["peak_rss_bytes", "cpu_seconds", "worker_restarts"])].copy()
    r["column"] = r.metric.map({"peak_rss_bytes": "peak RSS MB", "cpu_seconds": "CPU s",
                                "worker_restarts": "replaced"}) + " " + r.process
    r["shown"] = r.value.where(r.metric != "peak_rss_bytes", r.value / MB)
    order = [c for c in ("peak RSS MB serve", "peak RSS MB workers", "CPU s serve", "CPU s workers",
                         "replaced workers") if c in set(r.column)]
    return r.pivot_table(index="round", columns="column", values="shown", aggfunc="first")[order].reset_index()


def kib_per_run(value: float | None) -> str:
    """``+0.73 KiB per run`` for a slope in bytes per run; ``not measured`` for None."""
    return "not measured" if value is None else f"{value / KIB:+.2f} KiB per run"


_UNSETTLED = (f" With fewer than {SETTLED_RUNS:,} runs serve's caches and allocator are still settling, so these "
              "slopes overstate steady growth and the leak SLAs do not judge them.")


def serve_soak_text(m: pd.DataFrame) -> str:
    """The serve soak in a sentence: RSS slope per process role, and how many workers were replaced."""
    serve, workers = serve_slope(m, "serve"), serve_slope(m, "workers")
    if serve is None and workers is None:
        return "Soak on `python -m pipeline serve`: not measured in this session."
    runs = rows(m, "soak", "leak_rss_bytes_per_run")
    runs = runs[runs.variant == "serve"]
    total = int(runs.runs.max()) if "runs" in runs and len(runs) else 0
    largest = serve_slope(m, "workers", "leak_max_worker_rss_bytes_per_run")
    restarts, failed = serve_soak_fact(m, "worker_restarts"), serve_soak_fact(m, "runs_failed")
    return (f"Soak on `python -m pipeline serve` ({total:,} mails with a one-page PDF over SMTP after a warm-up, "
            "RSS read with psutil once each batch's runs ended; slopes fitted over the second half): "
            f"**serve** (the main process) {kib_per_run(serve)}, **extraction workers** (summed over the live ones) "
            f"{kib_per_run(workers)}, the largest single worker {kib_per_run(largest)}; "
            f"extraction workers replaced on schedule during the soak: {int(restarts or 0)}; runs failed: "
            f"{int(failed or 0)}." + (_UNSETTLED if total < SETTLED_RUNS else ""))


def slope_segments(series: pd.DataFrame, label: str = "serve RSS", segments: int = 3) -> list[float]:
    """The series' least-squares slope in bytes per run over ``segments`` consecutive parts of the settled samples
    (after the first sample, the warm-up): a leak keeps its slope, a cache that fills makes it fall towards 0."""
    if label not in series or len(series) < 2 * segments + 1:
        return []
    points = series[["runs", label]].dropna().iloc[1:]
    size = len(points) // segments
    parts = [points.iloc[i * size:(i + 1) * size + 1] for i in range(segments)]  # each shares its edge sample
    return [slope(list(p.runs), list(p[label] * MB)) for p in parts]


def slope_discussion(m: pd.DataFrame, project_runs: int = 1_000_000) -> str:
    """What serve's remaining RSS slope means: its slope per part of the soak (falling or not), and the growth
    over ``project_runs`` runs if the last part's slope held, which bounds what a month of mail would add."""
    parts = slope_segments(serve_soak_series(m))
    if not parts:
        return "Too few serve-soak samples in this session to say how serve's RSS slope changes over the soak."
    shown = ", ".join(kib_per_run(p) for p in parts)
    last = parts[-1]
    falling = all(later < earlier for earlier, later in zip(parts, parts[1:], strict=False))
    projected = max(last, 0.0) * project_runs / MB
    trend = ("falls from part to part, the shape of caches filling towards a bound (SQLite's page cache, "
             "allocator arenas, imported code paths warming up), not of a leak, which keeps its slope"
             if falling else
             "does not fall steadily from part to part: a leak cannot be ruled out from this soak alone; a longer "
             "soak (profile full) or the tracemalloc soak's top growing lines below say more")
    return (f"Serve's RSS slope over consecutive thirds of the soak after its warm-up: {shown}. The slope {trend}. "
            f"Even if the last third's slope held, {project_runs:,} more runs would add {projected:,.0f} MB to "
            "serve; the alert `PipelineServeRssGrowth` watches the same slope in production.")


def kernel_soak_slopes(m: pd.DataFrame, variant: str = "email_digest") -> dict[str, float]:
    """The in-kernel tracemalloc soak's fitted slopes in bytes per run: ``traced`` and ``rss`` (second half of the
    soak) and ``traced_all`` (every sample); a slope the session did not record is left out."""
    soak = rows(m, "soak")
    if soak.empty:
        return {}
    soak = soak[soak.variant == variant]
    names = {"traced": "leak_traced_bytes_per_run", "rss": "leak_rss_bytes_per_run",
             "traced_all": "traced_bytes_per_run_all_samples"}
    found = {key: soak[soak.metric == metric].value for key, metric in names.items()}
    return {key: float(values.max()) for key, values in found.items() if len(values)}


def kernel_soak_text(m: pd.DataFrame) -> str:
    """The in-kernel soak in a sentence: traced and RSS slopes, and the all-samples slope that early steps inflate."""
    slopes = kernel_soak_slopes(m)
    if "traced" not in slopes:
        return "In-kernel tracemalloc soak: not measured in this session."
    whole = slopes.get("traced_all")
    return ("In-kernel tracemalloc soak (the pipeline inside the audit's notebook kernel, not serve: it names the "
            f"lines that grow): traced memory grows {kib_per_run(slopes['traced'])} and the kernel's RSS "
            f"{kib_per_run(slopes.get('rss'))} over the second half of the soak (least-squares fit, samples after "
            "`gc.collect()`): a leak keeps growing to the end, while a bounded cache filling up is a step early on"
            + (f"; fitted over every sample the traced slope is {kib_per_run(whole)}, which such steps inflate "
               "(the chart shows where they are)." if whole is not None else "."))


def drain_table(m: pd.DataFrame) -> pd.DataFrame:
    """Small mails processed per second per serve variant: median and range over its rounds, CPU ms per run (all
    of serve, then its main process), what one core allows at the main process's cost, and each variant's median
    rate over the default's (rounds interleaved in one session)."""
    r = rows(m, "small_mail_drain")
    if r.empty:
        return r
    rate = r[r.metric == "runs_per_s"].groupby("variant").value
    table = pd.DataFrame({"rounds": rate.size(), "runs/s median": rate.median(), "min": rate.min(), "max": rate.max(),
                          "CPU ms per run": r[r.metric == "cpu_ms_per_run"].groupby("variant").value.median()})
    by_process = r[r.metric == "process_cpu_ms_per_run"]
    if not by_process.empty:  # sessions before the per-process rows have none
        main = by_process[by_process.process == "main"].groupby("variant").value.median()
        table["main process CPU ms per run"] = main
        table["runs/s one core allows at that"] = 1000 / main
    if "default" in table.index:
        table["x default"] = table["runs/s median"] / table.loc["default", "runs/s median"]
    return table.reset_index()


def drain_cpu_by_process(m: pd.DataFrame) -> pd.DataFrame:
    """The shipped defaults' CPU ms per small run in each of serve's processes (median over rounds)."""
    r = rows(m, "small_mail_drain", "process_cpu_ms_per_run")
    if r.empty:
        return r
    return r[r.variant == "default"].groupby("process", sort=False).value.median().rename(
        "CPU ms per run").reset_index()
