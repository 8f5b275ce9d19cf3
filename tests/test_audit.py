"""The audit harness at tiny sizes: fixtures, recorder, every scenario, the leak detector, line profiles."""

import hashlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.audit.base import fixtures as fx
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.base.serveproc import EXTRACT_WORKER
from pipeline.audit.base.workerrss import WorkerRssSampler
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import concurrency, memory_soak, pdf_ingestion, store_queries
from pipeline.audit.scenarios.line_profile import profile_lines
from pipeline.config import MB, IngestConfig
from pipeline.dag import DAG, Task
from pipeline.stages.ingest import ingest_pdf

_LEAK: list[bytes] = []


def _leaky(ctx):
    _LEAK.append(b"x" * 64 * 1024)  # 64 KiB kept forever per run
    return None


def _clean(ctx):
    return len(b"x" * 64 * 1024)


@pytest.fixture
def recorder(tmp_path):
    rec = AuditRecorder(tmp_path / "audit.duckdb")
    rec.start_session("test", {"why": "unit test"})
    return rec


@pytest.fixture(scope="module")
def small_pdfs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pdfs")
    paths = {"text": d / "text.pdf", "mixed": d / "mixed.pdf"}
    paths["text"].write_bytes(fx.text_pdf(2))
    paths["mixed"].write_bytes(fx.image_pdf(2, text_lines=5, image_px=64))
    return paths


@pytest.mark.parametrize("make", [lambda: fx.text_pdf(3), lambda: fx.kerned_pdf(2), lambda: fx.image_pdf(2),
                                  lambda: fx.bomb_pdf(2_000_000), lambda: fx.text_pdf(1, encrypt="rc4"),
                                  lambda: fx.email_with([("a.pdf", b"%PDF-1.4 x")])],
                         ids=["text", "kerned", "image", "bomb", "rc4", "email"])
def test_fixtures_are_deterministic(make):
    assert hashlib.sha256(make()).hexdigest() == hashlib.sha256(make()).hexdigest()


def test_fixture_cache_reuses_by_parameter_hash(tmp_path):
    calls = []
    make = lambda: calls.append(1) or b"%PDF-data"  # noqa: E731
    first = fx.cached(tmp_path, "x.pdf", {"mb": 1}, make)
    again = fx.cached(tmp_path, "x.pdf", {"mb": 1}, make)
    other = fx.cached(tmp_path, "x.pdf", {"mb": 2}, make)
    assert first == again != other and len(calls) == 2


def test_sender_processes_import_only_light_modules():
    """A sender process imports the module of the function it runs: those live in smtpclients, which must not pull
    in pandas, fpdf or the service (they made each sender take 3-6 s to start on a loaded 2-core machine)."""
    from pipeline.audit.scenarios import email_bursts, gateway_bench, scale_out

    senders = {email_bursts.paced_sender, gateway_bench.send_batch, scale_out.send_concurrently}
    assert {fn.__module__ for fn in senders} == {"pipeline.audit.base.smtpclients"}
    heavy = ("pandas", "numpy", "duckdb", "fpdf", "PIL", "aiosmtpd", "pipeline.service", "pipeline.audit.base.harness")
    code = f"import sys, pipeline.audit.base.smtpclients; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_sessions_are_kept_with_machine_facts(tmp_path):
    rec = AuditRecorder(tmp_path / "a.duckdb")
    first = rec.start_session("quick", {"n": 1})
    second = rec.start_session("quick", {"n": 2})
    sessions = rec.query("SELECT * FROM session ORDER BY started_at")
    assert list(sessions["session_id"]) == [first, second]
    row = sessions.iloc[0]
    assert row["cpus"] == os.cpu_count() and row["python"] and row["host"] and len(row["git_sha"]) >= 7
    assert json.loads(row["packages"])["pypdf"]


