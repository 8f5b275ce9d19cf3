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
# # Hostile senders
#
# Issue 11 measured against a real `python -m pipeline serve` (its own data dir and port), driven over SMTP by
# client processes. **Sessions**: a normal client's connect → 250 latency while N idle sessions are held open
# (`gateway.max_sessions` set for the run), what the idle connections got (220 or 421), whether the client gets
# in once slots are freed, and serve's log bytes per 1,000 refused connections. **Memory**: serve's peak RSS
# while large mails arrive at once, before (`gateway.stream_data` and `ingest.parse_isolate` off, no in-flight
# cap) and after (both on). **Head of line**: a hostile slow PDF, then 1 s later a normal one; the normal one's
# DATA end → run ended, with `ingest.fair_extraction` off and on; **many PDFs**: the hostile mail carries several,
# with `ingest.fair_by_mail` off and on, then with `ingest.mail_timeout_s` out of reach and set. **Spool**: spool and work bytes per 1,000
# mails before and after `python -m pipeline purge --older-than 0`, and what a restart re-creates. **Abandoned
# accepts**: many senders close the connection right after their final dot, never reading the reply, then send
# every message again: the accepts dropped, the temp files and gateway descriptors left, messages without one run.
# **Pipelining**: a normal client's mail beside a client that pipelines commands without pause. **Digest flood**: a
# client claims one address as the envelope sender of every mail, delivered through a relay, with `[delivery]
# max_digests_per_hour` off (before) and at 5 (after): the digests that address got.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
only = ["sessions", "memory", "head_of_line", "head_of_line_many", "mail_budget", "head_of_line_crowd", "spool", "abandoned", "pipelining", "digest_flood"]
sessions = {"limit": 10, "extra": 10, "sends": 3, "release": 3, "churn": 30}
memory = {"mails": 2, "mail_mb": 2, "reps": 1}
head_of_line = {"timeout_s": 3.0, "slow_pages": 20, "reps": 1}
head_of_line_many = {"pdfs": 4, "timeout_s": 1.5, "slow_pages": 20, "reps": 1}
mail_budget = {"pdfs": 6, "timeout_s": 1.0, "mail_timeout_s": 2.0, "slow_pages": 20, "reps": 1}
head_of_line_crowd = {"mails": 3, "pdfs": 2, "timeout_s": 1.0, "slow_pages": 20, "reps": 1}
spool = {"mails": 10, "senders": 2}
abandoned = {"mails": 24, "clients": 2}
pipelining = {"sends": 3, "reps": 1}
digest_flood = {"mails": 8, "quota": 5}

# %%
from pipeline.audit.notebook import open_recorder, resolve, scratch_dir
from pipeline.audit.reporting import hostileviews
from pipeline.audit.scenarios import hostile_senders

recorder = open_recorder(db_path, session_id, profile)
work = scratch_dir(db_path, "hostile-work")
work.mkdir(parents=True, exist_ok=True)

# %%
params = {"sessions": sessions, "memory": {**memory, "cache_dir": resolve(fixtures_dir)},
          "head_of_line": head_of_line, "head_of_line_many": head_of_line_many,
          "mail_budget": mail_budget, "head_of_line_crowd": head_of_line_crowd, "spool": spool, "abandoned": abandoned, "pipelining": pipelining,
          "digest_flood": digest_flood}
hostile_senders.hostile_figures(work, params, only=tuple(only), recorder=recorder)
m = recorder.measurements()
print(hostileviews.notes(m))
hostileviews.sessions_table(m)

# %%
hostileviews.comparison_table(m, "memory")

# %%
hostileviews.comparison_table(m, "head_of_line")

# %%
hostileviews.comparison_table(m, "head_of_line_many")

# %%
hostileviews.comparison_table(m, "mail_budget")

# %%
hostileviews.comparison_table(m, "head_of_line_crowd")

# %%
hostileviews.comparison_table(m, "spool")

# %%
hostileviews.comparison_table(m, "abandoned")

# %%
hostileviews.comparison_table(m, "pipelining")
# %%
hostileviews.comparison_table(m, "digest_flood")

# %%
hostileviews.fig_hostile_senders(m);
