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
# # Peers: this project beside Prefect, Dagster and Airflow
#
# Issue 16's `11_peers` (numbered 14 here: `11_scale_out` already holds 11). The same no-op shapes on this
# project's `WorkflowEngine` (SQLite run store, in this kernel) and on each peer in a process of its own, started
# with the python of its venv under `data/peers/` and its run store on disk in a temp dir: a chain, a fan-out,
# one parse → ingest×3 → digest → deliver run, and that run many times at once. Every shape runs once untimed
# first; then the engines take turns, their order rotated each rep. The peers are no dependency of this package
# (their pins conflict with ours and each other's): `make peers` installs them, and a peer that is absent is
# listed below as skipped, with the reason, instead of measured.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
peers_dir = "data/peers"
reps = 1
sizes = {"chain": {"this_project": 20, "prefect": 5, "dagster": 5, "airflow": 5},
         "fanout": {"this_project": 20, "prefect": 5, "dagster": 5, "airflow": 5},
         "digest": {"this_project": 1, "prefect": 1, "dagster": 1, "airflow": 1},
         "burst": {"this_project": 10, "prefect": 2, "dagster": 2, "airflow": 0}}

# %%
from IPython.display import Markdown, display

from pipeline.audit.notebook import open_recorder, resolve, scratch_dir
from pipeline.audit.reporting import peerviews, views
from pipeline.audit.scenarios import peers

recorder = open_recorder(db_path, session_id, profile)
peers.compare_engines(scratch_dir(db_path, "peers-work"), sizes=sizes, reps=reps, peers_root=resolve(peers_dir),
                      recorder=recorder)
m = recorder.measurements(peers.SCENARIO)
table = peerviews.ratio_table(m)
display(Markdown("**Not measured** (engine, shape, reason):\n\n" + views.markdown(peerviews.skipped_table(m))))

# %%
display(Markdown(f"Milliseconds per no-op task ({reps} timed runs per engine and shape; *size*: tasks of a chain "
                 "or fan-out, runs at once of a burst; *busy after s*: how long the peer's processes kept working "
                 "after a run returned (waited out before the next engine's turn); *× this_project*: the median "
                 "over reps of the engine's ms per task over this project's in the same rep, min–max beside it):\n\n"
                 + views.markdown(table) + "\n\n" + peerviews.peers_summary(m)
                 + "\n\nEach peer process's start (not in any figure above):\n\n"
                 + views.markdown(peerviews.startup_table(m))))

# %%
peerviews.fig_peers(table);

# %% [markdown]
# ## What is and is not comparable
#
# The shapes, the no-op bodies, warm runs and an on-disk SQLite run store are the same for every engine, so each
# figure is that engine's own cost of scheduling a task and recording its state. The features behind that cost
# are not the same: this project writes every run and task transition to its store and nothing else, while the
# peers also pay for what their users get beside it: Prefect's API server (its ephemeral server here) and the
# events and logs every task sends it for the UI; Dagster's structured event log of every step and its type
# checks; Airflow's DAG serialization, a DAG-folder sync on every `dag.test()` and each task through its execution
# API. Nor does any peer run here as in production (Prefect workers, Dagster's multiprocess executor and daemon,
# Airflow's scheduler and executor), which adds process starts and polling intervals: these are their floors.
# Airflow has no runs-at-once figure: `dag.test()` runs one DAG run per process. Sizes differ where a peer would
# take minutes; per-task figures are compared, and a fixed cost per run (Prefect's ~1 s when a flow ends) weighs
# more on a smaller shape.
