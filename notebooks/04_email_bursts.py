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
duration_s = 0.5
burst = 25
senders = 2
client = {"senders": [1, 2], "per_sender": 5, "reps": 1, "large_mb": 0.5, "warmup_mails": 4,
          "variants": ["gateway_process", "bare_sink"]}
drain = {"burst": 60, "reps": 1, "senders": 2}

# %%
from pipeline.audit.notebook import open_recorder, scratch_dir
from pipeline.audit.reporting import soakviews, views
from pipeline.audit.scenarios import client_latency, email_bursts

recorder = open_recorder(db_path, session_id, profile)

# %%
email_bursts.email_burst(rates, duration_s=duration_s, burst=burst, senders=senders, recorder=recorder)
views.burst_table(recorder.measurements())

# %%
views.fig_burst(recorder.measurements());

# %%
soakviews.burst_resources(recorder.measurements())

# %% [markdown]
# Small mails processed per second (issue 16): a burst to a fresh serve per round, worked off after the last
# send; the shipped settings against `build_digest` and `deliver` in the engine's threads
# (`[runner] stage_executor = "thread"`), interleaved.

# %%
email_bursts.small_mail_drain(**drain, recorder=recorder)
soakviews.drain_table(recorder.measurements())

# %%
soakviews.drain_cpu_by_process(recorder.measurements())

# %% [markdown]
# The sender's wait (issue 17): whole SMTP transactions timed by client processes against a real serve that
# processes the runs, with the gateway in its own process (the default) and in serve's process, and the other
# variants (`client_latency.VARIANTS`), interleaved, one serve alive at a time.

# %%
latency = client_latency.client_latency(scratch_dir(db_path, "client-latency-work"), recorder=recorder,
                                        **{**client, "senders": tuple(client["senders"])})
client_latency.summary(latency)
