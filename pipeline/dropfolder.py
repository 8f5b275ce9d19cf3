"""DropFolder: messages dropped into a Maildir (``tmp/ new/ cur/``) become runs.

Writers put a file in ``tmp/`` and rename it into ``new/`` (the Maildir rule:
a file in ``new/`` is complete); watchdog reports that through inotify (or by
polling, if configured). Each file is accepted
through the gateway, then moved to ``cur/``; a file over the size limit goes
to ``rejected/`` with a log line. Files already in ``new/`` at start are taken too, by the rescan thread (a
backlog of thousands must not hold serve's start-up).

A file whose accept fails (service unavailable, spool or store failing) stays
in ``new/``, untouched, and is tried again every ``retry_interval_s`` until
it is taken; every callback is guarded, so one bad
file or one failing disk never stops the watcher. Events alone are not trusted:
inotify drops them once its queue overflows (16,384 events: a prober's 20,000
files left 11,342 in ``new/`` for good), and a folder removed and made again is no
longer watched at all. So every ``retry_interval_s`` the whole of ``new/`` is
scanned, and a folder that is gone or replaced is made again and watched anew.

What people and programs really put there is checked before it is read: a file
still open for writing (copied straight into ``new/``, not renamed from
``tmp/``) waits until its writer closes it (a read lease cannot be had while
one writes; where serve may not take one, a file not owned by it, until it
has been unchanged for ``SETTLE_S``); a symlink, FIFO or device is moved to
``rejected/`` unread, as is a file over the size limit (a directory is left
alone); names are logged quoted (a newline in a name cannot forge a log line),
and names in ``cur/`` and ``rejected/`` are kept short and never overwrite
another file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .config import GatewayConfig
from .errors import PipelineError
from .ratelog import RateLimitedLog, cause_of

log = logging.getLogger(__name__)
SUBDIRS = ("tmp", "new", "cur", "rejected")
RETRY_INTERVAL_S = 5.0  # how often new/ is scanned for files a failed accept left, or no event reported


class DropFolder:
    """Watch ``directory/new`` and hand each message's bytes to ``accept``."""

    def __init__(self, directory: Path, accept: Callable[[bytes], Any], config: GatewayConfig | None = None,
                 retry_interval_s: float = RETRY_INTERVAL_S) -> None:
        self.directory = Path(directory)
        self.accept = accept
        self.config = config or GatewayConfig()
        self.retry_interval_s = retry_interval_s
        self._lock = threading.Lock()
        self._observer: Any = None
        self._stopping = threading.Event()
        self._retry_thread: threading.Thread | None = None
        # files accepted whose move to cur/ failed, with the version read (_version): only the move is retried
        self._unmoved: dict[Path, tuple[int, ...]] = {}
        self._failures = RateLimitedLog(log)
        self.first_pass = threading.Event()  # set once the rescan thread has taken what waited at start
        self._watched: tuple[int, int] | None = None  # (device, inode) of the folder the observer watches
        # why the folder cannot be used (a file where it goes), logged once, not at every pass; None when usable
        self.unusable: str | None = None
        self._problems: list[str] = []  # what this pass found wrong with the folder (``one_pass``)
        self._make_dirs()

    def _make_dirs(self, again: bool = False) -> None:
        """Make the folder and its subfolders; ``again`` (it was removed), the folder only where its parent still
        is: a data dir moved away had its inbox made again at the old path, parents and all, and the operator's
        move back then landed inside that new data dir (a probe's find)."""
        if again:
            self.directory.mkdir(exist_ok=True)  # FileNotFoundError when the parent is gone: a problem, reported
        for sub in SUBDIRS:
            (self.directory / sub).mkdir(parents=not again, exist_ok=True)

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.directory)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _watch(self) -> None:
        """Start an observer on the folder as it is now."""
        observer: Any = PollingObserver(timeout=self.config.poll_interval_s) if self.config.watch_mode == "poll" \
            else Observer()
        # Watch the whole Maildir, not just new/: moving a taken file new/ -> cur/ must be seen as one paired
        # move, or watchdog holds the unpaired "moved from new/" for 0.5 s and every later event waits behind it.
        observer.schedule(_Handler(self), str(self.directory), recursive=True)
        observer.start()
        self._observer, self._watched = observer, self._identity()

    def _watch_again_if_replaced(self) -> None:
        """Make the folder again and watch it anew when it was removed or replaced (its inotify watch went with
        it, silently) or its observer stopped."""
        observer = self._observer
        if self._identity() == self._watched and observer is not None and observer.is_alive() and \
                observer.emitters and all(emitter.is_alive() for emitter in observer.emitters) and \
                all((self.directory / sub).is_dir() for sub in SUBDIRS):
            return  # (an inotify watch ends, its emitter with it, when its folder is removed: inode numbers recur)
        if self.unusable is None:  # (once: the next pass finds it whole, or still unusable)
            log.warning("drop folder %s was removed or replaced, or its watch stopped: making it again and "
                        "watching it anew", self.directory)
        try:
            self._make_dirs(again=True)
        except OSError as exc:  # a file where a folder goes, its parent gone: scanning new/ (if there) goes on
            self._problems.append(f"cannot make its folders again: {exc}")
            return
        old, self._observer = self._observer, None
        if old is not None:
            old.stop()
            old.join(timeout=5)
        self._watch()

    def _judge(self, problem: str | None) -> None:
        """Log once when a pass finds the folder unusable (three lines every 5 s while a file stood where it
        goes, a prober's find), and once when it is usable again; judged per pass, so one step that works does
        not clear what another found."""
        if problem is not None and self.unusable is None:
            log.warning("drop folder %s: %s; nothing dropped there is taken until it is mended (checked every "
                        "%g s, logged once)", self.directory, problem, self.retry_interval_s)
        elif problem is None and self.unusable is not None:
            log.warning("drop folder %s is usable again", self.directory)
        self.unusable = problem

    def start(self) -> DropFolder:
        """Watch ``new/``; what is waiting there is taken by the rescan thread, which starts with it at once.
        (It was taken here, before serve was up: a backlog of 25,000 files took more than serve's 60 s start-up
        limit, so serve failed to start twice before the backlog was small enough.)"""
        self._watch()
        self._stopping.clear()
        self._retry_thread = threading.Thread(target=self._retry_loop, name="dropfolder-retry", daemon=True)
        self._retry_thread.start()
        log.info("watching drop folder %s (%s)", self.directory / "new", self.config.watch_mode)
        return self

    def stop(self) -> None:
        """Stop watching."""
        self._stopping.set()
        if self._retry_thread is not None:
            self._retry_thread.join()
            self._retry_thread = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        self._failures.flush()

    def scan(self) -> int:
        """Take every file now in ``new/``; return how many were taken (a file that fails stays for later)."""
        try:  # links, FIFOs and the like too: take() moves them to rejected/
            with os.scandir(self.directory / "new") as entries:
                paths = sorted(Path(e.path) for e in entries if not e.is_dir(follow_symlinks=False))
        except OSError as exc:
            self._problems.append(f"cannot list {self.directory / 'new'}: {exc}")
            return 0
        taken = 0
        for path in paths:
            if self._stopping.is_set():  # a backlog of thousands must not hold serve's stop
                break
            taken += self.try_take(path)
        return taken

    def try_take(self, path: Path) -> bool:
        """``take`` guarded: a failure is logged in one line (a traceback only if unexpected) and returns False."""
        try:
            return self.take(path)
        except (PipelineError, OSError) as exc:  # expected faults: the file stays in new/ for the next rescan
            # one line per kind per interval: a full spool under 2,000 waiting files wrote 10,669 lines in 30 s
            self._failures.report(f"drop folder: accept failed ({cause_of(exc)})", "drop folder: %r stays in new/ "
                                  "(accept failed: %s: %s)", Path(path).name, type(exc).__name__, exc)
        except Exception as exc:  # one bad file must not stop the watcher
            self._failures.report(f"drop folder: could not accept ({cause_of(exc)})", "drop folder: could not "
                                  "accept %r; it stays in new/", str(path), level=logging.ERROR, exc_info=exc)
        return False

    def take(self, path: Path) -> bool:
        """Accept one file from ``new/`` and move it out; False if someone else took it first, or it is not
        a message (moved to ``rejected/``), or it is still being written (tried again later).

        If ``accept`` raises, the file is left in ``new/`` and the exception propagates.
        """
        path = Path(path)
        with self._lock:  # an event and a scan may both see the same file
            if path.parent != self.directory / "new" or path.name.startswith("."):
                return False
            if path in self._unmoved:  # accepted already: only its move is tried again, never the accept
                self._move_to_cur(path, self._unmoved[path])
                return False
            try:  # never follow a link, never wait on a FIFO
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO):  # ELOOP: a link; ENXIO: a socket
                    raise
                return self._reject(path, "not a regular file (a link or socket)")
            with os.fdopen(fd, "rb") as file:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return self._reject(path, "not a regular file (a FIFO or device)")
                if st.st_size > self.config.max_message_bytes:
                    return self._reject(path, f"{st.st_size:,} bytes, over the {self.config.max_message_bytes:,}-byte "
                                              f"limit")
                with _read_lease(fd) as lease:  # None: no lease to be had, so the file must be quiet
                    complete = lease if lease is not None else _settled(st)
                    if complete:
                        raw = file.read(self.config.max_message_bytes + 1)
                        complete = lease is None or _still_leased(fd)  # a writer opening it broke the lease
                if not complete:
                    log.debug("drop folder: %r is still being written; taken once it is closed", path.name)
                    return False
            self.accept(raw)
            self._move_to_cur(path, _version(st))
            return True

    def _move_to_cur(self, path: Path, read: tuple[int, ...]) -> None:
        """Move the accepted file, as it was read (``_version``), to ``cur/``; if that fails, the retry loop tries
        the move again (never the accept: a rescan at the next start finds the same run by its key). A file
        written under the same name meanwhile, renamed over it or rewritten in place, is a new message: it stays
        for its own accept (the name alone moved 414 unaccepted mails of a writer reusing one name to cur/,
        marked seen, with no run)."""
        try:
            target = _free_name(self.directory / "cur", path.name.partition(":")[0], ":2,S")  # before the check
            if _version(os.lstat(path)) != read:
                self._replaced(path)
                return
            try:
                os.replace(path, target)
            except FileNotFoundError:  # cur/ itself gone (the folder removed under serve): make it again
                if not os.path.lexists(path):
                    raise
                self._make_dirs()
                os.replace(path, target)
            if _version(os.lstat(target))[:4] != read[:4]:  # replaced between the check and the rename (the
                os.replace(target, _free_name(self.directory / "new", path.name))  # rename changed its ctime)
                self._replaced(path)
                return
            self._unmoved.pop(path, None)
        except FileNotFoundError:  # taken by someone else, or removed: nothing left to move
            self._unmoved.pop(path, None)
        except OSError as exc:
            if path not in self._unmoved:
                log.error("drop folder: %r was accepted but cannot be moved to cur/ (%s); moving it is retried",
                          path.name, exc)
            self._unmoved[path] = read

    def _replaced(self, path: Path) -> None:
        """The file under ``path`` is not the one accepted: it stays in (or goes back to) ``new/`` for its own."""
        self._unmoved.pop(path, None)
        self._failures.report("replaced while read", "drop folder: %r was replaced after it was read: the new file "
                              "is taken on its own", path.name, level=logging.INFO)

    def _reject(self, path: Path, why: str) -> bool:
        """Move what is not a message out of ``new/`` to ``rejected/``, unread, with one log line."""
        log.warning("drop folder: %r is %s; moved to rejected/", path.name, why)
        os.replace(path, _free_name(self.directory / "rejected", path.name))
        return False

    def _retry_loop(self) -> None:
        # inotify reports a file once, and not at all once its queue overflowed: new/ is scanned from here. A
        # file a writer still holds open is safe from the scan: take() leaves it until its writer closes it.
        # The first pass runs at once: it takes what waited in new/ while serve was down.
        while not self._stopping.is_set():
            self.one_pass()
            self.first_pass.set()
            self._stopping.wait(self.retry_interval_s)

    def one_pass(self) -> None:
        """Watch the folder again if it was replaced, take what is in new/, move what could not be moved yet;
        then judge whether the folder is usable."""
        self._problems = []
        for step in (self._watch_again_if_replaced, self.scan, self._move_unmoved):
            try:  # each on its own: a folder that cannot be watched again must not stop the rescan
                step()
            except Exception as exc:  # the loop is the folder's safety net: it must outlive any one failure
                self._failures.report(f"{step.__name__}: {type(exc).__name__}", "drop folder: %s of %s failed; "
                                      "trying again in %g s", step.__name__.strip("_").replace("_", " "),
                                      self.directory, self.retry_interval_s, level=logging.ERROR, exc_info=exc)
        self._judge(self._problems[0] if self._problems else None)

    def _move_unmoved(self) -> None:
        with self._lock:  # one pass over a snapshot: events change the dict under the lock meanwhile
            for path, read in sorted(self._unmoved.items()):
                self._move_to_cur(path, read)


