"""The fault harness at tiny sizes, against a real `python -m pipeline serve`: kill -9 mid-burst and bad input.

Every serve process (and what it started) is killed and reaped by the harness on every path; these tests
check the figures it reports and that nothing it started is left running.
"""

import os

import pandas as pd
import psutil
import pytest

from pipeline.audit.base import fixtures as fx
from pipeline.audit.base.faultcheck import known_reasons, retries_logged, typed_reason, worker_deaths
from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.base.serveproc import ServeProcess
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import faults, scaleout_faults


def _figures(rows, fault):
    return {r["metric"]: r["value"] for r in rows if r["variant"] == fault and r["metric"] != "replies"}


def _live_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def _no_children_left(before: set[int]):
    """Processes started during the test (serve, its workers, senders) still alive; earlier tests' pools excluded."""
    return sorted(_live_children() - before)


def test_kill_9_mid_burst_loses_and_duplicates_no_acked_message(tmp_path):
    before = _live_children()
    rows = faults.kill_serve(tmp_path, messages=20, senders=2, kill_points=(0.5,), timeout_s=240)
    figures = _figures(rows, "kill_serve")
    assert figures["acked"] == 20 and figures["sent"] == 20  # senders retry until the restarted serve answers
    assert figures["lost"] == 0 and figures["duplicated"] == 0 and figures["untyped"] == 0
    assert figures["missing_digests"] == 0  # every acked message got exactly one terminal run and one digest
    replies = {r["tags"]["reply"]: r["value"] for r in rows if r["metric"] == "replies"}
    assert replies["250"] == 20
    assert not _no_children_left(before)


def test_a_hung_gateway_is_replaced_and_loses_no_acked_message(tmp_path):
    before = _live_children()
    rows = faults.hung_gateway(tmp_path, messages=16, senders=2, hung_after_s=2.0, margin_s=1.0, timeout_s=240)
    figures = _figures(rows, "hung_gateway")
    assert figures["acked"] == 16 and figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["untyped"] == 0 and figures["missing_digests"] == 0
    # silence counts from the last sign of life, up to a second before the hang
    assert 1.0 <= figures["killed_after_s"] and figures["recover_s"] >= figures["killed_after_s"] - 0.5
    assert not _no_children_left(before)


def test_a_locked_store_loses_no_acked_mail_and_metrics_still_answer_every_scrape(tmp_path):
    """Scrapes read the store through the engine's connection while it waited out the lock: 10-19 s each, past
    Prometheus's 10 s timeout (a prober's find). Now every scrape during the lock answers."""
    before = _live_children()
    rows = faults.store_locked(tmp_path, messages=16, senders=2, lock_s=12.0, busy_timeout_ms=10_000, margin_s=1.0,
                               timeout_s=240)  # the shipped busy timeout
    figures = _figures(rows, "store_locked")
    assert figures["acked"] == 16 and figures["lost"] == 0 and figures["duplicated"] == 0
    [scrapes] = [r["tags"]["scrapes"] for r in rows if r["metric"] == "scrapes_failed"]
    assert scrapes >= 2 and figures["scrapes_failed"] == 0, rows
    assert not _no_children_left(before)


def test_a_reader_holding_an_old_snapshot_loses_no_mail_and_the_wal_is_cut_back_after_it(tmp_path):
    before = _live_children()
    rows = faults.wal_reader(tmp_path, messages=40, senders=2, after=10, timeout_s=240)
    figures = _figures(rows, "wal_reader")
    assert figures["acked"] == 50 and figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["wal_peak_mb"] > 0 and figures["wal_after_mb"] <= 32
    assert not _no_children_left(before)


def test_serve_started_on_a_drop_folder_backlog_answers_smtp_and_takes_every_file_once(tmp_path):
    """A prober's find: files waiting in inbox/new were taken before serve was up, and 25,000 of them held
    start-up past its 60 s limit. Here 300 wait; SMTP mail sent meanwhile is taken too, each exactly once."""
    before = _live_children()
    rows = faults.drop_backlog(tmp_path, files=300, mails=10, senders=2, timeout_s=240)
    figures = _figures(rows, "drop_backlog")
    assert figures["acked"] == 310 and figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["failed_runs"] == 0 and figures["missing_digests"] == 0
    assert not list((tmp_path / "data" / "inbox" / "new").iterdir())
    assert not _no_children_left(before)


