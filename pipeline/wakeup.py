"""QueueBell: wake the engines on this host when a process queues runs in a SQLite store they share.

PostgreSQL has LISTEN/NOTIFY; a SQLite file has nothing like it, and since
issue 17 serve's gateway runs in a process of its own, so without a wake-up
its engine would see each run only at its next poll. Every process watching
the queue binds a Unix datagram socket in Linux's abstract namespace (no
path-length limit, nothing left on disk when it is killed) and registers its
name as an empty file in a directory next to the store
(``runs.sqlite3-wake/``). After a commit that queued runs, the committing
process sends an empty datagram to every registered name; a name nobody
listens on any more (its process died) refuses it and is removed. So any
process sharing the data dir is woken: serve's gateway process and engine,
and ``--gateway-only`` with ``--workers-only`` on one host alike.

A datagram carries nothing: the woken engine claims from the store, so a
lost or spurious one costs at most a poll interval or one query. Ringing
never raises: a failure is logged at DEBUG and the poll remains.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
SUPPORTED = sys.platform.startswith("linux")  # the abstract socket namespace is Linux's
_PREFIX = "\0pipeline-wake-"
BACKOFF_MAX_S = 5.0  # longest pause of a watcher whose socket keeps failing
_GONE = {errno.ECONNREFUSED, errno.ENOENT}  # nobody bound to that name any more


class QueueBell:
    """Ring every watcher registered in ``directory``; watch for rings of others."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._sender: socket.socket | None = None
        self._lock = threading.Lock()
        self._watchers: list[_Watcher] = []

    def ring(self) -> None:
        """Send one empty datagram to each registered watcher (call it after the commit, not inside). Never
        raises: a missed wake-up costs a watcher one poll interval, an error here would make a caller think its
        committed write failed."""
        if not SUPPORTED:
            return
        try:
            names = os.listdir(self.directory)
        except OSError:  # no watcher has registered yet
            return
        with self._lock:
            if self._sender is None:
                try:
                    self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                except OSError as exc:  # out of descriptors or buffers: the watchers poll, the commit stands
                    log.debug("queue wake-up socket: %s", exc)
                    return
                self._sender.setblocking(False)  # a full receiver already has a wake-up pending
            for name in names:
                try:
                    self._sender.sendto(b"", _PREFIX + name)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in _GONE:
                        self._forget(name)
                    else:
                        log.debug("queue wake-up to %s failed: %s", name, exc)

    def _forget(self, name: str) -> None:
        try:
            os.unlink(self.directory / name)
        except OSError:  # another process removed it first
            pass

    def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` (on a daemon thread) whenever some process rings; return a function that stops watching.

        If the socket or its registration cannot be made, log it and return a no-op: the caller polls.
        """
        if not SUPPORTED:
            return not_watching
        try:
            watcher = _Watcher(self.directory, wake)
        except OSError as exc:
            log.warning("cannot watch the run queue for wake-ups (%s): polling every second", exc)
            return not_watching
        with self._lock:
            self._watchers.append(watcher)

        def stop() -> None:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
            watcher.stop()
        return stop

    def close(self) -> None:
        """Stop every watcher and close the sending socket (a second close does nothing)."""
        with self._lock:
            watchers, self._watchers = self._watchers, []
            sender, self._sender = self._sender, None
        for watcher in watchers:
            watcher.stop()
        if sender is not None:
            sender.close()


def not_watching() -> None:
    """What ``watch`` returns when it cannot watch: stopping it does nothing, and the engine, seeing it, polls
    every second (it polled at the notifying store's slow interval, 5 s: a probe's wake-up file replaced)."""


class _Watcher:
    """One bound datagram socket, its registration file and the thread that turns datagrams into wake-ups."""

    socket_type = socket.socket  # a test's socket that fails like the OS can

    def __init__(self, directory: Path, wake: Callable[[], None]) -> None:
        self.name = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._wake = wake
        self._stopped = threading.Event()  # set by stop(); also cuts a backoff short
        self._sock = self.socket_type(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(_PREFIX + self.name)
            directory.mkdir(parents=True, exist_ok=True)
            self.registration = directory / self.name
            self.registration.touch()
        except OSError:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="pipeline-queue-bell", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        failures = 0
        while True:
            try:
                self._sock.recv(1)
                self._sock.setblocking(False)
                try:
                    while True:  # a burst of rings is one wake-up
                        self._sock.recv(1)
                except BlockingIOError:
                    pass
                self._sock.setblocking(True)
            except OSError as exc:  # never expected on a bound datagram socket: back off and go on (it ended the
                if self._stopped.is_set():  # wake-ups for good, runs waiting up to the 5 s poll from then on)
                    return
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "queue wake-ups failed (%d in a row): %s; trying again", failures, exc)
                self._stopped.wait(min(BACKOFF_MAX_S, 0.1 * 2 ** (failures - 1)))  # a stop cuts it short
            else:
                if failures:
                    log.warning("queue wake-ups recovered after %d failure(s)", failures)
                failures = 0
            if self._stopped.is_set():
                return
            try:
                self._wake()  # after a failure too: a ring may have been lost
            except Exception:  # a broken callback must not end the wake-ups
                log.exception("queue wake-up callback failed")

    def stop(self) -> None:
        """Deregister, unblock the thread with a datagram of our own, wait for it, close the socket."""
        self._stopped.set()
        try:
            os.unlink(self.registration)
        except OSError:
            pass
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as poke:
            poke.setblocking(False)
            try:
                poke.sendto(b"", _PREFIX + self.name)
            except OSError:  # the buffer is full: the thread is about to wake anyway
                pass
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._sock.close()
