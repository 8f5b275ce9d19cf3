"""Turn one session's DuckDB rows into verdicts: SLA results, outbox.json, the task card.

Everything here reads the recorder; nothing measures. The report notebook
and the batch call these, so the SLA table in the markdown report, the
``sla_result`` rows and ``outbox.json`` all come from the same evaluation.
"""

from __future__ import annotations

import json
import operator
import re
import statistics
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from ..base.harness import percentile
from ..base.recorder import AuditRecorder

ROOT = Path(__file__).resolve().parents[3]
SLA_FILE = ROOT / "docs" / "performance" / "slas.toml"
TASK_ID = "TASK-163P"
_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def load_slas(path: Path = SLA_FILE) -> list[dict[str, Any]]:
    """The SLA definitions (see the comment at the top of the file)."""
    return tomllib.loads(Path(path).read_text())["sla"]


def reduce(values: list[float], stat: str) -> float:
    """Reduce values with median, p95, p99, max, min or mean."""
    if stat in ("p95", "p99"):
        return percentile(values, int(stat[1:]))
    reducers: dict[str, Callable[[list[float]], float]] = {
        "median": statistics.median, "max": max, "min": min, "mean": statistics.fmean}
    return reducers[stat](values)


def select_rows(measurements: pd.DataFrame, sla: dict[str, Any]) -> pd.DataFrame:
    """The measurement rows an SLA speaks of."""
    rows = measurements[(measurements.scenario == sla["scenario"]) & (measurements.metric == sla["metric"])]
    for key, wanted in sla.get("where", {}).items():
        if rows.empty:
            break
        if key == "variant":
            rows = rows[rows.variant == wanted]
        elif key == "largest":
            sizes = rows.tags.map(lambda t, tag=wanted: t.get(tag))
            rows = rows[sizes == sizes.max()]
        else:
            rows = rows[rows.tags.map(lambda t, k=key, w=wanted: t.get(k) == w)]
    return rows


def missing_parts(measurements: pd.DataFrame, sla: dict[str, Any]) -> list[str]:
    """For an SLA over every part of its scenario (``every_part = true``: "lost under any injected fault"), the
    parts that errored or were skipped: then it was not measured, whatever the other parts say."""
    if not sla.get("every_part"):
        return []
    rows = measurements[(measurements.scenario == sla["scenario"]) & measurements.metric.isin(["error", "skipped"])]
    return sorted(set(rows.variant))


def observe(rows: pd.DataFrame, stat: str) -> float | None:
    """The SLA's observed value, or None if no rows."""
    if rows.empty:
        return None
    return reduce(rows.value.tolist(), stat)


def evaluate_slas(recorder: AuditRecorder, session_id: str, slas: list[dict[str, Any]] | None = None,
                  save: bool = True) -> pd.DataFrame:
    """Evaluate every SLA on one session; with ``save``, replace that session's ``sla_result`` rows."""
    measurements = recorder.measurements(session_id=session_id)
    results = []
    for sla in slas or load_slas():
        observed = None if missing_parts(measurements, sla) else observe(select_rows(measurements, sla), sla["stat"])
        passed = None if observed is None else bool(_COMPARE[sla["comparison"]](observed, sla["target"]))
        results.append({"sla": sla["name"], "source": sla["source"], "target": float(sla["target"]),
                        "observed": observed, "unit": sla["unit"], "comparison": sla["comparison"],
                        "passed": passed})
    frame = pd.DataFrame(results)
    if save:
        with recorder.connect() as db:
            db.execute("DELETE FROM sla_result WHERE session_id = ?", [session_id])
        saved = recorder.session_id
        recorder.session_id = session_id
        recorder.record_sla(frame)
        recorder.session_id = saved
    return frame


def sla_table(frame: pd.DataFrame, previous: pd.DataFrame | None = None) -> pd.DataFrame:
    """The report's SLA table: target, observed, margin and verdict (plus the previous session's value)."""
    table = pd.DataFrame({
        "SLA": frame.sla, "source": frame.source,
        "target": [f"{c} {_fmt(t)} {u}" for c, t, u in zip(frame.comparison, frame.target, frame.unit, strict=True)],
        "observed": [("not measured" if pd.isna(o) else f"{_fmt(o)} {u}")
                     for o, u in zip(frame.observed, frame.unit, strict=True)],
        "margin": [_margin(o, t, c) for o, t, c in zip(frame.observed, frame.target, frame.comparison, strict=True)],
        "result": [{True: "PASS", False: "FAIL"}.get(p, "not measured") if not pd.isna(p) else "not measured"
                   for p in frame.passed],
    })
    if previous is not None and not previous.empty:
        before = dict(zip(previous.sla, previous.observed, strict=True))
        table["previous"] = [("-" if pd.isna(before.get(s)) else _fmt(before[s])) for s in frame.sla]
    return table


