"""Duration percentiles from histograms (issue 16), on SQLite and a real PostgreSQL: the exact count, values within
the stated bin error of percentile_cont's, run times apart from waits, purge and the migration of an existing store."""

from __future__ import annotations

import random
import sqlite3
import statistics
import time

import pytest

from pipeline import postgres_schema, sqlite_schema
from pipeline.config import StoreConfig
from pipeline.duration_bins import percentiles
from pipeline.store import DURATION_ERROR_BOUND, Transition, open_store

HOUR = 3600.0
T0 = 1000 * HOUR  # an hour boundary


@pytest.fixture
def any_store(store_config):
    st = open_store(store_config)
    yield st
    st.close()


def exact(values: list[float]) -> dict[str, float]:
    """What percentile_cont says: n, median and 95th percentile, interpolated linearly."""
    if len(values) == 1:
        return {"n": 1, "p50": values[0], "p95": values[0]}
    return {"n": len(values), "p50": statistics.median(values),
            "p95": statistics.quantiles(values, n=20, method="inclusive")[18]}


def record_tries(st, tries: list[tuple[str, float, float, float]]) -> int:
    """One run whose instances ``(task_id, started_at, ended_at, wait_s)`` succeeded; return its id."""
    run = st.create_run("wf", {})[0]
    st.create_tasks(run.run_id, [t[0] for t in tries])
    st.record_transitions([Transition(run.run_id, task_id, state, 1, at, wait_s=wait if state == "success" else 0.0)
                           for task_id, start, end, wait in tries
                           for state, at in (("running", start), ("success", end))])
    return run.run_id


def assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert got["n"] == want["n"]
    for key in ("p50", "p95"):
        assert got[key] == pytest.approx(want[key], rel=DURATION_ERROR_BOUND, abs=1e-9), key


def test_percentiles_are_within_the_bin_error_of_the_exact_ones_for_any_window(any_store):
    rnd = random.Random(5)
    tries = []
    for i in range(600):  # ends spread over five hours, so windows cut hours and hold whole ones
        duration, end = rnd.lognormvariate(-1.0, 1.2), T0 + rnd.uniform(0, 5 * HOUR)
        task = ("parse_email", "ingest_pdf", "deliver")[i % 3]
        tries.append((f"{task}[{i}]", end - duration, end, duration * rnd.random()))
    for chunk in range(0, len(tries), 200):
        record_tries(any_store, tries[chunk:chunk + 200])
    windows = [(T0 + 0.3 * HOUR, T0 + 0.9 * HOUR),  # inside one hour
               (T0 + 0.5 * HOUR, T0 + 4.25 * HOUR),  # two partial hours around three whole ones
               (T0 + HOUR, T0 + 3 * HOUR),  # whole hours only
               (T0 - HOUR, T0 + 6 * HOUR)]  # everything
    for since, until in windows:
        for run_time in (False, True):
            groups: dict[str, list[float]] = {}
            for task_id, start, end, wait in tries:
                if since <= end < until:
                    groups.setdefault(task_id.split("[")[0], []).append(end - start - (wait if run_time else 0.0))
            got = any_store.task_duration_percentiles(since, until, run_time=run_time)
            assert sorted(got) == sorted(groups)
            for task, values in groups.items():
                assert_close(got[task], exact(values))


def test_run_time_is_the_duration_less_the_wait(any_store):
    record_tries(any_store, [("ingest_pdf[0]", T0, T0 + 10.0, 8.0), ("ingest_pdf[1]", T0, T0 + 4.0, 0.0)])
    durations = any_store.task_duration_percentiles(T0, T0 + HOUR)
    run_times = any_store.task_duration_percentiles(T0, T0 + HOUR, run_time=True)
    assert durations["ingest_pdf"] == {"n": 2, "p50": 7.0, "p95": 9.7}
    assert run_times["ingest_pdf"] == {"n": 2, "p50": 3.0, "p95": pytest.approx(3.9)}
    assert [t.wait_s for t in any_store.get_tasks(1)] == [8.0, 0.0]


def test_a_try_on_an_hour_boundary_counts_once_and_one_without_a_start_not_at_all(any_store):
    run_id = record_tries(any_store, [("a", T0 + HOUR - 2.0, T0 + HOUR, 0.0), ("b", T0 - 1.0, T0, 0.0)])
    any_store.create_tasks(run_id, ["c"])
    any_store.record_transitions([Transition(run_id, "c", "success", 1, T0 + 10.0)])  # a mapped task over nothing
    for since, until in ((T0 - 0.5, T0 + HOUR + 0.5), (T0, T0 + 2 * HOUR), (T0 - HOUR, T0 + HOUR + 1)):
        got = any_store.task_duration_percentiles(since, until)
        assert got == {"a": {"n": 1, "p50": 2.0, "p95": 2.0}, "b": {"n": 1, "p50": 1.0, "p95": 1.0}}, (since, until)


