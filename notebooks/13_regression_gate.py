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
# # The regression gate, checked on a busy machine
#
# Issue 14. A throwaway clone of this repository gets one more commit that adds a fixed amount of work to every
# store write; the commit A/B (`scripts/check_regression.py --base-commit`) then compares, with each measure, the
# planted commit against its parent and the parent against itself, while `load` CPU-bound processes run beside
# it. A sound gate calls the planted commit "regressed" with the load-stable measure (instruction counts under
# cachegrind; CPU seconds where valgrind is missing) and never calls a commit "regressed" against itself.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
measures = {"cpu": 2}  # measure -> repetitions
load = 0
work = 75

# %%
from IPython.display import Markdown, display

from pipeline.audit.notebook import open_recorder, scratch_dir
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import regression_gate

recorder = open_recorder(db_path, session_id, profile)
regression_gate.gate_check(scratch_dir(db_path, "gate-work"), measures=measures, load=load, work=work,
                     recorder=recorder)
display(Markdown(views.markdown(regression_gate.gate_table(recorder.measurements(regression_gate.SCENARIO)))))