def _fmt(value: float) -> str:
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _margin(observed: float | None, target: float, comparison: str) -> str:
    if observed is None or pd.isna(observed):
        return ""
    if target == 0:
        return f"{observed - target:+.3g}"
    headroom = (target - observed) / target if comparison.startswith("<") else (observed - target) / target
    return f"{headroom:+.0%}"


def shown_path(path: Path) -> str:
    """``path`` as the report names it: relative to the repository when inside it (``data/audit.duckdb``)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def session_info(recorder: AuditRecorder, session_id: str | None = None) -> dict[str, Any]:
    """The session row (the latest if ``session_id`` is None)."""
    sql = "SELECT * FROM session " + ("WHERE session_id = ?" if session_id else "ORDER BY started_at DESC LIMIT 1")
    frame = recorder.query(sql, [session_id] if session_id else [])
    if frame.empty:
        raise LookupError(f"no audit session {session_id or ''} in {recorder.path}")
    return frame.iloc[0].to_dict()


def previous_session(recorder: AuditRecorder, session_id: str) -> str | None:
    """The latest earlier session of the same profile that ran to its end and has SLA results, if any (an
    interrupted session, even one whose report was drawn by hand, is never the comparison)."""
    frame = recorder.query(
        "SELECT s.session_id FROM session s, session me WHERE me.session_id = ? AND s.profile = me.profile "
        "AND s.started_at < me.started_at AND EXISTS (SELECT 1 FROM sla_result r WHERE r.session_id = s.session_id) "
        "AND EXISTS (SELECT 1 FROM session_end e WHERE e.session_id = s.session_id) "
        "ORDER BY s.started_at DESC LIMIT 1", [session_id])
    return None if frame.empty else str(frame.iloc[0, 0])


def sla_results(recorder: AuditRecorder, session_id: str) -> pd.DataFrame:
    """The stored SLA results of a session."""
    return recorder.query("SELECT * FROM sla_result WHERE session_id = ? ORDER BY rowid", [session_id])


def headline_metrics(recorder: AuditRecorder, session_id: str) -> dict[str, float]:
    """A few numbers for outbox.json: median stage times, 5 MB ingest, concurrency, leak slope, fault totals."""
    m = recorder.measurements(session_id=session_id)
    out: dict[str, float] = {}
    stages = m[(m.scenario == "pipeline_profile") & (m.metric == "stage_seconds")]
    for stage, group in stages.groupby(stages.tags.map(lambda t: t["stage"])):
        out[f"stage_median_s.{stage}"] = round(float(group.value.median()), 6)
    burst = m[(m.scenario == "email_burst") & (m.metric == "trigger_latency_ms")]
    if not burst.empty:
        out["trigger_latency_p99_ms"] = round(reduce(burst.value.tolist(), "p99"), 3)
    concurrency = m[(m.scenario == "concurrency") & (m.metric == "failed_runs")]
    ok = concurrency[concurrency.value == 0].tags.map(lambda t: t["level"])
    if not ok.empty:
        out["max_concurrent_workflows_without_failure"] = float(ok.max())
    leak = m[(m.scenario == "soak") & (m.metric == "leak_traced_bytes_per_run") & (m.variant == "email_digest")]
    if not leak.empty:
        out["leak_traced_bytes_per_run"] = round(float(leak.value.max()), 1)
    faults = m[m.scenario == "faults"]
    for metric, name in (("lost", "faults_lost_messages"), ("duplicated", "faults_duplicated_messages"),
                         ("untyped", "faults_untyped_runs")):
        picked = faults[faults.metric == metric]
        if not picked.empty:
            out[name] = float(picked.value.sum())
    return out | _hostile_headlines(m[m.scenario == "hostile"]) | _scale_out_headlines(m[m.scenario == "scale_out"])


def _hostile_headlines(hostile: pd.DataFrame) -> dict[str, float]:
    """Hostile senders with the switches on: serve's peak RSS under large mails, a normal PDF's latency beside a
    hostile one (both the worst), and the spool and work bytes per 1,000 mails before and after purge."""
    out: dict[str, float] = {}
    after = hostile[hostile.tags.map(lambda t: t.get("mode") in (None, "after"))] if len(hostile) else hostile
    for metric, name in (("serve_peak_rss_mb", "hostile_serve_peak_rss_mb"),
                         ("normal_latency_s", "hostile_normal_pdf_latency_s"),
                         ("bytes_before_purge_per_1000", "spool_bytes_per_1000_mails"),
                         ("bytes_after_purge_per_1000", "spool_bytes_per_1000_mails_after_purge")):
        picked = after[after.metric == metric] if len(after) else after
        if not picked.empty:
            out[name] = round(float(picked.value.max()), 3)
    return out


def _scale_out_headlines(scale: pd.DataFrame) -> dict[str, float]:
    """Scale-out: PostgreSQL's list query and one-per-commit transitions at its largest size, and the CPU-bound
    ingestion speedup of 2 Dask workers over 1."""
    out: dict[str, float] = {}
    if scale.empty:
        return out
    tags = scale.tags
    pg = scale[tags.map(lambda t: t.get("backend") == "postgres" and t.get("stat") == "median")]
    if len(pg):
        largest = pg[pg.tags.map(lambda t: t.get("runs")) == max(t.get("runs", 0) for t in pg.tags)]
        for metric, name in (("list_latest_50_of_workflow", "pg_list_query_median_ms"),
                             ("task_transitions_per_s_one_per_commit", "pg_transitions_per_s_one_per_commit")):
            picked = largest[largest.metric == metric]
            if len(picked):
                out[name] = round(float(picked.value.median()), 3)
    speedup = scale[scale.metric == "speedup_2_vs_1_workers"]
    if len(speedup):
        out["dask_speedup_2_vs_1_workers"] = round(float(speedup.value.median()), 3)
    return out


def deliverables(measured: pd.DataFrame) -> dict[str, bool]:
    """Which of the task card's deliverables this session's rows prove (the card ticks exactly these)."""
    has_variants = bool(len(measured) and (measured.groupby(["scenario", "metric"]).variant.nunique() > 1).any())
    return {"report": True, "stress": True, "slas": True, "optimizations": has_variants,
            "code_quality": bool((measured.scenario == "code_quality").any()) if len(measured) else False}


STATUSES = ("done", "sla_failed", "incomplete")


def task_status(sla_summary: dict[str, int], proven: dict[str, bool]) -> str:
    """``done`` (every deliverable proven, every SLA measured and met), ``incomplete`` (a deliverable not
    proven or an SLA not measured) or ``sla_failed`` (all measured, some SLA missed).

    The outbox and the task card both show this one verdict, so they cannot disagree.
    """
    if not all(proven.values()) or sla_summary["not_measured"]:
        return "incomplete"
    return "sla_failed" if sla_summary["failed"] else "done"


def write_outbox(path: Path, recorder: AuditRecorder, session_id: str, report_path: str,
                 notebooks: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the machine-readable completion report for the session; return it."""
    info = session_info(recorder, session_id)
    slas = sla_results(recorder, session_id)
    measured = slas[slas.passed.notna()]
    summary = {"passed": int(measured.passed.sum()), "failed": int((~measured.passed.astype(bool)).sum()),
               "not_measured": int(slas.passed.isna().sum())}
    proven = deliverables(recorder.measurements(session_id=session_id))
    outbox = {
        "task_id": TASK_ID,
        "status": task_status(summary, proven),
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "report_path": report_path,
        "session_id": session_id,
        "profile": info["profile"],
        "commit": info["git_sha"],
        "commit_dirty": bool(info["git_dirty"]),
        "machine": {"host": info["host"], "cpu": info["cpu"], "cpus": int(info["cpus"]), "python": info["python"]},
        "sla_summary": summary,
        "deliverables": proven,
        "failed_slas": [r.sla for r in measured.itertuples() if not bool(r.passed)],
        "sla_results": [{"sla": r.sla, "source": r.source, "target": r.target, "comparison": r.comparison,
                         "observed": None if pd.isna(r.observed) else float(r.observed), "unit": r.unit,
                         "passed": None if pd.isna(r.passed) else bool(r.passed)} for r in slas.itertuples()],
        "headline_metrics": headline_metrics(recorder, session_id),
        "notebooks": notebooks,
    }
    Path(path).write_text(json.dumps(outbox, indent=2) + "\n")
    return outbox


