"""Interleaved A/B of two commits: is the candidate slower than the base, measured side by side?

Comparing two audit sessions run at different times confounds the code with the machine's drift (on
a shared 2-core VM, 1.2–1.4x in trigger latency within the hour). Here each commit is checked out in
a temporary git worktree and one probe (``scripts/ab_probe.py``) runs alternately in each, A B A B
after a warm-up, in fresh processes; the ratio of medians over the repetitions gets the same
bootstrap interval and the same three verdicts as the session gate.

What is compared (``measure``): ``wall`` time, the probe's own figure; ``cpu``, the CPU seconds its
process tree spent on the measured work (the default: other jobs on the machine stretch wall time far
more than CPU time); or ``instructions``, the instructions executed under valgrind's cachegrind by a
small version of the probe (deterministic to a fraction of a percent, ~50x slower to run; Debian's
``valgrind``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from .regression import TIME_UNITS, SeriesVerdict, bootstrap_ratio, judge
from .report import ROOT

PROBE = ROOT / "scripts" / "ab_probe.py"
PROBES = ("trigger", "drain", "accept", "ingest", "transitions")
MEASURES = ("cpu", "wall", "instructions")
INSTRUCTION_PROBES = ("transitions", "ingest")  # the SMTP probes (trigger, drain, accept) have no small form
_I_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


class ABError(RuntimeError):
    """A commit could not be checked out, or the probe failed in it; the message says which."""


@contextmanager
def checkout(rev: str | None, repo: Path = ROOT) -> Iterator[Path]:
    """The tree of ``rev`` of ``repo`` in a temporary worktree, or the working tree when ``rev`` is None."""
    if rev is None:
        yield repo
        return
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        tree = Path(tmp) / "tree"
        done = subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), rev], cwd=repo,
                              capture_output=True, text=True)
        if done.returncode:
            raise ABError(f"cannot check out {rev!r}: {done.stderr.strip()}")
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, capture_output=True)


def run_probe(tree: Path, probe: str, measure: str = "wall", timeout_s: float = 1800) -> tuple[float, str]:
    """Run ``probe`` in a fresh interpreter importing ``pipeline`` from ``tree``; its figure for ``measure``."""
    if measure == "instructions":
        return _instructions(tree, probe, 3, timeout_s) - _instructions(tree, probe, 1, timeout_s), "instructions"
    result = json.loads(_run(tree, [sys.executable, str(PROBE), probe], timeout_s).stdout.strip().splitlines()[-1])
    if measure == "cpu":
        return float(result["cpu_s"]), "s"
    return float(result["value"]), str(result["unit"])


def _instructions(tree: Path, probe: str, passes: int, timeout_s: float) -> float:
    """Instructions executed by the probe's process tree with ``passes`` small passes, under cachegrind."""
    if probe not in INSTRUCTION_PROBES:
        raise ABError(f"probe {probe!r} cannot be counted in instructions; use {', '.join(INSTRUCTION_PROBES)}")
    if shutil.which("valgrind") is None:
        raise ABError("counting instructions needs valgrind (Debian: apt-get install valgrind)")
    done = _run(tree, ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--trace-children=yes",
                       "--cachegrind-out-file=/dev/null", sys.executable, str(PROBE), probe, "--small", str(passes)],
                timeout_s)
    counts = [int(n.replace(",", "")) for n in _I_REFS.findall(done.stderr)]  # one total per process
    if not counts:
        raise ABError(f"cachegrind printed no instruction count for {probe!r}: {done.stderr.strip()[-400:]}")
    return float(sum(counts))


def _run(tree: Path, command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        probe = command[command.index(str(PROBE)) + 1]
        raise ABError(f"probe {probe!r} failed in {tree}: {done.stderr.strip()[-800:]}")
    return done


def compare_commits(base: str, candidate: str | None = None, probe: str = "trigger", reps: int = 5,
                    min_effect: float = 0.10, progress: bool = True, repo: Path = ROOT,
                    measure: str = "cpu") -> SeriesVerdict:
    """Run ``probe`` ``reps`` times in each commit of ``repo``, interleaved after one warm-up each; ``candidate``
    None means the working tree. The verdict comes from the interval of the slowness ratio against
    1 + min_effect (see ``regression.judge``)."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
    values: dict[str, list[float]] = {"base": [], "candidate": []}
    unit = "s"
    with checkout(base, repo) as base_tree, checkout(candidate, repo) as cand_tree:
        trees = {"base": base_tree, "candidate": cand_tree}
        if measure != "instructions":  # warm-up: page cache, fixture generation, first imports
            for tree in trees.values():
                run_probe(tree, probe, measure)
        for _ in tqdm(range(reps), desc=f"A/B {probe} ({measure})", unit="rep", disable=not progress):
            for side, tree in trees.items():
                value, unit = run_probe(tree, probe, measure)
                values[side].append(value)
    direction = TIME_UNITS.get(unit, 1)
    point, low, high = bootstrap_ratio(values["base"], values["candidate"], direction)
    key = f"ab/{probe}/{measure}/{base}..{candidate or 'working tree'}"
    return SeriesVerdict(key, statistics.median(values["base"]), statistics.median(values["candidate"]), point,
                         low, high, judge(low, high, min_effect), measure)
