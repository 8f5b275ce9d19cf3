"""Spool lifecycle (issue 11, item 4): purge removes spool and work files, restart resurrects nothing,
run ids are never reused, and the AUTOINCREMENT migration keeps an older store's runs, counts and indexes."""

import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest
from helpers import fill_disk
from helpers import send_for_run_id as send

from pipeline import housekeeping
from pipeline.audit.base import fixtures as fx
from pipeline.cli import main
from pipeline.errors import StoreBusyError
from pipeline.housekeeping import LEGACY_GRACE_S, unknown_spool_files
from pipeline.service import PipelineService
from pipeline.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from pipeline.sqlite_store import SqliteRunStore
from pipeline.workflows import EMAIL_DIGEST


def spool_files(settings) -> list[str]:
    return sorted(p.name for p in (settings.data_dir / "spool").glob("*.eml"))


def work_dirs(settings) -> list[str]:
    work = settings.data_dir / "work"
    return sorted(p.name for p in work.iterdir()) if work.exists() else []


def spool_file(settings, body: bytes, name: str | None = None) -> Path:
    """Write a spool file as the gateway would (a content-named .eml) and return its path."""
    import hashlib

    spool = settings.data_dir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / (name or f"{hashlib.sha256(body).hexdigest()}.eml")
    path.write_bytes(body)
    return path


def finished_run(store, settings, spool: Path | None, ended_at: float = 10.0, work_bytes: int = 100) -> int:
    """A finished run naming ``spool``, with a work dir holding ``work_bytes`` bytes."""
    run = store.create_run(EMAIL_DIGEST, {"spool": str(spool)} if spool else {})[0]
    assert store.claim_next_run("me").run_id == run.run_id
    store.finish_run(run.run_id, "success", now=ended_at)
    work = settings.data_dir / "work" / str(run.run_id) / "text"
    work.mkdir(parents=True)
    (work / "000.txt").write_bytes(b"x" * work_bytes)
    return run.run_id


