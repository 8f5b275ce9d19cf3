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
# # Monitoring: serve's /metrics and what it costs
#
# Issue 13. Two real `python -m pipeline serve` configurations, one with `--metrics-port` (scraped every
# 5 s while loaded) and one without, take turns (A B, B A, ...), one serve alive at a time: each turn
# starts its serve, warms it up, sends `mails` small mails from sender processes, and stops it. Trigger
# latency per run (DATA end → run queued) comes from each serve's run store;
# the on/off ratio of the p99s is reported, and serve's CPU seconds per mail with and without metrics, compared
# with a 95 % interval, judge the overhead (SLA: not shown to exceed 5 %). A scrape after the load records which
# metric families serve exposes, for the report's monitoring section.

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"
mails = 10
senders = 2
reps = 1
warmup_mails = 1

# %%
from IPython.display import Markdown, display

from pipeline.audit.notebook import open_recorder, scratch_dir
from pipeline.audit.reporting import alertbaselines, views
from pipeline.audit.scenarios import monitoring

recorder = open_recorder(db_path, session_id, profile)
result = monitoring.metrics_ab(scratch_dir(db_path, "monitoring-work"), mails=mails, senders=senders, reps=reps,
                                 warmup_mails=warmup_mails, recorder=recorder)
display(Markdown(monitoring.monitoring_markdown(recorder.measurements(monitoring.SCENARIO))))

# %%
trigger = result[result.metric == "trigger_seconds"].assign(ms=lambda d: d.value * 1000)
ax = trigger.boxplot(column="ms", by="variant", showfliers=True)
ax.set_ylabel("trigger latency (ms): DATA end → run queued")
ax.set_xlabel("variant")
ax.figure.suptitle("")
ax.set_title("Metrics on/off: trigger latency per run");
spread = trigger.groupby("variant").ms.describe(percentiles=[0.5, 0.95, 0.99]).reset_index()
display(Markdown(views.markdown(spread)))

# %% [markdown]
# Each alert threshold next to what the audit measured on the same traffic earlier in this session (notebooks
# 01-11): a rule whose threshold is below its baseline would fire on ordinary mail.

# %%
display(Markdown(views.markdown(alertbaselines.record(recorder))))
