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
# # DAGRunStore queries at size
#
# One SQLite store grows through the sizes (5 task instances per run, 30 days of history); at each
# size every canonical query is timed (median and p95 after a warm-up) with the write throughput.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
sizes = [5_000, 20_000]
repeat = 20
transitions = 2_000
runner_tasks = 200
runner_repeat = 3

# %%
from pipeline.audit.notebook import open_recorder, scratch_dir
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import store_queries

recorder = open_recorder(db_path, session_id, profile)

# %%
store_queries.store_queries(sizes, scratch_dir(db_path, "bench"), repeat=repeat, recorder=recorder,
                            transitions=transitions)
views.store_table(recorder.measurements())

# %% [markdown]
# The runner's own cost: a `runner_tasks`-wide no-op DAG and a 200-task chain, per task (store writes included).

# %%
store_queries.runner_overhead(scratch_dir(db_path, "bench"), tasks=runner_tasks, repeat=runner_repeat,
                              recorder=recorder)
views.baselines_table(recorder.measurements())
