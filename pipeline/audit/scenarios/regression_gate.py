"""The audit checks its own regression gate: is a planted slowdown caught on a busy machine?

A gate that answers "not regressed" when it cannot tell is worse than none. Here a throwaway clone of
the repository gets one more commit that adds a fixed amount of work to every store write (the
``transitions`` probe's hot path), and the commit A/B (``abcommits``) compares, with each measure,
the planted commit against its parent and the parent against itself, while ``load`` CPU-bound
processes run beside it, as on a shared CI machine. The gate is sound when the planted commit comes
out "regressed" with the load-stable measure and the parent never does against itself.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from ..base.harness import row
from ..base.recorder import AuditRecorder
from ..reporting.abcommits import compare_commits
from ..reporting.report import ROOT

SCENARIO = "regression_gate"
# Appended to pipeline/sqlite_store.py in the planted commit: extra work on every store write. 75 squares
# per write is about 15 % more of the transitions probe's instructions (the audit reports the measured share):
# clearly above the gate's 10 % threshold. 50 squares measured 10.0-10.6 %, on the threshold, so whether the gate
# caught it was a coin flip on each change to the store's own cost.
PLANTED = '''

_record_transitions_unplanted = SqliteRunStore.record_transitions


def _planted_slowdown(self, transitions):  # the audit's planted slowdown (pipeline/audit/scenarios/regression_gate.py)
    sum(i * i for i in range({work}))
    return _record_transitions_unplanted(self, transitions)


SqliteRunStore.record_transitions = _planted_slowdown
'''


def planted_repo(directory: Path, work: int = 75, source: Path = ROOT) -> Path:
    """A clone of ``source`` at HEAD plus one commit that slows every store write by ``work`` squares."""
    clone = directory / "planted-repo"
    subprocess.run(["git", "clone", "--quiet", str(source), str(clone)], check=True)
    with open(clone / "pipeline" / "sqlite_store.py", "a") as module:
        module.write(PLANTED.format(work=work))
    git = ["git", "-c", "user.name=audit", "-c", "user.email=audit@localhost"]
    subprocess.run([*git, "commit", "--quiet", "-am", "planted slowdown"], cwd=clone, check=True)
    return clone


def _spin() -> None:
    while True:
        pass


@contextmanager
def cpu_load(processes: int) -> Iterator[None]:
    """``processes`` busy-looping processes for the duration of the block (the shared machine's neighbours)."""
    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(processes)]
    for p in spinners:
        p.start()
    try:
        yield
    finally:
        for p in spinners:
            p.terminate()
        for p in spinners:
            p.join(timeout=10)


def gate_check(directory: Path, measures: dict[str, int], load: int = 2, work: int = 75,
               recorder: AuditRecorder | None = None, progress: bool = True) -> pd.DataFrame:
    """Per measure (with its repetitions): the planted commit against its parent and, for the noisy measures, the
    parent against itself, under ``load`` busy neighbours. Instruction counts repeat to a fraction of a percent,
    so their self-comparison would only cost minutes of valgrind; their spread shows in the planted pair.

    Rows: ``slowness_ratio`` (candidate/base, with the interval's ``low``/``high`` and the ``verdict`` as tags)
    per pair, ``planted_caught`` (1 if the planted pair is "regressed") and, where run, ``identical_regressed``
    (1 if the parent is "regressed" against itself), tagged with the measure and the load.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gate-", dir=directory) as tmp, cpu_load(load):
        repo = planted_repo(Path(tmp), work)
        for measure, reps in measures.items():
            pairs = {"planted": ("HEAD~1", "HEAD")}
            if measure != "instructions":
                pairs["identical"] = ("HEAD~1", "HEAD~1")
            tags = {"measure": measure, "load": load, "reps": reps, "probe": "transitions", "work": work}
            for pair, (base, candidate) in pairs.items():
                v = compare_commits(base, candidate, "transitions", reps=reps, progress=progress, repo=repo,
                                    measure=measure)
                rows.append(row(pair, "slowness_ratio", v.ratio, "x", 0, **tags, low=v.low, high=v.high,
                                verdict=v.verdict))
                metric = "planted_caught" if pair == "planted" else "identical_regressed"
                rows.append(row(pair, metric, int(v.regressed), "bool", 0, **tags))
    frame = pd.DataFrame(rows)
    if recorder is not None:
        recorder.record(SCENARIO, frame)
    return frame


def gate_table(measurements: pd.DataFrame) -> pd.DataFrame:
    """The report's view: per measure and pair, the ratio with its interval and the verdict."""
    picked = measurements[(measurements.scenario == SCENARIO) & (measurements.metric == "slowness_ratio")]
    return pd.DataFrame([{"measure": r.tags["measure"], "pair": r.variant,
                          "ratio": round(r.value, 3), "interval": f"[{r.tags['low']:.3f}, {r.tags['high']:.3f}]",
                          "verdict": r.tags["verdict"], "reps": r.tags["reps"],
                          "CPU-bound neighbours": r.tags["load"]} for r in picked.itertuples()])