@pytest.mark.parametrize("fault", ["work_disk_full", "outbox_full"])
def test_a_full_work_disk_or_outbox_fails_no_acked_run_and_every_mail_gets_its_digest(tmp_path, fault):
    """Before, every run acked while data/work was full failed task_io for good, and every digest meant for a
    full outbox was lost after deliver's retries, serve healthy throughout. Now the runs wait for room."""
    before = _live_children()
    rows = getattr(faults, fault)(tmp_path, messages=10, senders=2, full_s=1.0, size_mb=16, timeout_s=240)
    if rows[0]["metric"] == "skipped":
        pytest.skip(rows[0]["tags"]["reason"])
    figures = _figures(rows, fault)
    assert figures["acked"] == 10 and figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["failed_runs"] == 0 and figures["missing_digests"] == 0
    # the mails sent once the engine saw the machine short were refused (451), then acked once there was room
    replies = {r["tags"]["reply"]: r["value"] for r in rows if r["metric"] == "replies"}
    assert replies.get("451", 0) >= 1 and figures["refused_after_s"] > 0, (replies, figures)
    assert 1 <= figures["acked_while_full"] < 10
    assert figures["waiting_unexplained"] == 0, figures  # a run waiting for room says so in `show`
    assert not _no_children_left(before)


@pytest.mark.parametrize("fault", ["store_server_down", "scheduler_killed", "scheduler_frozen"])
def test_the_scale_out_engines_going_away_under_serve_lose_and_fail_no_acked_mail(tmp_path, fault):
    """The PostgreSQL store's server stopped as by a crash, or the Dask scheduler killed, mid-burst and back two
    seconds later, or the scheduler frozen for 8 s (past its 5 s of silence): the outage is the machine's, so no
    acked mail fails, is lost or is digested twice."""
    before = _live_children()
    rows = getattr(scaleout_faults, fault)(tmp_path, messages=12, senders=2, margin_s=1.0, timeout_s=240,
                                           down_s=8.0 if fault == "scheduler_frozen" else 2.0)
    if rows[0]["metric"] == "skipped" and not os.environ.get("CI"):
        pytest.skip(rows[0]["tags"]["reason"])
    figures = _figures(rows, fault)
    assert figures["sent"] == 12 and figures["acked"] == 12, rows
    assert figures["lost"] == 0 and figures["duplicated"] == 0 and figures["untyped"] == 0
    assert figures["failed_runs"] == 0 and figures["missing_digests"] == 0
    if fault in ("store_server_down", "scheduler_frozen"):  # nothing recorded without the store, nothing sent to a
        # silent scheduler: senders were told to retry
        replies = {r["tags"]["reply"]: r["value"] for r in rows if r["metric"] == "replies"}
        assert replies.get("451", 0) >= 1, replies
    assert not _no_children_left(before)


def test_a_relay_hanging_after_the_data_leaves_later_mail_parsed_and_digested_and_loses_none(tmp_path):
    """Every relay session hangs for 3 s once the first 16 mails' sessions did: the 16 mails sent then are parsed
    and digested meanwhile (on the shared task threads, none was), and every digest arrives once after."""
    from pipeline.audit.scenarios import relay_hung

    before = _live_children()
    rows = relay_hung.relay_hung(tmp_path, messages=16, senders=2, hung_s=3.0, timeout_s=240)
    figures = _figures(rows, "relay_hung")
    assert figures["acked"] == 32 and figures["lost"] == 0 and figures["duplicated"] == 0, rows
    assert figures["failed_runs"] == 0 and figures["missing_digests"] == 0
    assert figures["sessions_hung"] == 8 and figures["digested_while_hung"] >= 8, figures
    assert not _no_children_left(before)


