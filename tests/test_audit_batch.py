"""`scripts/run_audit.py --profile quick` end to end in a temp dir: notebooks, report, SLAs, outbox, card."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import jupytext
import pandas as pd
import pytest

from pipeline.audit.batch import PROFILES, REPORT_NOTEBOOK, AuditBatchError, _execute
from pipeline.audit.recorder import AuditRecorder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    cmd = [sys.executable, "scripts/run_audit.py", "--profile", "quick", "--data-dir", str(out / "data"),
           "--report-dir", str(out / "report"), "--outbox", str(out / "outbox.json"),
           "--task-cards", str(out / "TASK_CARDS.md")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "outbox.json").read_text())


def test_every_notebook_executed(quick_audit):
    out, outbox = quick_audit
    names = [n["notebook"] for n in outbox["notebooks"]]
    assert names == [*PROFILES["quick"], REPORT_NOTEBOOK]
    for entry in outbox["notebooks"]:
        assert (out / "data" / "audit-runs" / outbox["session_id"] / f"{entry['notebook']}.ipynb").exists()


def test_report_and_its_charts_exist(quick_audit):
    out, _ = quick_audit
    report = (out / "report" / "PERFORMANCE_AUDIT_SPRINT4.md").read_text()
    charts = re.findall(r"!\[png\]\((PERFORMANCE_AUDIT_SPRINT4_files/[^)]+\.png)\)", report)
    assert len(charts) >= 5 and all((out / "report" / c).stat().st_size > 1000 for c in charts)
    for section in ["## 1. Summary", "## 2. Pipeline profile", "## 3. Memory", "## 4. Stress", "## 5. Limits",
                    "## 6. DAGRunStore", "## 9. Baselines", "## 10. How to reproduce", "**Bottleneck:"]:
        assert section in report
    assert "import " not in report  # code is hidden


def test_report_sla_rows_match_duckdb(quick_audit):
    out, outbox = quick_audit
    report = (out / "report" / "PERFORMANCE_AUDIT_SPRINT4.md").read_text()
    table = report.split("## 1. Summary")[1].split("##")[0]
    shown = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] != "SLA" and not cells[0].startswith(":-"):
            shown[cells[0]] = cells[5]
    stored = AuditRecorder(out / "data" / "audit.duckdb").query(
        "SELECT sla, passed FROM sla_result WHERE session_id = ?", [outbox["session_id"]])
    assert len(stored) == len(shown) > 5
    for sla, passed in zip(stored.sla, stored.passed, strict=True):
        expected = "not measured" if pd.isna(passed) else ("PASS" if passed else "FAIL")
        assert shown[sla] == expected, sla
    assert {r["sla"]: r["passed"] for r in outbox["sla_results"]} == \
        {s: (None if pd.isna(p) else bool(p)) for s, p in zip(stored.sla, stored.passed, strict=True)}


def test_outbox_validates_against_its_schema(quick_audit):
    _, outbox = quick_audit
    schema = json.loads((ROOT / "docs" / "performance" / "outbox.schema.json").read_text())
    jsonschema.validate(outbox, schema)
    assert outbox["profile"] == "quick" and outbox["headline_metrics"]


def test_task_card_names_the_session(quick_audit):
    out, outbox = quick_audit
    card = (out / "TASK_CARDS.md").read_text()
    assert f"audit session `{outbox['session_id']}`" in card
    assert "- [x] Performance audit report" in card


def test_failing_notebook_names_notebook_and_cell(tmp_path):
    source = tmp_path / "broken.py"
    source.write_text('# %% tags=["parameters"]\nx = 1\n\n# %%\ny = x + 1\n\n# %%\nraise ValueError("boom")\n')
    recorder = AuditRecorder(tmp_path / "a.duckdb")
    recorder.start_session("test")
    with pytest.raises(AuditBatchError, match=r"broken.py failed at cell .*ValueError: boom") as err:
        _execute(source, tmp_path / "run", {"x": 2}, 60, recorder)
    partial = tmp_path / "run" / "broken.ipynb"
    assert partial.exists() and str(partial) in str(err.value)


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.py")), ids=lambda p: p.name)
def test_notebooks_are_thin_with_a_parameters_cell(path):
    nb = jupytext.read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(len(c.source.splitlines()) <= 40 for c in code)  # logic belongs in pipeline.audit
    assert not any(c.get("outputs") for c in code)


def test_report_only_redraws_the_same_session_without_measuring(quick_audit):
    out, outbox = quick_audit
    db = out / "data" / "audit.duckdb"
    before = AuditRecorder(db).query("SELECT count(*) AS n FROM measurement").n.item()
    cmd = [sys.executable, "scripts/run_audit.py", "--report-only", outbox["session_id"], "--data-dir",
           str(out / "data"), "--report-dir", str(out / "redrawn")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    redrawn = (out / "redrawn" / "PERFORMANCE_AUDIT_SPRINT4.md").read_text()
    assert f"Session `{outbox['session_id']}`" in redrawn
    assert AuditRecorder(db).query("SELECT count(*) AS n FROM measurement").n.item() == before
    missing = subprocess.run([*cmd[:3], "no-such-session", *cmd[4:]], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert missing.returncode == 1 and "no session 'no-such-session'" in missing.stderr
