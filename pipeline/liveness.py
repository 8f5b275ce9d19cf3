"""Liveness: who owns a running run, and whether that owner is gone.

An owner string is ``host:pid:nonce``. A run is dead when its heartbeat is
stale, or when its owner ran on this host and either that pid is gone or it
is this very pid but no live engine of this process has that owner: a
restarted container's PID 1 gets the dead incarnation's pid back, so
``kill(pid, 0)`` alone would call the dead process alive for ever.
"""

from __future__ import annotations

import os
import socket
import uuid

from .store import Run

HOST = socket.gethostname()
LIVE_OWNERS: set[str] = set()  # owners of this process's started engines (an engine adds itself at start)


def new_owner() -> str:
    """Return a fresh owner string for an engine of this process."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def is_dead(run: Run, me: str, stale_before: float) -> bool:
    """Tell whether ``run``'s owner is gone (never true for ``me``, the caller's own owner)."""
    if run.owner == me:
        return False
    if run.owner is None or run.heartbeat_at is None or run.heartbeat_at < stale_before:
        return True
    host, _, rest = run.owner.partition(":")
    pid = rest.partition(":")[0]
    if host != HOST or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return run.owner not in LIVE_OWNERS
    return not pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """Tell whether a process with this pid runs on this host (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil  # here: the CLI's start-up imports this module, and only a live pid needs the second look

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
