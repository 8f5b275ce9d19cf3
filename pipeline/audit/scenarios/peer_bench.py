"""Issue 16's shapes on one peer engine, run by that peer's own interpreter: ``python peer_bench.py ENGINE DIR``.

This file is a script, not part of the package at run time: ``peers.PeerProcess`` starts it with the python
of ``data/peers/<engine>/venv`` (whose pins conflict with ours), so it imports nothing from ``pipeline`` and
only the standard library besides the peer. Every run store lives on disk under DIR.

Protocol (stdout, one JSON object per line after ``MARK``): first ``{"ready", "version", "import_s",
"setup_s"}`` (seconds to import the engine's top module, then to build the rest: more imports, the store);
then, for each request line on stdin ``{"shape", "size"}``, one run of it: ``{"seconds"}`` or ``{"error"}``.
A shape's definitions are built at its first request, which the driver sends as an untimed warm-up. The
engine's own prints go to stderr: fd 1 is pointed there and the protocol keeps a private copy of stdout.

Shapes, every task body a no-op: ``chain`` (``size`` tasks, each after the previous), ``fanout`` (``size``
independent tasks), ``digest`` (parse → ingest×3 → digest → deliver, one run) and ``burst`` (``size`` digest
runs started at once from as many threads).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MARK = "@@peer-bench "
DIGEST = ("parse_email", ("ingest_0", "ingest_1", "ingest_2"), "build_digest", "deliver")
Runner = Callable[[str, int], Callable[[], None]]  # (shape, size) → a function doing one run of it


def _burst(one_run: Callable[[], None], size: int) -> Callable[[], None]:
    def run() -> None:
        with ThreadPoolExecutor(max_workers=size) as pool:
            for future in [pool.submit(one_run) for _ in range(size)]:
                future.result()
    return run


def prefect_env(home: Path) -> dict[str, str]:
    """Prefect's settings: its home and a SQLite database there, served by its ephemeral API server."""
    os.environ.pop("PREFECT_API_URL", None)  # never a server configured elsewhere
    return {"PREFECT_HOME": str(home), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}


def prefect(home: Path) -> tuple[str, Runner]:
    """Prefect 3: flows of tasks, its ephemeral API server on a SQLite database in ``home``."""
    import prefect as engine
    from prefect import flow, task
    from prefect.futures import wait

    @task
    def noop(*upstream: Any) -> None:
        return None

    @functools.cache  # each named task built once (warm-up), as a module of @task functions would be
    def named(name: str) -> Any:
        return noop.with_options(name=name)

    @flow
    def chain(size: int) -> None:
        previous = None
        for i in range(size):
            previous = named(f"t{i}")(previous)

    @flow
    def fanout(size: int) -> None:
        wait([named(f"t{i}").submit() for i in range(size)])

    @flow
    def digest() -> None:
        parse = named(DIGEST[0]).submit()
        ingests = [named(name).submit(parse) for name in DIGEST[1]]
        named(DIGEST[3]).submit(named(DIGEST[2]).submit(*ingests)).result()

    def runner(shape: str, size: int) -> Callable[[], None]:
        if shape == "digest":
            return digest
        if shape == "burst":
            return _burst(digest, size)
        return lambda: {"chain": chain, "fanout": fanout}[shape](size)

    return engine.__version__, runner


def dagster_env(home: Path) -> dict[str, str]:
    """Dagster's instance directory: its run, event-log and schedule storage (SQLite files) go there."""
    return {"DAGSTER_HOME": str(home)}


def dagster(home: Path) -> tuple[str, Runner]:
    """Dagster: a job of ops run by ``execute_in_process`` against a DagsterInstance (SQLite) in ``home``."""
    import dagster as engine
    from dagster import DagsterInstance, In, Nothing, Out, job, op

    instance = DagsterInstance.get()

    @op(ins={"after": In(Nothing)}, out=Out(Nothing))
    def noop() -> None:
        return None

    def build(shape: str, size: int) -> Any:
        @job(name=f"{shape}_{size}")
        def shaped() -> None:
            if shape == "chain":
                previous = noop.alias("t0")()
                for i in range(1, size):
                    previous = noop.alias(f"t{i}")(after=previous)
            elif shape == "fanout":
                for i in range(size):
                    noop.alias(f"t{i}")()
            else:
                parse = noop.alias(DIGEST[0])()
                ingests = [noop.alias(name)(after=parse) for name in DIGEST[1]]
                noop.alias(DIGEST[3])(after=noop.alias(DIGEST[2])(after=ingests))
        return shaped

    def runner(shape: str, size: int) -> Callable[[], None]:
        shaped = build(shape, size if shape != "burst" else 0)

        def one() -> None:
            if not shaped.execute_in_process(instance=instance).success:
                raise RuntimeError(f"dagster run of {shape} failed")
        return _burst(one, size) if shape == "burst" else one

    return engine.__version__, runner


