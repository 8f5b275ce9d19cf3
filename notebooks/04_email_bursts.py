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
# # Email bursts
#
# Client processes send small mails over SMTP at sustained rates, then all at once. Trigger latency
# is DATA end → run queued from the run store; the backlog is runs queued or running; a message is
# lost if it got a 250 and has no run.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
rates = [50]
duration_s = 2.0
burst = 100
senders = 2

# %%
from pipeline.audit import scenarios, views
from pipeline.audit.notebook import open_recorder

recorder = open_recorder(db_path, session_id, profile)

# %%
scenarios.email_burst(rates, duration_s=duration_s, burst=burst, senders=senders, recorder=recorder)
views.burst_table(recorder.measurements())

# %%
views.fig_burst(recorder.measurements());
