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
# # Code-quality audit
#
# ruff and mypy on `pipeline/` with their counts, line coverage of the fast tests, and two surveys of
# the source: which typed errors each module raises (and what the user then sees), and every logging
# call (does an INFO line name its run; could it log message content).

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
with_coverage = False

# %%
from pipeline.audit.notebook import open_recorder
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import code_quality

recorder = open_recorder(db_path, session_id, profile)

# %%
recorder.record("code_quality", code_quality.audit_code_quality(with_coverage=with_coverage))
counts, errors = views.code_quality_tables(recorder.measurements())
counts

# %%
errors

# %%
code_quality.logging_survey()
