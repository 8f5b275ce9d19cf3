"""What people and programs really put in the drop folder: a file copied straight into new/ while it is still
being written, links, FIFOs, reused and overlong names. Real files, a real watcher (inotify and polling)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_until

from pipeline.config import GatewayConfig
from pipeline.dropfolder import DropFolder

MESSAGE = b"From: alice@example.com\r\nSubject: dropped\r\n\r\n" + b"line of text\r\n" * 200


class Keep:
    """An accept that keeps every message's bytes."""

    def __init__(self) -> None:
        self.accepted: list[bytes] = []

    def __call__(self, raw: bytes) -> None:
        self.accepted.append(raw)


@pytest.fixture(params=["inotify", "poll"])
def folder(request, tmp_path):
    keep = Keep()
    drop = DropFolder(tmp_path / "inbox", keep, GatewayConfig(watch_mode=request.param, poll_interval_s=0.05,
                                                              max_message_bytes=100_000), retry_interval_s=0.1)
    drop.start()
    yield drop, keep
    drop.stop()


def test_a_file_written_straight_into_new_is_taken_whole_once_its_writer_closes_it(folder):
    drop, keep = folder
    target = drop.directory / "new" / "copied.eml"
    with open(target, "wb") as out:  # as `cp` or a script does: created in new/, then written bit by bit
        for i in range(0, len(MESSAGE), 500):
            out.write(MESSAGE[i:i + 500])
            out.flush()
            time.sleep(0.05)
    assert wait_until(lambda: keep.accepted, 10)
    time.sleep(0.3)  # a later event or retry must not take it a second time
    assert keep.accepted == [MESSAGE]
    assert [p.name for p in (drop.directory / "cur").iterdir()] == ["copied.eml:2,S"]


def test_links_and_fifos_are_moved_to_rejected_unread_and_other_files_go_on(folder, tmp_path):
    drop, keep = folder
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not yours")
    new = drop.directory / "new"
    os.symlink(secret, new / "link")
    os.mkfifo(new / "fifo")  # opening it for reading would wait for a writer for ever
    (new / "good.eml").write_bytes(MESSAGE)
    assert wait_until(lambda: sorted(p.name for p in (drop.directory / "rejected").iterdir()) == ["fifo", "link"], 10)
    assert wait_until(lambda: keep.accepted == [MESSAGE], 10)
    assert b"not yours" not in b"".join(keep.accepted)


def test_reused_and_overlong_names_never_overwrite_and_are_taken_once(folder):
    drop, keep = folder
    new, long_name = drop.directory / "new", "n" * 250  # 250 bytes: cur/'s ":2,S" would pass the 255-byte limit
    for body in (MESSAGE, MESSAGE + b"second\r\n"):
        (drop.directory / "tmp" / "reused").write_bytes(body)
        os.rename(drop.directory / "tmp" / "reused", new / "reused")
        assert wait_until(lambda: not (new / "reused").exists(), 10)
    (drop.directory / "tmp" / long_name).write_bytes(MESSAGE + b"third\r\n")
    os.rename(drop.directory / "tmp" / long_name, new / long_name)
    assert wait_until(lambda: len(keep.accepted) == 3 and not list(new.iterdir()), 10)
    time.sleep(0.3)  # no retry takes the long one again
    assert len(keep.accepted) == 3
    kept = sorted(p.read_bytes() for p in (drop.directory / "cur").iterdir())
    assert kept == sorted([MESSAGE, MESSAGE + b"second\r\n", MESSAGE + b"third\r\n"])


def test_an_oversized_file_dropped_twice_under_one_name_keeps_both_in_rejected(folder):
    drop, keep = folder
    for fill in (b"a", b"b"):
        (drop.directory / "tmp" / "big").write_bytes(fill * 200_000)
        os.rename(drop.directory / "tmp" / "big", drop.directory / "new" / "big")
        assert wait_until(lambda: not (drop.directory / "new" / "big").exists(), 10)
    assert sorted(p.read_bytes()[:1] for p in (drop.directory / "rejected").iterdir()) == [b"a", b"b"]
    assert keep.accepted == []


def test_a_name_with_a_newline_is_logged_quoted(folder, caplog):
    drop, _ = folder
    os.mkfifo(drop.directory / "new" / "x\n2026-01-01 ERROR forged")
    assert wait_until(lambda: "forged" in caplog.text, 10)
    assert "\n2026-01-01 ERROR forged" not in caplog.text and "\\n2026-01-01 ERROR forged" in caplog.text


