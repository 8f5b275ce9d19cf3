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
# # Optimizations, measured both ways
#
# Each optimization is a switch whose baseline still works; both are run in this session, interleaved
# (A B A B) after a warm-up. Store: journal and synchronous level, batched commits, BEGIN IMMEDIATE,
# indexes, the counter table, selecting only needed columns. Gateway: chunked DATA reading, inotify
# against polling. (PDF engines are compared in the PDF ingestion notebook.)

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
store_runs = 20_000
reps = 3
gateway_reps = 1

# %%
from pipeline.audit import switches, views
from pipeline.audit.notebook import open_recorder

recorder = open_recorder(db_path, session_id, profile)

# %%
switches.store_switches(runs=store_runs, reps=reps, recorder=recorder)
switches.gateway_switches(reps=gateway_reps, recorder=recorder)
views.optimization_table(recorder.measurements())
