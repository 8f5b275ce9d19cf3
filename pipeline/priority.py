"""Accepting mail before processing it: serve's engine at a lower CPU priority than its gateway (issue 17).

Two knobs, both Linux only. ``lower_priority`` ranks the engine below the
gateway (how much CPU each gets when both want it); ``request_slice`` asks the
scheduler for short slices in the gateway process (how soon it runs when it
wakes: a reply to a sender must not wait for a running engine thread's slice to
end).

A sender waits for the gateway's reply to each SMTP command; the engine's
work (parse, extract, digest, deliver) can wait a few milliseconds without
anyone noticing. With the gateway in its own process, the scheduler can tell
them apart: ``lower_priority`` adds to the nice value of serve's engine
(every thread of this process but the ones kept, which start and supervise the
gateway process) and of its extraction workers (every thread of each), so on a
busy machine the gateway runs first and the engine takes the CPU it leaves.

Linux keeps a nice value per thread; threads and processes started later
inherit their creator's, so the engine's new threads and restarted workers
stay lower too, and a gateway process restarted by the (kept) supervising
thread starts at serve's own priority. Nice values rank threads within one
scheduling autogroup (one per session where the kernel enables them), which
is why the extraction workers stay in serve's session. Raising a nice value
needs no privilege; lowering it again would, so this is one-way. Elsewhere
than Linux a nice value is per process and the gateway process would inherit
the engine's when restarted, so there the setting does nothing (and says so).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import struct
import sys
from collections.abc import Iterable

import psutil

log = logging.getLogger(__name__)
MAX_NICE = 19
# sched_setattr / sched_getattr, which the os module does not wrap (it has sched_setscheduler, without a slice)
SCHED_ATTR_CALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
SCHED_ATTR = struct.Struct("IIQiIQQQ")  # struct sched_attr as first defined (48 bytes): size, policy, flags,
#                                         nice, priority, runtime (the slice, ns), deadline, period
PASSES = 5  # threads and workers started while we renice are caught by the next pass


def lower_priority(nice: int, keep_threads: Iterable[int] = (), keep_pids: Iterable[int] = ()) -> int:
    """Put this process's threads and its descendants' threads, but those kept, ``nice`` steps below the
    calling thread's priority; return how many threads were looked at (0 where this cannot be done per
    thread). A thread already that low (one started by a changed thread) is left as it is.

    ``keep_threads`` are native thread ids of this process, ``keep_pids`` processes left as they are with
    their descendants (the gateway process). Passes repeat until one finds nothing new, so a thread or
    worker started meanwhile (at the old priority, by a thread not yet changed) is changed too. A thread
    that ends meanwhile is skipped; one the OS refuses is logged and left.
    """
    if nice <= 0:
        return 0
    if not sys.platform.startswith("linux"):
        log.warning("[serve] engine_nice works on Linux only (per-thread nice values): left as it is")
        return 0
    target = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, 0) + nice)  # this thread: not changed yet
    kept_threads, kept_pids = set(keep_threads), set(keep_pids)
    done: set[int] = set()
    for _ in range(PASSES):
        todo = _threads(os.getpid()) - kept_threads - done
        for child in _descendants(kept_pids):
            todo |= _threads(child) - done
        if not todo:
            break
        for tid in todo:
            _renice(tid, target)
        done |= todo
    return len(done)


def _descendants(kept: set[int]) -> list[int]:
    """Pids of this process's descendants outside the kept processes' subtrees (gone ones skipped)."""
    found = []
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        try:
            if child.pid not in kept and not kept & {p.pid for p in child.parents()}:
                found.append(child.pid)
        except psutil.Error:  # ended meanwhile
            continue
    return found


def _threads(pid: int) -> set[int]:
    """Native ids of ``pid``'s threads (empty once it is gone)."""
    try:
        return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def _renice(tid: int, target: int) -> None:
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except ProcessLookupError:  # ended meanwhile
        return
    except OSError as exc:
        log.warning("could not lower the CPU priority of thread %d: %s", tid, exc)


def request_slice(slice_us: int) -> int:
    """Ask Linux for ``slice_us`` µs scheduler slices for every thread of this process; return how many threads
    took it (0 where it cannot be done, which is logged, never raised).

    Since Linux 6.12 the EEVDF scheduler takes a fair task's ``sched_runtime`` as the slice it asks for: a
    shorter slice gives an earlier deadline, so a waking thread preempts a running one with a longer slice
    instead of waiting for that slice to end. Weights (nice values) are unchanged: the thread gets no more
    CPU, only sooner. Threads started later inherit the slice. An older kernel takes the call and ignores
    the slice, which the read-back shows.
    """
    calls = SCHED_ATTR_CALLS.get(platform.machine())
    if slice_us <= 0:
        return 0
    if not sys.platform.startswith("linux") or calls is None:
        log.info("[serve] gateway_slice_us works on Linux (x86_64, aarch64) only: left as it is")
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    done = 0
    for tid in _threads(os.getpid()):
        try:
            _set_runtime(libc, calls, tid, slice_us * 1000)
        except ProcessLookupError:  # ended meanwhile
            continue
        except OSError as exc:
            log.warning("could not ask for %d µs scheduler slices for thread %d: %s", slice_us, tid, exc)
            return done
        done += 1
    if done and _runtime(libc, calls, os.getpid()) != slice_us * 1000:
        log.info("this kernel (%s) ignores slice requests ([serve] gateway_slice_us): left as it is",
                 platform.release())
        return 0
    return done


def _set_runtime(libc: ctypes.CDLL, calls: tuple[int, int], tid: int, runtime_ns: int) -> None:
    """sched_setattr keeping the thread's policy and nice value, with ``runtime_ns`` as its slice."""
    attr = SCHED_ATTR.pack(SCHED_ATTR.size, os.sched_getscheduler(tid), 0, os.getpriority(os.PRIO_PROCESS, tid),
                           0, runtime_ns, 0, 0)
    if libc.syscall(calls[0], tid, ctypes.create_string_buffer(attr, SCHED_ATTR.size), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _runtime(libc: ctypes.CDLL, calls: tuple[int, int], tid: int) -> int:
    """The slice (ns) sched_getattr reports for ``tid``; -1 if it cannot say."""
    buf = ctypes.create_string_buffer(SCHED_ATTR.size)
    if libc.syscall(calls[1], tid, buf, SCHED_ATTR.size, 0) != 0:
        return -1
    return int(SCHED_ATTR.unpack(buf.raw)[5])
