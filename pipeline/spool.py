"""Spool: raw accepted messages on disk, durable before anyone is told "accepted".

Each message is written to a temporary file, fsynced, renamed to
``<sha256>.eml`` and the directory fsynced, so after a crash a spool file is
either whole or absent. Names are content hashes: the same bytes twice are
one file. Only the header block is read here (to find the Message-ID and the
Return-Path trace header); parsing the body is the workflow's job, off the
SMTP event loop.

Two ways in: ``store(raw)`` for a message already in memory (drop folder, CLI,
the SMTP baseline) and ``open_writer()`` for one written as it arrives (SMTP
DATA streamed piece by piece, hashed as it goes), so the gateway never holds
a whole message.

A write that fails (full disk, read-only or vanished directory, I/O error)
raises ``SpoolError`` (``disk_full`` for ENOSPC/EDQUOT) and leaves no
``.incoming-*.tmp`` behind, so the gateway can answer 452/451 and the
sender keeps the message. A process killed mid-write does leave one: each
writer holds an ``flock`` on its temporary file, and opening the spool
removes every temporary file whose lock is free (its writer is gone), never
one a live process is still writing.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from .errors import SpoolError
from .stages.mime_repair import needs_header_repair, repair_header_block

log = logging.getLogger(__name__)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MAX_HEADER_BYTES = 256 * 1024
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_TEMP_PREFIX, _TEMP_SUFFIX = ".incoming-", ".tmp"
_WRITE_BUFFER = 64 * 1024  # small pieces are gathered to this size before a write() (fewer system calls)
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class SpooledMessage:
    """A message safely on disk.

    ``return_path`` is the first ``Return-Path`` trace header, the envelope sender the gateway wrote there:
    None without one, "" for the null sender ``<>``.
    """

    path: Path
    sha256: str
    size: int
    message_id: str | None
    return_path: str | None = None

    @property
    def dedup_key(self) -> str:
        """The Message-ID if the message has a usable one, else its content hash."""
        return self.message_id or f"sha256:{self.sha256}"


class Spool:
    """A directory of durable raw messages."""

    def __init__(self, directory: Path) -> None:
        """Open (and make) the directory, then remove the temporary files of writers that died."""
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._dir_fd = os.open(self.directory, os.O_RDONLY)  # kept open: one fewer open() per message
        except OSError as exc:
            raise spool_error(f"cannot open spool directory {self.directory}", exc) from exc
        self.remove_stale_temp_files()

    def close(self) -> None:
        """Release the directory handle (a second call does nothing)."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def store(self, raw: bytes, *, head: bytes = b"") -> SpooledMessage:
        """Write ``head + raw`` durably (fsync file and directory) and return where it is.

        ``head`` (a trace header) is written before ``raw`` without copying ``raw``. Raises ``SpoolError``
        (``disk_full`` set on ENOSPC/EDQUOT); no temporary file is left behind.
        """
        digest = hashlib.sha256(head)
        digest.update(raw)
        path = self.directory / f"{digest.hexdigest()}.eml"
        size = len(head) + len(raw)
        try:
            if not _reuse(path):
                fd, tmp = self._new_temp()
                self._finish_temp(fd, tmp, path, [head, raw])
        except OSError as exc:
            raise spool_error(f"cannot spool a {size}-byte message in {self.directory}", exc) from exc
        return describe(path, digest.hexdigest(), size, head + raw[:_MAX_HEADER_BYTES])

    def open_writer(self) -> SpoolWriter:
        """Start a message that arrives in pieces; never raises (a failure to start is raised by ``finish``)."""
        return SpoolWriter(self)

    def load(self, path: Path) -> SpooledMessage:
        """Describe an existing spool file (used when reconciling the spool with the run store).

        Reads the file in chunks: only the header block is kept in memory.
        """
        digest, size, head = hashlib.sha256(), 0, b""
        with Path(path).open("rb") as fh:
            while chunk := fh.read(_READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if len(head) < _MAX_HEADER_BYTES:
                    head += chunk[: _MAX_HEADER_BYTES - len(head)]
        return describe(Path(path), digest.hexdigest(), size, head)

    def files(self) -> list[Path]:
        """Spooled messages, oldest first."""
        return sorted(self.directory.glob("*.eml"), key=lambda p: p.stat().st_mtime)

    def remove_stale_temp_files(self) -> tuple[int, int]:
        """Remove ``.incoming-*.tmp`` files no live writer holds (a killed accept); return (files, bytes)."""
        removed = freed = 0
        for path in self.directory.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            size = remove_if_unlocked(path)
            if size is not None:
                removed, freed = removed + 1, freed + size
        if removed:
            log.warning("spool: removed %d temporary file(s) of %d bytes left by an interrupted accept",
                        removed, freed)
        return removed, freed

    # -- the write path shared by store() and SpoolWriter ------------------------

    def _new_temp(self) -> tuple[int, Path]:
        """Create a temporary file in the spool and lock it; return (fd, path).

        A cleaner (another process opening the spool) may delete the file between its creation and our
        lock; then the name no longer leads to our file, and we start again with a new one.
        """
        while True:
            fd, name = tempfile.mkstemp(dir=self.directory, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: only a cleaner could hold it
                if os.stat(name).st_ino == os.fstat(fd).st_ino:
                    return fd, Path(name)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EWOULDBLOCK):
                    os.close(fd)
                    Path(name).unlink(missing_ok=True)
                    raise
            os.close(fd)  # lost it to a cleaner: try a new name

    def free_bytes(self) -> int | None:
        """Bytes free for us on the spool's disk now; None when it cannot be told (the directory closed)."""
        try:
            st = os.fstatvfs(self._dir_fd)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def probe(self) -> None:
        """Create and remove a temporary file, as an accept does first: OSError when the spool cannot take a
        message now (its directory deleted or made read-only, no inode left), or when the directory at its path
        is no longer the one it opened (moved away and made anew: each accept's fsync went to the old one, so
        no mail acked since was durable; a re-probe's find)."""
        fd, tmp = self._new_temp()
        os.close(fd)
        tmp.unlink(missing_ok=True)
        opened, there = os.fstat(self._dir_fd), os.stat(self.directory)
        if (opened.st_dev, opened.st_ino) != (there.st_dev, there.st_ino):
            raise OSError(errno.ESTALE, "the spool directory was replaced under serve: restart serve")

    def _finish_temp(self, fd: int, tmp: Path, path: Path, pieces: list[bytes]) -> None:
        """Write the last ``pieces``, fsync, rename to ``path``, fsync the directory; the temp goes on failure.

        The fd (and its lock) is closed only after the rename, so no cleaner can take the file before.
        """
        try:
            for piece in pieces:
                self._write(fd, piece)
            os.fsync(fd)  # an fsync can be where a full disk (or a failing one) is first reported
            if _reuse(path):  # the same bytes arrived before: keep that file
                tmp.unlink()
            else:
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        # Make the rename itself durable. If this fsync fails the file is whole but its name may not survive
        # a crash; the sender got 4xx and retries, and the retry finds the same content-named file.
        os.fsync(self._dir_fd)

    def _write(self, fd: int, raw: bytes) -> None:
        """Write all of ``raw`` to ``fd`` (the one place a full disk shows up; tests inject faults here)."""
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]