def test_bad_inputs_end_with_typed_outcomes(tmp_path):
    before = _live_children()
    rows = faults.bad_input(tmp_path, timeout_s=240)
    figures = _figures(rows, "bad_input")
    probe = {"damaged_zip_beside_pdf", "second_content_type", "base64_in_padded_pieces", "yenc_in_body", "gzip_pdf",
             "dmarc_report"}
    assert figures["acked"] == 6 + len(probe) and figures["lost"] == 0 and figures["untyped"] == 0
    cases = {r["tags"]["case"]: r for r in rows if r["metric"] == "case_typed"}
    assert set(cases) == {"damaged_page_pdf", "crlf_encoded_from", "quoted_local_part", "scanner_unindented_fold",
                          "forward_in_base64", "auto_replied", *probe}
    assert all(r["value"] == 1.0 for r in cases.values()), cases
    # an SMTP mail's From: is only shown, never written into the digest: the hostile one costs nothing
    assert (cases["crlf_encoded_from"]["tags"]["state"], cases["crlf_encoded_from"]["tags"]["digests"]) == \
        ("success", 1)
    assert [cases[c]["tags"]["pdfs"] for c in ("scanner_unindented_fold", "forward_in_base64", "auto_replied")] == \
        [1, 1, 1]
    assert figures["wild_mail_pdfs_missed"] == 0 and figures["automatic_mail_answered"] == 0
    assert figures["missing_digests"] == 0  # the automatic reply's digest is skipped by design, not missing
    assert cases["auto_replied"]["tags"]["digests"] == 0 and cases["forward_in_base64"]["tags"]["digests"] == 1
    assert {c: cases[c]["tags"]["pdfs"] for c in probe} == {**dict.fromkeys(probe, 1), "damaged_zip_beside_pdf": 2}
    assert cases["damaged_zip_beside_pdf"]["tags"]["state"] == "success"  # partial: the member is not_read
    assert cases["dmarc_report"]["tags"]["digests"] == 0 and cases["yenc_in_body"]["tags"]["digests"] == 1
    # each way a digest comes back (the relay is the gateway; a ticket system; a forwarding rule): the mail and
    # what came back, then quiet; each responder got one digest per mail
    loops = {(r["tags"]["loop"], r["metric"]): r["value"] for r in rows if r["variant"] == "mail_loop"}
    assert loops == {**{(how, "runs_per_mail"): 2.0 for how in ("gateway", "ticket", "forward")},
                     **{(how, "runs_not_ended"): 0.0 for how in ("gateway", "ticket", "forward")},
                     ("ticket", "digests_per_mail"): 1.0, ("forward", "digests_per_mail"): 1.0}, loops
    assert not _no_children_left(before)


def test_a_worker_killed_mid_document_costs_one_retry_and_the_run_still_succeeds(tmp_path):
    before = _live_children()
    pdf = tmp_path / "victim.pdf"
    pdf.write_bytes(fx.text_pdf(300, seed=3))  # about 1 MB: extraction lasts long enough to be caught
    rows = faults.kill_worker(tmp_path, pdf, timeout_s=240)
    figures = {r["metric"]: r for r in rows if r["variant"] == "kill_worker"}
    assert "skipped" not in figures, figures["skipped"]["tags"]
    assert figures["victim_worker_mid_document"]["tags"]["file_open"]  # the run's file was open in the victim
    assert figures["killed_worker_served_victim"]["value"] == 1.0, figures["killed_worker_served_victim"]["tags"]
    tries = figures["victim_task_try_number"]
    assert tries["value"] == 2 and "retrying(worker_crashed)@1 running@2" in tries["tags"]["events"], tries["tags"]
    assert tries["tags"]["retries_logged"] == "ingest_pdf[0] try 1: worker_crashed"
    victim = figures["victim_run_typed"]["tags"]
    assert victim["state"] == "success" and victim["task_errors"] == "ingest_pdf[0] try 1: worker_crashed (retried)"
    assert figures["next_pdf_succeeded"]["value"] == 1.0 and figures["lost"]["value"] == 0
    assert not _no_children_left(before)


def test_serve_log_lines_name_the_dead_worker_and_the_retry():
    log = ("2026-11-27 23:23:55,615 WARNING pipeline.stages.extract_worker: extraction worker 22561 died on "
           "000-a.pdf (worker_crashed: the extraction worker died (exit code -9, SIGKILL) while reading)\n"
           "2026-11-27 23:23:56,694 INFO pipeline.runner: run 1 task ingest_pdf[0]: try 1 failed (worker_crashed), "
           "retrying\n"
           "2026-11-27 23:23:57,000 INFO pipeline.runner: run 2 task deliver: try 1 failed (delivery), retrying\n")
    assert worker_deaths(log) == {22561: ("000-a.pdf", "worker_crashed")}
    assert retries_logged(log, 1) == ["ingest_pdf[0] try 1: worker_crashed"]


