"""SQLite queue wake-ups (``pipeline.wakeup``): a run queued through one store object wakes the watchers of
every other store object on the same file, once it is committed; a dead watcher's registration is dropped."""

from __future__ import annotations

import errno
import socket
import threading

import pytest

from pipeline import wakeup
from pipeline.sqlite_store import SqliteRunStore

pytestmark = pytest.mark.skipif(not wakeup.SUPPORTED, reason="abstract Unix sockets are Linux's")


def test_a_run_queued_by_another_store_object_wakes_the_watcher_after_its_commit(tmp_path):
    path = tmp_path / "runs.sqlite3"
    with SqliteRunStore(path) as engine_side, SqliteRunStore(path) as gateway_side:
        assert engine_side.queue_notifications
        seen: list[int] = []
        woken = threading.Event()

        def wake() -> None:  # what the woken engine does: look in the store
            seen.append(engine_side.count_runs_by_state().get("queued", 0))
            woken.set()
        stop = engine_side.watch_queue(wake)
        try:
            gateway_side.create_run("email_digest", {"spool": "a.eml"}, "<a@x>")
            assert woken.wait(30)
            assert seen[0] == 1  # woken after the commit: the run is there to claim
            woken.clear()
            gateway_side.create_run("email_digest", {"spool": "a.eml"}, "<a@x>")  # a duplicate queues nothing
            assert not woken.wait(0.5)
        finally:
            stop()
        assert list((tmp_path / "runs.sqlite3-wake").iterdir()) == []  # stopping deregisters


def test_a_registration_nobody_listens_on_is_removed_at_the_next_ring(tmp_path):
    path = tmp_path / "runs.sqlite3"
    with SqliteRunStore(path) as store:
        registry = tmp_path / "runs.sqlite3-wake"
        registry.mkdir()
        (registry / "4242-deadbeef0000").touch()  # a watcher whose process was killed
        store.create_run("email_digest", {"spool": "a.eml"}, "<b@x>")
        assert list(registry.iterdir()) == []


def test_closing_the_store_stops_its_watchers(tmp_path):
    store = SqliteRunStore(tmp_path / "runs.sqlite3")
    store.watch_queue(lambda: None)
    assert len(list((tmp_path / "runs.sqlite3-wake").iterdir())) == 1
    store.close()
    assert list((tmp_path / "runs.sqlite3-wake").iterdir()) == []


def test_a_ring_whose_socket_cannot_be_made_does_not_fail_the_committed_write(tmp_path, monkeypatch):
    """The OS refusing the bell's socket (out of descriptors or buffers): the run is queued, and create_run
    says so rather than raising an error for a write that committed (its watchers poll instead)."""
    with SqliteRunStore(tmp_path / "runs.sqlite3") as store:
        registry = tmp_path / "runs.sqlite3-wake"
        registry.mkdir()
        (registry / "4242-cafe").touch()  # a watcher to ring

        def refused(*args, **kwargs):
            raise OSError(errno.EMFILE, "Too many open files")
        monkeypatch.setattr(wakeup.socket, "socket", refused)  # the fault, injected at the OS call
        run, created = store.create_run("email_digest", {"spool": "a.eml"}, "<c@x>")
        monkeypatch.undo()
        assert created and store.count_runs_by_state() == {"queued": 1}


class _FailsOnce(socket.socket):
    """A real datagram socket whose first receive fails as the OS can (EIO)."""

    failed = False

    def recv(self, *args):
        if not _FailsOnce.failed:
            _FailsOnce.failed = True
            raise OSError(errno.EIO, "Input/output error")
        return super().recv(*args)


def test_a_watcher_whose_socket_fails_backs_off_and_goes_on(tmp_path, caplog):
    """A prober's find: one OSError from the socket ended the wake-ups for good (runs then waited up to the 5 s
    poll, and serve said nothing more). Now the watcher wakes its engine (a ring may have been lost), backs off
    and keeps listening."""
    class Flaky(wakeup._Watcher):
        socket_type = _FailsOnce

    _FailsOnce.failed = False  # (a rerun of this test in the same process fails once again)

    woken = threading.Semaphore(0)
    watcher = Flaky(tmp_path / "wake", woken.release)
    try:
        assert woken.acquire(timeout=30)  # the wake-up after the failure
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ring:
            ring.sendto(b"x", wakeup._PREFIX + watcher.name)
        assert woken.acquire(timeout=30)  # and a real ring after it: still listening
    finally:
        watcher.stop()
    assert _FailsOnce.failed and any("queue wake-ups failed (1 in a row)" in r.getMessage() for r in caplog.records)


def test_a_wake_up_folder_that_cannot_be_made_leaves_the_engine_polling_every_second(tmp_path, settings):
    """A probe's find: with runs.sqlite3-wake a file, the watch failed ("polling only") and the engine polled at
    the notifying store's interval (5 s), so a run another process queued waited 1.3-4.4 s to start."""
    from dataclasses import replace

    from pipeline.dag import DAG, Task
    from pipeline.engine import WorkflowEngine

    path = tmp_path / "runs.sqlite3"
    (tmp_path / "runs.sqlite3-wake").write_text("a file where the folder goes")
    config = replace(settings, engine=replace(settings.engine, queue_poll_s=30.0))
    with SqliteRunStore(path) as store, SqliteRunStore(path) as other:
        engine = WorkflowEngine(store, config)
        engine.register(DAG("w", [Task("t", lambda ctx: 1)]))
        engine.start()
        try:
            assert engine._unwatch is wakeup.not_watching
            run = other.create_run("w", {})[0]  # queued by another process: no ring reaches this engine
            assert engine.wait(run.run_id, timeout=20).state == "success"  # found by the 1 s poll, not 30 s
        finally:
            engine.shutdown(grace_s=5)
