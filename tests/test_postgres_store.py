"""PostgresRunStore on a real PostgreSQL server: what the cross-backend contract suite cannot say.

Migrations under an advisory lock, refusing foreign or newer databases, the
generated spool_name column, sharded run counters, typed errors when the server
goes away (and recovery when it comes back), and LISTEN/NOTIFY wake-ups.
"""

import os
import subprocess
import sys
import threading
import time

import pytest
from helpers import at_once, noop, wait_until

from pipeline.config import Settings, StoreConfig
from pipeline.dag import DAG, Task
from pipeline.engine import WorkflowEngine
from pipeline.errors import (
    ConfigurationError,
    SchemaTooNewError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreIOError,
    StoreUnavailableError,
)
from pipeline.postgres_schema import MIGRATIONS, SCHEMA_VERSION
from pipeline.postgres_store import IDLE_CHECK_S, PostgresRunStore, store_error
from pipeline.sql_store import TransientStoreError
from pipeline.store import Transition, open_store

psycopg = pytest.importorskip("psycopg", reason="the [postgres] extra is not installed")


def test_open_store_picks_postgres_by_url(pg_url):
    with open_store(StoreConfig(url=pg_url)) as store:
        assert isinstance(store, PostgresRunStore) and store.queue_notifications


def test_a_database_not_encoded_utf8_is_refused_in_one_line(pg_server):
    """A prober's find: on a database created SQL_ASCII (initdb's default under a C locale, common in containers)
    psycopg handed every text column back as bytes: all 60 acked mails failed "unknown_workflow:
    b'email_digest' is not registered", and every metrics scrape answered 500 (jsonb there cannot even hold a
    non-ASCII subject). The store refuses it at open, saying how to make a UTF8 one, and creates nothing."""
    name = f"ascii{os.getpid()}"
    url = pg_server.create_database(name, encoding="SQL_ASCII")
    try:
        with pytest.raises(ConfigurationError, match="encoded SQL_ASCII, and the run store needs UTF8: create it "
                                                     "with createdb --encoding=UTF8"):
            open_store(StoreConfig(url=url))
        import psycopg

        with psycopg.connect(url) as conn:  # refused untouched: no schema made
            assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0
    finally:
        pg_server.drop_database(name)


def test_a_missing_driver_is_a_one_line_configuration_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)  # an uninstalled extra: import raises ImportError
    with pytest.raises(ConfigurationError) as info:
        open_store(StoreConfig(url="postgresql://nobody@127.0.0.1:1/none"))
    assert "pip install 'email-digest-pipeline[postgres]'" in str(info.value) and "\n" not in str(info.value)


def test_concurrent_openers_of_a_new_database_migrate_it_once(pg_url):
    stores, errors = at_once(lambda: PostgresRunStore(pg_url), 6)
    for store in stores:
        store.close()
    assert not errors
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert [v for v, _ in rows] == list(range(1, SCHEMA_VERSION + 1)) and all(name for _, name in rows)


def test_a_newer_schema_is_refused(pg_url):
    PostgresRunStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (%s, 'from the future', 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNewError):
        PostgresRunStore(pg_url)


def test_a_database_with_other_tables_is_refused_untouched(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id int)")
    with pytest.raises(StoreError, match="other tables"):
        PostgresRunStore(pg_url)
    with pytest.raises(StoreError, match="no run store here"):
        PostgresRunStore(pg_url, create=False)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('runs')").fetchone()[0] is None


def test_spool_name_is_the_last_path_component_kept_by_postgres(pg_url):
    with PostgresRunStore(pg_url) as store:
        store.create_run("wf", {"spool": "spool/ab.eml"})
        store.create_run("wf", {"spool": "/var/data/spool/cd.eml"})
        store.create_run("wf", {"spool": "ef.eml"})
        store.create_run("wf", {})
        assert store.spool_names_in_use(["ab.eml", "cd.eml", "ef.eml", "spool", "zz.eml"]) == {
            "ab.eml", "cd.eml", "ef.eml"}


