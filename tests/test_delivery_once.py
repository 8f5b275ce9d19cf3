"""A digest goes out once per run, even when the run is retried after a crash that came after delivery."""

from __future__ import annotations

import json
import mailbox
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
from helpers import wait_until

from pipeline.audit.base.fakerelay import Relay, running
from pipeline.config import DeliveryConfig
from pipeline.dag import TaskContext
from pipeline.errors import DeliveryError, StoreIOError, TaskIOError
from pipeline.workflows import deliver_task, delivery_key


def _ctx(tmp_path, run_id=7, spool="data/spool/abc.eml"):
    work = tmp_path / f"work-{run_id}"
    work.mkdir(parents=True)
    digest_path = work / "digest.json"
    digest_path.write_text(json.dumps({"subject": "Digest: hi", "text": "body", "html": "<p>body</p>"}))
    upstream = {"build_digest": {"digest_path": str(digest_path)},
                "parse_email": {"from": "alice@example.com", "message_id": "<m1@example.com>"}}
    payload = {"spool": spool, "source": "smtp", "mail_from": "alice@example.com"}
    return TaskContext(run_id, "deliver", payload, upstream, {}, str(work), 1, None, None)


def _copies(outbox: Path) -> int:
    """The digest files in new/ and cur/: Maildir's len() counts one name once, so a copy in each (a digest sent
    again after a mail client moved the first) would count as one (a reviewer's find)."""
    return sum(1 for sub in ("new", "cur") if (outbox / sub).is_dir() for _ in (outbox / sub).iterdir())


def test_a_retry_after_a_crash_past_delivery_adds_no_second_digest_to_the_outbox(tmp_path, settings):
    ctx = _ctx(tmp_path)
    first = deliver_task(ctx, settings)
    (tmp_path / "work-7" / "delivered.json").unlink()  # the crash came before the marker was written
    second = deliver_task(replace(ctx, try_number=2), settings)
    box = mailbox.Maildir(settings.delivery.outbox, create=False)
    assert _copies(settings.delivery.outbox) == 1 and first == second
    assert [m["Message-ID"] for m in box] == [first["message_id"]]


@pytest.mark.parametrize("left", ["", '{"to": "alice@exa'])
def test_a_marker_cut_short_by_a_power_loss_adds_no_second_digest_to_the_outbox(tmp_path, settings, left):
    """An outbox digest's marker is not fsynced (the digest in the outbox is the durable record)."""
    ctx = _ctx(tmp_path)
    first = deliver_task(ctx, settings)
    (tmp_path / "work-7" / "delivered.json").write_text(left)
    second = deliver_task(replace(ctx, try_number=2), settings)
    assert _copies(settings.delivery.outbox) == 1 and first == second


def test_a_digest_read_by_a_mail_client_is_not_sent_again(tmp_path, settings):
    ctx = _ctx(tmp_path)
    first = deliver_task(ctx, settings)
    outbox = settings.delivery.outbox
    moved = outbox / "cur" / (first["where"].rsplit("/", 1)[1] + ":2,S")  # a client marked it seen
    (outbox / "new" / moved.name.split(":")[0]).rename(moved)
    (tmp_path / "work-7" / "delivered.json").unlink()
    deliver_task(ctx, settings)
    assert _copies(outbox) == 1


def test_a_first_try_does_not_search_what_a_mail_client_kept_and_a_later_try_does(tmp_path, settings):
    """cur/ is listed only after a try that may have stored the digest: a name there that would match (here
    planted; a first try cannot have put it there) is not seen by the first try, and is by the next one."""
    ctx, outbox = _ctx(tmp_path), settings.delivery.outbox
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True)
    kept = outbox / "cur" / (delivery_key(ctx) + ":2,S")
    kept.write_bytes(b"Subject: planted\r\n\r\n")
    first = deliver_task(ctx, settings)
    assert first["where"] == str(outbox / "new" / delivery_key(ctx))
    (outbox / "new" / delivery_key(ctx)).unlink()  # as if this try had crashed before storing and marking
    (tmp_path / "work-7" / "delivered.json").unlink()
    second = deliver_task(replace(ctx, try_number=2), settings)
    assert second["where"] == str(kept) and not (outbox / "new" / delivery_key(ctx)).exists()



