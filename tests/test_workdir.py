"""An ended run's work dir keeps no bulk: not even what a late try writes after the run has ended."""

from dataclasses import replace
from pathlib import Path

from helpers import wait_until

from pipeline import workdir, workflows
from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig
from pipeline.dag import DAG, Task, TaskContext


def _ingest_context(work: Path, pdf_path: Path) -> TaskContext:
    item = {"name": "a.pdf", "path": str(pdf_path), "size": pdf_path.stat().st_size}
    return TaskContext(run_id=7, task_id="ingest_pdf[0]", payload={}, upstream={}, errors={}, work_dir=str(work),
                       item=item, index=0)


def test_a_late_ingest_try_deletes_the_text_it_wrote_after_its_run_ended(settings, tmp_path):
    """A try abandoned at a timeout or a stop finished after the run had ended and shed its files: its text
    stayed under work/ until purge (a leftover of an earlier prober's round)."""
    work = tmp_path / "work" / "7"
    (work / "attachments").mkdir(parents=True)
    pdf_path = work / "attachments" / "a.pdf"
    pdf_path.write_bytes(fx.text_pdf(2))
    settings = replace(settings, ingest=IngestConfig(isolate=False, engine="pypdf", page_workers=1))
    copy = tmp_path / "a.pdf"  # the run's own attachment goes with the shedding, as it does in serve
    copy.write_bytes(pdf_path.read_bytes())
    workdir.shed_run_files(work)  # the run ends while its try still runs

    result = workflows.ingest_pdf_task(_ingest_context(work, copy), settings)

    assert result["pages"] == 2 and result["words"] > 0  # the try itself ran to its end
    assert not (work / "text").exists() and not (work / "attachments").exists()


def test_a_try_of_a_running_run_keeps_its_text(settings, tmp_path):
    work = tmp_path / "work" / "7"
    work.mkdir(parents=True)
    pdf_path = tmp_path / "a.pdf"
    pdf_path.write_bytes(fx.text_pdf(2))
    settings = replace(settings, ingest=IngestConfig(isolate=False, engine="pypdf", page_workers=1))
    result = workflows.ingest_pdf_task(_ingest_context(work, pdf_path), settings)
    assert Path(result["text_path"]).exists()


def _write_text_then_check(ctx: TaskContext) -> bool:
    text = Path(ctx.work_dir) / "text"
    text.mkdir(parents=True, exist_ok=True)
    (text / "000-a.txt").write_text("words")
    workdir.shed_if_ended(Path(ctx.work_dir))  # what ingest_pdf_task does after each try
    return (text / "000-a.txt").exists()


def test_a_run_id_used_again_runs_anew_despite_an_earlier_runs_ended_marker(store, make_engine, settings):
    """SQLite hands out a purged highest run id again, and a restored backup reuses ids: the earlier run's
    marker, left in a work dir purge could not delete, must not make the new run's tries delete their text."""
    for run_id in range(1, 4):
        stale = Path(settings.data_dir) / "work" / str(run_id)
        stale.mkdir(parents=True)
        workdir.shed_run_files(stale)
    engine = make_engine(DAG("texts", [Task("w", _write_text_then_check)]))
    run = engine.wait(engine.trigger("texts").run_id, timeout=30)
    assert run.run_id in (1, 2, 3) and run.state == "success"
    [task] = store.get_tasks(run.run_id)
    assert task.output is True  # the text was still there after the try's check
    work = Path(settings.data_dir) / "work" / str(run.run_id)
    assert wait_until(lambda: not (work / "text").exists())  # and the run's own end shed it