def test_counts_stay_exact_when_many_connections_write_at_once(pg_url):
    with PostgresRunStore(StoreConfig(url=pg_url, pool_size=8)) as store:
        def work(i):
            for n in range(15):
                run = store.create_run("wf" if n % 3 else "other", {})[0]
                if n % 2:
                    claimed = store.claim_next_run(f"w{i}")
                    store.finish_run(claimed.run_id, "success" if n % 4 == 1 else "failed", owner=f"w{i}")
                del run

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.purge_runs(time.time() + 10, batch_size=7)
        with psycopg.connect(pg_url) as conn:
            for workflow in (None, "wf"):
                where = "" if workflow is None else f"WHERE workflow = '{workflow}'"
                truth = dict(conn.execute(f"SELECT state, count(*) FROM runs {where} GROUP BY state").fetchall())
                assert store.count_runs_by_state(workflow) == truth


def _counts_are_exact(store, pg_url):
    with psycopg.connect(pg_url) as conn:
        truth = dict(conn.execute("SELECT state, count(*) FROM runs GROUP BY state").fetchall())
    assert store.count_runs_by_state() == truth


def test_a_multi_row_insert_is_counted_once_per_statement(pg_url):
    with PostgresRunStore(pg_url) as store:
        store.create_run("wf", {})
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO runs (workflow, state, payload, queued_at) "
                          "SELECT 'wf', CASE WHEN i % 3 = 0 THEN 'failed' ELSE 'success' END, '{}', 1.0 "
                          "FROM generate_series(1, 300) AS i")
            conn.execute("INSERT INTO runs (workflow, state, payload, queued_at) "
                          "SELECT 'wf', 'queued', '{}', 1.0 WHERE false")  # no rows: counts nothing
        _counts_are_exact(store, pg_url)
        assert store.count_runs_by_state() == {"queued": 1, "failed": 100, "success": 200}


def test_a_database_of_the_first_schema_is_migrated_and_keeps_counting(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a store as the first release left it
        conn.execute("CREATE TABLE schema_migrations "
                     "(version integer PRIMARY KEY, name text NOT NULL, applied_at double precision NOT NULL)")
        for statement in MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (1, %s, 0)", (MIGRATIONS[0][0],))
        conn.execute("INSERT INTO runs (workflow, state, payload, queued_at) VALUES ('wf', 'queued', '{}', 1.0)")
    with PostgresRunStore(pg_url) as store:
        store.create_runs([("wf", {}, f"k{i}") for i in range(3)])
        run = store.claim_next_run("me")
        store.finish_run(run.run_id, "success", owner="me")
        _counts_are_exact(store, pg_url)
        assert store.count_runs_by_state() == {"queued": 3, "success": 1}
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION


def test_one_transition_a_call_is_a_statement_the_server_keeps_prepared(pg_url):
    with PostgresRunStore(StoreConfig(url=pg_url, pool_size=1)) as store:
        run = store.create_run("wf", {})[0]
        store.claim_next_run("me")
        store.create_tasks(run.run_id, [f"t{i}" for i in range(10)])
        for i in range(10):  # psycopg prepares a statement on its prepare_threshold-th (5th) run
            assert store.record_transitions([Transition(run.run_id, f"t{i}", "running", 1, 1.0)], owner="me") == 1
        with store._pool.connection() as conn:  # pool_size 1: the connection the transitions used
            prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements "
                                    "WHERE statement LIKE '%UPDATE task_runs%'").fetchone()[0]
        assert prepared == 1
        assert [t.state for t in store.get_tasks(run.run_id)] == ["running"] * 10


@pytest.mark.parametrize(("error", "typed"), [
    (psycopg.errors.DiskFull, StoreIOError),
    (psycopg.errors.ReadOnlySqlTransaction, StoreIOError),
    (psycopg.errors.DataCorrupted, StoreCorruptError),
    (psycopg.errors.IndexCorrupted, StoreCorruptError),
    (psycopg.errors.SerializationFailure, TransientStoreError),
    (psycopg.errors.DeadlockDetected, TransientStoreError),
    (psycopg.errors.AdminShutdown, StoreUnavailableError),
    (psycopg.errors.ConnectionFailure, StoreUnavailableError),
    (psycopg.errors.LockNotAvailable, StoreBusyError),
    (psycopg.OperationalError, StoreUnavailableError),  # refused or reset: no SQLSTATE
    (psycopg.errors.DivisionByZero, StoreError),
])
def test_driver_errors_map_onto_the_store_error_tree(error, typed):
    translated = store_error("postgresql://u:***@h/db", error("boom"))
    assert type(translated) is typed and "boom" in str(translated)


