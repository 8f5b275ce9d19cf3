"""The CLI on a real store: runs, show, purge, and one-line errors."""

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from test_store_faults import damage_table

from pipeline.cli import build_parser, main
from pipeline.sqlite_store import SqliteRunStore
from pipeline.store import Transition


@pytest.fixture
def filled(store, settings):
    ok = store.create_run("wf", {"n": 1}, "k1")[0]
    store.claim_next_run("me")
    store.create_tasks(ok.run_id, ["t"])
    store.record_transitions([Transition(ok.run_id, "t", "running", 1, 10.0),
                              Transition(ok.run_id, "t", "failed", 1, 12.5, "corrupt", "bad xref")])
    store.finish_run(ok.run_id, "failed", "t: corrupt: bad xref", now=13.0)
    queued = store.create_run("other", {})[0]
    return ok, queued


def run_cli(settings, *args):
    return main(["--data-dir", str(settings.data_dir), *args])


@pytest.mark.parametrize("limit", [1, 4, 5, 9])
def test_runs_reads_page_by_page(store, settings, capsys, monkeypatch, limit):
    """``runs`` reads the store a page at a time (it held every row: 853 MB for ``--limit 200000``): pages
    of 2 list the same runs, newest first, each once, as one page would; JSON and table alike."""
    monkeypatch.setattr("pipeline.cli.RUNS_PAGE", 2)
    ids = [store.create_run("wf", {"n": n})[0].run_id for n in range(5)]
    assert run_cli(settings, "runs", "--json", "--limit", str(limit)) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ids[::-1][:limit]
    assert run_cli(settings, "runs", "--limit", str(limit), "--before", str(ids[-1])) == 0
    listed = [int(line.split()[0]) for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ids[-2::-1][:limit]


def test_runs_json_lists_newest_first(filled, settings, capsys):
    assert run_cli(settings, "runs", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in rows] == [filled[1].run_id, filled[0].run_id]
    assert set(rows[0]) >= {"run_id", "workflow", "state", "queued_at", "started_at", "ended_at", "dedup_key"}


def test_runs_filters_by_workflow_and_state(filled, settings, capsys):
    run_cli(settings, "runs", "--workflow", "wf", "--state", "failed", "--json")
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [filled[0].run_id]
    run_cli(settings, "runs")
    table = capsys.readouterr().out
    assert "RUN" in table and "t: corrupt: bad xref" in table


def test_show_json_has_tasks_with_errors(filled, settings, capsys):
    assert run_cli(settings, "show", str(filled[0].run_id), "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dedup_key"] == "k1" and shown["state"] == "failed"
    assert shown["tasks"] == [{"task_id": "t", "state": "failed", "try_number": 1, "started_at": 10.0,
                               "ended_at": 12.5, "duration_s": 2.5, "wait_s": 0.0,
                               "error": {"type": "corrupt", "message": "bad xref"}}]


def test_unknown_run_is_one_line_error(filled, settings, capsys):
    assert run_cli(settings, "show", "999") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no run with id 999"]


def test_store_that_is_not_a_database_is_one_line_error(tmp_path, capsys):
    (tmp_path / "runs.sqlite3").write_text("garbage" * 50)
    assert main(["--data-dir", str(tmp_path), "runs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a SQLite database" in err[0] and str(tmp_path) in err[0]


def test_runs_before_anything_ran_is_empty_and_creates_nothing(tmp_path, capsys):
    data = tmp_path / "nothing"
    assert main(["--data-dir", str(data), "runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["--data-dir", str(data), "runs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].split()[:3] == ["RUN", "WORKFLOW", "STATE"]
    assert not data.exists()


def test_show_before_anything_ran_is_unknown_run_and_creates_nothing(tmp_path, capsys):
    data = tmp_path / "nothing"
    assert main(["--data-dir", str(data), "show", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: no run with id 5"]
    assert not data.exists()


def test_purge_without_a_store_purges_nothing_and_creates_nothing(tmp_path, capsys):
    """A fresh install's purge job (cron) has nothing to purge: that is no error (it was exit 2)."""
    assert main(["--data-dir", str(tmp_path / "nothing"), "purge", "--older-than", "1"]) == 0
    assert capsys.readouterr().out.startswith("purged 0 run(s): no run store at ")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("argv", [["runs", "--json"], ["show", "1"], ["purge", "--older-than", "0"]])
def test_an_empty_store_file_is_read_as_no_store_and_never_written(tmp_path, capsys, argv):
    """A prober's find: with a 0-byte runs.sqlite3 (a restore that failed, ``> runs.sqlite3``) a read command
    wrote a whole new schema into the file, and run ids started again at 1."""
    (tmp_path / "runs.sqlite3").touch()
    main(["--data-dir", str(tmp_path), *argv])
    assert (tmp_path / "runs.sqlite3").stat().st_size == 0 and not (tmp_path / "runs.sqlite3-wal").exists()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and (captured.out or captured.err)


@pytest.mark.parametrize("option", ["--data-dir", "--config"])
def test_an_empty_path_option_is_refused_not_the_current_directory(tmp_path, capsys, option, monkeypatch):
    """``--data-dir "$DATA"`` with DATA unset: as a path "" is ".", and ingest wrote its store and spool there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([option, "", "runs"])
    assert stopped.value.code == 2 and "an empty path" in capsys.readouterr().err
    (tmp_path / "empty.toml").write_text('data_dir = ""\n')
    assert main(["--config", str(tmp_path / "empty.toml"), "runs"]) == 2
    assert "data_dir is empty" in capsys.readouterr().err and list(tmp_path.iterdir()) == [tmp_path / "empty.toml"]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


@pytest.mark.parametrize("argv", [["runs"], ["runs", "--json"], ["show", "1"], ["show", "1", "--json"]])
def test_store_with_damaged_pages_is_one_line_error(filled, settings, store, capsys, argv):
    store.close()  # checkpoint the WAL into the file before damaging it
    damage_table(settings.store.path, "runs")
    assert run_cli(settings, *argv) == 2
    line = one_error_line(capsys)
    assert str(settings.store.path) in line and "malformed" in line


def test_purge_on_a_store_locked_by_another_process_is_one_line_error(filled, settings, tmp_path, capsys):
    config = tmp_path / "settings.toml"
    config.write_text("[store]\nbusy_timeout_ms = 200\n")
    with closing(sqlite3.connect(settings.store.path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        assert run_cli(settings, "--config", str(config), "purge", "--older-than", "1") == 2
        other.execute("ROLLBACK")
    line = one_error_line(capsys)
    assert str(settings.store.path) in line and "database is locked" in line
    assert run_cli(settings, "--config", str(config), "purge", "--older-than", "1") == 0  # free again: it works


def test_serve_where_the_data_dir_cannot_be_made_is_one_line_error(tmp_path, capsys):
    # a regular file where the data dir should be: mkdir fails as on a read-only disk (tests run as root,
    # and root ignores permission bits, so chmod 0o500 would not provoke it)
    data = tmp_path / "data"
    data.write_text("not a directory")
    assert main(["--data-dir", str(data), "serve", "--port", "0", "--no-drop-folder"]) == 2
    line = one_error_line(capsys)
    assert str(data) in line  # StartupError from the service, or StoreIOError from the store: either is one line


def test_purge_removes_old_runs(filled, settings, store, capsys):
    assert run_cli(settings, "purge", "--older-than", "1", "--dry-run") == 0
    assert capsys.readouterr().out.startswith("would purge 1 run(s) that ended more than 1 day(s) ago")
    assert [r.run_id for r in store.list_runs()] == [filled[1].run_id, filled[0].run_id]  # the dry run kept it
    assert run_cli(settings, "purge", "--older-than", "1") == 0
    assert "purged 1 run(s)" in capsys.readouterr().out
    assert [r.run_id for r in store.list_runs()] == [filled[1].run_id]


def test_every_command_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices) and all(helps.values())


def test_python_dash_m_entry_point(filled, settings):
    out = subprocess.run([sys.executable, "-m", "pipeline", "--data-dir", str(settings.data_dir), "runs", "--json"],
                         capture_output=True, text=True, check=True)
    assert len(json.loads(out.stdout)) == 2


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_work_on_either_side_of_the_command(filled, settings, tmp_path, capsys, where):
    config = tmp_path / "c.toml"
    config.write_text("[store]\nbusy_timeout_ms = 500\n")
    options = ["--data-dir", str(settings.data_dir), "--config", str(config)]
    argv = [*options, "runs", "--json"] if where == "before" else ["runs", "--json", *options]
    assert main(argv) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [filled[1].run_id, filled[0].run_id]


def test_a_global_option_after_the_command_wins_over_one_before(filled, settings, tmp_path, capsys):
    argv = ["--data-dir", str(tmp_path / "elsewhere"), "runs", "--json", "--data-dir", str(settings.data_dir)]
    assert main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.parametrize("chatty", ["mail.log", "psycopg.pool"])
def test_library_chatter_stays_out_of_the_log_unless_verbose(tmp_path, capsys, chatty):
    import logging

    main(["runs", "--data-dir", str(tmp_path / "none")])
    assert logging.getLogger(chatty).getEffectiveLevel() == logging.WARNING
    main(["runs", "-v", "--data-dir", str(tmp_path / "none")])
    assert logging.getLogger(chatty).level == logging.NOTSET  # the root's level again: DEBUG with -v


def test_show_lists_tasks_in_dag_order_then_by_start(settings, capsys):
    from pipeline.sqlite_store import SqliteRunStore
    with SqliteRunStore(settings.store) as store:
        run, _ = store.create_run("email_digest", {})
        # created in an order unlike the DAG's, as a requeued run's tasks can be
        store.create_tasks(run.run_id, ["deliver", "ingest_pdf[1]", "build_digest", "ingest_pdf[0]", "parse_email"])
        store.record_transitions([Transition(run.run_id, "ingest_pdf[1]", "running", 1, 10.0),
                                  Transition(run.run_id, "ingest_pdf[0]", "running", 1, 20.0)])
    assert main(["--data-dir", str(settings.data_dir), "show", str(run.run_id), "--json"]) == 0
    shown = [t["task_id"] for t in json.loads(capsys.readouterr().out)["tasks"]]
    assert shown == ["parse_email", "ingest_pdf[1]", "ingest_pdf[0]", "build_digest", "deliver"]


@pytest.mark.parametrize("argv", [["runs", "--limit", "-5"], ["runs", "--limit", "0"], ["runs", "--limit", "x"],
                                  ["runs", "--limit", "99999999999999999999"],
                                  ["runs", "--before", "9223372036854775808"], ["show", "9223372036854775808"],
                                  ["show", "-1"], ["serve", "--max-message-mb", "nan"],
                                  ["serve", "--max-message-mb", "inf"]])
def test_nonsense_numbers_are_refused_in_one_line(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "error: argument" in err and "Traceback" not in err


# -- issue 12: --store-url, serve roles, the executor ---------------------------------------------------------------


def test_store_url_and_executor_flags_reach_the_settings(tmp_path):
    from pipeline.cli import settings_from

    args = build_parser().parse_args(["--data-dir", str(tmp_path), "serve", "--workers-only",
                                      "--store-url", "postgresql://u:secret@db.example/runs",
                                      "--scheduler", "tcp://sched.example:8786"])
    settings = settings_from(args)
    assert settings.store.url == "postgresql://u:secret@db.example/runs" and settings.store.is_postgres
    assert (settings.executor.kind, settings.executor.scheduler) == ("dask", "tcp://sched.example:8786")


@pytest.mark.parametrize("argv, message", [
    (["serve", "--workers-only", "--port", "2525"], "--workers-only does not listen: drop --port"),
    (["serve", "--gateway-only", "--executor", "dask"], "--gateway-only runs no tasks: give --executor"),
    (["serve", "--executor", "local", "--scheduler", "tcp://h:8786"], "--scheduler names a Dask cluster"),
    (["--store-url", "mysql://h/db", "runs"], "--store-url must start with postgresql://"),
])
def test_serve_role_and_store_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["--data-dir", str(tmp_path / "data"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_gateway_only_and_workers_only_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--data-dir", str(tmp_path), "serve", "--gateway-only", "--workers-only"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_the_store_url_is_logged_without_its_password():
    from pipeline.config import Settings, StoreConfig
    from pipeline.service import store_location

    def shown(url: str) -> str:
        return store_location(Settings(store=StoreConfig(url=url)))

    assert shown("postgresql://digest:s3cret@db.example:5432/runs") == "postgresql://digest:***@db.example:5432/runs"
    assert shown("postgresql://digest@db.example/runs") == "postgresql://digest@db.example/runs"
    assert "s3cret" not in shown("postgresql://:s3cret@db.example/runs")


def test_runs_and_show_read_a_postgresql_store_named_by_store_url(pg_url, tmp_path, capsys):
    from pipeline.config import StoreConfig
    from pipeline.store import open_store

    with open_store(StoreConfig(url=pg_url)) as pg:
        run = pg.create_run("email_digest", {"spool": "/x/spool/a.eml"}, "<pg@example.com>")[0]
    assert main(["--data-dir", str(tmp_path / "data"), "--store-url", pg_url, "runs", "--json"]) == 0
    assert [r["dedup_key"] for r in json.loads(capsys.readouterr().out)] == ["<pg@example.com>"]
    assert main(["show", str(run.run_id), "--store-url", pg_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == run.run_id
    assert not (tmp_path / "data").exists()  # no SQLite file made beside the PostgreSQL store


def test_ingest_names_a_missing_file_and_a_directory_in_one_line_each(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "d"), "ingest", str(tmp_path / "nope.pdf")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such file: {tmp_path / 'nope.pdf'}"
    assert main(["--data-dir", str(tmp_path / "d"), "ingest", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: not a regular file: {tmp_path}"


def test_ingest_refuses_a_file_over_the_message_limit_in_one_line_before_any_run(tmp_path, capsys):
    """A probe's find: ``ingest`` read any file whole (60 MB took 703 MB of memory; 100 GB: a MemoryError
    traceback) where SMTP and the drop folder refuse it."""
    small, big = tmp_path / "small.eml", tmp_path / "big.eml"
    small.write_bytes(b"From: a@example.com\r\nSubject: s\r\n\r\nhi\r\n")
    with open(big, "wb") as out:
        out.truncate(2 * 1024 * 1024 + 1)  # sparse: nothing is written
    (config := tmp_path / "small.toml").write_text("[gateway]\nmax_message_bytes = 2097152\n"
                                                    "max_inflight_bytes = 2097152\n")
    code = main(["--data-dir", str(tmp_path / "d"), "--config", str(config), "ingest", str(small), str(big)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"error: cannot ingest {big}: 2,097,153 bytes, over the 2,097,152-byte limit "
                                 "([gateway] max_message_bytes)")
    assert main(["--data-dir", str(tmp_path / "d"), "runs"]) == 0 and "email_digest" not in capsys.readouterr().out


def test_runs_into_a_pipe_whose_reader_left_stops_quietly_as_head_expects(filled, settings):
    """``runs | head -1``: the reader closes its end early; that is no error (exit 141, as a shell reports a
    tool killed by SIGPIPE), and nothing is printed about it."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already left: the first write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline", "--data-dir", str(settings.data_dir), "runs"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


@contextmanager
def read_only_view(directory, view):
    """Bind-mount ``directory`` read-only on ``view`` (skip where mounting is refused); unmounted after."""
    view.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(view)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip() or done.returncode}")
    try:
        if os.access(view, os.W_OK):  # an old mount(8) ignores ro on a bind: remount it
            subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_runs_and_show_read_a_store_on_a_read_only_mount(settings, tmp_path, capsys):
    """A backup or a data dir mounted read-only: SQLite cannot make the WAL's -shm file beside a closed store,
    so the store is read as a snapshot rather than failing with "unable to open database file"."""
    with closing(SqliteRunStore(settings.store)) as writer:
        run = writer.create_run("email_digest", {}, "<ro@x>")[0]
    assert not list(settings.data_dir.glob("*-shm"))  # closed: SQLite removed it
    with read_only_view(settings.data_dir, tmp_path / "view") as view:
        assert main(["--data-dir", str(view), "runs", "--json"]) == 0
        assert [r["dedup_key"] for r in json.loads(capsys.readouterr().out)] == ["<ro@x>"]
        assert main(["--data-dir", str(view), "show", str(run.run_id)]) == 0
        assert capsys.readouterr().out.startswith(f"run {run.run_id}  email_digest  queued")


def test_runs_read_only_sees_what_a_live_writer_committed(settings, tmp_path):
    """While serve has the store open (its -shm exists), a reader who cannot write the directory still sees
    every committed run, those only in the WAL included."""
    settings.data_dir.mkdir(parents=True)
    with read_only_view(settings.data_dir, tmp_path / "view") as view:
        with closing(SqliteRunStore(settings.store)) as writer:
            writer.create_run("email_digest", {}, "<first@x>")
            writer.create_run("email_digest", {}, "<second@x>")  # in the WAL, not checkpointed
            # another process, as a reader is (in this one, SQLite keeps the reader's descriptors while the
            # writer holds locks on the same file)
            done = subprocess.run([sys.executable, "-m", "pipeline", "--data-dir", str(view), "runs", "--json"],
                                  capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert [r["dedup_key"] for r in json.loads(done.stdout)] == ["<second@x>", "<first@x>"]


def test_read_only_store_of_an_older_schema_says_what_to_do(settings, tmp_path, capsys):
    with closing(SqliteRunStore(settings.store)) as writer:
        writer.create_run("email_digest", {}, "<old@x>")
    with closing(sqlite3.connect(settings.store.path)) as conn:
        conn.execute("PRAGMA user_version = 3")
    with read_only_view(settings.data_dir, tmp_path / "view") as view:
        assert main(["--data-dir", str(view), "runs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "older version of the pipeline" in err[-1], err


INGEST = [sys.executable, "-m", "pipeline", "--data-dir"]


def _one_pdf(tmp_path):
    from pipeline.audit.base import fixtures as fx

    path = tmp_path / "one.pdf"
    path.write_bytes(fx.text_pdf(1))
    return path


def test_ingest_runs_only_its_own_runs_never_a_backlog_serve_queued(tmp_path):
    """A prober's find: ingest's engine claimed every queued run in the store (a gateway-only serve's 60 mails),
    and delivered their digests with the ingest command's own settings (another outbox, another relay)."""
    from pipeline.config import StoreConfig

    data = tmp_path / "data"
    data.mkdir()
    with SqliteRunStore(StoreConfig(path=data / "runs.sqlite3")) as st:
        theirs = st.create_run("a_workflow_of_serve", {}, "<serve's@x>")[0]  # claimed, it would fail at once
    done = subprocess.run([*INGEST, str(data), "ingest", str(_one_pdf(tmp_path))], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "success"
    with SqliteRunStore(StoreConfig(path=data / "runs.sqlite3")) as st:
        assert st.get_run(theirs.run_id).state == "queued"  # left for serve


def test_ingest_of_an_unreadable_file_is_one_line_and_makes_no_run(tmp_path):
    """A prober's find: the unreadable second file failed with a bare OS error after the first file's run was
    queued, a run no one waited for."""
    unreadable = tmp_path / "secret.pdf"
    unreadable.write_bytes(b"%PDF-1.4")
    unreadable.chmod(0)
    if os.geteuid() == 0:  # root reads any mode; a write-only kernel file refuses even root
        unreadable = next((p for p in map(Path, ["/proc/sys/vm/compact_memory", "/proc/sysrq-trigger"])
                           if p.is_file() and _refuses_read(p)), None)
        if unreadable is None:
            pytest.skip("no file here that root cannot read")
    data = tmp_path / "data"
    done = subprocess.run([*INGEST, str(data), "ingest", str(_one_pdf(tmp_path)), str(unreadable)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == \
        [f"error: cannot read {unreadable}: Permission denied"], done.stderr
    runs = subprocess.run([*INGEST, str(data), "runs", "--json"], capture_output=True, text=True, timeout=60)
    assert json.loads(runs.stdout) == []


def _refuses_read(path):
    try:
        with open(path, "rb"):
            return False
    except OSError:
        return True


INGEST_UNWRITABLE = """
import sys
from pathlib import Path
from pipeline.config import Settings
from pipeline.errors import RunNotFinishedError
from pipeline.ingest_command import ingest_files
data = Path(sys.argv[1])
data.mkdir()
(data / "work").write_text("a file where the work dir belongs")
try:
    ingest_files(Settings.for_data_dir(data), [Path(sys.argv[2])], unhealthy_s=1.0)
except RunNotFinishedError as exc:
    print(exc)
    sys.exit(2)
"""


def test_ingest_gives_up_on_an_engine_that_stays_unhealthy_and_says_why(tmp_path):
    """A prober's find: with the work dir unusable, ingest logged an ERROR every 5 s for its whole 600 s wait, then
    said only 'run 1 still running after 600 s' (the run was in fact queued)."""
    done = subprocess.run([sys.executable, "-c", INGEST_UNWRITABLE, str(tmp_path / "data"), str(_one_pdf(tmp_path))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr[-2000:])
    assert done.stdout.startswith("run 1 cannot go on: ") and "Not a directory" in done.stdout, done.stdout
    assert "serve on this data dir finishes it" in done.stdout


def test_runs_and_show_read_a_store_on_a_full_disk(tmp_path, capsys):
    """A prober's find: on a full disk serve, runs and show all failed "disk I/O error" (SQLite cannot make the
    WAL's -shm file there), though the store reads fine read-only."""
    from test_gateway_faults import fill, tmpfs

    with tmpfs(tmp_path / "disk", "4m") as disk:
        data = disk / "data"
        with closing(SqliteRunStore(data / "runs.sqlite3")) as writer:
            run = writer.create_run("email_digest", {}, "<full@x>")[0]
        fill(disk)
        assert main(["--data-dir", str(data), "runs", "--json"]) == 0, capsys.readouterr().err
        assert [r["dedup_key"] for r in json.loads(capsys.readouterr().out)] == ["<full@x>"]
        assert main(["--data-dir", str(data), "show", str(run.run_id)]) == 0
        assert capsys.readouterr().out.startswith(f"run {run.run_id}  email_digest  queued")
