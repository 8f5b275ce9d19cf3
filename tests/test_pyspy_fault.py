"""py-spy that cannot attach: the profile records why and goes on (pipeline/audit/scenarios/pipeline_profile.py)."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.audit.scenarios import pipeline_profile


@pytest.fixture
def not_python():
    """A live process py-spy cannot profile (no Python interpreter in it)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


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

