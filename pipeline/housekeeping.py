"""Housekeeping: purge old runs together with the files they leave on disk (issue 11, item 4).

What ``purge`` deletes, and why in this order:

- the finished runs (success or failed) that ended before the cut-off, with their
  task instances and events, in batches of one short transaction each, so a
  running ``serve`` never waits long for the store;
- the work directory of each purged run (``<data>/work/<run_id>/``: attachments,
  extracted text, the digest's JSON), after the batch's transaction committed;
- a purged run's spool file (``<data>/spool/<sha256>.eml``) once no remaining run
  names it, whatever that run's state: a run that ``runs`` still lists can be
  reprocessed from its spool file (``ingest`` makes runs that share one file);
- spool files an earlier version's purge left without runs (older than the
  store's tombstones, less ``LEGACY_GRACE_S``): start-up never queues them.

Digests in the outbox are the user's mail and are never touched. The store
tombstones a spool file in the transaction that drops its last run, and the
tombstone goes only once the file is gone: if the file cannot be deleted, or
the process dies between the commit and the delete, start-up reconciliation
still knows the message was purged and does not queue it again, and the next
purge retries the file. A file that cannot be deleted is logged (the first few,
one line each) and counted in the report; it never fails the purge. A work
directory that could not be deleted is not retried (its run is gone): the log
names it. Bytes are the files' sizes (``st_size``), not the blocks they held.

Known gap: a message whose bytes equal those of a spool file being purged, arriving
in the instant between the purge's commit and its delete, finds its file gone.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import ConfigurationError, PipelineError, StoreIOError
from .store import DAGRunStore, open_store

log = logging.getLogger(__name__)
DAY_S = 86400.0
# Spool files older than the store's tombstones (spool_tracked_since), less this, that no run names are
# leftovers of an earlier version's purge, which deleted runs but never files; that version reconciled
# the last 24 h of spool only. Start-up never queues them; purge deletes them.
LEGACY_GRACE_S = DAY_S
_LOGGED_FAILURES = 5  # per purge; the rest are only counted
_MB = 1024 * 1024


@dataclass(frozen=True)
class PurgeReport:
    """What one purge removed: runs, and the files and bytes of their spool files and work directories."""

    older_than_days: float
    runs: int = 0
    spool_files: int = 0
    spool_bytes: int = 0
    work_dirs: int = 0
    work_bytes: int = 0
    failures: int = 0  # files or directories that could not be deleted (logged; spool files are retried)

    @property
    def freed_bytes(self) -> int:
        """Bytes of spool and work files deleted."""
        return self.spool_bytes + self.work_bytes

    def summary(self) -> str:
        """One line for a person: runs purged, bytes freed, and failures if any."""
        line = (f"purged {self.runs:,} run(s) that ended more than {self.older_than_days:g} day(s) ago; "
                f"freed {self.freed_bytes / _MB:,.1f} MB (spool {self.spool_bytes / _MB:,.1f} MB in "
                f"{self.spool_files:,} file(s), work {self.work_bytes / _MB:,.1f} MB in {self.work_dirs:,} dir(s))")
        if self.failures:
            line += f"; {self.failures:,} could not be deleted (see the log)"
        return line


def purge(settings: Settings, older_than_days: float, *, batch_size: int = 1000,
          progress: bool = False) -> PurgeReport:
    """Delete finished runs that ended more than ``older_than_days`` ago, with their spool and work files.

    ``0`` purges every finished run. Raises ``ConfigurationError`` for a negative or non-finite age
    and ``StoreError`` if the data dir has no run store (nothing is created). ``progress`` shows a bar on
    stderr where it is a terminal (a purge of a million runs takes minutes).
    """
    check_age(older_than_days)
    try:
        with open_store(settings.store, create=False) as store:
            bar = _progress_bar(store.count_purgeable(time.time() - older_than_days * DAY_S)) if progress else None
            try:
                return purge_store(store, Path(settings.data_dir), older_than_days, batch_size=batch_size,
                                   on_batch=bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
    except StoreIOError as exc:
        free = _free_bytes(Path(settings.data_dir))
        if free is None or free >= PURGE_NEEDS_FREE:
            raise
        # the store records what it deletes before a file goes (and SQLite cannot even open it on a full disk)
        raise StoreIOError(f"{exc}: the disk has {free // 1024:,} KB free, and purge needs a few MB to record "
                           f"what it deletes; free some (old digests in the outbox, say) and run it again") from exc


def purgeable(settings: Settings, older_than_days: float) -> int:
    """How many runs ``purge`` would delete now (``purge --dry-run``); deletes nothing."""
    check_age(older_than_days)
    with open_store(settings.store, create=False) as store:
        return store.count_purgeable(time.time() - older_than_days * DAY_S)


def check_age(older_than_days: float) -> None:
    """ConfigurationError unless the age is a number of days, 0 or more."""
    if not math.isfinite(older_than_days) or older_than_days < 0:
        raise ConfigurationError(f"cannot purge runs older than {older_than_days:g} day(s): "
                                 "the age must be a number of days, 0 or more")


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm  # only purge's own command needs it

    return tqdm(total=total, unit="run", desc="purge", disable=None)  # disable=None: silent where not a tty


PURGE_NEEDS_FREE = 4 * _MB  # below this, a purge that fails with a store I/O error says the disk is the cause


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def purge_store(store: DAGRunStore, data_dir: Path, older_than_days: float, *, batch_size: int = 1000,
                now: float | None = None, on_batch: Callable[[int], object] | None = None) -> PurgeReport:
    """Like ``purge`` on an open store whose spool and work directories are under ``data_dir``; ``on_batch``
    is called with the number of runs of each batch once its files are gone."""
    now = time.time() if now is None else now
    files = _FileRemover(data_dir / "spool", data_dir / "work")
    runs = 0

    def report() -> PurgeReport:
        return PurgeReport(older_than_days, runs, files.spool_files, files.spool_bytes, files.work_dirs,
                           files.work_bytes, files.failures)
    try:
        retry_tombstones(store, files)
        remove_orphan_work_dirs(store, files)
        for batch in store.purge_batches(now - older_than_days * DAY_S, batch_size):
            runs += len(batch.run_ids)
            for run_id in batch.run_ids:
                files.remove_work_dir(run_id)
            # look again just before deleting: the same bytes may have arrived (and been named) since the commit
            live = store.spool_names_in_use(batch.spool_names)
            gone = [name for name in batch.spool_names if name not in live and files.remove_spool_file(name)]
            store.drop_spool_tombstones([*live, *gone])
            if on_batch is not None:
                on_batch(len(batch.run_ids))
        legacy_before = store.spool_tracked_since() - LEGACY_GRACE_S
        for mtime, path in unknown_spool_files(store, data_dir / "spool"):
            if mtime < legacy_before:
                files.remove_spool_file(path.name)
    except (PipelineError, OSError, KeyboardInterrupt):  # what is gone is gone: say so before the error does
        log.warning("purge stopped before its end; until then it %s", report().summary())
        raise
    finally:
        files.log_unlogged()
    return report()


def remove_orphan_work_dirs(store: DAGRunStore, files: _FileRemover, page: int = 500) -> None:
    """Delete the work directories of runs that are gone: those a purge stopped midway (killed, Ctrl-C, the
    store failing) had deleted the runs of but not yet the directories. A directory is an orphan when its number
    is a run id already handed out (ids are never reused) and no run has it."""
    work = files.work_dir
    if not work.is_dir():
        return
    last = store.last_run_id()
    try:
        with os.scandir(work) as entries:
            numbered = sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=False))
    except OSError as exc:  # unreadable: the runs' own purge goes on; the next purge tries again
        log.warning("cannot list %s for work dirs of purged runs: %s", work, exc)
        files.failures += 1
        return
    candidates = [run_id for run_id in numbered if run_id <= last]
    for start in range(0, len(candidates), page):
        chunk = candidates[start:start + page]
        for run_id in sorted(set(chunk) - store.existing_run_ids(chunk)):
            files.remove_work_dir(run_id)


def retry_tombstones(store: DAGRunStore, files: _FileRemover, page: int = 500) -> None:
    """Delete the spool files an earlier purge could not, unless a run names them again (then they are live)."""
    after = ""
    while names := store.list_spool_tombstones(after, page):
        after = names[-1]
        live = store.spool_names_in_use(names)
        gone = [name for name in names if name not in live and files.remove_spool_file(name)]
        store.drop_spool_tombstones([*live, *gone])


def unknown_spool_files(store: DAGRunStore, spool_dir: Path, batch: int = 500) -> list[tuple[float, Path]]:
    """Return the spool files no run names and no tombstone covers, as (mtime, path), oldest first.

    Names are looked up ``batch`` at a time before any file is opened: thousands of processed
    messages cost one directory listing and a few index lookups. Temporary files are not spool files.
    """
    if not spool_dir.is_dir():  # nothing was ever spooled here
        return []
    unknown: list[str] = []
    names: list[str] = []
    with os.scandir(spool_dir) as entries:
        for entry in entries:
            # a regular file only: a FIFO named *.eml blocked serve's start in its open() (a probe's find)
            if entry.name.endswith(".eml") and not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                names.append(entry.name)
            if len(names) >= batch:
                unknown += set(names) - store.spool_names_known(names)
                names.clear()
    unknown += set(names) - store.spool_names_known(names)
    found = []
    for name in unknown:
        try:
            found.append((os.stat(spool_dir / name).st_mtime, spool_dir / name))
        except FileNotFoundError:  # removed meanwhile
            continue
    return sorted(found)


class _FileRemover:
    """Delete spool files and work directories, tallying files, bytes and failures."""

    def __init__(self, spool_dir: Path, work_dir: Path) -> None:
        self.spool_dir, self.work_dir = spool_dir, work_dir
        self.spool_files = self.spool_bytes = self.work_dirs = self.work_bytes = self.failures = 0

    def remove_spool_file(self, name: str) -> bool:
        """Delete one spool file by name; True once it is gone (also if it never existed)."""
        if not name.endswith(".eml") or name.startswith(".") or os.sep in name:
            return True  # not a spool file's name (a payload from elsewhere): nothing of ours to delete
        path = self.spool_dir / name
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return True
        except OSError as exc:
            self._failed(path, exc, "its tombstone stays; the next purge tries again")
            return False
        self.spool_files += 1
        self.spool_bytes += size
        return True

    def remove_work_dir(self, run_id: int) -> None:
        """Delete a purged run's work directory and everything in it (symlinks are removed, not followed)."""
        top = self.work_dir / str(run_id)
        if not top.is_dir() or top.is_symlink():
            return
        freed, ok = 0, True
        for root, dirs, names in os.walk(top, topdown=False):  # never follows symlinked directories
            for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                freed, ok = self._unlink(Path(root, name), freed, ok)
            for name in dirs:
                ok = self._rmdir(Path(root, name)) and ok
        if self._rmdir(top) and ok:
            self.work_dirs += 1
        self.work_bytes += freed

    def _unlink(self, path: Path, freed: int, ok: bool) -> tuple[int, bool]:
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            return freed, ok
        except OSError as exc:
            self._failed(path, exc, "its run is purged; delete it by hand")
            return freed, False
        return freed + size, ok

    def _rmdir(self, path: Path) -> bool:
        if path.is_symlink():  # already unlinked above
            return True
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:  # not empty: a file in it failed, and was counted
                self._failed(path, exc, "its run is purged; delete it by hand")
            return False
        return True

    def _failed(self, path: Path, exc: OSError, then: str) -> None:
        self.failures += 1
        if self.failures <= _LOGGED_FAILURES:
            log.warning("purge: cannot delete %s: %s; %s", path, exc.strerror or exc, then)

    def log_unlogged(self) -> None:
        """One line for the failures past the first few (each of those had its own)."""
        if self.failures > _LOGGED_FAILURES:
            log.warning("purge: %d more file(s) or dir(s) could not be deleted", self.failures - _LOGGED_FAILURES)
