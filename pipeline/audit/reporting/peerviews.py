"""Tables, chart and text of the peer comparison (scenario ``peers``, notebook 14): this project beside
Prefect, Dagster and Airflow on the same no-op shapes.

Like ``views``: each function takes the measurement frame and returns a DataFrame, a Figure or a string; no
rows give an empty table, never invented figures. A ratio is always of runs taken in the same rep (the
engines interleaved), so a slow minute of the machine moves both sides of it.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from ..base.harness import percentile
from ..scenarios.peer_shapes import SHAPES
from ..scenarios.peers import ENGINES, OURS, SCENARIO
from .views import markdown, rows

SHAPE_NAMES = {"chain": "chain", "fanout": "fan-out", "digest": "one digest run (6 tasks)",
               "burst": "runs at once (6 tasks each)"}

COMPARABLE = """**What is and is not comparable.** Every engine runs the same DAG shapes with no-op task bodies, warm
(definitions built and one untimed run first), with its run store on local disk (SQLite for all four), so the
figures are each engine's own cost per task and per run: scheduling, state bookkeeping and what it writes.
They are not the cost of the same *features*. This project writes every run and task transition to its SQLite
store and does nothing else. Prefect 3 also runs an API server (its ephemeral server, in a subprocess here)
and sends every task's state changes and logs to it as events for its UI; Dagster writes a structured event log
of every step (the data its UI and asset lineage read) and checks types at each step's inputs and outputs;
Airflow's `dag.test()` serializes the DAG, syncs its DAG folder to the metadata database on every call and runs
each task through its execution API with rendered-template and XCom bookkeeping. None of them is run here the
way it runs in production (Prefect workers polling a server, Dagster's multiprocess executor launched by its
daemon, Airflow's scheduler and executor), which adds process start-up and polling intervals per task or run;
so these figures are the peers' floor, not their typical latency. The sizes differ per engine where a peer
would take minutes (rows name them): milliseconds per task are compared, and a fixed per-run cost (Prefect's
~1 s at flow end) weighs more on a smaller shape."""


def _measured(m: pd.DataFrame) -> pd.DataFrame:
    return rows(m, SCENARIO, "per_task_ms") if len(m) else pd.DataFrame()


def paired_ratios(measured: pd.DataFrame) -> pd.DataFrame:
    """Per engine, shape and rep: ms per task over this project's in the same rep (columns engine, shape,
    rep, ratio). Reps where this project has no figure are left out."""
    if measured.empty:
        return pd.DataFrame(columns=["engine", "shape", "rep", "ratio"])
    ours = measured[measured.variant == OURS].set_index(["shape", "rep"]).value
    out = measured.assign(ours=[ours.get((s, r), math.nan) for s, r in zip(measured["shape"], measured.rep,
                                                                           strict=True)])
    out = out.assign(ratio=out.value / out.ours).dropna(subset=["ratio"])
    return out.rename(columns={"variant": "engine"})[["engine", "shape", "rep", "ratio"]].reset_index(drop=True)


def ratio_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per shape and engine: size, reps, median and p95 ms per task, median run ms, the median seconds the
    engine's processes stayed busy after a run returned (``peers.settle``), and the ratio to this project
    (median of the per-rep ratios, with their min–max)."""
    measured = _measured(m)
    if measured.empty:
        return pd.DataFrame()
    ratios = paired_ratios(measured)
    out = []
    for (shape, engine), r in measured.groupby(["shape", "variant"], sort=False):
        paired = ratios[(ratios.engine == engine) & (ratios["shape"] == shape)].ratio
        out.append({"shape": SHAPE_NAMES.get(shape, shape), "engine": engine, "version": r.version.iloc[0],
                    "size": int(r["size"].max()), "tasks/run": int(r.tasks.max()), "reps": len(r),
                    "median ms/task": r.value.median(), "p95 ms/task": percentile(r.value, 95),
                    "median run ms": r.seconds.median() * 1000,
                    "busy after s": r.settle_s.median() if "settle_s" in r else math.nan,
                    f"× {OURS}": paired.median() if len(paired) else math.nan,
                    "spread (min–max)": f"{paired.min():.3g}–{paired.max():.3g}" if len(paired) and engine != OURS
                    else ""})
    table = pd.DataFrame(out)
    order = {s: i for i, s in enumerate(SHAPE_NAMES[s] for s in SHAPES)}
    rank = {e: i for i, e in enumerate(ENGINES)}
    return table.sort_values(["shape", "engine"], key=lambda c: c.map(order if c.name == "shape" else rank)
                             ).reset_index(drop=True)


