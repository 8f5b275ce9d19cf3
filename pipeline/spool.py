"""Spool: raw accepted messages on disk, durable before anyone is told "accepted".

Each message is written to a temporary file, fsynced, renamed to
``<sha256>.eml`` and the directory fsynced, so after a crash a spool file is
either whole or absent. Names are content hashes: the same bytes twice are
one file. Only the header block is read here (to find the Message-ID);
parsing the body is the workflow's job, off the SMTP event loop.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MAX_HEADER_BYTES = 256 * 1024


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
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self.directory, os.O_RDONLY)  # kept open: one fewer open() per message

    def close(self) -> None:
        """Release the directory handle."""
        os.close(self._dir_fd)

    def store(self, raw: bytes) -> SpooledMessage:
        """Write ``raw`` durably (fsync file and directory) and return where it is."""
        digest = hashlib.sha256(raw).hexdigest()
        path = self.directory / f"{digest}.eml"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(raw)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            os.fsync(self._dir_fd)  # make the rename itself durable
        return SpooledMessage(path, digest, len(raw), message_id_of(raw))

    def load(self, path: Path) -> SpooledMessage:
        """Describe an existing spool file (used when reconciling the spool with the run store)."""
        raw = Path(path).read_bytes()
        return SpooledMessage(Path(path), hashlib.sha256(raw).hexdigest(), len(raw), message_id_of(raw))

    def files(self) -> list[Path]:
        """Spooled messages, oldest first."""
        return sorted(self.directory.glob("*.eml"), key=lambda p: p.stat().st_mtime)


def message_id_of(raw: bytes) -> str | None:
    """Return the Message-ID header of a raw message, or None if absent or unusable."""
    match = _HEADER_END.search(raw, 0, _MAX_HEADER_BYTES)
    head = raw[: match.start()] if match else raw[:_MAX_HEADER_BYTES]
    value = BytesHeaderParser(policy=compat32).parsebytes(head).get("Message-ID")
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value if 3 <= len(value) <= 998 and value.isprintable() else None
