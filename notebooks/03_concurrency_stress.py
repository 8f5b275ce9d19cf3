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
# # Concurrency stress
#
# At each level, that many mails (one PDF each) are accepted at once and the engine may run all of
# them concurrently (`max_active_runs` = level). Throughput is runs per second from the first trigger
# to the last end; latency is each run's queued → ended time.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
levels = [10, 20]
pdf = "text-tiny.pdf"
stop_on_failure = False

# %%
from pipeline.audit.notebook import fixture, open_recorder
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import concurrency

recorder = open_recorder(db_path, session_id, profile)

# %%
concurrency.concurrency(levels, fixture(fixtures_dir, profile, pdf), recorder=recorder, stop_on_failure=stop_on_failure)
table = views.concurrency_table(recorder.measurements())
table

# %%
views.fig_concurrency(table);
