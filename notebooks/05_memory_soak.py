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
# **On `python -m pipeline serve`** (the leak verdict): a real serve child process with its own data dir gets
# `serve_runs` mails with a one-page PDF over SMTP from sender processes, in batches of `serve_every` after
# `serve_warmup`; once a batch's runs have ended, RSS and USS are read (psutil) for each process of serve's tree
# by role: *serve* (the main process) and *workers* (the extraction workers: the sum over the live ones and the
# largest one; they are replaced after a fixed number of documents, so they are a role, not pids). The leak slope
# per role is a least-squares fit of bytes against runs over the second half of the samples.
#
# **In this notebook's kernel** (the diagnostic): the same pipeline under tracemalloc, `runs` runs after `warmup`,
# sampled after `gc.collect()` every `every` runs. Its figures are this kernel's, not serve's; it is what names
# *which* allocation site grows.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
serve_runs = 30
serve_warmup = 10
serve_every = 10
serve_senders = 2
serve_min_runs = None  # from here the soak may stop once its judged slopes are precise (None: never)
runs = 60
warmup = 20
every = 10
min_runs = None

# %%
from pipeline.audit.notebook import open_recorder
from pipeline.audit.reporting import soakviews, views
from pipeline.audit.scenarios import memory_soak

recorder = open_recorder(db_path, session_id, profile)

# %%
memory_soak.serve_soak(runs=serve_runs, warmup=serve_warmup, every=serve_every, senders=serve_senders,
                       recorder=recorder, min_runs=serve_min_runs)
serve_slopes = soakviews.serve_slopes(recorder.measurements())
serve_slopes

# %%
soakviews.fig_serve_soak(soakviews.serve_soak_series(recorder.measurements()), serve_slopes);

# %% [markdown]
# In-kernel tracemalloc soak (this kernel's memory, not serve's):

# %%
soak = memory_soak.soak(runs=runs, warmup=warmup, every=every, recorder=recorder, min_runs=min_runs)
slopes = {"traced": soak[soak.metric == "leak_traced_bytes_per_run"].value.item(),
          "rss": soak[soak.metric == "leak_rss_bytes_per_run"].value.item()}
slopes

# %%
views.fig_soak(views.soak_series(recorder.measurements()), slopes);

# %%
views.top_allocations(recorder.measurements())