def test_a_writer_opening_a_leased_file_breaks_the_lease_without_killing_us(tmp_path):
    from pipeline.dropfolder import _read_lease, _still_leased

    path = tmp_path / "m.eml"
    path.write_bytes(MESSAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        with _read_lease(fd) as lease:
            assert lease is True and _still_leased(fd)
            writer = subprocess.Popen([sys.executable, "-c", f"open({str(path)!r}, 'ab').close()"])
            assert wait_until(lambda: not _still_leased(fd), 10)  # the kernel told us with SIGURG (ignored)
        assert writer.wait(timeout=30) == 0  # let go once the lease was released
    finally:
        os.close(fd)


def test_an_accepted_file_whose_move_fails_is_moved_later_never_accepted_twice(tmp_path, caplog):
    keep = Keep()
    drop = DropFolder(tmp_path / "inbox", keep, GatewayConfig(watch_mode="poll", poll_interval_s=0.05),
                      retry_interval_s=0.1)
    cur = drop.directory / "cur"
    cur.rmdir()
    cur.write_bytes(b"")  # a file where cur/ goes: the move after the accept fails (ENOTDIR)
    (drop.directory / "new" / "m.eml").write_bytes(MESSAGE)
    drop.start()
    try:
        assert wait_until(lambda: "cannot be moved to cur/" in caplog.text, 10)
        time.sleep(0.5)  # several retry rounds while the move still fails
        assert keep.accepted == [MESSAGE] and (drop.directory / "new" / "m.eml").exists()
        cur.unlink()
        cur.mkdir()  # the disk is right again
        assert wait_until(lambda: [p.name for p in cur.iterdir()] == ["m.eml:2,S"], 10)
    finally:
        drop.stop()
    assert keep.accepted == [MESSAGE]


def test_a_folder_removed_and_made_again_is_watched_again(tmp_path, caplog):
    """A prober's find: after `rm -r inbox; mkdir -p inbox/{tmp,new,cur}` nothing dropped was ever taken, and
    nothing said so. The next pass sees the watch gone and watches the folder anew: a file is then taken on
    its event (the rescan, every 60 s here, is not what takes it)."""
    import shutil

    keep = Keep()
    drop = DropFolder(tmp_path / "inbox", keep, GatewayConfig(watch_mode="inotify"), retry_interval_s=60).start()
    try:
        assert drop.first_pass.wait(10)  # the rescan's first pass, at start, must not remake folders under rmtree
        first = drop._observer
        shutil.rmtree(drop.directory)
        for sub in ("tmp", "new", "cur"):
            (drop.directory / sub).mkdir(parents=True)
        assert wait_until(lambda: not all(e.is_alive() for e in first.emitters), 10)  # its watch went with it
        drop._watch_again_if_replaced()  # what the retry loop does each pass
        assert drop._observer is not first and "was removed or replaced" in caplog.text
        assert (drop.directory / "rejected").is_dir()
        (drop.directory / "tmp" / "after.eml").write_bytes(MESSAGE)
        os.replace(drop.directory / "tmp" / "after.eml", drop.directory / "new" / "after.eml")
        assert wait_until(lambda: keep.accepted == [MESSAGE], 10)
    finally:
        drop.stop()


@pytest.mark.parametrize("where", ["", "cur"], ids=["the-folder", "its-cur"])
def test_a_file_where_the_folder_goes_is_logged_once_not_at_every_pass_and_its_mending_too(tmp_path, caplog, where):
    """A prober's find: while a file stood where the drop folder goes, each pass (every 5 s) logged three
    warnings, for as long as it stood there. Now one line says why nothing is taken, and one that it is usable
    again once mended; judged per pass (a reviewer's file where ``cur/`` goes was "usable again" at each pass,
    as new/ could still be listed)."""
    import shutil

    keep = Keep()
    drop = DropFolder(tmp_path / "inbox", keep, GatewayConfig(watch_mode="inotify"), retry_interval_s=60).start()
    try:
        assert drop.first_pass.wait(10)
        broken = drop.directory / where
        shutil.rmtree(broken)
        broken.write_bytes(b"not a folder")
        caplog.clear()
        for _ in range(3):  # what the retry loop does every 5 s
            drop.one_pass()
        lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.dropfolder"]
        assert len(lines) == 2 and "nothing dropped there is taken until it is mended" in lines[1], lines
        assert drop.unusable and ("Not a directory" in drop.unusable or "File exists" in drop.unusable)
        broken.unlink()
        drop.one_pass()
        assert drop.unusable is None and "is usable again" in caplog.text
        (drop.directory / "tmp" / "after.eml").write_bytes(MESSAGE)
        os.replace(drop.directory / "tmp" / "after.eml", drop.directory / "new" / "after.eml")
        assert wait_until(lambda: keep.accepted == [MESSAGE], 10)
    finally:
        drop.stop()


def test_files_whose_events_inotify_dropped_are_taken_by_the_rescan(tmp_path, caplog):
    """inotify drops events once its queue is full (a prober's 20,000 files left 11,342 in new/ for good).
    Here the queue is made 16 events long for this watcher (the limit applies to inotify instances made while
    it is set): 300 files overflow it, and every one is still taken, once."""
    limit = Path("/proc/sys/fs/inotify/max_queued_events")
    try:
        before = limit.read_text()
        limit.write_text("16")
    except OSError as exc:
        pytest.skip(f"cannot set the inotify queue length here: {exc}")
    keep = Keep()
    drop = DropFolder(tmp_path / "inbox", keep, GatewayConfig(watch_mode="inotify"), retry_interval_s=0.5)
    try:
        drop.start()
    finally:
        limit.write_text(before)
    try:
        messages = [MESSAGE + b"%d\r\n" % i for i in range(300)]
        for i, raw in enumerate(messages):
            (drop.directory / "tmp" / f"{i}.eml").write_bytes(raw)
            os.replace(drop.directory / "tmp" / f"{i}.eml", drop.directory / "new" / f"{i}.eml")
        assert wait_until(lambda: len(keep.accepted) == 300, 60), len(keep.accepted)
        assert sorted(keep.accepted) == sorted(messages)
        assert "overflow" in caplog.text.lower()  # events were lost, so the rescan took some of them
    finally:
        drop.stop()


def test_a_backlog_waiting_at_start_does_not_hold_start_up_and_is_all_taken(tmp_path):
    """A prober's find: the files waiting in new/ were taken inside start(), before serve was up; 25,000 of
    them took longer than serve's 60 s start-up limit, and serve failed to start twice. The rescan thread
    takes them now, beginning at once."""
    accepted: list[bytes] = []

    def slow(raw: bytes) -> None:
        time.sleep(0.02)
        accepted.append(raw)

    drop = DropFolder(tmp_path / "inbox", slow, GatewayConfig(watch_mode="inotify"), retry_interval_s=60)
    messages = [MESSAGE + b"%d\r\n" % i for i in range(200)]
    for i, raw in enumerate(messages):
        (drop.directory / "new" / f"{i}.eml").write_bytes(raw)
    os.utime(drop.directory / "new", None)
    drop.start()
    try:
        assert len(accepted) < len(messages)  # start() returned before the backlog was taken (4 s of accepts)
        assert wait_until(lambda: len(accepted) == len(messages), 60), len(accepted)
        assert sorted(accepted) == sorted(messages)
    finally:
        drop.stop()


@pytest.mark.parametrize("how", ["renamed over it", "rewritten in place"])
def test_a_file_replaced_under_its_name_while_accepted_is_taken_on_its_own(tmp_path, how):
    """A prober's find: the move to cur/ went by name, so a writer reusing one name (tmp/x -> new/same.eml)
    had its next mail moved to cur/, marked seen, unaccepted (414 of 487); a reviewer's: ``cp`` over the name
    keeps the inode. The file read is the file moved."""
    new = tmp_path / "inbox" / "new"
    second = MESSAGE + b"second\r\n"
    accepted: list[bytes] = []

    def replace_while_accepting(raw: bytes) -> None:
        accepted.append(raw)
        if len(accepted) == 1 and how == "renamed over it":  # the writer's next mail under the same name
            (tmp_path / "inbox" / "tmp" / "next").write_bytes(second)
            os.replace(tmp_path / "inbox" / "tmp" / "next", new / "same.eml")
        elif len(accepted) == 1:
            (new / "same.eml").write_bytes(second)  # O_TRUNC: the same inode, new bytes
            os.utime(new / "same.eml", (0, 0))  # settled at once, as a quick writer's file is a second later

    drop = DropFolder(tmp_path / "inbox", replace_while_accepting, GatewayConfig(watch_mode="poll",
                                                                                poll_interval_s=0.05),
                      retry_interval_s=0.1)
    (new / "same.eml").write_bytes(MESSAGE)
    os.utime(new / "same.eml", (0, 0))  # settled
    drop.start()
    try:
        assert wait_until(lambda: len(accepted) == 2, 20), accepted
        assert wait_until(lambda: not (new / "same.eml").exists(), 10)
    finally:
        drop.stop()
    assert accepted == [MESSAGE, second]  # the first file itself is gone: the writer's rename replaced it
    assert [p.read_bytes() for p in (tmp_path / "inbox" / "cur").iterdir()] == [second]


def test_a_name_used_a_hundred_times_still_gets_a_free_name_and_the_rescan_outlives_a_failed_watch(tmp_path):
    """Prober's finds: after 10,000 files of one name in cur/ (a scanner's scan.eml) the next could not be moved
    and was retried for ever, and a rescan pass whose watch-again step failed (EMFILE: the inotify limit)
    skipped its scan too, so nothing was taken."""
    keep = Keep()
    drop = DropFolder(tmp_path / "inbox", keep, GatewayConfig(watch_mode="inotify"), retry_interval_s=0.1)
    cur = drop.directory / "cur"
    for n in range(100):
        (cur / (f"scan.eml.{n}:2,S" if n else "scan.eml:2,S")).write_bytes(b"old")

    def no_more_watches() -> None:
        raise OSError(24, "inotify instance limit reached")

    drop._watch_again_if_replaced = no_more_watches  # type: ignore[method-assign]
    drop.start()
    drop._observer.stop()  # no events either: only the rescan can take the file
    drop._observer.join()
    try:
        (drop.directory / "new" / "scan.eml").write_bytes(MESSAGE)
        os.utime(drop.directory / "new" / "scan.eml", (0, 0))
        assert wait_until(lambda: keep.accepted == [MESSAGE], 10)
        assert wait_until(lambda: not (drop.directory / "new" / "scan.eml").exists(), 10)
    finally:
        drop._observer = None
        drop.stop()
    assert len(list(cur.iterdir())) == 101 and keep.accepted == [MESSAGE]


def test_a_second_fault_of_the_same_type_is_logged_not_hidden_by_the_first(tmp_path, caplog):
    """A prober's find: failures were counted by exception type alone, so a file failing EIO for good hid a
    full disk (ENOSPC) refusing every other file: one OSError line per 10 s, naming the first file only."""
    import errno

    def failing(raw: bytes) -> None:
        code = errno.EIO if raw.startswith(b"poison") else errno.ENOSPC
        raise OSError(code, os.strerror(code))

    drop = DropFolder(tmp_path / "inbox", failing, GatewayConfig(watch_mode="inotify"), retry_interval_s=0.1)
    for name, raw in (("a-poison.eml", b"poison" + MESSAGE), ("b.eml", MESSAGE), ("c.eml", MESSAGE + b"c")):
        (drop.directory / "new" / name).write_bytes(raw)
        os.utime(drop.directory / "new" / name, (0, 0))
    drop.start()
    try:
        assert wait_until(lambda: "No space left on device" in caplog.text and "Input/output error" in caplog.text, 10)
    finally:
        drop.stop()


def test_a_data_dir_moved_away_is_not_made_again_at_its_old_path(tmp_path):
    """A probe's find: with the data dir moved away, the drop folder's next pass made ``data/inbox/...`` again,
    parents and all, and the operator's ``mv data.away data`` then landed inside that new ``data``. The folder is
    made again only where its parent still is, and the pass says why it cannot."""
    data = tmp_path / "data"
    drop = DropFolder(data / "inbox", Keep(), GatewayConfig(watch_mode="poll", poll_interval_s=0.05),
                      retry_interval_s=60).start()
    try:
        assert drop.first_pass.wait(10)
        os.rename(data, tmp_path / "data.away")
        drop._problems = []
        drop._watch_again_if_replaced()  # what the retry loop does each pass
        assert not data.exists() and any("cannot make its folders again" in p for p in drop._problems)
        os.rename(tmp_path / "data.away", data)  # the operator's move back lands where it was
        drop._watch_again_if_replaced()
        assert sorted(p.name for p in (data / "inbox").iterdir()) == ["cur", "new", "rejected", "tmp"]
    finally:
        drop.stop()


def test_a_file_dated_in_the_future_counts_as_written_by_its_change_time(tmp_path):
    """A probe's find: with no lease to be had (serve not root, the file another user's), a file whose mtime was a
    day ahead (``cp -p`` from a host whose clock runs ahead) was never taken, and nothing said so."""
    from pipeline.dropfolder import SETTLE_S, _settled

    path = tmp_path / "future.eml"
    path.write_bytes(MESSAGE)
    os.utime(path, (time.time() + 86400, time.time() + 86400))
    assert not _settled(os.stat(path))  # just changed: its change time is now
    time.sleep(SETTLE_S + 0.2)
    assert _settled(os.stat(path))
    os.utime(path, (time.time(), time.time()))
    assert not _settled(os.stat(path))  # a file written just now is not settled, whatever its dates
