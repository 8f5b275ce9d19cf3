"""The suite's own reaping: a timed-out command dies with its descendants, orphans are adopted and killed."""

import re
import subprocess
import sys

import psutil
import pytest
from leaks import ReapedTimeout, descendants, kill_tree, process_wide_pids, run_reaped

SPAWN_GRANDCHILD = ("import subprocess, sys, time; "
                    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                    "print(p.pid, flush=True); print(p.pid, file=sys.stderr, flush=True); time.sleep(600)")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_tree_kills_the_grandchildren_too():
    child = subprocess.Popen([sys.executable, "-c", SPAWN_GRANDCHILD], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
    finally:
        kill_tree(child.pid)
        child.wait()
        child.stdout.close()
    assert gone(child.pid) and gone(grandchild)


def test_run_reaped_kills_a_command_past_its_budget_and_says_so():
    with pytest.raises(ReapedTimeout, match=r"did not finish within 3 s; killed it and its descendants") as err:
        run_reaped([sys.executable, "-c", SPAWN_GRANDCHILD], 3)
    spawned = [int(pid) for pid in re.findall(r"^(\d+)$", str(err.value), re.M)]  # none if it was slower than 3 s
    assert all(gone(pid) for pid in spawned)
    assert {p.pid for p in descendants()} <= process_wide_pids()


def test_an_orphan_is_adopted_so_the_suite_can_reap_it():
    """The session fixture made pytest a child subreaper: a grandchild whose parent dies becomes our child
    (not pid 1's), which is how the per-test guard finds processes a killed ``serve`` or audit left."""
    child = subprocess.Popen([sys.executable, "-c", SPAWN_GRANDCHILD], stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    child.kill()
    child.wait()
    child.stdout.close()
    try:
        assert psutil.Process(grandchild).ppid() == psutil.Process().pid
    finally:
        kill_tree(grandchild)