def test_a_deadlock_is_retried_inside_the_store_not_raised(pg_url):
    """A heartbeat and another transaction lock two runs in opposite orders: whichever PostgreSQL aborts, the
    store's call ends normally (retried if it was the victim)."""
    with PostgresRunStore(pg_url) as store:
        for _ in range(2):
            store.create_run("wf", {})
        a, b = (store.claim_next_run("me").run_id for _ in range(2))
        results, errors = [], []

        def heartbeat_both():
            try:
                results.append(store.heartbeat([a, b], owner="me"))  # locks a, then waits for b
            except Exception as exc:
                errors.append(exc)

        with psycopg.connect(pg_url) as holder, psycopg.connect(pg_url, autocommit=True) as watcher:
            holder.execute("UPDATE runs SET reason = 'x' WHERE run_id = %s", (b,))
            thread = threading.Thread(target=heartbeat_both)
            thread.start()
            assert wait_until(lambda: watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0] >= 1)
            try:
                holder.execute("UPDATE runs SET reason = 'y' WHERE run_id = %s", (a,))
            except psycopg.errors.DeadlockDetected:
                pass
            holder.rollback()
            thread.join()
        assert not errors and results == [2]


def test_a_stopped_server_raises_typed_errors_and_the_same_store_recovers(pg_server, pg_url):
    wakes = []
    with PostgresRunStore(StoreConfig(url=pg_url, busy_timeout_ms=1000)) as store:
        run = store.create_run("wf", {})[0]
        stop_watching = store.watch_queue(lambda: wakes.append(1))
        assert wait_until(lambda: wakes)  # listening
        pg_server.pg_ctl("stop", "-m", "immediate")
        try:
            for call in (lambda: store.get_run(run.run_id), lambda: store.create_run("wf", {}),
                         lambda: store.claim_next_run("me"), lambda: store.list_runs(),
                         lambda: store.count_runs_by_state(), lambda: list(store.purge_batches(0))):
                with pytest.raises(StoreUnavailableError):
                    call()
        finally:
            pg_server.pg_ctl("start")
        seen = len(wakes)
        assert wait_until(lambda: _answers(store), timeout_s=60)
        assert store.get_run(run.run_id).state == "queued"
        assert store.create_run("wf", {})[1]
        assert wait_until(lambda: len(wakes) > seen, timeout_s=60)  # the watcher reconnected and listens again
        stop_watching()


def _answers(store):
    try:
        store.list_runs(limit=1)
        return True
    except StoreUnavailableError:
        return False


CREATE_RUN = """
import sys
from pipeline.postgres_store import PostgresRunStore
with PostgresRunStore(sys.argv[1]) as store:
    print(store.create_run("wf", {}, "from-another-process")[0].run_id)
"""


def test_an_idle_engine_claims_a_run_another_process_queued_when_notified(pg_url, settings):
    with PostgresRunStore(pg_url) as store:
        engine = WorkflowEngine(store, settings)
        engine.register(DAG("wf", [Task("t", noop)]))
        engine.start()
        try:
            assert wait_until(lambda: engine.queue_notices >= 1)  # listening: its first wake-up is the catch-up
            before = engine.queue_notices
            done = subprocess.run([sys.executable, "-c", CREATE_RUN, pg_url], capture_output=True, text=True,
                                  timeout=120, check=True)
            run_id = int(done.stdout)
            assert engine.wait(run_id, timeout=60).state == "success"
            assert engine.queue_notices > before  # woken by the other process's NOTIFY, not by the 5 s poll
        finally:
            engine.shutdown()