def test_pdf_scaling_interleaves_reps(recorder, small_pdfs):
    items = [{"path": str(small_pdfs["text"]), "kind": "text", "mb": 0.01},
             {"path": str(small_pdfs["mixed"]), "kind": "mixed", "mb": 0.01}]
    df = pdf_ingestion.pdf_scaling(items, reps=2, recorder=recorder, variants=["pypdf", "pdfium-2w"])
    timings = df[df.metric == "ingest_seconds"]
    assert list(zip(timings.rep, timings.kind, timings.variant, strict=True)) == [
        (r, k, v) for r in (0, 1) for k in ("text", "mixed") for v in ("pypdf", "pdfium-2w")]  # A B A B
    assert set(timings[timings["default"]].variant) == {"pdfium-2w"}
    memory = df[df.metric == "workers_peak_rss_mb"]  # the extraction workers', one row per ingest
    assert (df[df.metric == "pages"].value == 2).all() and len(memory) == len(timings) and (memory.value > 0).all()
    assert (memory.workers >= 1).all() and "peak_rss_mb" not in set(df.metric)


def test_pdf_scaling_runs_other_engines_once_above_the_size_and_the_default_every_rep(recorder, small_pdfs):
    items = [{"path": str(small_pdfs["text"]), "kind": "text", "mb": 0.01},
             {"path": str(small_pdfs["mixed"]), "kind": "mixed", "mb": 10}]
    df = pdf_ingestion.pdf_scaling(items, reps=2, recorder=recorder, variants=["pypdf", "pdfium-2w"], once_above_mb=5)
    timings = df[df.metric == "ingest_seconds"]
    assert list(zip(timings.rep, timings.kind, timings.variant, strict=True)) == [
        (0, "text", "pypdf"), (0, "text", "pdfium-2w"), (0, "mixed", "pypdf"), (0, "mixed", "pdfium-2w"),
        (1, "text", "pypdf"), (1, "text", "pdfium-2w"), (1, "mixed", "pdfium-2w")]  # still interleaved


def test_pdf_scaling_measures_only_the_default_engine_above_the_others_size_cap(recorder, small_pdfs):
    items = [{"path": str(small_pdfs["text"]), "kind": "text", "mb": 0.01},
             {"path": str(small_pdfs["mixed"]), "kind": "mixed", "mb": 10}]
    df = pdf_ingestion.pdf_scaling(items, reps=2, recorder=recorder, variants=["pypdf", "pdfium-2w"],
                                   once_above_mb=1, others_max_mb=5)
    timings = df[df.metric == "ingest_seconds"]
    assert list(zip(timings.rep, timings.kind, timings.variant, strict=True)) == [
        (0, "text", "pypdf"), (0, "text", "pdfium-2w"), (0, "mixed", "pdfium-2w"),
        (1, "text", "pypdf"), (1, "text", "pdfium-2w"), (1, "mixed", "pdfium-2w")]


def test_worker_rss_sampler_measures_the_extraction_workers_and_no_other_process(small_pdfs, tmp_path):
    decoy = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with WorkerRssSampler() as sampler:
            ingest_pdf(small_pdfs["text"], tmp_path / "out.txt", IngestConfig())
            commands = {pid: " ".join(psutil.Process(pid).cmdline()) for pid in sampler.pids if psutil.pid_exists(pid)}
    finally:
        decoy.communicate(timeout=60)  # its stdin closes: it exits
    assert sampler.pids and {os.getpid(), decoy.pid}.isdisjoint(sampler.pids)
    assert commands and all(EXTRACT_WORKER in command for command in commands.values())
    assert sampler.peak > 0 and sampler.samples[0][1] == sampler.before