def airflow_env(home: Path) -> dict[str, str]:
    """Airflow's home and its metadata database (SQLite) there; no example DAGs."""
    return {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags")}


def airflow_dag(shape: str, size: int) -> Any:
    """The Airflow DAG of ``shape``: called from the DAG file ``airflow`` writes, as Airflow parses DAG files."""
    import datetime

    from airflow.sdk import DAG, task

    @task
    def noop() -> None:
        return None

    with DAG(dag_id=f"{shape}_{size}", schedule=None, start_date=datetime.datetime(2026, 1, 1),
             catchup=False) as dag:
        if shape == "chain":
            previous = noop.override(task_id="t0")()
            for i in range(1, size):
                current = noop.override(task_id=f"t{i}")()
                previous >> current
                previous = current
        elif shape == "fanout":
            for i in range(size):
                noop.override(task_id=f"t{i}")()
        else:
            parse, built = noop.override(task_id=DIGEST[0])(), noop.override(task_id=DIGEST[2])()
            for name in DIGEST[1]:
                parse >> noop.override(task_id=name)() >> built
            built >> noop.override(task_id=DIGEST[3])()
    return dag


# Airflow 3's dag.test() runs only a DAG its bundle sync finds in the DAGs folder (it re-parses the folder on
# every call): each shape gets a file there, kept to the shapes of this process.
DAG_FILE = """import sys
sys.path.insert(0, {here!r})
from peer_bench import airflow_dag
dag = airflow_dag({shape!r}, {size})
"""


def airflow(home: Path) -> tuple[str, Runner]:
    """Airflow 3: ``dag.test()`` (one process, no scheduler) on a SQLite metadata database in ``home``."""
    import importlib.util

    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=sys.stderr)
    import airflow as engine

    def runner(shape: str, size: int) -> Callable[[], None]:
        path = dags / f"{shape}_{size}.py"
        path.write_text(DAG_FILE.format(here=str(Path(__file__).resolve().parent), shape=shape, size=size))
        spec = importlib.util.spec_from_file_location(f"peer_dag_{shape}_{size}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        def one() -> None:
            state = getattr(module.dag.test(), "state", None)
            if str(state).lower().split(".")[-1] != "success":
                raise RuntimeError(f"airflow run of {shape} ended {state}")
        return _burst(one, size) if shape == "burst" else one

    return engine.__version__, runner


# name → (its settings, its top-level module: timed alone as import_s, then the rest of its set-up)
ENGINES = {"prefect": (prefect_env, "prefect", prefect), "dagster": (dagster_env, "dagster", dagster),
           "airflow": (airflow_env, "airflow", airflow)}


def serve(name: str, home: Path) -> None:
    """Answer timing requests from stdin until it closes (the protocol in the module docstring)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the engines' own prints and logs: stderr, never the protocol

    def say(**fields: Any) -> None:
        protocol.write(MARK + json.dumps(fields) + "\n")

    home.mkdir(parents=True, exist_ok=True)
    settings, module, setup = ENGINES[name]
    os.environ.update(settings(home))
    started = time.perf_counter()
    importlib.import_module(module)
    imported = time.perf_counter()
    version, runner = setup(home)
    say(ready=True, version=version, import_s=imported - started, setup_s=time.perf_counter() - imported)
    runs: dict[tuple[str, int], Callable[[], None]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (request["shape"], int(request["size"]))
        try:
            if key not in runs:  # built on first use: the driver's untimed warm-up request
                runs[key] = runner(*key)
            t0 = time.perf_counter()
            runs[key]()
            say(seconds=time.perf_counter() - t0)
        except Exception as exc:  # reported to the driver, which records it as the row's reason
            say(error=f"{type(exc).__name__}: {exc}"[:500])

if __name__ == "__main__":
    serve(sys.argv[1], Path(sys.argv[2]))
