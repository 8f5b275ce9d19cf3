"""A look at serve's data dir every few seconds: can the spool take a message, is the run store file still the
one serve opened, has the disk under either room left. Any problem makes serve unhealthy (``pipeline_healthy``
0, and the gateway answers 451 before it reads a mail).

A full disk under the spool or the run store refused every mail (452, 451) after reading it whole, while
``pipeline_healthy`` said 1 (an operations prober's find): an empty file still fits on a full disk, so the
spool's probe passed. Now less than ``MIN_FREE_BYTES`` free there is a problem too.

A prober found serve healthy while it could not take any mail: its spool made unwritable, or its data dir
deleted (451 to 510 tries over two minutes, ``pipeline_healthy`` 1 throughout); and a run store file deleted
under serve went on taking mail into the unlinked file, which the next start never saw (its spool rebuilt the
runs, and the digests already sent went out again through a relay).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from .health import one_line

log = logging.getLogger(__name__)
WATCH_EVERY_S = 5.0
MIN_FREE_BYTES = 64 * 1024  # below this a disk is full: no mail fits, nor a run store's next pages


class Probed(Protocol):
    directory: Path

    def probe(self) -> None: ...


class DataDirWatch:
    """``problem``: why the data dir cannot serve now, from the last look (None: fine, or not looked yet)."""

    def __init__(self, spool: Probed | None, store_file: Path | None) -> None:
        self.spool, self.store_file = spool, store_file
        self._files: dict[Path, tuple[int, int]] = {}  # the store's files at start, and their identity
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> DataDirWatch:
        """Note the store's files as they are now (the store open: its -wal and -shm too), then look every
        WATCH_EVERY_S."""
        if self.store_file is not None:
            for path in (self.store_file, *(Path(f"{self.store_file}{end}") for end in ("-wal", "-shm"))):
                identity = _identity(path)
                if identity is not None:
                    self._files[path] = identity
        self._thread = threading.Thread(target=self._loop, name="pipeline-datadir-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WATCH_EVERY_S + 5)

    def look(self) -> str | None:
        """Look once; return (and keep) the problem, logging each change."""
        problem = self._store_problem() or self._spool_problem() or self._disk_problem()
        if problem != self.problem:
            if problem:
                log.error("unhealthy: %s", problem)
            else:
                log.info("the data dir serves again: %s", self.problem)
        self.problem = problem
        return problem

    def _loop(self) -> None:
        while not self._stop.wait(WATCH_EVERY_S):
            try:
                self.look()
            except Exception as exc:  # a look that breaks says so and tries again; it must never end the loop
                log.exception("watching the data dir failed")
                self.problem = f"watching the data dir failed: {one_line(exc)}"

    def _store_problem(self) -> str | None:
        """The store's file, or its -wal or -shm (a deleted -wal lost 6 of 25 runs from every other reader, and
        the next start re-made 9 runs from the spool, a re-probe's find), gone or replaced since start."""
        for path, identity in self._files.items():
            now = _identity(path)
            if now is None:
                return f"the run store file {path} is gone (deleted under serve?): restart serve"
            if now != identity:
                return f"the run store file {path} was replaced under serve: restart serve"
        return None

    def _spool_problem(self) -> str | None:
        if self.spool is None:
            return None
        try:
            self.spool.probe()
        except OSError as exc:
            return f"the spool cannot take a message: {exc.strerror or one_line(exc)}"
        return None

    def _disk_problem(self) -> str | None:
        """A disk under the spool or the run store with less than ``MIN_FREE_BYTES`` free."""
        places = [*([("spool", self.spool.directory)] if self.spool is not None else []),
                  *([("run store", self.store_file.parent)] if self.store_file is not None else [])]
        for what, directory in places:
            try:
                st = os.statvfs(directory)
            except OSError:
                continue  # gone or unreadable: the other looks say so
            free = st.f_bavail * st.f_frsize
            if free < MIN_FREE_BYTES:
                return f"the disk under the {what} ({directory}) is full: {free:,} bytes free"
        return None


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
