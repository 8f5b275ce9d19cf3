"""Notebook 14's measurements: issue 16's shapes on this project and on Prefect, Dagster and Airflow, interleaved.

Each peer runs in a long-lived ``peer_bench`` process started with the python of its own venv
(``data/peers/<name>/venv``, made by ``make peers``: ``base.peerenv``) and its run store on disk in a temp
dir; this project runs in this process (``peer_shapes.LocalEngine``). Rep 0 is an untimed warm-up of every
(engine, shape); then, rep by rep and shape by shape, each engine runs it once, the engines' order rotated
every rep so none is always first after another's load. A peer's turn ends only once its processes are idle
again (``settle``: Prefect's server goes on ingesting a run's events after the run returned), so its
leftover work never lands in the next engine's timing. A peer whose venv is absent, or whose process fails
to start, gives one ``skipped`` row with the reason instead of figures: the notebook never fails on a peer.

Sizes are per engine: issue 16's 200-task chain and 1,000-wide fan-out take minutes a run on the slow peers,
so they run smaller shapes (the rows name the size) and the tables compare milliseconds per task.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import pandas as pd
import psutil
from tqdm import tqdm

from ..base import peerenv
from ..base.harness import row, save
from ..base.recorder import AuditRecorder
from .peer_shapes import SHAPES, LocalEngine, tasks_per_run

SCENARIO = "peers"
OURS = "this_project"
ENGINES = (OURS, *peerenv.PEERS)
BENCH = Path(__file__).with_name("peer_bench.py")
MARK = "@@peer-bench "  # peer_bench.MARK (that file is run by a foreign interpreter, never imported here)
START_S = 300.0  # Airflow's `db migrate` on a fresh SQLite file alone takes ~5-30 s on 2 busy cores
REQUEST_S = 900.0
NOT_MEASURED = {
    ("airflow", "burst"): "not measured: dag.test() runs one DAG run in its process (two at once from threads fail: "
                          "'signal only works in main thread'); runs at once need Airflow's scheduler and executor",
}


class PeerProcess:
    """A peer's ``peer_bench`` process: started on construction, ``measure`` per request, ``close`` at the end."""

    def __init__(self, name: str, python: Path, home: Path) -> None:
        self.name = name
        self.log = home / "bench.log"
        home.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.log, "w")
        started = time.perf_counter()
        self.process = subprocess.Popen([str(python), str(BENCH), name, str(home / "store")], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                        start_new_session=True)  # its group: Prefect's server child goes with it
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        self._pump = threading.Thread(target=_pump, args=(self.process.stdout, self._lines), daemon=True)
        self._pump.start()
        try:
            self.ready = self._answer(START_S)
        except Exception:
            self.close()
            raise
        self.ready["ready_s"] = time.perf_counter() - started

    def measure(self, shape: str, size: int) -> dict[str, Any]:
        """Seconds of one warm run of ``shape`` at ``size`` in the peer (``error`` instead when it failed)."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"shape": shape, "size": size}) + "\n")
        self.process.stdin.flush()
        answer = self._answer(REQUEST_S)
        answer["settle_s"] = settle(psutil.Process(self.process.pid))
        return answer

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self._kill()  # a late answer must not be read as the next request's
            raise RuntimeError(f"{self.name}: no answer within {timeout:.0f} s (log: {self.log})") from None
        if line is None:
            raise RuntimeError(f"{self.name}: bench process exited {self.process.wait()}: {_tail(self.log)}")
        return dict(json.loads(line))

    def close(self) -> None:
        """End the process (stdin closed: it returns) and its log."""
        with contextlib.suppress(BrokenPipeError):  # it may have died already
            if self.process.stdin:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._kill()
        self._pump.join(timeout=10)
        if self.process.stdout:
            self.process.stdout.close()
        self._stderr.close()


    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def settle(process: psutil.Process, idle_share: float = 0.05, step_s: float = 0.25, limit_s: float = 60.0) -> float:
    """Wait until ``process`` and its children use under ``idle_share`` of a core; return the seconds waited.

    A peer may go on working after its run returned (Prefect's server ingests the run's events and logs):
    that work would land in the next engine's timing, so the next turn waits, and the wait is recorded.
    """
    started = time.monotonic()
    before = _cpu_s(process)
    while time.monotonic() - started < limit_s:
        time.sleep(step_s)
        now = _cpu_s(process)
        if now - before < idle_share * step_s:
            break
        before = now
    return time.monotonic() - started - step_s


def _cpu_s(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        if line.startswith(MARK):
            lines.put(line[len(MARK):])
    lines.put(None)


def _tail(path: Path, lines: int = 3) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-500:]


def start_engines(directory: Path, peers_root: Path, engines: tuple[str, ...]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start each engine that can run (one at a time: their imports compete for the CPU); rows for the rest."""
    started: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name in engines:
        reason = None if name == OURS else peerenv.skip_reason(peers_root, name)
        if reason is None:
            try:
                started[name] = (LocalEngine(directory / OURS) if name == OURS else
                                 PeerProcess(name, peerenv.venv_python(peers_root, name), directory / name))
            except Exception as exc:  # a peer that cannot start is reported, never fatal
                reason = f"skipped: failed to start: {type(exc).__name__}: {exc}"[:500]
        if reason is not None:
            rows.append(row(name, "skipped", 1, "bool", 0, reason=reason))
            continue
        ready = started[name].ready
        rows += [row(name, metric, ready[metric], "s", 0, version=ready["version"])
                 for metric in ("import_s", "setup_s", "ready_s") if ready.get(metric) is not None]
    return started, rows


