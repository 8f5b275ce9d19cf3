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
# # Pipeline profile of `python -m pipeline serve`: Email → Ingestion → Digest → Delivery
#
# A real `python -m pipeline serve` child (its own temp data dir, digests into its Maildir outbox) gets one
# warm-up mail, then `emails` mails with PDF attachments from `senders` SMTP sender processes. Stage times
# come from serve's run store (task start and end; the Email stage is DATA end → run queued). Memory and
# CPU come from serve's process tree, each process named by its role: RSS sampled with `memory_profiler`
# per process, per stage the peak and the largest rise over the RSS just before a task started. py-spy
# samples serve and its extraction workers over the load, from its start to its end or at most `pyspy_s`
# seconds (flame graph and top functions by self time); it pauses a process for each sample, so stage times
# carry that small cost.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
emails = 4
senders = 2
pdfs = ["text-0.5mb.pdf", "mixed-1mb.pdf"]
line_profile_pdf = "text-0.5mb.pdf"
pyspy_s = 30.0
pyspy_rate = 100
memory_interval_s = 0.02
e2e = {"pdf": "text-0.5mb.pdf", "senders": [2], "per_sender": 2, "rounds": 1}

# %%
import tempfile
from pathlib import Path

from IPython.display import SVG, Markdown, display

from pipeline.audit.notebook import fixture, open_recorder
from pipeline.audit.reporting import profileviews, views
from pipeline.audit.scenarios import end_to_end, pipeline_profile
from pipeline.audit.scenarios.line_profile import profile_lines

recorder = open_recorder(db_path, session_id, profile)
pdf_paths = [fixture(fixtures_dir, profile, name) for name in pdfs]
artefacts = profileviews.artefact_dir(db_path, recorder.session_id)

# %%
with tempfile.TemporaryDirectory(prefix="serve-profile-") as work:
    pipeline_profile.profile_serve(pdf_paths, Path(work), emails=emails, senders=senders, recorder=recorder,
                               artefacts=artefacts, pyspy_s=pyspy_s, pyspy_rate=pyspy_rate,
                               memory_interval_s=memory_interval_s)
m = recorder.measurements(session_id=recorder.session_id)
stages = views.stage_breakdown(m)
stages

# %%
views.fig_stage_breakdown(stages);

# %% [markdown]
# Memory per stage (MB): *peak* is the process's RSS while at least one such task ran, *+MB* the largest
# rise of one task over the RSS sampled just before it started; the extraction workers are summed.

# %%
profileviews.stage_memory_table(m)

# %%
profileviews.process_table(m)

# %%
display(Markdown(profileviews.pyspy_note(m)))
flamegraph = profileviews.flamegraph_file(m, artefacts)
if flamegraph is not None:
    display(SVG(filename=str(flamegraph)))

# %% [markdown]
# Top functions by self time (py-spy, serve under load) next to line_profiler's hottest lines below
# (one mail, in-process in this kernel, extraction in-process so the profiler sees it):

# %%
profileviews.top_self_time(m, top=10)

# %% [markdown]
# A mail's digest as its sender waits for it: for each count in `e2e["senders"]`, that many senders each send a
# mail with one PDF, wait for its digest, then send the next (at most that many runs in the pipeline at once). End to end is DATA end →
# digest delivered, next to the stages it is made of (medians and p95 over all mails).

# %%
with tempfile.TemporaryDirectory(prefix="serve-e2e-") as work:
    end_to_end.end_to_end(fixture(fixtures_dir, profile, e2e["pdf"]), Path(work), senders=tuple(e2e["senders"]),
                          per_sender=e2e["per_sender"], rounds=e2e["rounds"], recorder=recorder, name=e2e["pdf"])
profileviews.end_to_end_table(recorder.measurements())

# %%
recorder.record("line_profile", profile_lines(fixture(fixtures_dir, profile, line_profile_pdf)))
views.hot_lines(recorder.measurements(), top=3)
