"""The CLI starts at once (issue 16): read commands load no PDF, SMTP or engine code; ingest still extracts.

What a command imports is checked in a fresh interpreter (``sys.modules`` at its end), which no
load on the machine can change; how long it takes is the benchmark's job (``pipeline.audit.scenarios.cli_start``),
never a test's.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline.audit.base import fixtures as fx
from pipeline.audit.scenarios import cli_start
from pipeline.config import IngestConfig, Settings
from pipeline.sqlite_store import SqliteRunStore
from pipeline.stages.extract_worker import ExtractionPool
from pipeline.stages.ingest import ingest_pdf

# modules that cost a read command a large part of its start-up and that it has no use for
HEAVY = ("pypdf", "pypdfium2", "aiosmtpd", "prometheus_client", "pipeline.gateway", "pipeline.service",
         "pipeline.engine")
# runs the CLI's main in this interpreter, then prints its exit code and every module it loaded
PROBE = """
import json, sys
from pipeline.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:  # --help
    code = stop.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
LINES = [b"The lighthouse keeper counts seven boats.", b"Quarterly tide tables are attached below."]


def modules_loaded_by(argv: list[str], cwd: Path) -> tuple[int, set[str]]:
    """Run ``main(argv)`` in a fresh interpreter; return its exit code and the modules it had loaded at the end."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    return report["code"], set(report["modules"])


@pytest.fixture
def one_run(settings: Settings) -> Settings:
    """A data dir whose store holds run 1, with its tasks."""
    with SqliteRunStore(settings.store) as store:
        run, _ = store.create_run("email_digest", {"spool": "x.eml"})
        store.create_tasks(run.run_id, ["parse_email", "ingest_pdf[0]", "build_digest", "deliver"])
    return settings


@pytest.mark.parametrize("argv", [["--help"], ["runs"], ["show", "1"], ["runs", "--json"], ["show", "1", "--json"]])
def test_read_commands_load_no_pdf_smtp_or_engine_code(argv, one_run, tmp_path):
    code, modules = modules_loaded_by(["--data-dir", str(one_run.data_dir), *argv], tmp_path)
    assert code == 0
    assert not modules & set(HEAVY), f"`{' '.join(argv)}` loaded {sorted(modules & set(HEAVY))}"


def test_importing_the_package_loads_none_of_its_modules(tmp_path):
    probe = "import json, sys, pipeline; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=True)
    assert [m for m in json.loads(done.stdout) if m.startswith("pipeline.")] == []


def test_every_public_name_has_a_home_module():
    homed = {name for names in pipeline._HOMES.values() for name in names}
    assert homed == set(pipeline.__all__)


def test_ingest_of_a_one_page_pdf_extracts_its_text(pdf, tmp_path):
    path = pdf(fx.typeset_pdf(LINES), "one-page.pdf")
    data = tmp_path / "data"
    done = subprocess.run([sys.executable, "-m", "pipeline", "--data-dir", str(data), "ingest", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["state"] == "success"
    [digest] = (data / "outbox" / "new").iterdir()  # delivered, and its summary is the page's text
    body = email.message_from_bytes(digest.read_bytes(), policy=email.policy.default).get_body(("plain",))
    assert "lighthouse keeper counts seven boats" in body.get_content() and "tide tables" in body.get_content()


def test_workers_started_ahead_serve_the_first_document(pdf, tmp_path):
    limits = IngestConfig(workers=2, page_workers=2, memory_limit_bytes=907 * 1024 * 1024)
    pool = ExtractionPool(limits.workers, limits.memory_limit_bytes)
    try:
        pool.start_workers()
        assert len(pool.pipe_fds()) == 2 * 3  # both started at once, before any document: three pipes each
        pool.start_workers()
        assert len(pool.pipe_fds()) == 2 * 3  # never more than the pool's size
        text = tmp_path / "t.txt"
        result = pool.extract(pdf(fx.typeset_pdf(LINES)), text, limits)
        assert result["pages"] == 1 and "tide tables" in text.read_text()
    finally:
        pool.close()


def test_a_document_still_works_after_the_pool_was_closed(pdf, tmp_path):
    limits = IngestConfig(workers=2, page_workers=2, memory_limit_bytes=908 * 1024 * 1024)
    from pipeline.stages.extract_worker import pool_for

    try:
        pool_for(limits).start_workers()
        pool_for(limits).close()
        result = ingest_pdf(pdf(fx.typeset_pdf(LINES)), tmp_path / "t.txt", limits)
        assert result.pages == 1 and result.has_text
    finally:
        pool_for(limits).close()


def test_cli_start_benchmark_times_every_command(pdf):
    rows = cli_start.measure_cli_start(reps=2, pdf=pdf(fx.typeset_pdf(LINES), "one-page.pdf"))
    assert sorted((r["command"], r["bytecode"], r["rep"]) for r in rows) == sorted(
        (command, variant, rep) for command in cli_start.COMMANDS for variant in cli_start.BYTECODE for rep in (1, 2))
    assert all(r["returncode"] == 0 for r in rows), rows
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in rows)
    summary = cli_start.summarize(rows)
    assert [(s["bytecode"], s["command"]) for s in summary] == [
        (variant, command) for variant in cli_start.BYTECODE for command in cli_start.COMMANDS]
    assert all(s["n"] == 2 and s["failures"] == 0 and 0 < s["wall_median_s"] <= s["wall_p95_s"] for s in summary)


def test_cli_start_benchmark_refuses_an_unknown_bytecode_variant():
    with pytest.raises(ValueError, match="compiled, source"):
        cli_start.measure_cli_start(reps=1, bytecode=("frozen",))
    with pytest.raises(ValueError, match="each once"):
        cli_start.measure_cli_start(reps=1, bytecode=("source", "source"))


def test_the_source_variant_has_every_cached_module_but_the_pipeline_s(tmp_path):
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    package = cli_start._package_cache(tmp_path, env)
    cli_start._copy_without(tmp_path / "pycache", tmp_path / "no-pipeline", package)
    copied = {p.name for p in (tmp_path / "no-pipeline").rglob("*.pyc")}
    assert f"argparse.{sys.implementation.cache_tag}.pyc" in copied  # the standard library's stay compiled
    assert {p.name for p in package.glob("*.pyc")} and not any(
        p.is_relative_to(tmp_path / "no-pipeline" / package.relative_to(tmp_path / "pycache"))
        for p in (tmp_path / "no-pipeline").rglob("*.pyc"))


@pytest.fixture(scope="session")
def r_manual(tmp_path_factory):
    """The R reference manual from Debian's r-doc-pdf (a real 2,415-page typeset PDF), fetched once per session;
    a machine that cannot fetch it skips with the reason, but under CI (env var CI set) it must run."""
    from pipeline.audit.base import realpdfs

    try:
        return realpdfs.fetch(cache=tmp_path_factory.mktemp("real-pdfs"))
    except realpdfs.NotAvailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"real-world PDF not available: {exc}; CI is set, so this test must run", pytrace=False)
        pytest.skip(f"real-world PDF not available here: {exc}")


def test_ingest_of_a_real_2400_page_manual_extracts_every_page_and_delivers_its_digest(r_manual, tmp_path):
    """Debian's R reference manual, a real typeset PDF, through the CLI: every page, and a digest that counts them."""
    data = tmp_path / "data"
    done = subprocess.run([sys.executable, "-m", "pipeline", "--data-dir", str(data), "ingest", str(r_manual)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["state"] == "success" and not run["partial"]
    import pypdfium2

    document = pypdfium2.PdfDocument(str(r_manual))
    pages = len(document)  # 2,415 in Debian 12's edition
    document.close()
    assert pages > 1000
    mail = email.message_from_bytes(next((data / "outbox" / "new").iterdir()).read_bytes(), policy=email.policy.default)
    body = mail.get_body(("plain",)).get_content()
    assert f": {pages:,} pages," in body and "\ufffe" not in body  # every page; PDFium's soft hyphens are gone


def test_a_real_pdf_that_cannot_be_fetched_is_one_not_available_error(tmp_path, monkeypatch):
    from pipeline.audit.base import realpdfs

    missing = realpdfs.RealPdf("no-such-package-for-pipeline-tests", "usr/share/doc/x.pdf")
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        with pytest.raises(realpdfs.NotAvailable, match="no-such-package-for-pipeline-tests"):
            realpdfs.fetch(missing, cache=tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get here
    with pytest.raises(realpdfs.NotAvailable, match="needs apt-get"):
        realpdfs.fetch(missing, cache=tmp_path)
    assert not any(tmp_path.rglob("*.pdf"))  # nothing half-made is taken for the PDF
