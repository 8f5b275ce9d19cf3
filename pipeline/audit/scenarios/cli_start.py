"""How long the CLI takes from a cold start (issue 16): every sample is a fresh ``python -m pipeline`` process.

Commands: ``--help``, ``runs`` and ``show <id>`` on a small store (one real
ingested run), and ``ingest`` of a one-page PDF into a new data dir each time
(cold: no extraction worker running yet, no store). Rounds run every command
once, interleaved, each round starting with the next command so no command
always follows the same one; round 0 is a warm-up (page cache) and is dropped.

Bytecode: an installed package has its modules compiled (pip does it; ``make``
runs ``compileall`` on the editable checkout), but a machine that sets
PYTHONDONTWRITEBYTECODE (the audit machine does) over a checkout that has none
compiles the pipeline's modules again at every start. Both are measured,
interleaved: ``compiled`` reads every module's .pyc from a cache under the temp
dir (PYTHONPYCACHEPREFIX, written in the warm-up round, never into the source
tree); ``source`` has the same cache without the pipeline's own files, and
writes none, so only the pipeline is compiled at each start.

``cpu_s`` is the CPU time (user + system) of the process and of the children
it reaped (the extraction workers), from ``resource.getrusage(RUSAGE_CHILDREN)``
before and after: it is only exact while nothing else in this process reaps
children at the same time.

Rows: ``{"command", "bytecode", "rep", "wall_s", "cpu_s", "returncode"}``, one
per sample; ``summarize`` gives median and p95 per variant and command.
"""

from __future__ import annotations

import os
import resource
import shutil
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
BYTECODE = ("compiled", "source")


def measure_cli_start(reps: int = 10, pdf: Path | None = None,
                      bytecode: tuple[str, ...] = BYTECODE) -> list[dict[str, Any]]:
    """Time each command ``reps`` times as a fresh subprocess per ``bytecode`` variant, interleaved after one
    warm-up round.

    ``pdf``: the document ``ingest`` reads (default: a generated one-page text PDF). The ``show`` store
    is seeded by one untimed ``ingest`` of it. Returns one row per sample (see the module docstring).
    """
    if not bytecode or set(bytecode) - set(BYTECODE) or len(set(bytecode)) < len(bytecode):
        raise ValueError(f"bytecode variants are {', '.join(BYTECODE)}, each once; got {', '.join(bytecode) or 'none'}")
    with tempfile.TemporaryDirectory(prefix="clistart-") as tmp:
        root = Path(tmp)
        compiled = dict(os.environ, PYTHONPYCACHEPREFIX=str(root / "pycache"))
        compiled.pop("PYTHONDONTWRITEBYTECODE", None)
        if pdf is None:
            pdf = root / "one-page.pdf"
            pdf.write_bytes(fixtures.text_pdf(1))
        # a seeding failure shows as `show` samples with a non-zero returncode; it also fills the cache
        _run_cli(["--data-dir", str(root / "store"), "ingest", str(pdf)], root, compiled)
        envs = {"compiled": compiled,
                "source": dict(compiled, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(root / "no-pipeline"))}
        rows = []
        for rep in range(reps + 1):  # round 0 warms the page cache and writes the cache's .pyc files
            if rep == 1:  # the cache without the pipeline's modules: the source variant compiles only those
                _copy_without(root / "pycache", root / "no-pipeline", _package_cache(root, compiled))
            turn = rep % len(COMMANDS)
            variants = (bytecode if rep % 2 else bytecode[::-1]) if rep else ("compiled",)
            for command in COMMANDS[turn:] + COMMANDS[:turn]:
                for variant in variants:
                    wall_s, cpu_s, code = _run_cli(_argv(command, root, pdf, rep, variant), root, envs[variant])
                    if rep:
                        rows.append({"command": command, "bytecode": variant, "rep": rep, "wall_s": wall_s,
                                     "cpu_s": cpu_s, "returncode": code})
    return rows


def _copy_without(src: Path, dst: Path, left_out: Path) -> None:
    """Copy the tree ``src`` to ``dst``, leaving out the directory ``left_out`` inside it (which must exist:
    otherwise the source variant would quietly measure compiled code)."""
    if not left_out.is_dir():
        raise RuntimeError(f"no compiled pipeline modules at {left_out}: cannot measure the source variant")
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d, n) == left_out])


def _package_cache(root: Path, env: dict[str, str]) -> Path:
    """The directory of the pipeline's own .pyc files in the cache, as a CLI process sees its path."""
    ask = "import importlib.util, pipeline; print(importlib.util.cache_from_source(pipeline.__file__))"
    done = subprocess.run([sys.executable, "-c", ask], cwd=root, env=env, capture_output=True, text=True, check=True)
    return Path(done.stdout.strip()).parent


def _argv(command: str, root: Path, pdf: Path, rep: int, variant: str) -> list[str]:
    """The arguments of one sample: reads go to the seeded store, each ingest to a data dir of its own."""
    store = ["--data-dir", str(root / "store")]
    return {"--help": ["--help"], "runs": [*store, "runs"], "show": [*store, "show", "1"],
            "ingest": ["--data-dir", str(root / f"ingest-{rep}-{variant}"), "ingest", str(pdf)]}[command]


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
    """Median and p95 of wall and CPU seconds per bytecode variant and command (``COMMANDS`` order), and failures."""
    summary = []
    for variant in [v for v in BYTECODE if any(r["bytecode"] == v for r in rows)]:
        for command in [c for c in COMMANDS if any(r["command"] == c for r in rows)]:
            mine = [r for r in rows if r["command"] == command and r["bytecode"] == variant]
            if not mine:
                continue
            wall, cpu = [r["wall_s"] for r in mine], [r["cpu_s"] for r in mine]
            summary.append({"command": command, "bytecode": variant, "n": len(mine),
                            "wall_median_s": statistics.median(wall), "wall_p95_s": _p95(wall),
                            "cpu_median_s": statistics.median(cpu), "cpu_p95_s": _p95(cpu),
                            "failures": sum(r["returncode"] != 0 for r in mine)})
    return summary


def _p95(values: list[float]) -> float:
    """The 95th percentile (``harness.percentile``)."""
    return percentile(values, 95)
