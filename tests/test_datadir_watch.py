"""Serve says it is unhealthy, and the gateway answers 451 at once, when its data dir cannot serve: a spool that
cannot take a message, a run store file deleted or replaced under it (a prober's finds: healthy throughout)."""

from __future__ import annotations

import shutil
import smtplib
from dataclasses import replace

import pytest
from conftest import free_port
from helpers import fill_disk, wait_until
from test_gateway_faults import tmpfs

from pipeline import datadir_watch
from pipeline.config import GatewayConfig, StoreConfig
from pipeline.service import PipelineService


@pytest.fixture
def quick_watch(monkeypatch):
    monkeypatch.setattr(datadir_watch, "WATCH_EVERY_S", 0.1)


def _send(service) -> int:
    try:
        with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
            smtp.sendmail("alice@example.com", ["digest@pipeline.local"], b"Subject: hi\r\n\r\nhello\r\n")
        return 250
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code


def test_a_spool_that_cannot_take_a_message_makes_serve_unhealthy_until_it_can(service_factory, quick_watch):
    service = service_factory()
    spool = service.spool.directory
    assert _send(service) == 250
    shutil.rmtree(spool)  # as a data dir deleted under serve: the gateway's directory handle leads nowhere
    assert wait_until(lambda: "the spool cannot take a message" in (service.health_problem or ""), 10)
    assert _send(service) == 451
    assert service.datadir.problem.endswith("No such file or directory")


def test_a_run_store_file_deleted_under_serve_makes_it_unhealthy(service_factory, quick_watch):
    service = service_factory()
    store_file = service.settings.store.path
    assert _send(service) == 250
    moved = store_file.with_name("moved.sqlite3")
    store_file.rename(moved)  # serve's connection still writes to the file, which the next start never sees
    assert wait_until(lambda: "is gone (deleted under serve?)" in (service.health_problem or ""), 10)
    assert _send(service) == 451
    moved.rename(store_file)
    assert wait_until(lambda: service.health_problem is None, 10)
    assert _send(service) == 250


def test_a_look_that_breaks_is_reported_and_the_watch_goes_on(tmp_path, quick_watch):
    class Broken:
        calls = 0
        directory = tmp_path

        def probe(self) -> None:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a bug in the probe")

    watch = datadir_watch.DataDirWatch(Broken(), None).start()
    try:
        assert wait_until(lambda: watch.spool.calls >= 3, 10)  # the loop survived its first look's exception
        assert wait_until(lambda: watch.problem is None, 10)
    finally:
        watch.stop()


def test_a_spool_directory_replaced_under_serve_makes_it_unhealthy(service_factory, quick_watch):
    """A re-probe's find: `mv spool spool.old; mkdir spool` left serve healthy, and each accept's fsync went to the
    old directory (its open handle), so no mail acked since had a durable name."""
    service = service_factory()
    spool = service.spool.directory
    spool.rename(spool.with_name("spool.old"))
    spool.mkdir()
    assert wait_until(lambda: "spool directory was replaced" in (service.health_problem or ""), 10)
    assert _send(service) == 451


def test_a_store_wal_deleted_under_serve_makes_it_unhealthy(service_factory, quick_watch):
    """A re-probe's find: with runs.sqlite3-wal deleted, serve took mail every other reader could not see, and
    the next start re-made runs from the spool."""
    service = service_factory()
    assert _send(service) == 250
    wal = service.settings.store.path.with_name(service.settings.store.path.name + "-wal")
    assert wal.exists()
    wal.unlink()
    assert wait_until(lambda: "-wal is gone" in (service.health_problem or ""), 10)
    assert _send(service) == 451


@pytest.mark.parametrize("where", ["spool", "store"])
def test_a_full_disk_under_the_spool_or_the_run_store_makes_serve_unhealthy_until_there_is_room(
        settings, tmp_path, quick_watch, where):
    """An operations prober's find: with the spool's disk full every mail got 452 after it was read whole, and with
    the run store's disk full 451, while pipeline_healthy said 1 (an empty file still fits on a full disk)."""
    disk = settings.data_dir / "spool" if where == "spool" else tmp_path / "store"
    with tmpfs(disk, "4m"):
        store = StoreConfig(path=disk / "runs.sqlite3") if where == "store" else settings.store
        service = PipelineService(replace(settings, store=store, gateway=GatewayConfig(port=free_port(),
                                                                                        drop_folder=False)))
        try:
            service.start()
            assert _send(service) == 250
            filler = fill_disk(disk / "filler")
            # the watch's own verdict: the engine may also report its heartbeat failing on the full store first
            assert wait_until(lambda: f"the disk under the {'spool' if where == 'spool' else 'run store'}" in
                              (service.datadir.problem or ""), 10), service.health_problem
            assert "is full" in service.datadir.problem and _send(service) == 451
            with smtplib.SMTP("127.0.0.1", service.settings.gateway.port, timeout=30) as smtp:
                assert smtp.mail("alice@example.com")[0] == 451  # at MAIL: before the data is sent
            filler.unlink()
            assert wait_until(lambda: service.health_problem is None, 30), service.health_problem
            assert _send(service) == 250
        finally:
            service.stop(grace_s=5)  # releases the spool's and the store's files before the unmount