def test_purge_then_restart_makes_no_new_runs_and_no_new_digests(service_factory, smtp_sink, settings, capsys):
    service = service_factory()
    run_ids = [send(service, fx.email_with([("a.pdf", fx.text_pdf(1, seed=i))], message_id=f"<m{i}@x>"))
               for i in range(5)]
    for run_id in run_ids:
        assert service.engine.wait(run_id, timeout=60).state == "success"
    smtp_sink[0].wait_for(5)
    service.stop(grace_s=10)
    mine = settings.data_dir / "outbox" / "kept-by-purge"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("the user's mail")
    assert len(spool_files(settings)) == 5 and len(work_dirs(settings)) == 5

    assert main(["--data-dir", str(settings.data_dir), "purge", "--older-than", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("purged 5 run(s) that ended more than 0 day(s) ago; freed ")
    assert "in 5 file(s)" in out[0] and "in 5 dir(s)" in out[0]
    assert spool_files(settings) == [] and work_dirs(settings) == []
    assert mine.read_text() == "the user's mail"  # digests in the outbox are never purged

    again = service_factory()  # start-up reconciliation runs here
    assert again.store.count_runs_by_state() == {}
    assert again.reconcile_spool() == 0
    next_id = send(again, fx.email_with([("b.pdf", fx.text_pdf(1, seed=9))], message_id="<new@x>"))
    assert next_id > max(run_ids)  # ids of purged runs are not handed out again
    assert again.engine.wait(next_id, timeout=60).state == "success"
    assert len(smtp_sink[0].wait_for(6)) == 6  # the new mail's digest only: none of the purged five again


def test_purge_reports_the_bytes_it_freed(store, settings):
    spools = [spool_file(settings, f"message {i}\r\n".encode() * 10) for i in range(3)]
    for path in spools:
        finished_run(store, settings, path, work_bytes=1000)
    report = housekeeping.purge(settings, 0, batch_size=2)
    assert (report.runs, report.spool_files, report.work_dirs, report.failures) == (3, 3, 3, 0)
    assert report.spool_bytes == sum(len(f"message {i}\r\n".encode() * 10) for i in range(3))
    assert report.work_bytes == 3000 and report.freed_bytes == report.spool_bytes + 3000
    assert spool_files(settings) == [] and work_dirs(settings) == []
    assert store.list_spool_tombstones() == []  # files gone: their tombstones too


def test_purge_reports_each_batch_for_its_progress_bar(store, settings):
    for i in range(3):
        finished_run(store, settings, spool_file(settings, f"message {i}\r\n".encode()), work_bytes=10)
    seen: list[int] = []
    report = housekeeping.purge_store(store, settings.data_dir, 0, batch_size=2, on_batch=seen.append)
    assert seen == [2, 1] and report.runs == 3 and work_dirs(settings) == []


def test_a_spool_file_is_kept_while_a_remaining_run_names_it(store, settings):
    shared = spool_file(settings, b"Subject: reprocessed\r\n\r\nbody\r\n")
    old = finished_run(store, settings, shared, ended_at=10.0)
    young = finished_run(store, settings, Path("elsewhere") / shared.name, ended_at=time.time())  # same name
    queued = store.create_run(EMAIL_DIGEST, {"spool": str(shared.resolve())})[0]  # absolute path, same file

    report = housekeeping.purge(settings, 1)
    assert report.runs == 1 and report.spool_files == 0 and report.work_dirs == 1
    assert shared.exists() and work_dirs(settings) == [str(young)]
    assert store.spool_names_in_use([shared.name]) == {shared.name}
    assert store.get_run(queued.run_id).state == "queued"  # queued and running runs are never purged
    assert old not in [r.run_id for r in store.list_runs()]

    store.finish_run(queued.run_id, "failed", "x")
    assert housekeeping.purge(settings, 0).spool_files == 1  # its last run gone: the file goes
    assert not shared.exists()


def test_a_spool_file_purge_cannot_delete_is_not_requeued_and_the_next_purge_deletes_it(
        store, settings, monkeypatch, caplog):
    stuck = spool_file(settings, b"Subject: stuck\r\nMessage-ID: <stuck@x>\r\n\r\nbody\r\n")
    finished_run(store, settings, stuck)
    real_unlink = Path.unlink

    def refuse(path, missing_ok=False):  # a fault root cannot provoke with permissions
        if path.name == stuck.name:
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    with caplog.at_level(logging.WARNING, logger="pipeline.housekeeping"):
        report = housekeeping.purge(settings, 0)
    assert (report.runs, report.spool_files, report.failures) == (1, 0, 1)
    assert [r.getMessage() for r in caplog.records] == [
        f"purge: cannot delete {stuck}: Permission denied; its tombstone stays; the next purge tries again"]
    assert "1 could not be deleted" in report.summary()
    assert stuck.exists() and store.list_spool_tombstones() == [stuck.name]

    service = PipelineService(settings, listen=False)
    try:
        assert service.reconcile_spool() == 0  # purged, not lost: never queued again
    finally:
        service.stop(grace_s=0)
    assert store.count_runs_by_state() == {}

    monkeypatch.setattr(Path, "unlink", real_unlink)
    again = housekeeping.purge(settings, 0)
    assert (again.runs, again.spool_files, again.failures) == (0, 1, 0)
    assert not stuck.exists() and store.list_spool_tombstones() == []


def test_a_tombstoned_name_that_a_new_run_names_is_live_again(store, settings):
    path = spool_file(settings, b"Subject: same bytes again\r\n\r\nbody\r\n")
    finished_run(store, settings, path)
    batches = list(store.purge_batches(time.time()))  # purged, but the file not deleted yet
    assert [b.spool_names for b in batches] == [(path.name,)]
    store.create_run(EMAIL_DIGEST, {"spool": str(path)}, "<again@x>")  # the same bytes arrived again
    assert housekeeping.purge(settings, 0).spool_files == 0
    assert path.exists() and store.list_spool_tombstones() == []


def test_reconciliation_queues_only_unknown_spool_files_and_reads_no_named_one(store, settings, caplog):
    named = spool_file(settings, b"", name="0" * 64 + ".eml")
    named.unlink()
    named.mkdir()  # reading it would fail and be logged: a file some run names is skipped by name, unread
    store.create_run(EMAIL_DIGEST, {"spool": str(named)}, "<named@x>")
    lost = spool_file(settings, b"Subject: lost\r\nMessage-ID: <lost@x>\r\n\r\nbody\r\n")
    legacy = spool_file(settings, b"Subject: old\r\nMessage-ID: <old@x>\r\n\r\nbody\r\n")
    long_ago = store.spool_tracked_since() - LEGACY_GRACE_S - 3600
    os.utime(legacy, (long_ago, long_ago))
    (settings.data_dir / "spool" / ".incoming-x.tmp").write_bytes(b"partial")

    service = PipelineService(settings, listen=False)
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.service"):
            assert service.reconcile_spool() == 1
            assert service.reconcile_spool() == 0  # the lost file has its run now
    finally:
        service.stop(grace_s=0)
    assert not any("skipped" in r.getMessage() for r in caplog.records)
    runs = store.list_runs()
    assert [r.dedup_key for r in runs] == ["<lost@x>", "<named@x>"]
    assert Path(runs[0].payload["spool"]).name == lost.name and runs[0].payload["source"] == "spool"
    assert legacy.exists()  # left alone: a purge of an earlier version orphaned it

    store.finish_run(runs[0].run_id, "success", now=time.time() + 10)  # the lost one's run ends after the cut
    report = housekeeping.purge(settings, 0)
    assert (report.runs, report.spool_files) == (0, 1)  # the legacy file goes; the others have runs
    assert not legacy.exists() and lost.exists()


def test_reconciliation_looks_up_names_in_batches(store, settings):
    paths = [spool_file(settings, f"Subject: {i}\r\nMessage-ID: <b{i}@x>\r\n\r\n".encode()) for i in range(7)]
    for path in paths[:4]:
        store.create_run(EMAIL_DIGEST, {"spool": path.name}, path.name)  # a bare name counts as well
    unknown = unknown_spool_files(store, settings.data_dir / "spool", batch=2)
    assert sorted(p.name for _, p in unknown) == sorted(p.name for p in paths[4:])


def test_reconciliation_skips_what_is_not_a_regular_file(store, settings):
    """A probe's find: a FIFO named *.eml in the spool blocked serve's start in its open() (60 s, then "the gateway
    process did not listen"); a symlink could point at /dev/zero."""
    import os

    real = spool_file(settings, b"Subject: real\r\nMessage-ID: <real@x>\r\n\r\n")
    spool = settings.data_dir / "spool"
    os.mkfifo(spool / "fifo.eml")
    (spool / "zero.eml").symlink_to("/dev/zero")
    (spool / "dir.eml").mkdir()
    assert [p.name for _, p in unknown_spool_files(store, spool)] == [real.name]


@pytest.mark.parametrize("days", ["-1", "nan", "inf"])
def test_purge_refuses_a_negative_or_non_finite_age_in_one_line(store, settings, capsys, days):
    assert main(["--data-dir", str(settings.data_dir), "purge", "--older-than", days]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot purge runs older than") and "0 or more" in err[0]


def _store_at_version(path: Path, version: int) -> sqlite3.Connection:
    """Create a store file as a pipeline with only the first ``version`` migrations made it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "applied_at REAL NOT NULL)")
    for number, (name, statements) in enumerate(MIGRATIONS[:version], start=1):
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (number, name))
    conn.execute(f"PRAGMA user_version = {version}")
    return conn


def test_migration_to_autoincrement_keeps_runs_counts_tasks_and_indexes(tmp_path):
    path = tmp_path / "runs.sqlite3"
    conn = _store_at_version(path, 4)
    for i, state in enumerate(["success", "failed", "queued", "running", "success"], start=1):
        conn.execute("INSERT INTO runs (workflow, state, dedup_key, payload, queued_at, ended_at) "
                     "VALUES ('wf', ?, ?, ?, ?, ?)", (state, f"k{i}", f'{{"spool": "data/spool/{i}.eml"}}', i,
                                                     i + 0.5 if state in ("success", "failed") else None))
    conn.execute("INSERT INTO task_runs (run_id, task_id, state) VALUES (1, 't', 'success')")
    conn.execute("DELETE FROM runs WHERE run_id = 5")  # the old schema will hand out 5 again; the new never will
    conn.close()

    store = SqliteRunStore(path)
    try:
        assert [r.run_id for r in store.list_runs()] == [4, 3, 2, 1]
        assert store.get_run(1).payload == {"spool": "data/spool/1.eml"} and store.get_run(1).ended_at == 1.5
        assert store.get_tasks(1)[0].state == "success"
        assert store.count_runs_by_state() == {"success": 1, "failed": 1, "queued": 1, "running": 1}
        assert store.create_run("wf", {}, "k2") == (store.get_run(2), False)  # dedup key still unique
        newest = store.create_run("wf", {})[0]
        assert newest.run_id == 5 and store.count_runs_by_state()["queued"] == 2  # the counting triggers fire
        store.finish_run(newest.run_id, "success")
        assert store.purge_runs(time.time() + 1) == 3
        assert store.create_run("wf", {})[0].run_id == 6
        assert store.spool_names_in_use(["3.eml", "1.eml"]) == {"3.eml"}
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'runs'")}
        assert {"runs_by_workflow", "runs_by_state", "runs_by_workflow_state", "runs_running_heartbeat",
                "runs_by_ended", "runs_by_spool_name", "runs_count_insert", "runs_count_update",
                "runs_count_delete"} <= indexes
        plan = [r[-1] for r in conn.execute("EXPLAIN QUERY PLAN SELECT run_id FROM runs WHERE spool_name IN ('a')")]
        assert any("runs_by_spool_name" in step for step in plan), plan
        plan = [r[-1] for r in conn.execute("EXPLAIN QUERY PLAN SELECT run_id FROM runs WHERE ended_at < 5 "
                                            "AND state IN ('success', 'failed')")]
        assert all("USING INDEX" in step for step in plan), plan  # the purge's query: no full scan
    finally:
        conn.close()


def test_a_message_that_reused_a_message_id_keeps_its_run_after_the_first_is_purged(settings):
    service = PipelineService(settings, listen=False)  # the engine is not started: runs stay queued
    try:
        first = service.gateway.accept(fx.email_with([], subject="A", message_id="<reused@example.com>"))
        second_mail = fx.email_with([], subject="B", message_id="<reused@example.com>")
        second = service.gateway.accept(second_mail)
        assert second.run_id != first.run_id and second.dedup_key.startswith("<reused@example.com> sha256:")
        service.store.finish_run(first.run_id, "success", now=1.0)
        housekeeping.purge_store(service.store, settings.data_dir, 0)
        again = service.gateway.accept(second_mail)  # B again (a retry after a lost 250): still one run
        assert again.run_id == second.run_id
        assert [r.run_id for r in service.store.list_runs()] == [second.run_id]
    finally:
        service.stop(grace_s=0)


def test_work_dirs_a_purge_stopped_midway_left_are_removed_by_the_next_purge(store, settings):
    """A purge killed (or Ctrl-C'd, or failing) after a batch committed left that batch's work dirs, with the
    users' PDFs, text and digests, for good: later purges only removed the dirs of the runs they deleted."""
    done = [finished_run(store, settings, None) for _ in range(4)]
    live = store.create_run(EMAIL_DIGEST, {})[0].run_id  # queued: its dir (made early, say) must stay
    (settings.data_dir / "work" / str(live)).mkdir()
    future = settings.data_dir / "work" / "999"  # no run has been handed that id: not ours to judge
    future.mkdir()
    batches = store.purge_batches(time.time(), 2)
    first = next(batches)  # the batch committed; the process died before deleting any file
    batches.close()
    assert len(first.run_ids) == 2 and all((settings.data_dir / "work" / str(i)).is_dir() for i in first.run_ids)
    report = housekeeping.purge(settings, 0)
    assert report.runs == 2 and report.work_dirs == 4  # its own two and the two orphans
    assert work_dirs(settings) == sorted([str(live), "999"])
    assert not set(map(str, done)) & set(work_dirs(settings))


class _FailingAfterOneBatch(SqliteRunStore):
    """A store whose second purge batch fails as a store locked past its busy timeout does."""

    def purge_batches(self, before, batch_size):
        batches = super().purge_batches(before, batch_size)
        yield next(batches)
        raise StoreBusyError(f"{self.path}: database is locked (another process held it past the busy timeout)")


def test_a_purge_that_fails_midway_says_what_it_had_deleted(settings, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    with _FailingAfterOneBatch(settings.store) as store:
        for _ in range(4):
            finished_run(store, settings, None)
        with pytest.raises(StoreBusyError):
            housekeeping.purge_store(store, settings.data_dir, 0, batch_size=2)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("purge stopped")]
    assert "2 run(s)" in line and "work 0.0 MB in 2 dir(s)" in line, line


def test_a_work_dir_listing_that_fails_is_counted_and_the_next_purge_removes_the_orphan(store, settings, caplog):
    """Out of file descriptors (for real: RLIMIT_NOFILE), the sweep for orphaned work dirs cannot list them:
    it logs, counts one failure and returns, so the purge of the runs themselves goes on."""
    import resource

    caplog.set_level(logging.WARNING, logger="pipeline")
    orphan = finished_run(store, settings, None)
    batches = store.purge_batches(time.time(), 10)
    next(batches)  # the run is deleted; its work dir stays, as a purge killed here leaves it
    batches.close()
    assert work_dirs(settings) == [str(orphan)]
    files = housekeeping._FileRemover(settings.data_dir / "spool", settings.data_dir / "work")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new descriptor takes the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no number left for the listing
    try:
        housekeeping.remove_orphan_work_dirs(store, files)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert files.failures == 1 and files.work_dirs == 0
    assert any("cannot list" in r.getMessage() and "Too many open files" in r.getMessage() for r in caplog.records)
    assert work_dirs(settings) == [str(orphan)]
    report = housekeeping.purge(settings, 0)
    assert report.work_dirs == 1 and report.failures == 0 and work_dirs(settings) == []


def test_purge_on_a_full_disk_says_what_to_do_and_works_once_there_is_room(tmp_path, capsys):
    """A prober's find: on a full disk purge failed with SQLite's bare 'database or disk is full', although a full
    disk is when an operator reaches for it: the store must record what it deletes before a file goes."""
    from test_gateway_faults import tmpfs

    data = tmp_path / "data"
    with tmpfs(data, "16m"):
        with SqliteRunStore(data / "runs.sqlite3") as store:
            for i in range(300):
                store.finish_run(store.create_run("wf", {"n": i, "pad": "x" * 500})[0].run_id, "success", now=1.0)
        ballast = fill_disk(data / "ballast")
        assert main(["--data-dir", str(data), "purge", "--older-than", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "KB free, and purge needs a few MB to record what it deletes" in err[0], err
        ballast.unlink()
        assert main(["--data-dir", str(data), "purge", "--older-than", "0"]) == 0
        assert capsys.readouterr().out.startswith("purged 300 run(s)")
