"""A process-pool worker exits once serve (its owner) is gone, whoever reaps serve and when."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

OWNER = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pipeline.executors import init_pool_worker

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"), initializer=init_pool_worker,
                               initargs=(os.getpid(),))
    print(pool.submit(os.getpid).result(timeout=120), flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited; its new parent has not reaped it
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("reap_owner", [True, False], ids=["owner-reaped", "owner-left-a-zombie"])
def test_a_pool_worker_exits_when_its_owner_is_killed_outright(tmp_path, reap_owner):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        worker = int(owner.stdout.readline())
        assert psutil.Process(worker).ppid() != owner.pid  # a child of the fork server, not of its owner
        owner.send_signal(signal.SIGKILL)
        if reap_owner:
            owner.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker), "the pool worker outlived its owner"
        if not reap_owner:
            assert psutil.Process(owner.pid).status() == psutil.STATUS_ZOMBIE  # it was a zombie all along
    finally:
        owner.kill()
        owner.wait(timeout=30)
        owner.stdout.close()
