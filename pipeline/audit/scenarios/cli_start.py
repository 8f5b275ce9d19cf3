"""How long the CLI takes from a cold start (issue 16): every sample is a fresh ``python -m pipeline`` process.

Commands: ``--help``, ``runs`` and ``show <id>`` on a small store (one real
ingested run), and ``ingest`` of a one-page PDF into a new data dir each time
(cold: no extraction worker running yet, no store). Rounds run every command
once, interleaved, each round starting with the next command so no command
always follows the same one; round 0 is a warm-up (page cache) and is dropped.

Bytecode: by default the commands run in this environment as it is; where it
sets PYTHONDONTWRITEBYTECODE (the audit machine does) every start compiles the
pipeline's modules again. ``cache_bytecode=True`` measures an installed CLI
instead: .pyc files written in the warm-up round under the temp dir
(PYTHONPYCACHEPREFIX), never into the source tree.

``cpu_s`` is the CPU time (user + system) of the process and of the children
it reaped (the extraction workers), from ``resource.getrusage(RUSAGE_CHILDREN)``
before and after: it is only exact while nothing else in this process reaps
children at the same time.

Rows: ``{"command", "rep", "wall_s", "cpu_s", "returncode"}``, one per
sample; ``summarize`` gives median and p95 per command.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..base import fixtures
from ..base.harness import percentile

COMMANDS = ("--help", "runs", "show", "ingest")


def measure_cli_start(reps: int = 10, pdf: Path | None = None, cache_bytecode: bool = False) -> list[dict[str, Any]]:
    """Time each command ``reps`` times as a fresh subprocess, interleaved after one warm-up round.

    ``pdf``: the document ``ingest`` reads (default: a generated one-page text PDF). The ``show`` store
    is seeded by one untimed ``ingest`` of it. Returns one row per sample (see the module docstring).
    """
    with tempfile.TemporaryDirectory(prefix="clistart-") as tmp:
        root = Path(tmp)
        env = dict(os.environ)
        if cache_bytecode:  # a prefix outside the source tree: the working copy gets no __pycache__ dirs
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        if pdf is None:
            pdf = root / "one-page.pdf"
            pdf.write_bytes(fixtures.text_pdf(1))
        # a seeding failure shows as `show` samples with a non-zero returncode
        _run_cli(["--data-dir", str(root / "store"), "ingest", str(pdf)], root, env)
        rows = []
        for rep in range(reps + 1):  # round 0 warms the page cache (and writes the .pyc files, if cached)
            turn = rep % len(COMMANDS)
            for command in COMMANDS[turn:] + COMMANDS[:turn]:
                wall_s, cpu_s, code = _run_cli(_argv(command, root, pdf, rep), root, env)
                if rep:
                    rows.append({"command": command, "rep": rep, "wall_s": wall_s, "cpu_s": cpu_s,
                                 "returncode": code})
    return rows


def _argv(command: str, root: Path, pdf: Path, rep: int) -> list[str]:
    """The arguments of one sample: reads go to the seeded store, each ingest to a data dir of its own."""
    store = ["--data-dir", str(root / "store")]
    return {"--help": ["--help"], "runs": [*store, "runs"], "show": [*store, "show", "1"],
            "ingest": ["--data-dir", str(root / f"ingest-{rep}"), "ingest", str(pdf)]}[command]


def _run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Run ``python -m pipeline ARGS`` to its end; return (wall s, CPU s of it and its reaped children, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
    wall_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall_s, cpu_s, done.returncode


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and p95 of wall and CPU seconds per command (commands in ``COMMANDS`` order), and failures."""
    summary = []
    for command in [c for c in COMMANDS if any(r["command"] == c for r in rows)]:
        mine = [r for r in rows if r["command"] == command]
        wall, cpu = [r["wall_s"] for r in mine], [r["cpu_s"] for r in mine]
        summary.append({"command": command, "n": len(mine), "wall_median_s": statistics.median(wall),
                        "wall_p95_s": _p95(wall), "cpu_median_s": statistics.median(cpu), "cpu_p95_s": _p95(cpu),
                        "failures": sum(r["returncode"] != 0 for r in mine)})
    return summary


def _p95(values: list[float]) -> float:
    """The 95th percentile (``harness.percentile``)."""
    return percentile(values, 95)
