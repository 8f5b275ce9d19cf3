"""Code-quality audit from tool output: ruff, mypy, coverage, and two AST surveys of ``pipeline/``.

The surveys read the source rather than trusting prose: which typed errors each module raises (and
so what a user can see from each component), and every logging call with its level and whether an
INFO line names the run it is about.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from ... import errors
from ..base.harness import row
from ..reporting.report import ROOT

PACKAGE = ROOT / "pipeline"
# What each component turns an error into, at the edge where a user meets it (STYLE.md section 3).
SURFACES = {
    "gateway": "SMTP reply: 550 recipient refused, 552 too large, 451 storage failure (sender retries)",
    "cli": "one line on stderr, exit code 2 (a failed run: exit code 1 from `ingest`)",
    "runner": "task state failed/retrying with error type (= reason) and message in the run store",
    "engine": "run state failed with its reason in the run store; UnknownWorkflowError to the caller",
    "sqlite_store": "StoreError subclass to the caller; never a silent reset",
    "stages": "raised inside a task: recorded by the runner as that task's error",
    "config": "ConfigurationError at start-up, before anything runs",
}
# the settings modules config.py re-exports from
SURFACES.update(dict.fromkeys(("addresses", "settings_file", "serve_config"), SURFACES["config"]))


def tool_counts() -> list[dict[str, Any]]:
    """ruff findings by rule and mypy errors on pipeline/ (rows)."""
    rows = []
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "pipeline", "--output-format", "json", "--exit-zero"],
                          cwd=ROOT, capture_output=True, text=True)
    if ruff.returncode != 0:
        raise RuntimeError(f"ruff did not run (exit {ruff.returncode}): {ruff.stderr[-500:]}")
    findings = json.loads(ruff.stdout)
    rows.append(row("baseline", "ruff_findings", len(findings), "count", 0, tool="ruff"))
    by_rule: dict[str, int] = {}
    for f in findings:
        by_rule[f["code"]] = by_rule.get(f["code"], 0) + 1
    rows += [row("baseline", "ruff_findings_by_rule", n, "count", 0, tool="ruff", rule=rule)
             for rule, n in sorted(by_rule.items())]
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: a shared one can hide errors
        mypy = subprocess.run([sys.executable, "-m", "mypy", "pipeline", "--no-error-summary", "--no-color-output",
                               "--cache-dir", cache],
                              cwd=ROOT, capture_output=True, text=True)
    errors_found = [line for line in mypy.stdout.splitlines() if ": error:" in line]
    if mypy.returncode not in (0, 1) or (mypy.returncode == 1) != bool(errors_found):
        raise RuntimeError(f"mypy did not run cleanly (exit {mypy.returncode}): {(mypy.stderr or mypy.stdout)[-500:]}")
    rows.append(row("baseline", "mypy_errors", len(errors_found), "count", 0, tool="mypy"))
    return rows


def coverage(test_args: tuple[str, ...] = ("-m", "not slow")) -> list[dict[str, Any]]:
    """Line coverage of pipeline/ by the test suite (fast tests by default)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "coverage.json"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--cov=pipeline",
                        f"--cov-report=json:{report}", *test_args], cwd=ROOT, capture_output=True, text=True)
        if not report.exists():
            return []
        totals = json.loads(report.read_text())["totals"]
    return [row("baseline", "line_coverage_percent", totals["percent_covered"], "%", 0, tool="coverage",
                scope=" ".join(test_args))]


def error_handling_table() -> pd.DataFrame:
    """Per module: the typed errors it raises, their reasons, retryability, and what the user sees."""
    classes = {name: cls for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, errors.PipelineError)}
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "audit":
            continue
        raised = sorted({_raised_name(node) for node in ast.walk(ast.parse(path.read_text()))
                         if isinstance(node, ast.Raise) and _raised_name(node) in classes})
        if not raised:
            continue
        component = rel.parts[0] if rel.parts[0] == "stages" else rel.stem
        out.append({"module": str(rel), "raises": ", ".join(raised),
                    "reasons": ", ".join(sorted({classes[n].reason for n in raised})),
                    "retried": ", ".join(sorted({n for n in raised if getattr(classes[n], "retryable", True)})) or "-",
                    "user sees": SURFACES.get(component, "propagates to the caller")})
    return pd.DataFrame(out)


def _raised_name(node: ast.Raise) -> str:
    exc = node.exc
    if isinstance(exc, ast.Call):
        exc = exc.func
    if isinstance(exc, ast.Attribute):
        return exc.attr
    return exc.id if isinstance(exc, ast.Name) else ""


def logging_survey() -> pd.DataFrame:
    """Every log call in pipeline/ (not audit): level, whether it names a run, whether it may log content."""
    out = []
    content = re.compile(r"\b(raw|body|payload|content|text|password)\b")
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "audit":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"):
                continue
            args = [ast.unparse(a) for a in node.args]
            message = args[0] if args else ""
            out.append({"module": str(rel), "line": node.lineno, "level": node.func.attr, "message": message[:90],
                        "names_run": bool(re.search(r"\brun\b", message.lower())),
                        "may_log_content": any(content.search(a) for a in args[1:])})
    return pd.DataFrame(out)


COVERAGE_ELSEWHERE = ("not measured in this profile (the fast tests under coverage take 6-11 min on 2 cores): "
                      "`python scripts/run_audit.py --profile full`, or `pytest -m 'not slow' --cov=pipeline`")


def audit_code_quality(with_coverage: bool = True) -> pd.DataFrame:
    """All code-quality rows for the recorder (tables from the surveys are summarised as counts). Without
    coverage a row says where to get it: a code-quality figure, not one of the audit's performance figures."""
    rows = tool_counts() + (coverage() if with_coverage else [
        row("baseline", "line_coverage_percent", float("nan"), "%", 0, tool="coverage", rule=COVERAGE_ELSEWHERE)])
    logs = logging_survey()
    rows.append(row("baseline", "log_calls", len(logs), "count", 0, tool="ast"))
    rows.append(row("baseline", "log_calls_possibly_logging_content", int(logs.may_log_content.sum()), "count", 0,
                    tool="ast"))
    info = logs[logs.level == "info"]
    rows.append(row("baseline", "info_log_calls_without_run_id", int((~info.names_run).sum()), "count", 0, tool="ast"))
    for entry in error_handling_table().to_dict("records"):
        rows.append(row("baseline", "error_handling_entry", len(entry["raises"].split(", ")), "classes", 0,
                        tool="ast", **entry))
    return pd.DataFrame(rows)
