"""Accepting mail before processing it: serve's engine at a lower CPU priority than its gateway (issue 17).

A sender waits for the gateway's reply to each SMTP command; the engine's
work (parse, extract, digest, deliver) can wait a few milliseconds without
anyone noticing. With the gateway in its own process, the scheduler can tell
them apart: ``lower_priority`` raises the nice value of serve's engine
(every thread of this process but the ones kept, which spawn and supervise the
gateway process) and of its extraction workers (every thread of each), so on a
busy machine the gateway runs first and the engine takes the CPU it leaves.

Linux keeps a nice value per thread; threads and processes started later
inherit their creator's, so the engine's new threads and restarted workers
stay lower too, and a gateway process restarted by the (kept) supervising
thread starts at serve's original priority. Raising a nice value needs no
privilege; only lowering it again would, so this is one-way. On a system
without per-thread priorities (not Linux) the whole process is reniced,
which the gateway process then inherits when it restarts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import psutil

log = logging.getLogger(__name__)


def lower_priority(nice: int, keep_threads: Iterable[int] = (), keep_pids: Iterable[int] = ()) -> int:
    """Add ``nice`` to the nice value of this process's threads and of its descendants (but those kept);
    return how many threads were changed. ``keep_threads`` are native thread ids of this process,
    ``keep_pids`` processes left as they are (the gateway process).

    A thread or process that is gone by the time it is reached is skipped; one the OS refuses is logged.
    """
    if nice <= 0:
        return 0
    keep = set(keep_threads)
    tids = _threads(os.getpid())
    if tids is None:  # no per-thread priorities here: the process as a whole
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)
        return 1
    changed = _renice(tids - keep, nice)
    kept = set(keep_pids)
    for child in psutil.Process().children(recursive=True):
        if child.pid not in kept and child.ppid() not in kept:
            changed += _renice(_threads(child.pid) or {child.pid}, nice)
    return changed


def _threads(pid: int) -> set[int] | None:
    """Native ids of ``pid``'s threads (empty once it is gone); None where the OS does not list them."""
    try:
        return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}
    except FileNotFoundError:
        return set() if os.path.isdir("/proc/self/task") else None


def _renice(tids: Iterable[int], nice: int) -> int:
    changed = 0
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
            changed += 1
        except ProcessLookupError:  # ended meanwhile
            continue
        except OSError as exc:
            log.warning("could not lower the CPU priority of thread %d: %s", tid, exc)
    return changed