def test_a_failing_scenario_still_kills_and_reaps_serve(tmp_path):
    serve = ServeProcess(tmp_path / "data", tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        try:
            serve.start()
            pid = serve.proc.pid
            raise RuntimeError("boom")
        finally:
            serve.kill()
    assert serve.proc.returncode is not None and not psutil.pid_exists(pid)


@pytest.mark.parametrize("reason, typed", [
    ("ingest_pdf[0]: corrupt: page 3 is damaged", "corrupt"), ("malformed_email", "malformed_email"),
    ("internal: bookkeeping failed", "internal"), ("parse_email: ValueError: bad", None),
    ("a final task did not succeed", None), (None, None)])
def test_typed_reason_reads_the_stored_reason(reason, typed):
    assert typed_reason(reason) == typed


def test_known_reasons_come_from_the_error_classes():
    assert {"encrypted", "corrupt", "too_large", "worker_crashed", "malformed_email", "timeout",
            "delivery"} <= known_reasons()



def test_relays_in_the_wild_get_each_digest_once_and_a_refusal_fails_its_run_at_once(tmp_path):
    before = _live_children()
    rows = faults.bad_relay(tmp_path, timeout_s=120)
    figures = _figures(rows, "bad_relay")
    assert figures["acked"] == 4 and figures["lost"] == 0 and figures["untyped"] == 0
    assert figures["duplicated"] == 0 and figures["missing_digests"] == 0 and figures["failed_runs"] == 1
    cases = {r["tags"]["case"]: r["tags"] for r in rows if r["metric"] == "relay_case_as_expected"}
    assert {case: (c["state"], c["copies"], c["deliver_tries"]) for case, c in cases.items()} == {
        "greylisted": ("success", 1, 3), "dropped": ("success", 1, 2), "quit_421": ("success", 1, 1),
        "refused": ("failed", 0, 1)}
    assert "refused the digest: 554 5.7.1" in cases["refused"]["reason"]
    assert figures["relay_cases_unexpected"] == 0
    recorder = AuditRecorder(tmp_path / "audit.duckdb")
    recorder.start_session("test")
    recorder.record("faults", pd.DataFrame(rows))
    table = views.relay_cases(recorder.measurements())
    assert list(table["as expected"]) == ["yes"] * 4 and "deliver tries" in table
    assert not _no_children_left(before)

@pytest.mark.parametrize("fault", ["kill_serve", "store_locked", "wal_reader", "hung_gateway", "disk_full",
                                   "work_disk_full", "outbox_full", "store_server_down", "scheduler_killed",
                                   "scheduler_frozen", "drop_backlog", "relay_hung"])
def test_every_profile_gives_the_fault_parameters_it_accepts(fault):
    import inspect

    from pipeline.audit.batch import PROFILES
    from pipeline.audit.scenarios import relay_hung

    runner = getattr(relay_hung, fault, None) or getattr(faults, fault, None) or getattr(scaleout_faults, fault)
    accepted = set(inspect.signature(runner).parameters)
    for profile in ("quick", "standard", "full"):
        assert set(PROFILES[profile]["09_faults"][fault]) <= accepted, profile


def test_a_spool_replaced_under_serve_gets_451_and_loses_no_acked_mail(tmp_path):
    from pipeline.audit.scenarios import datadir_faults

    before = _live_children()
    rows = datadir_faults.spool_replaced(tmp_path, messages=20, senders=2, down_s=6.0, margin_s=1.0, timeout_s=240)
    figures = _figures(rows, "spool_replaced")
    assert figures["acked"] == 20 and figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["untyped"] == 0 and figures["missing_digests"] == 0
    replies = {r["tags"]["reply"]: r["value"] for r in rows if r["metric"] == "replies"}
    assert replies.get("451", 0) >= 1  # unhealthy while its spool was not the one it opened
    assert not _no_children_left(before)


def test_a_stop_with_the_store_locked_ends_after_the_margin_and_a_restart_loses_nothing(tmp_path):
    from pipeline.audit.scenarios import datadir_faults

    before = _live_children()
    rows = datadir_faults.stop_overrun(tmp_path, messages=16, senders=2, lock_s=12.0, timeout_s=240)
    figures = _figures(rows, "stop_overrun")
    assert figures["acked"] == 16 and figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["stop_exit_code"] == 1 and figures["stop_s"] < 12.0  # the lock (12 s) outlasts the stop
    assert not _no_children_left(before)
