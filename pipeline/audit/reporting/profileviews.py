"""Tables of the pipeline profile measured on ``python -m pipeline serve`` (``pipeline_profile``), for notebook 01
and the report: per-stage memory of serve and its workers, per-process resources, the top functions by
self time from py-spy, and where the flame graph is.

Each function takes the measurement frame (``AuditRecorder.measurements``); empty inputs give empty tables.
Every figure names its process by role, never by pid.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..base.harness import percentile
from ..notebook import resolve
from ..scenarios.concurrency import STAGES
from ..scenarios.pipeline_profile import FLAMEGRAPH, SCENARIO, TASK_STAGES
from .views import rows


def _rows(m: pd.DataFrame, metric: str) -> pd.DataFrame:
    picked = m[(m.scenario == SCENARIO) & (m.metric == metric)].reset_index(drop=True)
    tags = pd.json_normalize(picked.tags.tolist()) if len(picked) else pd.DataFrame()
    return pd.concat([picked.drop(columns=["tags"]), tags], axis=1)


def stage_memory_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per task: peak RSS and largest increment (MB) of serve and of the extraction workers (summed)."""
    r = _rows(m, "stage_memory_mb")
    if r.empty:
        return pd.DataFrame(columns=["stage", "task"])
    workers = int(r[r.process != "serve"].processes.max()) if (r.process != "serve").any() else 0
    label = {"serve": "serve", "extract workers": f"{workers} extract workers (sum)"}
    r = r.assign(column=[f"{label.get(p, p)} {'peak MB' if s == 'peak' else '+MB'}"
                         for p, s in zip(r.process, r.stat, strict=True)])
    table = r.pivot_table(index=["stage", "task"], columns="column", values="value", aggfunc="max").reset_index()
    order = {task: i for i, task in enumerate(TASK_STAGES)}
    table = table.sort_values("task", key=lambda s: s.map(lambda t: order.get(t, len(order))))
    columns = ["stage", "task"] + [f"{label[p]} {s}" for p in ("serve", "extract workers") for s in ("peak MB", "+MB")
                                   if f"{label[p]} {s}" in table]
    table = table[columns].reset_index(drop=True)
    table.columns.name = None
    return table


def process_table(m: pd.DataFrame) -> pd.DataFrame:
    """Peak RSS (MB) and CPU seconds over the load of each process of serve's tree, named by role."""
    peak, cpu = _rows(m, "process_peak_rss_mb"), _rows(m, "process_cpu_seconds")
    if peak.empty:
        return pd.DataFrame(columns=["process", "peak RSS MB", "CPU s"])
    counts = peak.process.value_counts()
    names = [p if counts[p] == 1 else f"{p} {rep + 1}" for p, rep in zip(peak.process, peak.rep, strict=True)]
    cpu_of = {(p, rep): v for p, rep, v in zip(cpu.process, cpu.rep, cpu.value, strict=True)}
    return pd.DataFrame({"process": names, "peak RSS MB": peak.value.values,
                         "CPU s": [cpu_of.get(key) for key in zip(peak.process, peak.rep, strict=True)]})


def top_self_time(m: pd.DataFrame, top: int = 5, process: str | None = None) -> pd.DataFrame:
    """The ``top`` functions by self time in py-spy's profile of serve's tree (of one process role if given)."""
    self_s = _rows(m, "self_seconds")
    if self_s.empty:
        return pd.DataFrame(columns=["process", "function", "site", "self s", "self share", "total s"])
    key = ["process", "function", "site"]
    share = _rows(m, "self_share")[key + ["value"]].rename(columns={"value": "self share"})
    total = _rows(m, "total_seconds")[key + ["value"]].rename(columns={"value": "total s"})
    table = self_s[key + ["value"]].rename(columns={"value": "self s"}).merge(share, on=key).merge(total, on=key)
    if process is not None:
        table = table[table.process == process]
    table = table.sort_values("self s", ascending=False).head(top).reset_index(drop=True)
    table["self share"] = table["self share"].map("{:.0%}".format)
    return table


def pyspy_note(m: pd.DataFrame) -> str:
    """How the sampling profile was taken, or why there is none."""
    r = _rows(m, "pyspy_recorded")
    if r.empty:
        return "No sampling profile in this session."
    item = r.iloc[0]
    if item.value:
        return (f"py-spy sampled serve and its extraction workers (`--subprocesses`) at {item.rate:g} Hz for "
                f"{item.duration_s:g} s: the load from its start to its end, or its first `pyspy_s` seconds; idle "
                f"threads are left out.")
    return f"py-spy could not record serve in this session, so there is no flame graph: {item.reason}"


