"""py-spy in the profile: its window spans the block it records, and a process it cannot attach to gives a row
with the reason (pipeline/audit/scenarios/pipeline_profile.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.audit.scenarios import pipeline_profile


def _running(argv: list[str]):
    """Run ``argv`` for the test; yield its pid, then kill and reap it."""
    proc = subprocess.Popen(argv)
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def not_python():
    """A live process py-spy cannot profile (no Python interpreter in it)."""
    yield from _running(["sleep", "60"])


def test_a_process_pyspy_cannot_attach_to_gives_a_row_with_the_reason(not_python, tmp_path):
    if pipeline_profile.pyspy_path() is None:
        pytest.skip("py-spy is not installed (the dev extra installs it)")
    with pipeline_profile.pyspy_recording(not_python, tmp_path / "spy", 1, 20) as status:
        pass
    assert status["recorded"] is False
    assert "speedscope: exit" in status["reason"] and "flamegraph: exit" in status["reason"]
    [row] = pipeline_profile.pyspy_rows(status, {}, not_python, top=5)
    assert row["metric"] == "pyspy_recorded" and row["value"] == 0.0
    assert row["tags"]["reason"] == status["reason"] and row["tags"]["flamegraph"] == ""



@pytest.fixture
def busy_python():
    """A Python process that keeps a core busy, for py-spy to sample."""
    yield from _running([sys.executable, "-c", "while True: sum(range(1000))"])


def test_the_window_closes_when_the_block_ends_not_at_the_cap(busy_python, tmp_path):
    if pipeline_profile.pyspy_path() is None:
        pytest.skip("py-spy is not installed (the dev extra installs it)")
    started = time.monotonic()
    with pipeline_profile.pyspy_recording(busy_python, tmp_path / "spy", 120, 50) as status:
        attached = time.monotonic() - started
        time.sleep(1.0)  # the load
    # the load starts when py-spy says it samples (on its stdout), not after the wait for that runs out
    assert attached < pipeline_profile.PYSPY_ATTACH_S
    assert status["recorded"] is True, status["reason"]
    assert time.monotonic() - started < 60  # stopped by SIGINT at the block's end, not after 120 s
    assert 1.0 <= status["duration_s"] < 60
    assert status["flamegraph"].stat().st_size > 0
    profile = pipeline_profile.parse_speedscope(status["speedscope"], {}, busy_python)
    assert not profile.empty