def test_purged_tries_leave_the_histograms(any_store):
    old = record_tries(any_store, [("t", T0, T0 + 1.0, 0.0), ("u", T0, T0 + 2.0, 0.5)])
    kept = record_tries(any_store, [("t", T0, T0 + 3.0, 0.0)])
    any_store.finish_run(old, "success", now=T0 + 5.0)
    any_store.finish_run(kept, "success", now=T0 + 100 * HOUR)
    assert any_store.purge_runs(older_than=T0 + 50 * HOUR) == 1
    assert any_store.task_duration_percentiles(T0 - HOUR, T0 + 2 * HOUR) == {"t": {"n": 1, "p50": 3.0, "p95": 3.0}}
    assert any_store.query("SELECT measure, task, n FROM task_duration_bins") == [(0, "t", 1)]  # u's two went too


def test_a_counted_try_changed_behind_the_stores_back_moves_its_bins(any_store):
    record_tries(any_store, [("t", T0, T0 + 2.0, 1.5)])
    any_store.write_in_one_transaction([("UPDATE task_runs SET ended_at = ended_at + ?", (2 * HOUR,))])
    assert any_store.task_duration_percentiles(T0, T0 + HOUR) == {}
    assert any_store.task_duration_percentiles(T0, T0 + 3 * HOUR, run_time=True) == \
        {"t": {"n": 1, "p50": 2 * HOUR + 0.5, "p95": 2 * HOUR + 0.5}}
    assert len(any_store.query("SELECT * FROM task_duration_bins")) == 2  # the try's duration and run time


def test_an_existing_sqlite_store_is_migrated_with_histograms_of_its_tries(tmp_path):
    path = tmp_path / "runs.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "applied_at REAL NOT NULL)")
    for number, (name, statements) in enumerate(sqlite_schema.MIGRATIONS[:5], start=1):
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (number, name))
    conn.execute("PRAGMA user_version = 5")
    conn.execute("INSERT INTO runs (workflow, state, payload, queued_at) VALUES ('wf', 'success', '{}', 1.0)")
    conn.executemany("INSERT INTO task_runs (run_id, task_id, state, started_at, ended_at) VALUES (1, ?, ?, ?, ?)",
                     [("ingest_pdf[0]", "success", T0, T0 + 2.0), ("ingest_pdf[1]", "success", T0, T0 + 4.0),
                      ("deliver", "failed", T0, T0 + 9.0)])
    conn.close()
    with open_store(StoreConfig(path=path)) as st:
        assert st.task_duration_percentiles(T0, T0 + HOUR) == {"ingest_pdf": {"n": 2, "p50": 3.0, "p95": 3.9}}
        assert st.task_duration_percentiles(T0, T0 + HOUR, run_time=True) == \
            {"ingest_pdf": {"n": 2, "p50": 3.0, "p95": 3.9}}
        assert [t.wait_s for t in st.get_tasks(1)] == [0.0, 0.0, 0.0]


def test_an_existing_postgres_store_is_migrated_with_histograms_of_its_tries(pg_url):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                     "applied_at double precision NOT NULL)")
        for number, (name, statements) in enumerate(postgres_schema.MIGRATIONS[:2], start=1):
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, 0)", (number, name))
        run_id = conn.execute("INSERT INTO runs (workflow, state, payload, queued_at) "
                              "VALUES ('wf', 'success', '{}', 1.0) RETURNING run_id").fetchone()[0]
        for task_id, state, end in (("ingest_pdf[0]", "success", 2.0), ("ingest_pdf[1]", "success", 4.0),
                                    ("deliver", "failed", 9.0)):
            conn.execute("INSERT INTO task_runs (run_id, task_id, state, started_at, ended_at) "
                         "VALUES (%s, %s, %s, %s, %s)", (run_id, task_id, state, T0, T0 + end))
    with open_store(StoreConfig(url=pg_url)) as st:
        assert st.task_duration_percentiles(T0, T0 + HOUR) == {"ingest_pdf": {"n": 2, "p50": 3.0, "p95": 3.9}}
        assert st.task_duration_percentiles(T0, T0 + HOUR, run_time=True) == \
            {"ingest_pdf": {"n": 2, "p50": 3.0, "p95": 3.9}}


@pytest.mark.parametrize(("bins", "want"), [
    ([(3, 2.0, 2.0)], {"n": 3, "p50": 2.0, "p95": 2.0}),  # equal values: exact
    ([(1, 1.0, 1.0), (1, 3.0, 3.0)], {"n": 2, "p50": 2.0, "p95": 2.9}),
    ([(2, 0.0, 0.0), (2, 4.0, 4.0)], {"n": 4, "p50": 2.0, "p95": 4.0}),  # the bin of zero and near-zero values
    ([(2, 1.0, 1.004)], {"n": 2, "p50": 1.004 ** 0.5, "p95": 1.004 ** 0.5}),  # else the extremes' geometric mean
])
def test_an_order_statistic_is_read_as_its_bins_value(bins, want):
    assert percentiles(bins) == want


def test_a_benchmark_fill_leaves_histograms_that_answer_like_the_rows(any_store):
    """The audit's bulk fill switches PostgreSQL's triggers off for speed: it must build the histograms itself."""
    from pipeline.audit.scenarios.store_queries import fill_store

    fill_store(any_store, 3_000)
    now = time.time()
    binned = any_store.task_duration_percentiles(now - 40 * 86400, now)
    rows = any_store.query("SELECT count(*) FROM task_runs WHERE state = 'success' AND started_at IS NOT NULL "
                           "AND ended_at IS NOT NULL")[0][0]
    assert binned and sum(int(p["n"]) for p in binned.values()) == rows
