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
# # Memory soak
#
# Thousands of real runs (a one-page PDF each, through the gateway, digest delivered over SMTP).
# After a warm-up, memory is sampled after `gc.collect()` every `every` runs; the leak slope is a
# least-squares fit of bytes against runs. tracemalloc's traced size decides (RSS is shown beside it).

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
runs = 200
warmup = 50
every = 25

# %%
from pipeline.audit import scenarios, views
from pipeline.audit.notebook import open_recorder

recorder = open_recorder(db_path, session_id, profile)

# %%
soak = scenarios.soak(runs=runs, warmup=warmup, every=every, recorder=recorder)
slopes = {"traced": soak[soak.metric == "leak_traced_bytes_per_run"].value.item(),
          "rss": soak[soak.metric == "leak_rss_bytes_per_run"].value.item()}
slopes

# %%
views.fig_soak(views.soak_series(recorder.measurements()), slopes);

# %%
views.top_allocations(recorder.measurements())
