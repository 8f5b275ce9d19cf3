"""Spool: raw accepted messages on disk, durable before anyone is told "accepted".

Each message is written to a temporary file, fsynced, renamed to
``<sha256>.eml`` and the directory fsynced, so after a crash a spool file is
either whole or absent. Names are content hashes: the same bytes twice are
one file. Only the header block is read here (to find the Message-ID);
parsing the body is the workflow's job, off the SMTP event loop.

A write that fails (full disk, read-only or vanished directory, I/O error)
raises ``SpoolError`` (``disk_full`` for ENOSPC/EDQUOT) and leaves no
``.incoming-*.tmp`` behind, so the gateway can answer 452/451 and the
sender keeps the message.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from .errors import SpoolError

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MAX_HEADER_BYTES = 256 * 1024
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class SpooledMessage:
    """A message safely on disk."""

    path: Path
    sha256: str
    size: int
    message_id: str | None

    @property
    def dedup_key(self) -> str:
        """The Message-ID if the message has a usable one, else its content hash."""
        return self.message_id or f"sha256:{self.sha256}"


class Spool:
    """A directory of durable raw messages."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._dir_fd = os.open(self.directory, os.O_RDONLY)  # kept open: one fewer open() per message
        except OSError as exc:
            raise spool_error(f"cannot open spool directory {self.directory}", exc) from exc

    def close(self) -> None:
        """Release the directory handle (a second call does nothing)."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def store(self, raw: bytes) -> SpooledMessage:
        """Write ``raw`` durably (fsync file and directory) and return where it is.

        Raises ``SpoolError`` (``disk_full`` set on ENOSPC/EDQUOT); no temporary file is left behind.
        """
        digest = hashlib.sha256(raw).hexdigest()
        path = self.directory / f"{digest}.eml"
        try:
            if not path.exists():
                self._write_new(path, raw)
        except OSError as exc:
            raise spool_error(f"cannot spool a {len(raw)}-byte message in {self.directory}", exc) from exc
        return SpooledMessage(path, digest, len(raw), message_id_of(raw))

    def _write_new(self, path: Path, raw: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-", suffix=".tmp")
        try:
            try:
                self._write(fd, raw)
                os.fsync(fd)  # an fsync can be where a full disk (or a failing one) is first reported
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # Make the rename itself durable. If this fsync fails the file is whole but its name may not survive
        # a crash; the sender got 4xx and retries, and the retry finds the same content-named file.
        os.fsync(self._dir_fd)

    def _write(self, fd: int, raw: bytes) -> None:
        """Write all of ``raw`` to ``fd`` (the one place a full disk shows up; tests inject faults here)."""
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]

    def load(self, path: Path) -> SpooledMessage:
        """Describe an existing spool file (used when reconciling the spool with the run store)."""
        raw = Path(path).read_bytes()
        return SpooledMessage(Path(path), hashlib.sha256(raw).hexdigest(), len(raw), message_id_of(raw))

    def files(self) -> list[Path]:
        """Spooled messages, oldest first."""
        return sorted(self.directory.glob("*.eml"), key=lambda p: p.stat().st_mtime)


def spool_error(what: str, exc: OSError) -> SpoolError:
    """Translate an OSError from the spool's disk into a one-line ``SpoolError``."""
    full = exc.errno in _DISK_FULL
    detail = "disk full" if full else (exc.strerror or type(exc).__name__)
    return SpoolError(f"{what}: {detail}", disk_full=full)


def message_id_of(raw: bytes) -> str | None:
    """Return the Message-ID header of a raw message, or None if absent or unusable."""
    match = _HEADER_END.search(raw, 0, _MAX_HEADER_BYTES)
    head = raw[: match.start()] if match else raw[:_MAX_HEADER_BYTES]
    value = BytesHeaderParser(policy=compat32).parsebytes(head).get("Message-ID")
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value if 3 <= len(value) <= 998 and value.isprintable() else None