def test_where_the_sign_cannot_be_written_even_a_first_try_searches_what_a_mail_client_kept(tmp_path, settings):
    """The work dir gone (purged, or on a disk that failed) leaves no place for the ``delivering`` sign: such a
    try cannot tell it is the first, so it looks in cur/ as a retry would, rather than risk a second copy."""
    ctx, outbox = _ctx(tmp_path), settings.delivery.outbox
    digest_path = tmp_path / "digest.json"  # kept apart: only the work dir is gone
    (tmp_path / "work-7" / "digest.json").rename(digest_path)
    (tmp_path / "work-7").rmdir()
    ctx = replace(ctx, upstream={**ctx.upstream, "build_digest": {"digest_path": str(digest_path)}})
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True)
    kept = outbox / "cur" / (delivery_key(ctx) + ":2,S")
    kept.write_bytes(b"Subject: planted\r\n\r\n")
    assert deliver_task(ctx, settings)["where"] == str(kept)
    assert list((outbox / "new").iterdir()) == []

def test_a_relayed_digest_is_not_relayed_again_once_marked(tmp_path, settings, smtp_sink):
    handler, url = smtp_sink
    relayed = replace(settings, delivery=DeliveryConfig(relay=url, outbox=settings.delivery.outbox))
    ctx = _ctx(tmp_path)
    first = deliver_task(ctx, relayed)
    second = deliver_task(replace(ctx, try_number=2), relayed)
    assert first == second
    assert [m["Message-ID"] for m in handler.wait_for(1)] == [first["message_id"]]
    assert len(handler.messages) == 1


def test_a_relayed_digest_is_marked_at_the_relays_250_before_its_quit_is_answered(tmp_path, settings):
    """A prober's find: the marker was written after QUIT, whose reply a relay may hold for 30 s; serve killed
    meanwhile sent the digest again at restart (3 of 3 with a relay holding QUIT 15 s; 17 of 923 under random
    kills). The marker now goes down at the 250 to the final dot."""
    ctx = _ctx(tmp_path)
    marker = Path(ctx.work_dir) / "delivered.json"
    with running(Relay([{}], quit_delay_s=60)) as relay:
        relayed = replace(settings, delivery=DeliveryConfig(relay=relay.url, outbox=settings.delivery.outbox))
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(deliver_task, ctx, relayed)
            assert wait_until(lambda: marker.exists(), timeout_s=30), "no marker while QUIT was pending"
            assert not sending.done() and len(relay.messages) == 1  # the relay still holds its QUIT reply
            relay.stop.set()  # the relay answers QUIT now
            result = sending.result(timeout=30)
    assert json.loads(marker.read_text())["message_id"] == result["message_id"]
    assert deliver_task(replace(ctx, try_number=2), relayed) == result  # a retry sends nothing again


def test_each_run_has_its_own_digest_id_even_when_ids_are_reused(tmp_path):
    keys = {delivery_key(_ctx(tmp_path / "a", 1, "s/x.eml")), delivery_key(_ctx(tmp_path / "b", 2, "s/x.eml")),
            delivery_key(_ctx(tmp_path / "c", 1, "s/y.eml"))}
    assert len(keys) == 3


def test_an_outbox_that_cannot_be_written_is_a_retryable_delivery_error(tmp_path, settings):
    settings.delivery.outbox.parent.mkdir(parents=True, exist_ok=True)
    settings.delivery.outbox.write_text("a file where the Maildir should be")  # the fault: no folder can be made
    with pytest.raises(DeliveryError, match="cannot store the digest") as err:
        deliver_task(_ctx(tmp_path), settings)
    assert err.value.retryable
    assert not (tmp_path / "work-7" / "delivered.json").exists()  # not marked delivered


