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
# # Pipeline profile: Email → Ingestion → Digest → Delivery
#
# Mails with PDF attachments go through the whole pipeline: sent over real SMTP to the gateway,
# ingested with pypdf in the capped workers, summarised, and delivered over SMTP to a local sink.
# Stage times come from the run store (task start and end), the Email stage is DATA end → run queued.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
emails = 6
senders = 2
pdfs = ["text-0.5mb.pdf", "mixed-1mb.pdf"]
line_profile_pdf = "text-0.5mb.pdf"

# %%
from pipeline.audit import scenarios, views
from pipeline.audit.lineprof import profile_lines
from pipeline.audit.notebook import fixture, open_recorder

recorder = open_recorder(db_path, session_id, profile)
pdf_paths = [fixture(fixtures_dir, profile, name) for name in pdfs]

# %%
profile_rows = scenarios.pipeline_profile(pdf_paths, emails=emails, senders=senders, recorder=recorder)
stages = views.stage_breakdown(recorder.measurements())
stages

# %%
views.fig_stage_breakdown(stages);

# %% [markdown]
# Line-level profile of each stage's hot functions (one mail, extraction in-process so the profiler sees it):

# %%
recorder.record("line_profile", profile_lines(fixture(fixtures_dir, profile, line_profile_pdf)))
views.hot_lines(recorder.measurements(), top=3)
