"""Interleaved A/B of two commits: is the candidate slower than the base, measured side by side?

Comparing two audit sessions run at different times confounds the code with the machine's drift (on
a shared 2-core VM, 1.2–1.4x in trigger latency within the hour). Here each commit is checked out in
a temporary git worktree and one probe (``scripts/ab_probe.py``) runs alternately in each, A B A B
after a warm-up, in fresh processes; the ratio of medians over the repetitions gets the same
bootstrap interval as the session gate.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from .regression import TIME_UNITS, SeriesVerdict, bootstrap_ratio
from .report import ROOT

PROBE = ROOT / "scripts" / "ab_probe.py"
PROBES = ("trigger", "ingest", "transitions")


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


def run_probe(tree: Path, probe: str, timeout_s: float = 600) -> tuple[float, str]:
    """Run ``probe`` in a fresh interpreter importing ``pipeline`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(PROBE), probe], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode:
        raise ABError(f"probe {probe!r} failed in {tree}: {done.stderr.strip()[-800:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["value"]), str(result["unit"])


def compare_commits(base: str, candidate: str | None = None, probe: str = "trigger", reps: int = 5,
                    min_effect: float = 0.10, progress: bool = True, repo: Path = ROOT) -> SeriesVerdict:
    """Run ``probe`` ``reps`` times in each commit of ``repo``, interleaved after one warm-up each; ``candidate``
    None means the working tree. Regressed when the whole interval of the slowness ratio is above
    1 + min_effect."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    values: dict[str, list[float]] = {"base": [], "candidate": []}
    unit = "s"
    with checkout(base, repo) as base_tree, checkout(candidate, repo) as cand_tree:
        trees = {"base": base_tree, "candidate": cand_tree}
        for tree in trees.values():  # warm-up: page cache, fixture generation, first imports
            run_probe(tree, probe)
        for _ in tqdm(range(reps), desc=f"A/B {probe}", unit="rep", disable=not progress):
            for side, tree in trees.items():
                value, unit = run_probe(tree, probe)
                values[side].append(value)
    direction = TIME_UNITS.get(unit, 1)
    point, low, high = bootstrap_ratio(values["base"], values["candidate"], direction)
    key = f"ab/{probe}/{base}..{candidate or 'working tree'}"
    return SeriesVerdict(key, statistics.median(values["base"]), statistics.median(values["candidate"]), point,
                         low, high, low > 1 + min_effect)
