"""Notebook 14's peer comparison: this project's side for real, absent peers skipped with their reason, the
ratio tables, and (only where `make peers` installed it) one real peer."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from pipeline.audit.base import peerenv
from pipeline.audit.base.harness import row
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.batch import PROFILES
from pipeline.audit.reporting import peerviews
from pipeline.audit.scenarios import peer_shapes, peers

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"chain": {"this_project": 5, "prefect": 2, "dagster": 2, "airflow": 2},
         "fanout": {"this_project": 5, "prefect": 2, "dagster": 2, "airflow": 2},
         "digest": {"this_project": 1, "prefect": 1, "dagster": 1, "airflow": 1},
         "burst": {"this_project": 3, "prefect": 1, "dagster": 1, "airflow": 0}}


def _measurements(rows: list[dict]) -> pd.DataFrame:
    """Rows as ``AuditRecorder.measurements`` returns them (tags a dict column)."""
    return pd.DataFrame(rows).assign(scenario=peers.SCENARIO)


def test_our_side_runs_every_shape_warm_on_a_real_engine(tmp_path):
    engine = peer_shapes.LocalEngine(tmp_path, max_active_runs=4)
    try:
        first = {shape: engine.measure(shape, size) for shape, size in
                 (("chain", 5), ("fanout", 5), ("digest", 1), ("burst", 4))}
        again = engine.measure("chain", 5)
        runs = engine.store.list_runs(limit=100)
    finally:
        engine.close()
    assert all(r["seconds"] > 0 for r in [*first.values(), again])
    assert len(runs) == 1 + 1 + 1 + 4 + 1 and {r.state for r in runs} == {"success"}
    assert [peer_shapes.tasks_per_run(s, n) for s, n in (("chain", 5), ("digest", 1), ("burst", 4))] == [5, 6, 24]


def test_digest_shape_is_parse_three_ingests_digest_deliver():
    dag = peer_shapes.shape_dag("digest", 1)
    deps = {t.id: set(t.deps) for t in dag.tasks}
    assert deps == {"parse_email": set(), "ingest_0": {"parse_email"}, "ingest_1": {"parse_email"},
                    "ingest_2": {"parse_email"}, "build_digest": {"ingest_0", "ingest_1", "ingest_2"},
                    "deliver": {"build_digest"}}
    with pytest.raises(ValueError, match="unknown shape"):
        peer_shapes.shape_dag("ring", 3)


def test_absent_peers_are_skipped_with_the_reason_and_this_project_still_measured(tmp_path):
    recorder = AuditRecorder(tmp_path / "audit.duckdb")
    recorder.start_session("test")
    empty = tmp_path / "no-peers"
    empty.mkdir()
    result = peers.compare_engines(tmp_path / "work", SMALL, reps=2, peers_root=empty, recorder=recorder)
    skipped = result[result.metric == "skipped"]
    assert sorted(skipped.variant) == ["airflow", "dagster", "prefect"]
    assert all("not installed" in r and "make peers" in r for r in skipped.reason)
    ours = result[result.metric == "per_task_ms"]
    assert set(ours.variant) == {"this_project"} and len(ours) == 4 * 2 and set(ours.rep) == {0, 1}
    assert len(result[result.metric == "warmup_s"]) == 4  # one untimed run per shape first
    m = recorder.measurements(peers.SCENARIO)
    table = peerviews.ratio_table(m)
    assert list(table.engine.unique()) == ["this_project"] and (table["× this_project"] == 1).all()
    assert set(peerviews.skipped_table(m).engine) == {"prefect", "dagster", "airflow"}
    assert not list((tmp_path / "work").iterdir())  # the run stores were temporary


def test_a_peer_that_cannot_start_is_skipped_with_its_error(tmp_path):
    """A venv that is there but broken: our own interpreter, which has no Airflow, stands in for it."""
    venv_bin = tmp_path / "peers" / "airflow" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    (tmp_path / "peers" / "airflow" / "installed.json").write_text(json.dumps({"version": "3.3.2"}))
    result = peers.compare_engines(tmp_path / "work", SMALL, reps=1, peers_root=tmp_path / "peers",
                                   engines=("this_project", "airflow"))
    reason = result[(result.variant == "airflow") & (result.metric == "skipped")].reason.item()
    assert reason.startswith("skipped: failed to start") and "No module named 'airflow'" in reason


def test_skip_reason_names_the_install_command(tmp_path):
    assert "make peers" in peerenv.skip_reason(tmp_path, "dagster")
    assert "unknown peer" in peerenv.skip_reason(tmp_path, "luigi")


def test_ratios_pair_the_engines_rep_by_rep_with_their_spread():
    rows = [row("this_project", "per_task_ms", ms, "ms", rep, shape="chain", size=200, tasks=200, seconds=ms * 0.2,
                version="0.1.0") for rep, ms in enumerate([1.0, 2.0, 1.0])]
    rows += [row("prefect", "per_task_ms", ms, "ms", rep, shape="chain", size=50, tasks=50, seconds=ms * 0.05,
                 version="3.9.1") for rep, ms in enumerate([10.0, 30.0, 20.0])]
    table = peerviews.ratio_table(_measurements(rows))
    prefect = table[table.engine == "prefect"].iloc[0]
    assert prefect["× this_project"] == 15.0 and prefect["spread (min–max)"] == "10–20"  # 10/1, 30/2, 20/1
    assert prefect["median ms/task"] == 20.0 and prefect["size"] == 50 and prefect["reps"] == 3
    assert prefect["p95 ms/task"] == pytest.approx(29.0)
    assert "prefect 15×" in peerviews.peers_summary(_measurements(rows))


def test_no_rows_give_empty_tables_and_say_so():
    empty = _measurements([row("prefect", "skipped", 1, "bool", reason="skipped: not installed")])
    assert peerviews.ratio_table(empty).empty and peerviews.startup_table(empty).empty
    assert "prefect: skipped: not installed" in peerviews.peers_summary(empty)
    peerviews.fig_peers(peerviews.ratio_table(empty))


def test_settle_waits_while_a_process_tree_still_works(tmp_path):
    """Prefect's server goes on after a run returned; the next engine's turn waits for that, and says how long."""
    busy = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                             "child = subprocess.Popen([sys.executable, '-c', "
                             "'import time\\nend = time.time() + 1.5\\nwhile time.time() < end: pass'])\n"
                             "child.wait(); time.sleep(30)"])
    try:
        time.sleep(0.3)
        waited = peers.settle(psutil.Process(busy.pid))
        assert 0.6 < waited < 10
        assert peers.settle(psutil.Process(busy.pid)) < 0.3  # idle now: no wait
    finally:
        busy.kill()
        busy.wait()


def test_plan_rotates_the_engine_order_every_rep():
    order = peers.plan(["a", "b", "c"], ("chain",), 3)
    assert [e for _, _, e in order] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


@pytest.mark.parametrize("profile", ["quick", "standard", "full"])
def test_every_profile_gives_notebook_14_parameters_it_accepts(profile):
    params = PROFILES[profile]["14_peers"]
    cell = (ROOT / "notebooks" / "14_peers.py").read_text().split('tags=["parameters"]')[1].split("# %%")[0]
    assert set(params) <= set(re.findall(r"^(\w+) =", cell, re.M))
    assert set(params) <= set(inspect.signature(peers.compare_engines).parameters)
    assert set(params["sizes"]) <= set(peer_shapes.SHAPES)
    assert all(set(by_engine) <= set(peers.ENGINES) for by_engine in params["sizes"].values())


def test_the_bench_script_imports_nothing_of_this_package():
    """It runs under a peer's interpreter, where `pipeline` is not installed."""
    tree = ast.parse(peers.BENCH.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.startswith("pipeline") or n.startswith(".") for n in names)
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert f'MARK = "{peers.MARK}"' in peers.BENCH.read_text()


@pytest.mark.skipif(peerenv.installed_version(ROOT / peerenv.PEERS_DIR, "dagster") is None,
                    reason="Dagster not installed (make peers); CI does not install the peers")
def test_an_installed_peer_runs_the_shapes_in_its_own_venv(tmp_path):
    result = peers.compare_engines(tmp_path, {"chain": {"dagster": 3}, "digest": {"dagster": 1}}, reps=1,
                                   peers_root=ROOT / peerenv.PEERS_DIR, engines=("dagster",))
    timed = result[result.metric == "per_task_ms"]
    assert sorted(timed["shape"]) == ["chain", "digest"] and (timed.value > 0).all()
    assert timed.version.unique().tolist() == [peerenv.PEERS["dagster"].requirement.split("==")[1]]
    assert {"import_s", "setup_s", "ready_s"} <= set(result.metric)
