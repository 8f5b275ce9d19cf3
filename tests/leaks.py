"""What a test can leave behind: listening sockets and open file descriptors."""

from __future__ import annotations

import gc
import os


def listening_sockets() -> set:
    import psutil

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


def fds_opened_since(before: dict[int, str]) -> dict[int, str]:
    """Descriptors open now that were not open (to the same thing) at ``before``."""
    gc.collect()  # an unreachable object's descriptor is closed by its finalizer, not leaked
    return {fd: target for fd, target in open_fds().items() if before.get(fd) != target}
