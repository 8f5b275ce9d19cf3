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
# # Scale-out on real engines
#
# Issue 12 measured on one throwaway, durable PostgreSQL server (a fresh database per variant), Dask
# LocalClusters of real worker processes and real `python -m pipeline serve` children driven over SMTP.
# **Store**: notebook 06's queries and task transitions/s (one per commit, batched) on SQLite and PostgreSQL at
# each size, and at the largest, transitions/s one per commit from several writer processes at once (the store's
# capacity) beside one client's bare round trips. **Pipeline**: the email_digest with a ~1 MB text PDF per mail, at a given concurrency, variants
# interleaved (A B C ... A B C ... after a warm-up round): runs/s and e2e latency (DATA end → run ended, from
# the store). **Ingestion**: CPU-bound extraction only, dense PDFs straight to a Dask cluster of 1 and of 2
# workers, and Dask's round trip of a no-op task. **Gateways**: three serve processes on one PostgreSQL store,
# a third of the Message-IDs sent to two of them: duplicates and lost acked messages, from the store.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
only = ["store", "pipeline", "ingestion", "gateways"]
mail_pdf_mb = 0.5
dense_pdf_mb = 0.5
store = {"sizes": [2_000], "repeat": 10, "transitions": 1_000,
         "writers": {"writers": [1, 2], "transitions": 400, "reps": 1, "round_trips": 200}}
pipeline = {"variants": ["pg_local", "pg_dask_1"], "mails": 2, "concurrency": 2, "reps": 1, "warmup_mails": 0}
ingestion = {"documents": 2, "reps": 1, "roundtrips": 10}
gateways = {"mails": 2, "concurrency": 2, "pdf_pages": 1}

# %%
import os

from pipeline.audit.base import fixtures as fx
from pipeline.audit.notebook import open_recorder, resolve, scratch_dir
from pipeline.audit.reporting import scaleoutviews
from pipeline.audit.scenarios import scale_out

recorder = open_recorder(db_path, session_id, profile)
work = scratch_dir(db_path, "scaleout-work")
cache = resolve(fixtures_dir)
mail_pdf = fx.cached(cache, f"text-{mail_pdf_mb:g}mb.pdf", {"mb": mail_pdf_mb},
                     lambda: fx.text_pdf_of_size(mail_pdf_mb))
dense_pdf = fx.cached(cache, f"text-{dense_pdf_mb:g}mb.pdf", {"mb": dense_pdf_mb},
                      lambda: fx.text_pdf_of_size(dense_pdf_mb))

# %%
params = {"store": store, "pipeline": pipeline, "ingestion": ingestion, "gateways": gateways}
scale_out.scale_out_figures(work, params, mail_pdf, dense_pdf, only=tuple(only), recorder=recorder)
m = recorder.measurements()
print(scaleoutviews.notes(m))
scaleoutviews.pipeline_table(m)

# %%
scaleoutviews.store_table(m)

# %%
scaleoutviews.writers_table(m)

# %%
scaleoutviews.ingestion_table(m)

# %%
scaleoutviews.gateways_table(m)

# %%
print(scaleoutviews.machine_statement(m, os.cpu_count() or 1))
print(scaleoutviews.capacity_statement(m))
scaleoutviews.capacity_table(m)

# %%
scaleoutviews.fig_scale_out(m);
