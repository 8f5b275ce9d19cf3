"""The scale-out audit's package functions (notebook 11): well-formed rows from real engines, and the capacity
model's arithmetic. Sizes are tiny: the audit measures at scale, these prove each part runs and counts right."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from pipeline.audit.base import fixtures as fx
from pipeline.audit.reporting import scaleoutviews
from pipeline.audit.scenarios import scale_out, store_queries
from pipeline.config import StoreConfig
from pipeline.store import open_store

FIGURES = {"pages_per_s_per_worker": 300.0, "pages_per_mail": 300.0, "accepts_per_s_per_gateway": 20.0,
           "transitions_per_mail": 8.0, "pg_transitions_per_s": 4000.0, "sqlite_transitions_per_s": 8000.0}


@pytest.fixture
def pg_maker(pg_server):
    """A maker of fresh databases on the session's server, named apart from other tests'; dropped after."""
    made: list[str] = []

    def make(name: str) -> str:
        made.append(f"t{os.getpid()}_{name}")
        make.last = pg_server.create_database(made[-1])  # type: ignore[attr-defined]
        return make.last  # type: ignore[attr-defined]

    yield make
    for name in made:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def small_pdf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pdf") / "small.pdf"
    path.write_bytes(fx.text_pdf(4, seed=3))
    return path


def test_capacity_model_gives_workers_gateways_and_store_load():
    table = scale_out.capacity_model(FIGURES, [1.0, 10.0, 50.0]).set_index("mails_per_s")
    # one mail = 300 pages = 1 worker-second; 20 accepts/s per gateway; 8 transitions per mail
    assert table.workers.tolist() == [1, 10, 50]
    assert table.gateways.tolist() == [1, 1, 3]
    assert table.store_transitions_per_s.tolist() == [8.0, 80.0, 400.0]
    assert table.loc[50.0, "pg_load"] == pytest.approx(0.1)
    assert table.loc[50.0, "sqlite_load"] == pytest.approx(0.05)
    assert set(table.bottleneck) == {"none"}


def test_capacity_model_names_postgres_the_bottleneck_past_its_transitions():
    assert scale_out.store_ceiling(FIGURES) == {"pg_mails_per_s": 500.0, "sqlite_mails_per_s": 1000.0}
    table = scale_out.capacity_model(FIGURES, [499.0, 501.0, 1001.0]).set_index("mails_per_s")
    assert table.bottleneck.tolist() == ["none", "PostgreSQL", "PostgreSQL"]
    assert table.loc[1001.0, "sqlite_load"] > 1


def test_fill_store_on_postgres_makes_the_rows_sqlite_gets(tmp_path, pg_url):
    counts = {}
    backends = (("sqlite", StoreConfig(path=tmp_path / "runs.sqlite3")), ("postgres", StoreConfig(url=pg_url)))
    for backend, config in backends:
        store = open_store(config)
        try:
            store_queries.fill_store(store, 300, chunk=128)
            counts[backend] = store.count_runs_by_state()
            newest = store.list_runs(limit=1)[0]
            assert (newest.run_id, len(store.get_tasks(newest.run_id))) == (300, 5)
            assert store.create_run("after_fill", {})[0].run_id == 301  # the id sequence moved past the fill
        finally:
            store.close()
    assert counts["postgres"] == counts["sqlite"] == {"success": 99, "failed": 1, "running": 200}


def test_store_backends_time_the_same_queries_on_both(tmp_path, pg_maker):
    frame = pd.DataFrame(scale_out.store_backends(tmp_path, pg_maker, [400], repeat=3, transitions=100))
    tags = pd.json_normalize(frame.tags.tolist())
    assert set(tags.backend) == {"sqlite", "postgres"} and set(tags.runs) == {400}
    by_backend = {b: set(frame.metric[tags.backend == b]) for b in ("sqlite", "postgres")}
    assert by_backend["sqlite"] == by_backend["postgres"]
    assert {"get_run_with_tasks", "list_latest_50_of_workflow",
            "task_transitions_per_s_one_per_commit"} <= by_backend["postgres"]
    assert (frame.value > 0).all()


def test_dask_ingestion_measures_pages_and_task_round_trips(tmp_path, small_pdf):
    rows = pd.DataFrame(scale_out.dask_ingestion(tmp_path, small_pdf, documents=2, workers=(1,), reps=1,
                                                roundtrips=3))
    rate = rows[rows.metric == "pages_per_s"]
    assert len(rate) == 1 and rate.value.iloc[0] > 0 and rate.tags.iloc[0]["pages"] == 8  # two 4-page documents
    assert (rows.metric == "dask_task_overhead_ms").sum() == 3
    assert (rows.metric == "dask_bare_round_trip_ms").sum() == 3  # Dask's own floor, alternated with ours


def test_writers_commit_every_transition_from_each_process_on_both_backends_at_the_largest_size(tmp_path, pg_maker):
    writers = {"writers": (1, 3), "transitions": 120, "reps": 1, "round_trips": 20}
    frame = pd.DataFrame(scale_out.store_backends(tmp_path, pg_maker, [200, 300], repeat=2, transitions=40,
                                                  writers=writers))
    frame = frame[frame.variant == "writers"]
    tags = pd.json_normalize(frame.tags.tolist()).set_index(frame.index)
    rates = frame[frame.metric == "task_transitions_per_s_one_per_commit"]
    assert sorted(zip(tags.backend[rates.index], tags.writers[rates.index], strict=True)) == [
        ("postgres", 1), ("postgres", 3), ("sqlite", 1), ("sqlite", 3)]
    assert set(tags.runs) == {300} and (frame.value > 0).all()  # on the store at its largest size
    for config in (StoreConfig(path=tmp_path / "store-bench.sqlite3"), StoreConfig(url=pg_maker.last)):
        store = open_store(config)  # every transition of every writer landed, one per commit
        try:
            runs = store.list_runs(workflow="bench_writers", limit=10)
            assert len(runs) == 2
            assert {t.state for r in runs for t in store.get_tasks(r.run_id)} == {"success"}
        finally:
            store.close()
    assert (frame.metric == "task_transitions_per_s_peak").sum() == 2


def test_a_writer_process_that_failed_fails_the_measurement_with_its_reason():
    import queue

    results = queue.Queue()
    for message in ("ready", "StoreUnavailableError: connection refused"):
        results.put(message)
    with pytest.raises(RuntimeError, match="a writer process failed: StoreUnavailableError: connection refused"):
        store_queries._expect(results, 2, "ready")


def test_peak_is_the_best_writer_counts_median_and_feeds_the_capacity_model():
    rates = {1: [2000.0, 2200.0], 2: [5000.0, 5600.0], 4: [4400.0, 4600.0]}
    rows = [scale_out.row("writers", "task_transitions_per_s_one_per_commit", v, "1/s", rep, backend="postgres",
                          writers=n) for n, vs in rates.items() for rep, v in enumerate(vs)]
    [peak] = scale_out._peaks(rows)
    assert (peak["value"], peak["tags"]["writers"]) == (5300.0, 2)
    m = pd.DataFrame([{**r, "scenario": "scale_out"} for r in [*rows, peak]])
    assert scaleoutviews.measured_figures(m)["pg_transitions_per_s"] == 5300.0
    table = scaleoutviews.writers_table(m).set_index("writers")
    assert table.loc[2, "peak"] == "yes" and table.loc[1, "peak"] == ""
    assert table.loc[4, "transitions/s median"] == 4500.0


def test_speedup_is_the_ratio_of_median_pages_per_s():
    rows = [{"metric": "pages_per_s", "value": v, "tags": {"workers": n}}
            for n, v in ((1, 100.0), (2, 150.0), (1, 120.0), (2, 210.0), (1, 500.0), (2, 190.0))]
    [speedup] = scale_out._speedups(rows, (1, 2))
    assert speedup["metric"] == "speedup_2_vs_1_workers" and speedup["value"] == pytest.approx(190 / 120)


def test_pipeline_round_on_sqlite_reads_latency_and_throughput_from_the_store(tmp_path, small_pdf):
    rows = scale_out.pipeline_once(tmp_path, "sqlite_local", None, small_pdf, mails=2, concurrency=2, rep=0,
                                  timeout_s=120)
    got = {r["metric"]: r["value"] for r in rows}
    assert (got["acked"], got["runs_succeeded"], got["runs_not_ended"]) == (2, 2, 0)
    assert sum(r["metric"] == "e2e_latency_s" for r in rows) == 2
    assert got["throughput_runs_per_s"] > 0 and got["tasks_per_run"] >= 3
    assert rows[0]["tags"]["pages"] == 4


def test_gateways_on_one_store_count_duplicates_and_losses_with_a_one_page_attachment(tmp_path, pg_maker, small_pdf):
    rows = scale_out.gateway_dedup(tmp_path, pg_maker, small_pdf, mails=2, gateways=2, concurrency=2, pdf_pages=1,
                                  timeout_s=120)
    got = {r["metric"]: r["value"] for r in rows}
    assert (got["acked"], got["duplicated"], got["lost"]) == (4, 0, 0)  # 4 Message-IDs, 2 of them sent twice
    assert rows[0]["tags"]["pdf_kb"] < small_pdf.stat().st_size / 1024  # the one-page PDF, not the given one


def test_postgres_variant_without_a_server_is_a_skipped_row(tmp_path, small_pdf):
    rows = scale_out.pipeline_once(tmp_path, "pg_local", None, small_pdf, mails=1, concurrency=1, rep=0)
    assert [r["metric"] for r in rows] == ["skipped"]


def _m(rows: list[tuple[str, str, float, dict]]) -> pd.DataFrame:
    return pd.DataFrame([("scale_out", v, k, x, "", 0, t) for v, k, x, t in rows],
                        columns=["scenario", "variant", "metric", "value", "unit", "rep", "tags"])


def test_views_feed_the_measured_figures_to_the_capacity_model():
    m = _m([("ingestion", "pages_per_s", 300.0, {"workers": 1}), ("ingestion", "pages_per_s", 450.0, {"workers": 2}),
            ("ingestion", "speedup_2_vs_1_workers", 1.5, {"workers": 2}),
            ("pg_local", "accepts_per_s", 20.0, {"pages": 300}), ("pg_local", "tasks_per_run", 4.0, {"pages": 300}),
            ("pg_local", "throughput_runs_per_s", 1.0, {"pages": 300}), ("pg_local", "acked", 5, {"pages": 300}),
            ("store", "task_transitions_per_s_one_per_commit", 4000.0, {"backend": "postgres", "stat": "median",
                                                                         "runs": 1000}),
            ("store", "task_transitions_per_s_one_per_commit", 8000.0, {"backend": "sqlite", "stat": "median",
                                                                         "runs": 1000})])
    assert scaleoutviews.measured_figures(m) == FIGURES
    table = scaleoutviews.capacity_table(m, [50.0])
    assert table.workers.tolist() == [50] and table.gateways.tolist() == [3]
    assert "500 mails/s" in scaleoutviews.capacity_statement(m)
    assert "1.50x" in scaleoutviews.machine_statement(m, 2)


def test_views_say_not_measured_instead_of_inventing_figures():
    empty = _m([])
    assert scaleoutviews.capacity_table(empty).empty and scaleoutviews.pipeline_table(empty).empty
    assert "not computed" in scaleoutviews.capacity_statement(empty)
    assert "not measured" in scaleoutviews.machine_statement(empty, 2)
    assert all(math.isnan(v) for v in scaleoutviews.measured_figures(empty).values())


def test_store_views_take_sqlite_from_notebook_06_when_this_notebook_left_it_out():
    pg = ("store", "list_latest_50_of_workflow", 0.8, {"backend": "postgres", "stat": "median", "runs": 1000})
    m = _m([pg])
    m = pd.concat([m, pd.DataFrame([("store_queries", "baseline", "list_latest_50_of_workflow", 0.3, "ms", 0,
                                     {"stat": "median", "runs": 1000, "kind": "point_list"})], columns=m.columns)])
    table = scaleoutviews.store_table(m)
    assert table.loc["list_latest_50_of_workflow", "postgres 1,000 runs"] == 0.8
    assert table.loc["list_latest_50_of_workflow", "sqlite 1,000 runs"] == 0.3


@pytest.mark.parametrize("profile", ["quick", "standard", "full"])
def test_every_profile_gives_the_notebook_parameters_its_functions_accept(profile):
    import inspect
    import re

    from pipeline.audit.batch import PROFILES

    params = PROFILES[profile]["11_scale_out"]
    source = (Path(__file__).parent.parent / "notebooks" / "11_scale_out.py").read_text()
    cell = source.split('tags=["parameters"]')[1].split("# %%")[0]
    assert set(params) <= set(re.findall(r"^(\w+) =", cell, re.M))
    for part, fn in (("store", scale_out.store_backends), ("pipeline", scale_out.pipeline_variants),
                     ("ingestion", scale_out.dask_ingestion), ("gateways", scale_out.gateway_dedup)):
        assert set(params[part]) <= set(inspect.signature(fn).parameters), part
    assert set(params["pipeline"]["variants"]) <= set(scale_out.VARIANTS)