def _version(st: os.stat_result) -> tuple[int, ...]:
    """What tells one file under a name from another, or from itself rewritten in place (``cp`` over it keeps
    the inode): device, inode, size and change time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


MAX_NAME_BYTES = 200  # of a name in cur/ or rejected/, before the ".N" that keeps it unique (NAME_MAX is 255)


def _free_name(directory: Path, base: str, suffix: str = "") -> Path:
    """``directory/base[.N]suffix``: ``base`` cut to MAX_NAME_BYTES at a character boundary, ``.1``, ``.2``...
    added when taken (never overwrite), ``suffix`` (Maildir's ``:2,S``) kept whole at the end."""
    raw = os.fsencode(base)
    if len(raw) > MAX_NAME_BYTES:
        raw = raw[:MAX_NAME_BYTES]
        while raw and raw[-1] & 0xC0 == 0x80:  # continuation bytes of a UTF-8 character cut in two
            raw = raw[:-1]
        if raw and raw[-1] >= 0xC0:  # and its lead byte
            raw = raw[:-1]
    if not raw:  # a name of bytes cut away entirely (255 bytes of 0x80): not an empty or hidden name
        raw = b"message"
    for n in range(100):
        candidate = directory / os.fsdecode(raw + (b".%d" % n if n else b"") + suffix.encode())
        if not os.path.lexists(candidate):
            return candidate
    while True:  # a writer that always uses one name (a scanner's scan.eml): a unique name, never a dead end
        candidate = directory / os.fsdecode(raw + b".%d.%d" % (time.time_ns(), os.getpid()) + suffix.encode())
        if not os.path.lexists(candidate):
            return candidate


SETTLE_S = 1.0  # with no lease to be had, a file unchanged this long counts as written


def _settled(st: os.stat_result) -> bool:
    """Whether a file with no lease to be had has been unchanged for SETTLE_S: by its mtime, or by its ctime (set
    by this kernel's clock) when its mtime is in the future (``cp -p`` or rsync from a host whose clock runs
    ahead): a probe's file dated a day ahead was never taken, and nothing said so."""
    now = time.time()
    return now - (st.st_mtime if st.st_mtime <= now + SETTLE_S else st.st_ctime) >= SETTLE_S


@contextmanager
def _read_lease(fd: int) -> Iterator[bool | None]:
    """Hold a read lease on ``fd`` for the block: yields True while held, False when another process has the
    file open for writing (Linux grants no read lease then), None where leases are not to be had (serve is
    not the file's owner, a network file system): then the caller waits until the file is quiet. A writer
    opening the file during the block breaks the lease with SIGURG (ignored), not SIGIO (which would end the
    process): ``_still_leased`` tells."""
    setlease = getattr(fcntl, "F_SETLEASE", None)  # Linux only
    if setlease is None:
        yield None
        return
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, setlease, fcntl.F_RDLCK)
    except OSError as exc:
        yield False if exc.errno == errno.EAGAIN else None
        return
    try:
        yield True
    finally:
        fcntl.fcntl(fd, setlease, fcntl.F_UNLCK)


def _still_leased(fd: int) -> bool:
    """True while no writer has broken the read lease on ``fd`` (see ``_read_lease``)."""
    return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK


class _Handler(FileSystemEventHandler):
    def __init__(self, folder: DropFolder) -> None:
        self.folder = folder

    def on_created(self, event: FileSystemEvent) -> None:
        # A rename from tmp/ into new/ arrives as "created" (tmp/ is not watched). Maildir writers only ever
        # rename complete files into new/; a writer that writes straight into new/ is also seen at close.
        if not event.is_directory:
            self._take(str(event.src_path))

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._take(str(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._take(str(event.dest_path))

    def _take(self, path: str) -> None:
        self.folder.try_take(Path(path))