@pytest.mark.parametrize("url, shown", [
    ("postgresql://digest:s3cret@db:5432/digest", "postgresql://digest:***@db:5432/digest"),
    ("postgresql://:s3cret@db/digest", "postgresql://:***@db/digest"),  # a password without a user name
    ("postgresql://digest:p@ss@db/digest", "postgresql://digest:***@db/digest"),  # an '@' in the password
    ("postgresql://digest@db/digest", "postgresql://digest@db/digest"),  # nothing to hide
])
def test_the_password_never_reaches_a_message_or_a_log_line(url, shown):
    from pipeline.postgres_store import redact
    from pipeline.service import store_location

    assert redact(url) == shown
    assert store_location(Settings(store=StoreConfig(url=url))) == shown


@pytest.mark.parametrize(("change", "said"), [
    (lambda url: url.rsplit("/", 1)[0] + "/no_such_db", "does not exist"),
    (lambda url: url.replace("://", "://no_such_role@", 1) if "@" not in url else
     "postgresql://no_such_role@" + url.split("@", 1)[1], "no_such_role"),
])
def test_a_wrong_database_or_user_is_a_configuration_error_saying_what_the_server_said(pg_url, change, said):
    """It used to be "pool initialization incomplete after 10.0 sec (the server is unreachable; try again)",
    after 10 s of pool retries, whatever the server had said: retryable, for a mistake no retry mends."""
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=said) as err:
        PostgresRunStore(StoreConfig(url=change(pg_url)))
    assert "\n" not in str(err.value) and "check [store] url" in str(err.value)
    assert not err.value.retryable
    assert time.monotonic() - started < 8  # told at once, not after the pool's 10 s


def test_the_first_write_after_the_servers_backends_ended_succeeds(pg_url):
    """Idle pooled connections whose backends the server ended (a restart, pg_terminate_backend, a failover):
    the first write after that used to fail (a 451 for a sender); a connection idle for a while is checked
    before it is lent."""
    with PostgresRunStore(StoreConfig(url=pg_url, pool_size=4, busy_timeout_ms=3000)) as store, \
            PostgresRunStore(StoreConfig(url=pg_url)) as admin:
        held = threading.Barrier(4)

        def hold_one() -> None:  # four at once: the pool grows to four connections
            with store._pool.connection():
                held.wait(timeout=30)
        assert at_once(hold_one, 4)[1] == []
        store.create_run("wf", {})
        time.sleep(IDLE_CHECK_S + 0.5)  # the pool's connections are idle now
        with admin._pool.connection() as conn:
            ended = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        assert ended >= 4
        # no StoreUnavailableError: with four dead, trying them one by one (backing off 1, 2, 4 s) would pass
        # the 3 s the pool may wait
        assert store.create_run("wf", {})[1]


def test_a_connect_the_pool_could_not_make_is_named_in_the_error_not_only_that_it_timed_out(pg_url):
    """A prober's find: with the store's role refused at login (NOLOGIN; also "too many clients"), every call
    failed "couldn't get a connection after 1.0 sec (the server is unreachable ...)", serve's 451 log line
    said no more, and only psycopg.pool's own warnings named the server's refusal."""
    role = f"r{os.getpid()}"
    host_part = pg_url.split("@", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT ALL ON SCHEMA public TO {role}")
        store = PostgresRunStore(StoreConfig(url=f"postgresql://{role}@{host_part}", busy_timeout_ms=1000))
        try:
            store.create_run("wf", {})
            admin.execute(f"ALTER ROLE {role} NOLOGIN")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            # pg_terminate_backend only signals: a call right after it could still find its connection alive
            assert wait_until(lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                                    (role,)).fetchone()[0] == 0, 10)
            errors = []
            for _ in range(5):  # the first calls may meet their ended connection ("terminating connection")
                with pytest.raises(StoreUnavailableError) as err:
                    store.create_run("wf", {})
                errors.append(str(err.value))
                if "the last connect failed" in errors[-1]:
                    break
            assert 'the last connect failed: ' in errors[-1] and f'role "{role}" is not permitted to log in' in \
                errors[-1], errors
            assert err.value.retryable and "\n" not in errors[-1] and "unreachable" not in errors[-1]
            admin.execute(f"ALTER ROLE {role} LOGIN")
            assert wait_until(lambda: _answers(store), 30)  # the same store goes on once the role may log in
        finally:
            store.close()
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
