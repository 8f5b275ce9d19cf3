# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Pipeline audit (project .venv)
#     language: python
#     name: pipeline-audit
# ---

# %% [markdown]
# # Faults
#
# Each fault is injected into a real `python -m pipeline serve` process (its own data dir and port), driven
# over SMTP by sender processes that retry after a 4xx or a connection error, like an MTA. Judged from the
# run store and the Maildir outbox: an acked (250) message is lost if it has no run or its run never ends,
# duplicated if it has more than one run or digest; a failed run is untyped if its reason is not one of the
# reasons in `pipeline.errors`. Faults: `kill -9` of serve mid-burst (restarted at once), `kill -9` of a busy
# extraction worker, the run store locked by another process, another process holding an old snapshot of the
# store during a burst (`wal_reader`: the WAL grows, and is cut back once the reader goes), serve's gateway process hung (stopped with
# SIGSTOP; serve kills and restarts it after `[serve] gateway_hung_after_s`, shortened here), the data dir's disk full (a tmpfs; skipped
# with the reason where it cannot be mounted), only the work dir's disk full (senders keep sending for a few
# seconds: the first mails are acked and their runs must wait for room, not fail; once the engine sees the machine
# short it is unhealthy and later mails get 451 until there is room: *4xx after s* is how long the gateway acked
# mail before that), only the outbox's disk full (the same, with runs waiting at delivery), the scale-out engines
# failing under a serve that uses them: the PostgreSQL run store's server stopped as by a crash (`pg_ctl stop -m
# immediate`) and started again after a few seconds (`store_server_down`; *4xx after s* from the stop), and the Dask
# scheduler killed mid-burst, a new cluster started on its address a few seconds later (`scheduler_killed`; every
# mail carries a PDF, so every run needs the cluster), the Dask scheduler frozen with SIGSTOP, then continued
# (`scheduler_frozen`: serve must answer 451 once the scheduler is silent for `[executor] scheduler_silent_s`,
# shortened here), each skipped with the reason where PostgreSQL or Dask is not
# installed, serve started on a backlog of mails dropped into `inbox/new/` while it was down, SMTP mail sent meanwhile
# (`drop_backlog`; *recover s* is start → SMTP answering, *drain s* start → last run ended), serve's spool
# directory moved away and a new one put in its place mid-burst, then put back (`spool_replaced`; serve must answer
# 451 meanwhile), a stop while the run store is locked by another process (`stop_overrun`: the stop must end after
# the grace and `[serve] stop_margin_s`, exit 1, and a restart lose nothing; *stop s*), and bad input (a damaged page, a From: decoding to CR/LF, a
# quoted local part, and mail as real clients write it: a scanner's Subject folded without indent, a forward in
# base64, an automatic reply, each with one PDF; *pdfs* is how many the parse found). Then a mail loop: a serve
# whose relay routes every digest back to its own gateway, watched until no run is added. Last, relays as they
# behave in the wild (`bad_relay`: greylisting, a connection lost mid-DATA, a 421 to QUIT after the digest was
# taken, a permanent refusal): each digest taken once, the refused run failed with what the relay said. And a relay
# that hangs after the data (`relay_hung`: every session holds the final dot's reply for a few seconds while mail
# keeps coming; *digested while hung* counts the mails parsed and digested meanwhile).

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
only = ["kill_serve", "kill_worker", "store_locked", "wal_reader", "hung_gateway", "disk_full", "work_disk_full",
        "outbox_full", "spool_replaced", "stop_overrun", "store_server_down", "scheduler_killed", "scheduler_frozen",
        "drop_backlog", "bad_input", "bad_relay", "relay_hung"]
kill_serve = {"messages": 16, "senders": 2, "kill_points": [0.5]}
kill_worker_pdf = "text-1mb.pdf"
store_locked = {"messages": 16, "senders": 2, "lock_s": 2.0, "busy_timeout_ms": 1000, "margin_s": 1.0}
wal_reader = {"messages": 40, "senders": 2, "after": 10}
hung_gateway = {"messages": 16, "senders": 2, "hung_after_s": 2.0, "margin_s": 1.0}
disk_full = {"messages": 10, "senders": 2, "full_s": 1.0, "size_mb": 32}
work_disk_full = {"messages": 10, "senders": 2, "full_s": 1.0, "size_mb": 16}
outbox_full = {"messages": 10, "senders": 2, "full_s": 1.0, "size_mb": 16}
store_server_down = {"messages": 16, "senders": 2, "down_s": 2.0, "margin_s": 1.0}
scheduler_killed = {"messages": 12, "senders": 2, "down_s": 2.0, "margin_s": 1.0}
scheduler_frozen = {"messages": 12, "senders": 2, "down_s": 8.0, "margin_s": 1.0}
drop_backlog = {"files": 200, "mails": 10, "senders": 2}
spool_replaced = {"messages": 20, "senders": 2, "down_s": 6.0, "margin_s": 1.0}
stop_overrun = {"messages": 16, "senders": 2, "lock_s": 12.0}
relay_hung = {"messages": 16, "senders": 2, "hung_s": 3.0}

# %%
from pipeline.audit.notebook import fixture, open_recorder, scratch_dir
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import faults

recorder = open_recorder(db_path, session_id, profile)
work = scratch_dir(db_path, "faults-work")
work.mkdir(parents=True, exist_ok=True)

# %%
params = {"kill_serve": kill_serve, "kill_worker": {"pdf": fixture(fixtures_dir, profile, kill_worker_pdf)},
          "store_locked": store_locked, "wal_reader": wal_reader, "hung_gateway": hung_gateway, "disk_full": disk_full,
          "work_disk_full": work_disk_full, "outbox_full": outbox_full, "store_server_down": store_server_down,
          "scheduler_killed": scheduler_killed, "scheduler_frozen": scheduler_frozen, "drop_backlog": drop_backlog,
          "spool_replaced": spool_replaced,
          "stop_overrun": stop_overrun, "relay_hung": relay_hung}
faults.fault_figures(work, params, only=tuple(only), recorder=recorder)
views.fault_table(recorder.measurements())

# %%
views.fault_cases(recorder.measurements())
# %%
views.relay_cases(recorder.measurements())
# %%
detail = views.rows(recorder.measurements(), "faults")
detail[detail.variant.eq("mail_loop") | detail.metric.isin(["wild_mail_pdfs_missed", "automatic_mail_answered"])
       ].dropna(axis=1, how="all")

# %% [markdown]
# The killed worker: the one caught mid-way through the victim document (its ingest_pdf task running, its CPU
# time growing, the run's file open in it), whether serve's log says that pid died on the victim's document,
# and the victim task's tries and events in the store. By design the kill costs one retry (`retrying@1
# running@2`, reason `worker_crashed`); the store keeps only the latest try's error, so a retry that
# succeeded is named from serve's log.

# %%
detail = views.rows(recorder.measurements(), "faults")
detail[(detail.variant == "kill_worker") & detail.metric.str.startswith(("victim", "killed"))].dropna(axis=1, how="all")

# %%
views.fig_fault_replies(recorder.measurements());
