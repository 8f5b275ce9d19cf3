"""The hostile-sender audit (notebook 10) at tiny sizes, against a real `python -m pipeline serve`.

These tests check the measuring machinery and the shape of its records, on whatever the server does today:
the figures themselves (421 beyond the limit, RSS, fair extraction, purge) are judged by the SLAs when the
audit runs. Only what holds before and after issue 11 is asserted about the server.
"""

from collections import Counter

import pandas as pd
import pytest

from pipeline.audit.base.harness import row
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.reporting import hostileviews
from pipeline.audit.scenarios import hostile_senders


def _by_metric(rows, variant):
    found: dict[str, list[dict]] = {}
    for r in rows:
        if r["variant"] == variant:
            found.setdefault(r["metric"], []).append(r)
    return found


def test_sessions_measures_each_level_the_normal_client_and_the_refusal_log(tmp_path):
    limit, extra, sends = 6, 4, 3
    rows = hostile_senders.sessions(tmp_path, limit=limit, extra=extra, sends=sends, release=2, churn=20)
    assert "error" not in _by_metric(rows, "sessions")
    idle = Counter()
    for r in rows:
        if r["metric"] == "idle_replies":
            idle[r["tags"]["level"]] += r["value"]
    assert dict(idle) == {limit // 2: limit // 2, limit: limit, limit + extra: limit + extra}  # level 0 opens none
    normal = Counter()
    for r in rows:
        if r["metric"] == "normal_replies":
            normal[(r["tags"]["level"], r["tags"]["phase"])] += r["value"]
    assert set(normal) == {(0, "held"), (3, "held"), (limit, "held"), (limit + extra, "held"),
                           (limit, "after_release"), (limit + extra, "after_release")}
    assert all(n == sends for n in normal.values())
    metrics = _by_metric(rows, "sessions")
    assert {r["tags"]["level"] for r in metrics["over_limit_accepted"]} == {0, 3, limit, limit + extra}
    assert all(r["value"] == 0 for r in metrics["under_limit_refused"])  # a slot within the limit is never refused
    assert [r["value"] for r in metrics["normal_through_after_release"]] == [1.0, 1.0]
    held = {r["tags"]["level"]: r["value"] for r in metrics["serve_connections"]}
    assert held[limit] >= limit and held[limit + extra] >= limit  # found in serve's gateway process too
    below = [r for r in metrics["normal_latency_ms"] if r["tags"]["level"] < limit]
    assert len(below) == 2 * sends and all(r["value"] > 0 for r in below)  # below the limit every send got 250
    assert sum(r["value"] for r in metrics["churn_replies"]) == 20
    assert metrics["tracebacks_logged"][0]["tags"]["phase"] == "churn"
    assert metrics["tracebacks_logged"][0]["value"] == 0  # refusals are rate-limited lines, never tracebacks
    assert metrics["log_bytes"][0]["value"] < 5000  # 20 refusals: a line or two, not a line each


def test_memory_samples_serve_and_workers_in_both_modes(tmp_path):
    rows = hostile_senders.memory(tmp_path, mails=2, mail_mb=1.5, reps=1, timeout_s=240)
    metrics = _by_metric(rows, "memory")
    assert "error" not in metrics
    peaks = {r["tags"]["mode"]: r["value"] for r in metrics["serve_peak_rss_mb"]}
    idle = {r["tags"]["mode"]: r["value"] for r in metrics["serve_idle_rss_mb"]}
    assert set(peaks) == {"before", "after"} and all(peaks[m] >= idle[m] > 10 for m in peaks)
    assert all(r["value"] > 0 for r in metrics["workers_peak_rss_mb"])  # extraction workers were sampled too
    assert [r["value"] for r in metrics["accepted"]] == [2, 2]
    assert [r["value"] for r in metrics["runs_not_succeeded"]] == [0, 0]
    assert all(r["tags"]["nominal_mb"] == 1.5 and r["tags"]["mail_mb"] > 1 for r in metrics["accepted"])


def test_head_of_line_times_the_normal_pdf_beside_the_hostile_one_in_both_modes(tmp_path):
    rows = hostile_senders.head_of_line(tmp_path, timeout_s=3.0, slow_pages=2, gap_s=0.5, reps=1, wait_s=240)
    metrics = _by_metric(rows, "head_of_line")
    assert "error" not in metrics
    assert {r["tags"]["mode"]: r["value"] for r in metrics["normal_run_succeeded"]} == {"before": 1.0, "after": 1.0}
    assert {r["tags"]["mode"] for r in metrics["normal_latency_s"]} == {"before", "after"}
    assert all(r["value"] > 0 for r in metrics["normal_latency_s"])
    for r in metrics["hostile_run_succeeded"]:  # the hostile run ended, either way, with its outcome named
        assert r["tags"]["state"] in ("success", "failed") and r["tags"]["replies"] == "hostile 250, normal 250"
    left = {r["tags"]["mode"]: r["value"] for r in metrics["hostile_text_left_bytes"]}
    failed = {r["tags"]["mode"]: r["value"] for r in metrics["hostile_pdf_failed"]}
    assert len(left) == 2
    if failed["after"]:  # fair extraction deletes a failed document's partial text
        assert left["after"] == 0
    assert {r["tags"]["mode"] for r in metrics["hostile_pdf_failed"]} == {"before", "after"}


def test_head_of_line_many_times_the_normal_pdf_after_a_mail_of_several_hostile_ones_in_both_modes(tmp_path):
    rows = hostile_senders.head_of_line_many(tmp_path, pdfs=3, timeout_s=1.0, slow_pages=20, gap_s=0.5, wait_s=240)
    metrics = _by_metric(rows, "head_of_line_many")
    assert "error" not in metrics and "head_of_line" not in {r["variant"] for r in rows}
    assert {r["tags"]["mode"]: r["value"] for r in metrics["normal_run_succeeded"]} == {"before": 1.0, "after": 1.0}
    assert {r["tags"]["mode"] for r in metrics["normal_latency_s"]} == {"before", "after"}
    assert {r["tags"]["hostile_pdfs"] for r in rows} == {3}
    assert {r["tags"]["mode"]: r["value"] for r in metrics["hostile_pdf_failed"]} == {"before": 1.0, "after": 1.0}


def test_mail_budget_leaves_pdfs_unread_only_with_the_budget_set(tmp_path):
    rows = hostile_senders.mail_budget(tmp_path, pdfs=6, timeout_s=1.0, mail_timeout_s=2.0, slow_pages=20, gap_s=0.5,
                                       wait_s=240)
    metrics = _by_metric(rows, "mail_budget")
    assert "error" not in metrics
    unread = {r["tags"]["mode"]: r["value"] for r in metrics["hostile_pdfs_cut_by_the_mail_budget"]}
    assert unread["before"] == 0 and unread["after"] >= 1  # 6 PDFs of 1 s each against a budget of 2 s in all
    assert {r["tags"]["mode"]: r["value"] for r in metrics["normal_run_succeeded"]} == {"before": 1.0, "after": 1.0}
    assert {r["tags"]["mail_timeout_s"] for r in rows if r["tags"]["mode"] == "after"} == {2.0}


def test_spool_lifecycle_runs_the_real_purge_and_restart(tmp_path):
    rows = hostile_senders.spool_lifecycle(tmp_path, mails=6, senders=2, timeout_s=240)
    metrics = _by_metric(rows, "spool")
    assert "error" not in metrics
    assert metrics["purge_exit_code"][0]["value"] == 0, metrics["purge_exit_code"][0]["tags"]["output"]
    assert metrics["runs_purged"][0]["value"] == 6
    assert metrics["bytes_before_purge_per_1000"][0]["value"] > 0
    for name in ("bytes_after_purge", "freed_measured", "runs_recreated_after_restart",
                 "digests_resent_after_restart", "run_ids_reused", "stale_temp_files_left"):
        assert len(metrics[name]) == 1 and metrics[name][0]["tags"]["acked"] == 6, name
    assert metrics["freed_measured"][0]["value"] > 0
    for name in ("bytes_after_purge", "runs_recreated_after_restart", "digests_resent_after_restart",
                 "run_ids_reused", "stale_temp_files_left"):
        assert metrics[name][0]["value"] == 0, name


def test_purge_output_is_read_for_runs_and_bytes_freed():
    class Done:
        returncode, stderr = 0, ""
        stdout = "purged 1,000 run(s) that ended more than 0 day(s) ago; freed 2.5 MiB (spool 2 MiB, work 0.5 MiB)\n"

    found = {r["metric"]: r["value"] for r in hostile_senders._purge_rows(Done(), {})}
    assert found == {"purge_exit_code": 0, "runs_purged": 1000, "freed_reported": 2.5 * 2**20}


def test_a_broken_part_is_an_error_row_and_the_others_still_run(tmp_path):
    recorder = AuditRecorder(tmp_path / "a.duckdb")
    recorder.start_session("test")
    frame = hostile_senders.hostile_figures(tmp_path, {"sessions": {"no_such_parameter": 1}, "spool": {"mails": -1}},
                                    only=("sessions",), recorder=recorder)
    assert frame.metric.tolist() == ["error"] and "no_such_parameter" in frame.reason[0]
    assert recorder.measurements("hostile").metric.tolist() == ["error"]


def test_hostile_tables_show_levels_and_before_after_and_are_empty_without_rows(tmp_path):
    rec = AuditRecorder(tmp_path / "a.duckdb")
    rec.start_session("test")
    held, released = {"level": 4, "limit": 4, "phase": "held"}, {"level": 4, "limit": 4, "phase": "after_release"}
    rows = [row("sessions", "idle_replies", 4, "connections", 0, reply="220", **held),
            row("sessions", "normal_replies", 2, "sends", 0, reply="421", **held),
            row("sessions", "normal_replies", 2, "sends", 0, reply="250", **released),
            row("sessions", "normal_latency_ms", 10.0, "ms", 0, **released),
            row("sessions", "normal_latency_ms", 30.0, "ms", 1, **released),
            row("memory", "serve_peak_rss_mb", 900.0, "MB", 0, mode="before", mails=10),
            row("memory", "serve_peak_rss_mb", 120.0, "MB", 0, mode="after", mails=10),
            row("memory", "first_replies", 4, "mails", 0, reply="452", mode="after", mails=10),
            row("spool", "error", 1, "part", 0, reason="RuntimeError: boom")]
    assert hostileviews.sessions_table(rec.measurements()).empty
    assert hostileviews.comparison_table(rec.measurements(), "memory").empty
    rec.record("hostile", pd.DataFrame(rows))
    m = rec.measurements()
    sessions = hostileviews.sessions_table(m)
    assert sessions.phase.tolist() == ["held", "after_release"]
    assert sessions.loc[0, "connections got"] == "220 ×4" and sessions.loc[0, "normal client got"] == "421 ×2"
    assert sessions.loc[1, "median ms"] == 20.0 and sessions.loc[1, "normal client got"] == "250 ×2"
    memory = hostileviews.comparison_table(m, "memory").set_index("figure")
    assert memory.columns.tolist() == ["before", "after"]
    assert memory.loc["serve_peak_rss_mb"].tolist() == [900.0, 120.0] and memory.loc["first_replies 452", "after"] == 4
    assert hostileviews.comparison_table(m, "spool").empty
    assert hostileviews.notes(m) == "Parts whose harness failed: spool: RuntimeError: boom"


@pytest.mark.parametrize("part", sorted(hostile_senders.PARTS))
def test_every_part_has_quick_and_standard_parameters_it_accepts(part):
    import inspect

    from pipeline.audit.batch import PROFILES

    accepted = set(inspect.signature(hostile_senders.PARTS[part]).parameters)
    for profile in ("quick", "standard", "full"):
        assert set(PROFILES[profile]["10_hostile_senders"][part]) <= accepted, profile


def test_abandoned_accepts_leave_no_temp_file_descriptor_or_second_run(tmp_path):
    """Senders that close right after their final dot, more at once than the gateway's accept threads, then
    send every message again: some accepts were dropped, nothing of them is left, each message has one run."""
    rows = hostile_senders.abandoned_accepts(tmp_path, mails=40, clients=2, timeout_s=240)
    metrics = {name: found[0]["value"] for name, found in _by_metric(rows, "abandoned").items()}
    assert "error" not in metrics
    assert metrics["mails_closed_after_data"] == 40
    assert metrics["accepts_dropped"] > 0  # the path under test: accepts still queued when their session closed
    assert metrics["temp_files_left"] == metrics["gateway_fds_growth"] == 0
    assert metrics["messages_without_one_run"] == metrics["runs_not_ended"] == metrics["resent_not_250"] == 0


def test_pipelining_measures_a_normal_client_beside_a_flooder_both_ways_and_the_junk_limit(tmp_path):
    rows = hostile_senders.pipelining(tmp_path, sends=3, reps=1, chunk_lines=2000)
    figures = {(r["metric"], r["tags"].get("mode")): r["value"] for r in rows if r["metric"] != "normal_latency_ms"}
    assert figures[("normal_acked", "before")] == 3 and figures[("normal_acked", "after")] == 3
    assert figures[("flood_replies", "before")] > 0 and figures[("flood_replies", "after")] > 0
    assert len([r for r in rows if r["metric"] == "normal_latency_ms"]) == 6
    assert figures[("junk_closed_421", None)] == 1 and figures[("refusals_closed_421", None)] == 1
    assert figures[("junk_answered", None)] == 100  # the default max_junk_commands
    assert figures[("refusals_answered", None)] == 101  # the reply that made 101 is sent, then the 421


def test_digest_flood_counts_the_digests_one_claimed_address_gets_with_the_quota_off_and_on(tmp_path):
    rows = hostile_senders.digest_flood(tmp_path, mails=8, quota=5)
    figures = {(r["metric"], r["tags"]["mode"]): r["value"] for r in rows}
    assert figures[("acked", "before")] == figures[("acked", "after")] == 8
    assert figures[("runs_succeeded", "before")] == figures[("runs_succeeded", "after")] == 8
    assert figures[("digests_to_one_address", "before")] == 8 and figures[("digests_to_one_address", "after")] == 5


def test_head_of_line_crowd_times_the_normal_pdf_after_a_crowd_of_hostile_mails_in_both_modes(tmp_path):
    rows = hostile_senders.head_of_line_crowd(tmp_path, mails=3, pdfs=2, timeout_s=1.0, slow_pages=20, gap_s=0.5,
                                              wait_s=240)
    metrics = _by_metric(rows, "head_of_line_crowd")
    assert "error" not in metrics
    assert {r["tags"]["mode"]: r["value"] for r in metrics["normal_run_succeeded"]} == {"before": 1.0, "after": 1.0}
    assert {r["tags"]["mode"] for r in metrics["normal_latency_s"]} == {"before", "after"}
    settings = {r["tags"]["mode"]: (r["tags"]["extract_pool"], r["tags"]["newcomer_s"]) for r in rows}
    assert settings == {"before": (False, 0.0), "after": (True, "default")}
    assert all(r["tags"]["crowd_extracting"] >= 1 for r in rows)
