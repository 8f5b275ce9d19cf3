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
# Measured on `python -m pipeline serve`: each round starts a fresh serve child process (its own data dir)
# and client processes send it small mails over SMTP at a sustained rate, or all at once (the burst).
# Trigger latency is DATA end → run queued from serve's run store; the backlog is serve's runs queued or
# running; a message is lost if it got a 250 and has no run. Peak RSS and CPU seconds over each round are
# read with psutil per process role: *serve* (the main process) and *workers* (its extraction workers, summed).

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
rates = [50]
duration_s = 1.0
burst = 50
senders = 2

# %%
from pipeline.audit.notebook import open_recorder
from pipeline.audit.reporting import soakviews, views
from pipeline.audit.scenarios import email_bursts

recorder = open_recorder(db_path, session_id, profile)

# %%
email_bursts.email_burst(rates, duration_s=duration_s, burst=burst, senders=senders, recorder=recorder)
views.burst_table(recorder.measurements())

# %%
views.fig_burst(recorder.measurements());

# %%
soakviews.burst_resources(recorder.measurements())