def test_hostile_inputs_measure_the_extraction_workers_not_this_process(recorder, tmp_path):
    items = []
    for name, data in (("encrypted-password.pdf", fx.text_pdf(2, encrypt="rc4", user_password="secret")),
                       ("random-bytes.pdf", fx.random_bytes(8 * 1024))):
        (tmp_path / name).write_bytes(data)
        items.append({"name": name, "path": str(tmp_path / name)})
    df = pdf_ingestion.hostile_inputs(items, recorder=recorder)
    assert df.metric.tolist() == ["seconds", "workers_peak_rss_mb", "workers_rss_before_mb"] * 2
    assert "ok" not in set(df.outcome)  # neither file has readable text
    memory = df[df.metric == "workers_peak_rss_mb"]
    own_mb = psutil.Process().memory_info().rss / MB  # pytest with pandas and DuckDB: what used to be recorded
    assert (memory.workers >= 1).all() and (memory.value > 0).all()
    assert (memory.value / memory.workers < own_mb).all()  # per worker, an 8 KB file costs far less than that
    assert "workers_peak_rss_mb" in views.hostile_table(recorder.measurements())


def test_concurrency_sweep_reports_each_level(recorder, small_pdfs):
    df = concurrency.concurrency([3, 6], small_pdfs["text"], recorder=recorder)
    assert sorted(df[df.metric == "throughput_runs_per_s"]["level"]) == [3, 6]
    assert (df[df.metric == "failed_runs"].value == 0).all()
    assert (df[df.metric == "latency_p95_s"].value.values >= df[df.metric == "latency_p50_s"].value.values).all()


def test_store_queries_at_each_size(recorder, tmp_path):
    df = store_queries.store_queries([500, 1500], tmp_path / "store", repeat=5, recorder=recorder)
    assert set(df["runs"]) == {500, 1500}
    assert {"list_latest_50_of_workflow", "count_by_state_all", "task_transitions_per_s_batched_100"} <= set(df.metric)


def test_leak_detector_flags_a_leaking_workflow_only(recorder):
    leaky = memory_soak.soak(runs=60, warmup=10, every=10, dag=DAG("leaky", [Task("leak", _leaky)]),
                           recorder=recorder, variant="leaky")
    clean = memory_soak.soak(runs=60, warmup=10, every=10, dag=DAG("clean", [Task("work", _clean)]),
                           recorder=recorder, variant="clean")
    slope = leaky[leaky.metric == "leak_traced_bytes_per_run"].value.item()
    assert leaky[leaky.metric == "leaking"].value.item() == 1.0 and 60_000 < slope < 80_000
    assert clean[clean.metric == "leaking"].value.item() == 0.0
    sites = list(leaky["site"].dropna())
    assert any(site.startswith("tests/test_audit.py:") for site in sites)  # the leaking line is named
    assert not any(site.startswith("/") for site in sites)  # without this machine's paths


def test_a_one_off_step_is_not_a_leak_but_steady_growth_is():
    from pipeline.audit.base.memory import judge_leak

    def points(bytes_at):
        return [{"runs": r, "traced_bytes": bytes_at(r), "rss_bytes": 0.0} for r in range(0, 5001, 250)]

    step = judge_leak(points(lambda r: 4_000_000 if r >= 1000 else 700_000), [])  # a cache filled once
    assert not step.leaking and step.traced_bytes_per_run == 0 and step.traced_bytes_per_run_all > 500
    steady = judge_leak(points(lambda r: 20_000 * r), [])
    assert steady.leaking and steady.traced_bytes_per_run == pytest.approx(20_000)


def test_a_soak_with_min_runs_stops_once_its_slope_is_precise_and_says_when(recorder):
    df = memory_soak.soak(runs=2000, warmup=10, every=10, dag=DAG("clean", [Task("work", _clean)]),
                          recorder=recorder, variant="clean", min_runs=60)
    slope = df[df.metric == "leak_traced_bytes_per_run"].iloc[0]
    assert 60 <= slope.runs < 2000 and slope.planned_runs == 2000 and slope.runs == df.runs.max()
    assert slope.ci95_bytes_per_run <= 4096 and df[df.metric == "leaking"].value.item() == 0.0


