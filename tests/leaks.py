"""What a test can leave behind (listening sockets, open file descriptors, processes) and how to reap it."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterable

import psutil

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def listening_sockets() -> set:
    return {c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point at, less the extraction workers' pipes
    (the worker pool keeps those open between documents on purpose)."""
    from pipeline.stages.extract_worker import pool_pipe_fds

    held = pool_pipe_fds()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile, or the directory listing's own descriptor
            continue
    return {fd: target for fd, target in fds.items() if fd not in held}


# files a library keeps open for the life of the process by design: libuuid's clock (uuid.uuid1(), which Dask
# uses for client ids, opens it once when Debian's uuid-runtime is installed, and never closes it)
PROCESS_LIFETIME_FILES = frozenset({"/var/lib/libuuid/clock.txt"})


def fds_opened_since(before: dict[int, str]) -> dict[int, str]:
    """Descriptors open now that were not open (to the same thing) at ``before``."""
    def opened_now() -> dict[int, str]:
        return {fd: target for fd, target in open_fds().items()
                if before.get(fd) != target and target not in PROCESS_LIFETIME_FILES}

    opened = opened_now()
    if opened:  # an unreachable object's descriptor is closed by its finalizer, not leaked: collect, look again
        gc.collect()  # only then: a full collection costs ~0.1 s once the audit's libraries are imported
        opened = opened_now()
    return opened


def become_subreaper() -> None:
    """Adopt orphaned descendants (Linux): a grandchild whose parent died (a killed ``serve``'s extraction
    workers, a timed-out audit's forkserver workers) is re-parented to this process instead of pid 1, so
    ``descendants()`` still finds it and it can be killed and reaped."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


SESSION_SERVERS: list = []  # TemporaryPostgres instances of this session (their processes are not leaks)


def in_session_server(proc: psutil.Process) -> bool:
    """True when ``proc`` is a session server's postmaster or one of its backends (pg_ctl adopts them to us)."""
    roots = {server.pid for server in SESSION_SERVERS} - {None}
    if not roots:
        return False
    try:
        return proc.pid in roots or any(parent.pid in roots for parent in proc.parents())
    except psutil.Error:
        return False


def process_wide_pids() -> set[int]:
    """Processes that live for the whole test process by design: multiprocessing's forkserver and resource
    tracker, and the extraction pool's workers (``pool_for`` keeps them between documents)."""
    from multiprocessing import forkserver, resource_tracker

    pids = {forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid}
    for child in descendants():
        try:
            if child.ppid() == os.getpid() and "pipeline.stages.extract_worker" in child.cmdline():
                pids.add(child.pid)
            elif in_session_server(child):  # the session's PostgreSQL server and its backends
                pids.add(child.pid)
        except psutil.Error:
            continue
    return {pid for pid in pids if pid}


def descendants() -> list[psutil.Process]:
    """Every process below this one that has not exited (zombies are left to ``reap_zombies``)."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            continue
    return alive


def describe(procs: Iterable[psutil.Process]) -> list[str]:
    """``pid: command line`` of each process still there (for a failure message)."""
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid}: {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            continue
    return out


def kill_and_wait(procs: list[psutil.Process], timeout_s: float = 10.0) -> None:
    """SIGKILL every process and wait for it (our own children are reaped by the wait)."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=timeout_s)


def kill_tree(pid: int, timeout_s: float = 10.0) -> None:
    """Kill ``pid`` and everything below it, listed before the kill (afterwards the orphans move away)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    kill_and_wait(tree, timeout_s)


def reap_zombies() -> None:
    """Collect exited children nobody waits for (orphans adopted by ``become_subreaper``)."""
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            continue


class ReapedTimeout(AssertionError):
    """A command run by ``run_reaped`` outlived its budget; it and its descendants were killed."""


def run_reaped(cmd: list[str], timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``, but on a timeout or any exception (pytest-timeout's
    SIGALRM, Ctrl-C) the command's whole process tree is killed and reaped, not only the command itself.

    Raises ReapedTimeout (with the tail of stderr) when ``timeout_s`` passes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException as exc:
        kill_tree(proc.pid)
        try:  # the tree is dead, so the pipes reach EOF; bounded all the same
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            err = ""
        finally:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise ReapedTimeout(f"{' '.join(cmd[:4])} ... did not finish within {timeout_s:.0f} s; "
                                f"killed it and its descendants. Last stderr:\n{(err or '')[-3000:]}") from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