def test_an_outbox_on_a_full_disk_leaves_no_temp_file_and_a_later_try_delivers(tmp_path, settings):
    """The digest's temp file is /dev/full (a real ENOSPC at the write): the machine's fault, so the run waits for
    room with serve unhealthy (a prober's find: it was a DeliveryError, every digest lost after deliver's
    retries, serve healthy throughout), and nothing is left in tmp/ (each retry on a full disk would add one);
    once there is room, the retry delivers."""
    import os

    from pipeline.errors import MachineShortError

    ctx, outbox = _ctx(tmp_path), settings.delivery.outbox
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True, exist_ok=True)
    (outbox / "tmp" / f"{delivery_key(ctx)}.{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(MachineShortError, match="No space left on device") as err:
        deliver_task(ctx, settings)
    assert err.value.retryable and list((outbox / "tmp").iterdir()) == []
    assert deliver_task(ctx, settings)["where"] == str(outbox / "new" / delivery_key(ctx))
    assert _copies(outbox) == 1


def test_a_marker_left_by_another_run_in_a_reused_work_dir_is_ignored(tmp_path, settings, smtp_sink):
    handler, url = smtp_sink
    relayed = replace(settings, delivery=DeliveryConfig(relay=url, outbox=settings.delivery.outbox))
    ctx = _ctx(tmp_path, spool="data/spool/new.eml")
    # an older version's purge left run 7's work dir, with its delivery marker, and the id was reused
    (tmp_path / "work-7" / "delivered.json").write_text(json.dumps(
        {"to": "old@example.com", "where": url, "message_id": "<digest-7-0123456789abcdef@localhost>"}))
    result = deliver_task(ctx, relayed)
    assert result["message_id"] != "<digest-7-0123456789abcdef@localhost>"
    assert [m["Message-ID"] for m in handler.wait_for(1)] == [result["message_id"]]


def test_a_read_digest_of_another_run_whose_name_starts_alike_does_not_count(tmp_path, settings):
    ctx = _ctx(tmp_path)
    outbox = settings.delivery.outbox
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True, exist_ok=True)
    (outbox / "cur" / (delivery_key(ctx) + "0:2,S")).write_bytes(b"Subject: another run's digest\r\n\r\n")
    deliver_task(ctx, settings)
    assert _copies(outbox) == 2


@pytest.mark.parametrize("removed", [("tmp", "new", "cur"), ("new",), ("cur",)])
def test_an_outbox_whose_folders_were_removed_is_made_again(tmp_path, settings, removed):
    deliver_task(_ctx(tmp_path, run_id=1), settings)
    outbox = settings.delivery.outbox
    for sub in removed:
        for path in (outbox / sub).iterdir():
            path.unlink()
        (outbox / sub).rmdir()
    deliver_task(_ctx(tmp_path, run_id=2), settings)
    assert all((outbox / sub).is_dir() for sub in ("tmp", "new", "cur"))
    assert not list((outbox / "tmp").iterdir())  # nothing half-delivered left behind
    assert _copies(outbox) == (1 if "new" in removed else 2)


def test_a_retry_removes_what_a_try_killed_mid_write_left_in_tmp(tmp_path, settings):
    """A try killed between writing tmp/<key>.<pid> and renaming it into new/ left a whole digest in tmp/,
    which nothing removed (the chaos probe counted up to 9 after 60 worker kills); the retry removes it."""
    ctx, outbox = _ctx(tmp_path), settings.delivery.outbox
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True)
    (tmp_path / "work-7" / "delivering").touch()  # the killed try's sign: this one may follow a stored digest
    left = outbox / "tmp" / f"{delivery_key(ctx)}.99999"
    left.write_bytes(b"Subject: half written\r\n")
    other = outbox / "tmp" / "digest-8-0123456789abcdef.99999"  # another run's: not this try's to remove
    other.write_bytes(b"x")
    second = deliver_task(replace(ctx, try_number=2), settings)
    assert second["where"] == str(outbox / "new" / delivery_key(ctx))
    assert not left.exists() and other.exists()


