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
# # Optimizations, measured both ways
#
# Each optimization is a switch whose baseline still works; both are run in this session, interleaved
# (A B A B) after a warm-up. Store: journal and synchronous level, batched commits, BEGIN IMMEDIATE,
# indexes, the counter table, selecting only needed columns, waiting for the write lock by polling. Gateway:
# chunked DATA reading, inotify against polling, LeanSMTP sessions against aiosmtpd's, small mails accepted
# on the event loop against in the thread pool. Ingestion: worker processes against threads for CPU-bound
# extraction, streaming pages against holding the document's text. Stages: parsed mail headers kept against
# parsed at every read. (PDF engines and page-parallel
# extraction are compared in the PDF
# ingestion notebook; the runner's per-task overhead is in the store notebook.)

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
store_runs = 5_000
reps = 1
transitions = 500  # per commit-switch measurement
lock_inserts = 50  # run inserts per turn beside a busy writer process (lock polling off and on)
gateway_reps = 1
gateway = {"message_mb": 1.0, "rounds": 1, "concurrent": 2, "small_mails": 20, "drop_messages": 3,
           "session_senders": 2, "session_mails": 5}
dense_pdf = "text-0.5mb.pdf"  # streaming against holding: the text-densest fixture of the profile
batch_pdf = "text-tiny.pdf"  # executor kinds: several copies ingested at once
documents = 2
ingestion_reps = 1
memory_reps = 1  # tracemalloc's peak does not vary with load: one rep after a warm-up
stage_reps = 1
stage_mails = 20  # distinct small mails per turn (parse, digest, compose)

# %%
from pipeline.audit.notebook import fixture, open_recorder, resolve
from pipeline.audit.reporting import views
from pipeline.audit.scenarios import optimizations

recorder = open_recorder(db_path, session_id, profile)

# %%
optimizations.store_switches(runs=store_runs, reps=reps, recorder=recorder, transitions=transitions,
                             lock_inserts=lock_inserts)
optimizations.gateway_switches(reps=gateway_reps, recorder=recorder, cache_dir=resolve(fixtures_dir), **gateway)
optimizations.ingestion_switches(fixture(fixtures_dir, profile, dense_pdf), fixture(fixtures_dir, profile, batch_pdf),
                                 documents=documents, reps=ingestion_reps, recorder=recorder,
                                 memory_reps=memory_reps)
optimizations.stage_switches(reps=stage_reps, mails=stage_mails, recorder=recorder)
views.optimization_table(recorder.measurements())
