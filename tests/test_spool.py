"""The spool on real files: streamed writes, temporary files of killed writers, chunked loads, trace headers."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from pipeline.errors import SpoolError
from pipeline.spool import Spool, return_path_header

RAW = b"Message-ID: <s@example.com>\r\nSubject: spool\r\n\r\n" + b"line of the body\r\n" * 20_000


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".incoming-*.tmp"))


@pytest.fixture
def spool(tmp_path: Path):
    opened = Spool(tmp_path / "spool")
    yield opened
    opened.close()


def test_streamed_writer_makes_the_same_file_as_store(spool, tmp_path):
    writer = spool.open_writer()
    assert writer.temp_path in temp_files(spool.directory)
    for start in range(0, len(RAW), 7_001):  # small and large pieces alike
        writer.write(RAW[start:start + 7_001])
    streamed = writer.finish()
    assert not temp_files(spool.directory)
    other = Spool(tmp_path / "other")
    try:
        stored = other.store(RAW[100:], head=RAW[:100])
    finally:
        other.close()
    assert (streamed.sha256, streamed.size, streamed.message_id) == (stored.sha256, stored.size, "<s@example.com>")
    assert streamed.path.name == stored.path.name and streamed.path.read_bytes() == RAW
    assert spool.load(streamed.path) == streamed


def test_same_bytes_streamed_twice_are_one_file(spool):
    first, second = spool.open_writer(), spool.open_writer()
    for writer in (first, second):
        writer.write(RAW)
    assert first.finish() == second.finish()
    assert [p.name for p in spool.directory.iterdir()] == [f"{hashlib.sha256(RAW).hexdigest()}.eml"]


def test_aborted_writer_leaves_nothing(spool):
    writer = spool.open_writer()
    writer.write(RAW)
    writer.abort()
    writer.abort()  # a second abort does nothing
    assert list(spool.directory.iterdir()) == []
    with pytest.raises(SpoolError):
        writer.finish()


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_writer_disk_error_is_a_spool_error_at_finish_and_leaves_no_temp_file(spool, monkeypatch, failing):
    def broken(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = spool.open_writer()
    # A disk that fails on write or fsync on demand cannot be provoked here; inject the OSError where the OS raises it
    monkeypatch.setattr(Spool, "_write", broken) if failing == "write" else monkeypatch.setattr(os, "fsync", broken)
    try:
        writer.write(RAW)  # never raises: the session reads on and answers after the data
        with pytest.raises(SpoolError) as err:
            writer.finish()
    finally:
        monkeypatch.undo()
    assert err.value.disk_full
    assert list(spool.directory.iterdir()) == []


def test_writer_in_a_vanished_directory_fails_at_finish(tmp_path):
    spool = Spool(tmp_path / "spool")
    try:
        spool.directory.rmdir()
        writer = spool.open_writer()  # does not raise: the SMTP session answers after the data
        writer.write(RAW)
        with pytest.raises(SpoolError, match="No such file or directory") as err:
            writer.finish()
        assert f"cannot spool a {len(RAW)}-byte message" in str(err.value)  # it said 0 bytes (a prober's find)
    finally:
        spool.close()


def test_opening_the_spool_removes_unlocked_temp_files_and_keeps_locked_ones(tmp_path, caplog):
    directory = tmp_path / "spool"
    first = Spool(directory)
    live = first.open_writer()  # a writer of this process, still writing
    live.write(b"Subject: live\r\n\r\n")
    dead = directory / ".incoming-dead.tmp"  # a killed writer's: nobody holds its lock
    dead.write_bytes(b"x" * 1234)
    held = directory / ".incoming-held.tmp"
    fd = os.open(held, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer (its own open file) holds this one
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.spool"):
            second = Spool(directory)
        second.close()
        assert temp_files(directory) == sorted([live.temp_path, held])
        assert "removed 1 temporary file(s) of 1234 bytes" in caplog.text
    finally:
        os.close(fd)
        live.abort()
        first.close()
    third = Spool(directory)  # its lock released, the held file goes too
    third.close()
    assert temp_files(directory) == []


WRITER = """
import sys, time
from pipeline.spool import Spool
writer = Spool(sys.argv[1]).open_writer()
writer.write(b"Subject: killed mid-write\\r\\n\\r\\n" + b"x" * 100_000)
print(writer.temp_path, flush=True)
time.sleep(120)
"""


def test_temp_file_of_a_killed_writer_process_is_kept_while_it_lives_and_removed_after(tmp_path):
    directory = tmp_path / "spool"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        temp = Path(child.stdout.readline().strip())
        assert temp.exists()
        Spool(directory).close()
        assert temp.exists(), "removed a temporary file a live process is writing"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    spool = Spool(directory)
    spool.close()
    assert not temp.exists() and temp_files(directory) == []


def test_load_reads_a_large_file_in_chunks(spool):
    body = os.urandom(1024) * 8 * 1024  # 8 MB
    raw = b"Message-ID: <big@example.com>\r\nReturn-Path: <not-first@example.com>\r\n\r\n" + body
    stored = spool.store(raw, head=return_path_header("owner@example.com"))
    tracemalloc.start()
    try:
        loaded = spool.load(stored.path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loaded == stored and loaded.sha256 == hashlib.sha256(stored.path.read_bytes()).hexdigest()
    assert loaded.return_path == "owner@example.com"  # the first Return-Path: the one the gateway wrote
    assert peak < 3 * 1024 * 1024, peak


@pytest.mark.parametrize("mail_from, header", [
    ("alice@example.com", b"Return-Path: <alice@example.com>\r\n"),
    ("<>", b"Return-Path: <>\r\n"),
    ("", b"Return-Path: <>\r\n"),
    ("a@b.example\r\nBcc: victim@example.com", b"Return-Path: <a@b.exampleBcc: victim@example.com>\r\n"),
])
def test_return_path_header_is_one_line(mail_from, header):
    assert return_path_header(mail_from) == header


def test_a_message_without_return_path_has_none(spool):
    assert spool.store(RAW).return_path is None


def test_free_bytes_is_the_disks_room_and_none_once_it_cannot_be_told(tmp_path):
    """The gateway refuses a SIZE= over the room at MAIL; when the room cannot be told (fstatvfs fails: here the
    directory handle is closed, EBADF), it says None, and MAIL is judged without it rather than failing."""
    spool = Spool(tmp_path / "spool")
    st = os.statvfs(tmp_path)
    assert abs(spool.free_bytes() - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024  # the same disk, give or take
    spool.close()
    assert spool.free_bytes() is None