def plan(engines: list[str], shapes: tuple[str, ...], reps: int) -> list[tuple[int, str, str]]:
    """The (rep, shape, engine) order: shape by shape within a rep, the engines rotated by one every rep."""
    return [(rep, shape, engines[(rep + i) % len(engines)])
            for rep in range(reps) for shape in shapes for i in range(len(engines))]


def compare_engines(directory: Path, sizes: dict[str, dict[str, int]], reps: int = 3,
                    peers_root: Path = peerenv.PEERS_DIR, engines: tuple[str, ...] = ENGINES,
                    recorder: AuditRecorder | None = None) -> pd.DataFrame:
    """Run every shape on every available engine, interleaved, ``reps`` timed runs each after a warm-up.

    ``sizes`` maps shape → engine → size (tasks of a chain or fan-out, runs at once of a burst; 0 or absent:
    not measured, with ``NOT_MEASURED``'s reason); the profiles in ``batch.PROFILES`` hold the audit's.
    Rows (scenario ``peers``, variant = engine): ``per_task_ms`` per timed run with tags ``shape``, ``size``,
    ``tasks``, ``seconds``, ``version``, ``settle_s`` (the peer still busy after its run returned); ``warmup_s``
    per engine and shape (rep 0); ``import_s``/``setup_s``/``ready_s`` per peer process; ``skipped`` or
    ``error`` with a ``reason``. Run stores live in a temp dir under ``directory``, removed after.
    """
    shapes = tuple(s for s in SHAPES if s in sizes)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peers-", dir=directory) as tmp:
        started, rows = start_engines(Path(tmp), peers_root, engines)
        try:
            rows += _not_measured(started, shapes, sizes)
            steps = [s for s in plan(list(started), shapes, reps + 1) if sizes[s[1]].get(s[2], 0) > 0]
            for rep, shape, name in tqdm(steps, desc="peers", unit="run"):
                rows.append(_timed(started[name], name, shape, sizes[shape][name], rep - 1))
        finally:
            for engine in started.values():
                engine.close()
    return save(recorder, SCENARIO, rows)


def _not_measured(started: dict[str, Any], shapes: tuple[str, ...], sizes: dict[str, dict[str, int]]
                  ) -> list[dict[str, Any]]:
    return [row(name, "skipped", 1, "bool", 0, shape=shape, version=started[name].ready["version"],
                reason=NOT_MEASURED.get((name, shape), "not measured: size 0 in this profile"))
            for shape in shapes for name in started if sizes[shape].get(name, 0) <= 0]


def _timed(engine: Any, name: str, shape: str, size: int, rep: int) -> dict[str, Any]:
    """One request's row: ``per_task_ms``, or ``warmup_s`` for rep -1, or ``error`` with the reason."""
    tags = {"shape": shape, "size": size, "tasks": tasks_per_run(shape, size), "version": engine.ready["version"]}
    try:
        answer = engine.measure(shape, size)
    except Exception as exc:  # a peer that broke mid-way: the row says so, the other engines go on
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    if "error" in answer:
        return row(name, "error", 1, "bool", max(rep, 0), reason=str(answer["error"])[:500], **tags)
    if rep < 0:
        return row(name, "warmup_s", answer["seconds"], "s", 0, **tags)
    return row(name, "per_task_ms", answer["seconds"] * 1000 / tags["tasks"], "ms", rep, seconds=answer["seconds"],
               settle_s=answer.get("settle_s"), **tags)