def artefact_dir(db_path: str | Path, session_id: str) -> Path:
    """The session's artefact directory: ``audit-runs/<session>`` next to the DuckDB file (as the batch has it)."""
    return resolve(db_path).parent / "audit-runs" / session_id


def flamegraph_file(m: pd.DataFrame, artefacts: Path) -> Path | None:
    """The flame-graph SVG this session recorded, if it is in ``artefacts``."""
    r = _rows(m, "pyspy_recorded")
    if r.empty or not r.iloc[0].value or not r.iloc[0].get("flamegraph"):
        return None
    path = Path(artefacts) / str(r.iloc[0].flamegraph or FLAMEGRAPH)
    return path if path.exists() else None


def closing_note(m: pd.DataFrame, top: int = 5) -> str:
    """One markdown paragraph for the report's closing note: serve's top functions by self time and each
    task's memory increment of serve and of the extraction workers (empty when nothing was measured)."""
    parts = []
    functions = top_self_time(m, top=top)
    if len(functions):
        parts.append(f"Top {len(functions)} functions by self time under load (py-spy): " + "; ".join(
            f"`{r.function}` ({r.process}, `{r.site}`) {r['self s']:.2f} s" for _, r in functions.iterrows()) + ".")
    memory = stage_memory_table(m)
    rises = [c for c in memory.columns if c.endswith("+MB")]
    if len(memory) and rises:
        parts.append("Memory increment per task: " + "; ".join(
            f"{r.task} " + ", ".join(f"{c.removesuffix(' +MB')} {r[c]:+.1f} MB" for c in rises if pd.notna(r[c]))
            for _, r in memory.iterrows()) + ".")
    return " ".join(parts)


def end_to_end_floor_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per variant and sender count: CPU seconds per mail (serve and its workers, median over rounds; then by
    process, where measured), the floor the CPU sets on a mail's mean end to end (``end_to_end.cpu_floor_s``),
    the measured mean and median, and the mean over the floor (near 1: CPU-bound); empty when not measured."""
    r = rows(m, "end_to_end")
    if r.empty or "cpu_floor_seconds" not in set(r.metric):
        return pd.DataFrame(columns=["variant", "senders", "cores", "CPU s per mail", "floor s", "mean s",
                                     "median s", "mean / floor"])
    out = []
    for (variant, senders), group in r.groupby(["variant", "senders"]):
        floor = group[group.metric == "cpu_floor_seconds"]
        e2e = group[group.metric == "end_to_end_seconds"].value
        if floor.empty or e2e.empty:
            continue
        by_process = group[group.metric == "process_cpu_seconds_per_mail"]
        out.append({"variant": variant, "senders": int(senders), "cores": int(floor.cores.iloc[0]),
                    "CPU s per mail": float(group[group.metric == "cpu_seconds_per_mail"].value.median()),
                    # the same by process (sessions before these rows have none)
                    **{f"of which {process}": float(part.value.median())
                       for process, part in by_process.groupby("process", sort=False)},
                    "floor s": float(floor.value.median()), "mean s": float(e2e.mean()),
                    "median s": float(e2e.median())})
    table = pd.DataFrame(out)
    if len(table):
        table["mean / floor"] = table["mean s"] / table["floor s"]
    return table


def end_to_end_table(m: pd.DataFrame) -> pd.DataFrame:
    """Median and p95 seconds of a closed-loop mail (scenario ``end_to_end``) end to end and in each stage, per
    variant, with the conditions (PDF, its MB, senders) beside them; empty when not measured."""
    r = rows(m, "end_to_end")
    r = r[r.metric.isin(["end_to_end_seconds", "stage_seconds"])] if not r.empty else r
    if r.empty:
        return pd.DataFrame(columns=["variant", "what", "pdf", "pdf_mb", "senders", "n", "median_s", "p95_s"])
    what = r.stage.where(r.metric == "stage_seconds", "end to end")
    order = {name: i for i, name in enumerate(["end to end", *STAGES])}
    out = [{"variant": variant, "what": name, "pdf": pdf, "pdf_mb": mb, "senders": int(senders), "n": len(group),
            "median_s": float(group.value.median()), "p95_s": percentile(group.value, 95)}
           for (variant, name, pdf, mb, senders), group in r.assign(what=what).groupby(
               ["variant", "what", "pdf", "pdf_mb", "senders"])]
    table = pd.DataFrame(out)
    return table.sort_values(["variant", "senders", "what"],
                             key=lambda s: s.map(order) if s.name == "what" else s, ignore_index=True)
