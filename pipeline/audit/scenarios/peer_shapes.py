"""Issue 16's peer shapes on this project: the same no-op DAGs ``peer_bench`` builds on Prefect, Dagster, Airflow.

``chain`` (``size`` tasks, each after the previous), ``fanout`` (``size`` independent tasks), ``digest``
(parse → ingest×3 → digest → deliver, one run) and ``burst`` (``size`` digest runs triggered at once). The
engine is the one notebook 06's ``runner_overhead`` times (``WorkflowEngine`` on a ``SqliteRunStore`` in a
temp dir, 4 runner threads), so its chain and wide figures are the same measurement; here it answers the
same requests as a peer's bench process, so the two sides are driven alike.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...config import EngineConfig, RunnerConfig, Settings
from ...dag import DAG, Task
from ...engine import WorkflowEngine
from ...sqlite_store import SqliteRunStore

SHAPES = ("chain", "fanout", "digest", "burst")
DIGEST_TASKS = 6  # parse, 3 ingests, digest, deliver
WAIT_S = 600.0


def _noop(ctx: Any) -> None:
    return None


def shape_dag(shape: str, size: int) -> DAG:
    """The no-op DAG of ``shape``; a ``burst`` is ``size`` runs of the ``digest`` DAG, so its DAG is that one."""
    if shape == "chain":
        return DAG(f"chain_{size}", [Task("t0", _noop)] + [Task(f"t{i}", _noop, deps=(f"t{i - 1}",))
                                                           for i in range(1, size)])
    if shape == "fanout":
        return DAG(f"fanout_{size}", [Task(f"t{i}", _noop) for i in range(size)])
    if shape not in ("digest", "burst"):
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    ingests = [Task(f"ingest_{i}", _noop, deps=("parse_email",)) for i in range(3)]
    return DAG("digest", [Task("parse_email", _noop), *ingests,
                          Task("build_digest", _noop, deps=tuple(t.id for t in ingests)),
                          Task("deliver", _noop, deps=("build_digest",))])


def tasks_per_run(shape: str, size: int) -> int:
    """Tasks one timed request executes: what its seconds are divided by for ms per task."""
    return {"chain": size, "fanout": size, "digest": DIGEST_TASKS}.get(shape, DIGEST_TASKS * size)


class LocalEngine:
    """This project, answering ``measure(shape, size)`` as a peer's bench process does."""

    def __init__(self, directory: Path, max_active_runs: int = 100) -> None:
        settings = replace(Settings.for_data_dir(directory), runner=RunnerConfig(thread_workers=4),
                           engine=EngineConfig(max_active_runs=max_active_runs))
        self.store = SqliteRunStore(settings.store)
        self.engine = WorkflowEngine(self.store, settings).start()
        self.ready: dict[str, Any] = {"version": _version(), "import_s": None, "setup_s": None}
        self._workflows: dict[tuple[str, int], str] = {}  # registered (warmed-up) shapes → workflow id

    def measure(self, shape: str, size: int) -> dict[str, Any]:
        """Seconds of one run of ``shape`` (``size`` runs at once for ``burst``), like a ``peer_bench`` request;
        the first request of a shape registers its DAG (the driver's untimed warm-up)."""
        if (shape, size) not in self._workflows:
            dag = shape_dag(shape, size)
            self.engine.register(dag)
            self._workflows[shape, size] = dag.workflow_id
        return {"seconds": self._run(shape, size)}

    def _run(self, shape: str, size: int) -> float:
        workflow = self._workflows[shape, size]
        t0 = time.perf_counter()
        ids = [self.engine.trigger(workflow).run_id for _ in range(size if shape == "burst" else 1)]
        for run_id in ids:
            run = self.engine.wait(run_id, timeout=WAIT_S)
            if run.state != "success":
                raise RuntimeError(f"run {run_id} of {shape} ended {run.state}: {run.reason}")
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the engine and close its store."""
        self.engine.shutdown()
        self.store.close()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("email-digest-pipeline")
    except PackageNotFoundError:
        return "checkout"
