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
# # PDF ingestion: time and memory against size, pages and kind
#
# Each fixture is ingested `reps` times with each engine variant (pypdf or PDFium, one worker or the
# pages split across two), interleaved (A B A B), in the capped extraction workers after a warm-up.
# Memory is the extraction workers' own (this kernel's RSS, with DuckDB and pandas, is not ingestion's):
# `workers_peak_rss_mb` is their RSS summed, peak of samples every 10 ms, and `workers_rss_before_mb` what
# they already held before the document (a warm worker keeps part of an earlier one's memory).
# Then every hostile fixture (encrypted, truncated, random bytes, a 1 GB decompression bomb) is fed
# with the default limits, measured the same way. The chart has one column per document kind.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
reps = 1
variants = None  # None: every engine variant of pdf_ingestion.ENGINE_VARIANTS
once_above_mb = None  # documents over this size: every rep with the default engine, one with the others
others_max_mb = None  # documents over this size: the default engine only (None: every engine on every document)

# %%
from pipeline.audit.notebook import fixture_items, open_recorder
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import pdf_ingestion

recorder = open_recorder(db_path, session_id, profile)

# %%
scaling = pdf_ingestion.pdf_scaling(fixture_items(fixtures_dir, profile), reps=reps, recorder=recorder,
                                    variants=variants, once_above_mb=once_above_mb,
                                    others_max_mb=others_max_mb)
table = views.pdf_scaling_table(recorder.measurements())
table

# %%
views.fig_pdf_scaling(table);

# %%
pdf_ingestion.hostile_inputs(fixture_items(fixtures_dir, profile, hostile=True), recorder=recorder)
views.hostile_table(recorder.measurements())