@pytest.mark.parametrize("damage", [b"", b'{"subject": "Digest: hi", "te', b"\xff\xfe\x00", b"[]"])
def test_a_damaged_saved_digest_is_a_typed_error_no_retry_mends_even_from_a_pool_worker(tmp_path, settings,
                                                                                        damage):
    """digest.json cut short (a power loss: it is not fsynced) used to fail deliver as an untyped
    JSONDecodeError, retried for 13-26 minutes. Deliver runs in a process pool: the verdict must cross it."""
    ctx = _ctx(tmp_path)
    (tmp_path / "work-7" / "digest.json").write_bytes(damage)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        with pytest.raises(TaskIOError, match="saved digest digest.json is damaged") as err:
            pool.submit(deliver_task, ctx, settings).result(timeout=60)
    assert (err.value.reason, err.value.retryable) == ("task_io", False)
    assert not (settings.delivery.outbox / "new").exists() or not list((settings.delivery.outbox / "new").iterdir())


def test_a_refused_digest_gives_its_quota_place_back_and_a_store_failing_then_hides_not_the_refusal(
        tmp_path, settings, store, caplog):
    """The relay's refusal is what the run must report; a store that fails to release the place (a fault
    injected here: a full disk at that moment) leaves it taken, with a warning."""
    with running(Relay([{"rcpt": "550 5.1.1 no such user"}])) as relay:
        relayed = replace(settings, delivery=DeliveryConfig(relay=relay.url, max_digests_per_hour=1))
        with pytest.raises(DeliveryError, match="refused the digest: 550"):
            deliver_task(_ctx(tmp_path, run_id=1), relayed, quota=store)
        assert store.reserve_digest("alice@example.com", "another", 1, 3600)  # the place was given back
        store.release_digest("alice@example.com", "another")
        with mock.patch.object(store, "release_digest", side_effect=StoreIOError("disk full")), \
                pytest.raises(DeliveryError, match="refused the digest: 550"):
            deliver_task(_ctx(tmp_path, run_id=2), relayed, quota=store)
    assert "the unsent digest to alice@example.com still counts against its quota: disk full" in caplog.text
    assert not store.reserve_digest("alice@example.com", "another", 1, 3600)


def _fsynced_during(monkeypatch, call) -> list[str]:
    """The files ``call()`` fsynced, by name (the real fsync runs: this only watches it)."""
    seen, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name),
                                                 real(fd))[1])
    call()
    return seen


def test_an_outbox_digest_on_the_work_dirs_disk_is_the_record_and_on_another_disk_the_marker_is_fsynced_too(
        tmp_path, settings, monkeypatch):
    """The outbox digest is fsynced either way; its marker only when the outbox is on another disk, where the
    journal's order no longer keeps the work dir's sign of it (a reviewer's find)."""
    from test_gateway_faults import tmpfs

    from pipeline.stages import deliver

    ctx = _ctx(tmp_path, run_id=1)
    key = delivery_key(ctx)
    here = _fsynced_during(monkeypatch, lambda: deliver_task(ctx, settings))
    assert deliver.same_disk(tmp_path / "work-1", settings.delivery.outbox.parent) and here == [f"{key}.{os.getpid()}"]
    with tmpfs(tmp_path / "other-disk", "4m") as disk:
        elsewhere = replace(settings, delivery=replace(settings.delivery, outbox=disk / "outbox"))
        ctx = _ctx(tmp_path, run_id=2)
        seen = _fsynced_during(monkeypatch, lambda: deliver_task(ctx, elsewhere))
        assert not deliver.same_disk(tmp_path / "work-2", disk) and "delivered.tmp" in seen
        assert _copies(disk / "outbox") == 1
    assert not deliver.same_disk(tmp_path, tmp_path / "missing")  # cannot be told: take it as another disk