class SpoolWriter:
    """One message written to the spool as it arrives; ``finish`` makes it durable, ``abort`` removes it.

    ``write`` never raises: a disk error is kept and raised by ``finish`` as ``SpoolError``, so an SMTP
    session can read the rest of the data and answer once, after it. Used from one thread at a time
    (the event loop while data arrives, then one accept thread).
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.size = 0
        self._digest = hashlib.sha256()
        self._buffer = bytearray()
        self._error: OSError | None = None
        self._fd, self._tmp = -1, Path()
        try:
            self._fd, self._tmp = spool._new_temp()
        except OSError as exc:
            self._error = exc

    @property
    def temp_path(self) -> Path | None:
        """The temporary file being written, or None once finished, aborted or never created."""
        return self._tmp if self._fd >= 0 else None

    def write(self, data: bytes) -> None:
        """Append ``data`` (hashing it); small pieces are gathered, large ones written at once."""
        self.size += len(data)  # counted when it fails too: the error names the message's size
        if self._fd < 0 or self._error is not None:
            return
        self._digest.update(data)
        if not self._buffer and len(data) >= _WRITE_BUFFER:
            self._write(data)
            return
        self._buffer += data
        if len(self._buffer) >= _WRITE_BUFFER:
            self._write(bytes(self._buffer))
            self._buffer.clear()

    def _write(self, data: bytes) -> None:
        try:
            self.spool._write(self._fd, data)
        except OSError as exc:
            self._error = exc

    def finish(self) -> SpooledMessage:
        """Flush, fsync and rename to ``<sha256>.eml``; raises ``SpoolError`` (the temporary file is removed)."""
        what = f"cannot spool a {self.size}-byte message in {self.spool.directory}"
        if self._buffer:
            self._write(bytes(self._buffer))
            self._buffer = bytearray()
        try:
            if self._error is not None or self._fd < 0:
                raise self._error or OSError(errno.EBADF, "the writer was closed")
            head = os.pread(self._fd, _MAX_HEADER_BYTES, 0)  # read back: the message is never kept in memory
        except OSError as exc:
            self.abort()
            raise spool_error(what, exc) from exc
        fd, tmp, self._fd = self._fd, self._tmp, -1
        path = self.spool.directory / f"{self._digest.hexdigest()}.eml"
        try:
            self.spool._finish_temp(fd, tmp, path, [])
        except OSError as exc:
            raise spool_error(what, exc) from exc
        return describe(path, self._digest.hexdigest(), self.size, head)

    def abort(self) -> None:
        """Close and remove the temporary file (nothing happens after ``finish`` or a first ``abort``)."""
        fd, self._fd = self._fd, -1
        self._buffer = bytearray()
        if fd >= 0:
            os.close(fd)
            self._tmp.unlink(missing_ok=True)


def remove_if_unlocked(path: Path) -> int | None:
    """Remove ``path`` if no process holds its lock; return its size, or None if kept (or already gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # a live writer holds it
    try:
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            return None  # renamed or replaced meanwhile: not the file we locked
        size = os.fstat(fd).st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def _reuse(path: Path) -> bool:
    """True if a spool file of these bytes exists; touch it so purge's sweep of unnamed old files spares it."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def spool_error(what: str, exc: OSError) -> SpoolError:
    """Translate an OSError from the spool's disk into a one-line ``SpoolError``."""
    full = exc.errno in _DISK_FULL
    detail = "disk full" if full else (exc.strerror or type(exc).__name__)
    if isinstance(exc, FileExistsError):  # mkdir of a path that is a file said "File exists"
        detail = "a file is in the way (not a directory)"
    return SpoolError(f"{what}: {detail}", disk_full=full)


def describe(path: Path, sha256: str, size: int, head: bytes) -> SpooledMessage:
    """Build the SpooledMessage of a file whose first bytes (at least its header block) are ``head``."""
    headers = header_block(head)
    return SpooledMessage(path, sha256, size, _message_id(headers), _return_path(headers))


def header_block(raw: bytes) -> Message:
    """Parse the header block of a raw message (at most its first 256 KB)."""
    match = _HEADER_END.search(raw, 0, _MAX_HEADER_BYTES)
    head = raw[: match.start()] if match else raw[:_MAX_HEADER_BYTES]
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    if needs_header_repair(headers):  # a line without a colon: the parse stage repairs it, so the key must too
        repaired = repair_header_block(head)
        if repaired is not None:
            headers = BytesHeaderParser(policy=compat32).parsebytes(repaired)
    return headers


def message_id_of(raw: bytes) -> str | None:
    """Return the Message-ID header of a raw message, or None if absent or unusable."""
    return _message_id(header_block(raw))


def _message_id(headers: Message) -> str | None:
    value = headers.get("Message-ID")
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value if 3 <= len(value) <= 998 and value.isprintable() else None


def _return_path(headers: Message) -> str | None:
    """The address of the first Return-Path header ("" for ``<>``), UTF-8 restored (RFC 6532); None if none."""
    # raw_items(), not get(): for a value with non-ASCII bytes compat32's get() returns a Header object
    raw = next((v for k, v in headers.raw_items() if k.lower() == "return-path"), None)
    if raw is None:
        return None
    value = raw.encode("ascii", "surrogateescape").decode("utf-8", "replace")  # compat32 keeps raw bytes
    return "".join(value.split()).removeprefix("<").removesuffix(">")


def return_path_header(mail_from: str) -> bytes:
    """The ``Return-Path`` trace header a final-delivery MTA prepends (RFC 5321 4.4), as bytes.

    ``mail_from`` is the envelope sender as received ("" or "<>" for the null sender); a non-ASCII
    (SMTPUTF8) address is written in UTF-8 (RFC 6532). CR and LF cannot occur in an SMTP command; they
    are dropped all the same, so the header can never become two.
    """
    address = "" if mail_from in ("", "<>") else mail_from
    address = address.replace("\r", "").replace("\n", "")
    return f"Return-Path: <{address}>\r\n".encode("utf-8", "surrogateescape")