@pytest.mark.parametrize(("bytes_at", "stops"), [
    (lambda r, i: 300.0 * r + (-1) ** i * 4_000, True),  # healthy: about 0.3 KiB/run, tight
    (lambda r, i: 40_000.0 * r + (-1) ** i * 4_000, True),  # a clear leak is as settled a verdict
    (lambda r, i: 300.0 * r + (-1) ** i * 800_000, False),  # too noisy to say yet
    (lambda r, i: 16_000.0 * r + (-1) ** i * 100_000, False),  # the interval straddles the 16 KiB/run target
], ids=["healthy", "leaking", "noisy", "at-the-target"])
def test_a_soak_stops_early_only_when_the_interval_is_narrow_and_on_one_side_of_the_target(bytes_at, stops):
    from pipeline.audit.scenarios.memory_soak import precise_enough, slope_ci

    points = [{"runs": r, "rss": bytes_at(r, i)} for i, r in enumerate(range(0, 1001, 100))]
    assert precise_enough(points, ("rss",)) is stops
    assert slope_ci(points[:2], "rss")[1] == float("inf")  # two points: no interval


def test_real_pipeline_is_not_flagged_as_leaking(recorder):
    df = memory_soak.soak(runs=120, warmup=40, every=20, recorder=recorder)
    assert df[df.metric == "leaking"].value.item() == 0.0, df[df.metric.str.startswith("leak")]


def test_line_profile_names_hot_lines_per_stage(small_pdfs):
    df = profile_lines(small_pdfs["text"], top=3)
    assert {"Email", "Ingestion", "Digest", "Delivery", "Store"} <= set(df.tags.map(lambda t: t["stage"]))
    assert (df.value >= 0).all() and all(t["code"] for t in df.tags)


@pytest.mark.parametrize(("failed", "not_measured", "quality", "status"), [
    (0, 0, True, "done"), (1, 0, True, "sla_failed"), (1, 2, True, "incomplete"), (0, 0, False, "incomplete")])
def test_outbox_and_task_card_give_one_verdict(tmp_path, failed, not_measured, quality, status):
    from pipeline.audit.reporting.report import task_status, update_task_card

    summary = {"passed": 3, "failed": failed, "not_measured": not_measured}
    proven = {"report": True, "stress": True, "slas": True, "optimizations": True, "code_quality": quality}
    outbox = {"session_id": "s1", "profile": "standard", "commit": "abc", "completed_at": "now",
              "sla_summary": summary, "deliverables": proven, "status": task_status(summary, proven),
              "failed_slas": ["Trigger p99"] * failed}
    assert outbox["status"] == status
    update_task_card(tmp_path / "TASK_CARDS.md", outbox)
    text = (tmp_path / "TASK_CARDS.md").read_text()
    assert f"**Status:** `{status}` (last verified by audit session `s1`" in text
    assert ("- SLA failed: Trigger p99" in text) == bool(failed)
    assert ("- [x] Code-quality audit" in text) == quality


def test_wait_dead_counts_a_zombie_as_gone_and_returns_the_living_at_its_timeout():
    """Serve's orphaned workers stay zombies where nothing reaps them: waiting for them to vanish cost the audit
    up to 5 s per serve stopped."""
    from pipeline.audit.base.serveproc import wait_dead

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watched = psutil.Process(zombie.pid)
        while watched.status() != psutil.STATUS_ZOMBIE:  # exited, not reaped: we do not wait() for it yet
            time.sleep(0.01)
        assert wait_dead([watched], timeout_s=30.0) == []
        assert watched.status() == psutil.STATUS_ZOMBIE  # judged gone without reaping (only a parent can)
        assert [p.pid for p in wait_dead([psutil.Process(living.pid)], timeout_s=0.2)] == [living.pid]
    finally:
        living.kill()
        living.wait()
        zombie.wait()