def startup_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per peer process: seconds to import the engine's top module, then to set up the rest (imports, its
    store; Airflow's ``db migrate``), and spawn → ready in all. Not part of any per-task figure."""
    r = rows(m, SCENARIO) if len(m) else pd.DataFrame()
    r = r[r.metric.isin(["import_s", "setup_s", "ready_s"])] if len(r) else r
    if r.empty:
        return pd.DataFrame()
    table = r.pivot_table(index=["variant", "version"], columns="metric", values="value", aggfunc="first")
    table = table.reindex(columns=["import_s", "setup_s", "ready_s"]).reset_index()
    table = table.sort_values("variant", key=lambda c: c.map({e: i for i, e in enumerate(ENGINES)}))
    return table.reset_index(drop=True).rename(columns={"variant": "engine", "import_s": "import s",
                                                       "setup_s": "setup s", "ready_s": "spawn → ready s"})


def skipped_table(m: pd.DataFrame) -> pd.DataFrame:
    """What was not measured and why: absent peers, shapes a peer cannot run, runs that failed."""
    r = rows(m, SCENARIO) if len(m) else pd.DataFrame()
    r = r[r.metric.isin(["skipped", "error"])] if len(r) else r
    if r.empty:
        return pd.DataFrame(columns=["engine", "shape", "reason", "times"])
    r = r.assign(shape=r["shape"].map(SHAPE_NAMES).fillna("all") if "shape" in r else "all")
    return (r.groupby(["variant", "shape", "reason"], sort=False).size().rename("times").reset_index()
            .rename(columns={"variant": "engine"}))


def fig_peers(table: pd.DataFrame) -> Figure:
    """Median ms per task per shape and engine on a log scale, a whisker up to the p95."""
    fig, ax = plt.subplots(figsize=(10, 3.6), layout="constrained")
    if table.empty:
        ax.set_title("No peer comparison measured")
        return fig
    shapes = list(dict.fromkeys(table["shape"]))
    engines = [e for e in ENGINES if e in set(table.engine)]
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        part = table[table.engine == engine].set_index("shape").reindex(shapes)
        x = [k + (i - (len(engines) - 1) / 2) * width for k in range(len(shapes))]
        low = [0.0] * len(shapes)
        high = (part["p95 ms/task"] - part["median ms/task"]).clip(lower=0).fillna(0).tolist()
        ax.bar(x, part["median ms/task"], width, label=engine, yerr=[low, high], capsize=2)
    ax.set_xticks(range(len(shapes)), shapes, fontsize=8)
    ax.set_yscale("log")
    ax.set(ylabel="ms per task (median; whisker: p95, log)", title="No-op tasks: this project beside its peers")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    return fig


def peers_summary(m: pd.DataFrame) -> str:
    """One sentence per shape: each peer's median ratio to this project and its spread, for the report."""
    table = ratio_table(m)
    if table.empty:
        reasons = skipped_table(m)
        return ("No peer comparison was measured in this session" +
                (": " + "; ".join(f"{e}: {r}" for e, r in zip(reasons.engine, reasons.reason, strict=True))
                 if len(reasons) else " (notebook `14_peers` did not run).") )
    lines = []
    for shape, part in table.groupby("shape", sort=False):
        ours = part[part.engine == OURS]
        peers = part[part.engine != OURS]
        head = (f"{ours['median ms/task'].iloc[0]:.3g} ms per task here" if len(ours) else "not measured here")
        tail = ", ".join(f"{e} {v:.3g}× ({s})" for e, v, s in zip(peers.engine, peers[f"× {OURS}"],
                                                                  peers["spread (min–max)"], strict=True)
                         if not math.isnan(v))
        lines.append(f"- **{shape}**: {head}" + (f"; {tail}" if tail else ""))
    return "\n".join(lines)


def report_markdown(m: pd.DataFrame) -> str:
    """The report's peer section: the ratios per shape, the table, what was not measured, what compares."""
    table, skipped = ratio_table(m), skipped_table(m)
    if table.empty and skipped.empty:
        return "No peer comparison (notebook `14_peers`) was recorded in this session."
    return ("Issue 16 (notebook `14_peers`): the same no-op shapes on this project and on the engines users would "
            "pick instead, each peer in its own venv (`make peers`) and process with an on-disk run store, the "
            "engines interleaved rep by rep after a warm-up; *× this_project* is the median over reps of the ratio "
            "of ms per task in the same rep (min–max beside it):\n\n" + peers_summary(m) + "\n\n"
            + markdown(table) + ("\n\nNot measured:\n\n" + markdown(skipped) if len(skipped) else "")
            + "\n\n" + COMPARABLE)