def update_task_card(path: Path, outbox: dict[str, Any]) -> None:
    """Rewrite the status block of TASK-163P in TASK_CARDS.md from this session's outbox (nothing else).

    A missing file starts from the repository's TASK_CARDS.md.
    """
    text = Path(path).read_text() if Path(path).exists() else (ROOT / "TASK_CARDS.md").read_text()
    summary = outbox["sla_summary"]
    failed = "".join(f"\n- SLA failed: {name}" for name in outbox.get("failed_slas", []))
    status = (f"<!-- status:begin -->\n**Status:** `{outbox['status']}` "
              f"(last verified by audit session `{outbox['session_id']}`, profile `{outbox['profile']}`, "
              f"commit `{outbox['commit'][:12]}`, {outbox['completed_at']}; SLAs: {summary['passed']} passed, "
              f"{summary['failed']} failed, {summary['not_measured']} not measured; the same status as outbox.json)"
              f"{failed}\n<!-- status:end -->")
    text = re.sub(r"<!-- status:begin -->.*?<!-- status:end -->", status, text, flags=re.S)
    for key, done in outbox["deliverables"].items():
        mark = "x" if done else " "
        text = re.sub(rf"- \[[ x]\] (.*)<!-- {re.escape(key)} -->", rf"- [{mark}] \1<!-- {key} -->", text)
    Path(path).write_text(text)
