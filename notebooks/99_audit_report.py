# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Pipeline audit (project .venv)
#     language: python
#     name: pipeline-audit
# ---

# %% tags=["parameters"]
session_id = None
db_path = "data/audit.duckdb"
fixtures_dir = "data/fixtures"
profile = "quick"

# %%
from IPython.display import SVG, Markdown, display

from pipeline.audit.base.recorder import AuditRecorder
from pipeline.audit.notebook import resolve
from pipeline.audit.reporting import hostileviews, profileviews, report, scaleoutviews, soakviews, views
from pipeline.audit.scenarios import client_latency

recorder = AuditRecorder(resolve(db_path))
info = report.session_info(recorder, session_id)
session_id = info["session_id"]
m = recorder.measurements(session_id=session_id)
slas = report.evaluate_slas(recorder, session_id)
previous = report.previous_session(recorder, session_id)
md = lambda text: display(Markdown(text))  # noqa: E731

# %%
md(f"""# Performance audit, sprint 4 (TASK-163P)

Session `{session_id}`, profile **{info['profile']}**, commit `{info['git_sha'][:12]}`{' (with uncommitted changes)' if info['git_dirty'] else ''},
started {info['started_at']:%Y-%m-%d %H:%M} UTC on `{info['host']}`: {info['cpu']}, {info['cpus']} cores, Python {info['python']}.
Every figure below is read from `{report.shown_path(recorder.path)}` for this session; rerun with `make audit`.""" +
   ("" if recorder.ended(session_id) else "\n\n**This session did not run to its end** (interrupted, or a notebook "
    "failed): what it did not measure reads as not measured."))

# %%
md("## 1. Summary: SLAs\n\n" + views.markdown(report.sla_table(
    slas, report.sla_results(recorder, previous) if previous else None)) +
   (f"\n\n`previous` is session `{previous}` of the same profile." if previous else ""))

# %%
stages = views.stage_breakdown(m)
md("## 2. Pipeline profile\n\nMeasured on a real `python -m pipeline serve` (its own data dir, driven over SMTP "
   "by sender processes after a warm-up mail; stage times from its run store). Median and p95 time per mail in "
   "each stage (Email is DATA end → run queued; Queue is waiting for a run slot; Lane wait is the part of "
   "ingestion spent waiting for a free extraction worker, from the tasks' recorded waits, so Ingestion is the "
   "work itself):\n\n" + views.markdown(stages) +
   "\n\n" + views.bottleneck_line(stages))

# %%
if len(stages):
    views.fig_stage_breakdown(stages);

# %%
e2e = profileviews.end_to_end_table(m)
if len(e2e):
    md("A mail's digest as its sender waits for it: each sender sends a mail with the PDF below, waits until its "
       "digest is delivered (its run ended), then sends the next, so at most *senders* runs are in the pipeline "
       "at once (default settings, after a warm-up mail). End to end is DATA end → digest delivered; the stages "
       "are those above, per mail:\n\n" + views.markdown(e2e))
floor = profileviews.end_to_end_floor_table(m)
if len(floor):
    md("What the CPU allows: *senders* keep that many mails in flight, and the machine's *cores* finish at most "
       "cores / (CPU s per mail) mails a second, so a mail's mean end to end is at least senders × CPU s per mail "
       "/ cores (Little's law), however the work is scheduled. *CPU s per mail* is serve's and its workers' CPU "
       "over a round (psutil) per mail, and the *of which* columns split it by process (the extraction workers "
       "parse the mail and extract its PDF, the stage pool summarises and delivers, the main process runs the "
       "engine); a *mean / floor* near 1 means CPU-bound: only less CPU per mail makes the mail faster:\n\n"
       + views.markdown(floor))

# %%
md("Sampling profile of serve under that load. " + profileviews.pyspy_note(m) + " Top 5 functions by self time "
   "(serve and its extraction workers; *self share* is of that process's samples, *total s* includes the functions "
   "it calls):\n\n"
   + views.markdown(profileviews.top_self_time(m, top=5)))
flamegraph = profileviews.flamegraph_file(m, profileviews.artefact_dir(db_path, session_id))
if flamegraph is not None:
    display(SVG(filename=str(flamegraph)))

# %%
md("Hottest lines per stage (line_profiler, one mail, in-process in the notebook kernel):\n\n"
   + views.markdown(views.hot_lines(m, 3)))

# %%
md("## 3. Memory usage patterns\n\nMemory per stage of `python -m pipeline serve` under the pipeline-profile load "
   "(RSS of each process sampled with `memory_profiler`): *peak MB* is the process's RSS while at least one such "
   "task ran, *+MB* the largest rise of one task over the RSS sampled just before it started; the extraction "
   "workers are summed:\n\n" + views.markdown(profileviews.stage_memory_table(m)) +
   "\n\nPeak RSS and CPU seconds of each process over that load:\n\n" + views.markdown(profileviews.process_table(m)) +
   "\n\n" + soakviews.serve_soak_text(m) + "\n\n" + views.markdown(soakviews.serve_slopes(m)) +
   "\n\n" + soakviews.slope_discussion(m) +
   "\n\n" + soakviews.kernel_soak_text(m))

# %%
serve_series = soakviews.serve_soak_series(m)
if len(serve_series):
    soakviews.fig_serve_soak(serve_series, soakviews.serve_slopes(m));

# %%
series = views.soak_series(m)
if len(series):
    views.fig_soak(series, soakviews.kernel_soak_slopes(m));

# %%
md("Allocation sites that grew most over the in-kernel soak (tracemalloc in the notebook kernel):\n\n"
   + views.markdown(views.top_allocations(m)))

# %%
concurrency = views.concurrency_table(m)
md("## 4. Stress\n\n### Concurrency\n\nConditions: at each level that many mails with one PDF each (the "
   "`text-tiny.pdf` fixture, one page) handed to the gateway at once, in a pipeline inside the notebook kernel with "
   "`[engine] max_active_runs` raised to the level (**the shipped default is 32**) and up to 64 runner threads; "
   "everything else at its default (PDFium, two page workers).\n\n" + views.markdown(concurrency))

# %%
if len(concurrency):
    views.fig_concurrency(concurrency);

# %%
scaling = views.pdf_scaling_table(m)
md("### PDF scaling\n\nConditions: one document at a time through the capped extraction workers; each engine "
   "variant measured interleaved; `default` marks the shipped setting (**PDFium with two page workers**), the "
   "headline; the pypdf rows are the switch kept for comparison. Memory is the extraction workers' RSS alone."
   "\n\n" + views.markdown(scaling))

# %%
if len(scaling):
    views.fig_pdf_scaling(scaling);

# %%
md("### Email bursts\n\nConditions: small mails **without attachments** (a few hundred bytes each), each round on "
   "a fresh `python -m pipeline serve` with the shipped defaults, driven over SMTP by client processes; trigger "
   "latency is DATA end → run queued from serve's run store (the sender's whole SMTP transaction is longer: "
   "issue 17):\n\n" + views.markdown(views.burst_table(m))
   + "\n\nPeak RSS (MB) and CPU seconds over each round, per process role (*workers*: the extraction workers, "
   "summed):\n\n" + views.markdown(soakviews.burst_resources(m)) + "\n\nServe's RSS slope per process over the "
   f"soak: serve {soakviews.kib_per_run(soakviews.serve_slope(m, 'serve'))}, extraction workers "
   f"{soakviews.kib_per_run(soakviews.serve_slope(m, 'workers'))} (section 3).")

# %%
if len(views.rows(m, "email_burst")):
    views.fig_burst(m);

# %%
if len(views.rows(m, "small_mail_drain")):
    md("Small mails processed per second (issue 16): a burst of small mails (no attachment) at once to a fresh "
       "serve per round; *runs/s* is the backlog's peak over the time from the last send until every run ended, "
       "*CPU ms per run* serve's and its workers' CPU over the round per run. *default* runs `build_digest` and "
       "`deliver` in the runner's process pool (`[runner] stage_executor`), *stage_threads* in the engine's "
       "threads, as before issue 16's change; *results_on_pool_thread* takes the pool's results to their runs on "
       "the pool's own result thread (`[runner] completion_threads = 0`) instead of the 4 completion threads; "
       "rounds interleaved. *Main process CPU ms per run* is serve's main process alone: it runs the engine, the "
       "runner's bookkeeping and the run store's writes in one interpreter, so *runs/s one core allows at that* "
       "(1000 / it) is a ceiling that more stage workers do not raise:\n\n"
       + views.markdown(soakviews.drain_table(m))
       + "\n\nWhere the shipped defaults' CPU per small run goes, by process (median over rounds; the stage pool "
       "includes its fork server, the extraction workers parse each mail):\n\n"
       + views.markdown(soakviews.drain_cpu_by_process(m)))

# %%
md("### The sender's wait\n\nConditions: small mails (no attachment) from client processes, each on a new "
   "connection, in a closed loop, against a real `python -m pipeline serve` that processes the runs at the same "
   "time; *client_txn_ms* is connect → the final 250 (what a sender waits), *client_mail_ms* MAIL → that 250, "
   "*server_trigger_ms* DATA end → run committed (serve's own figure); a `large` round has one 5 MB PDF mail "
   "beside the small ones. *gateway_process* is the shipped default (issue 17: SMTP accepted in a child process "
   "of its own, the engine and its workers `[serve] engine_nice` (12) nice steps below it), *same_priority* that "
   "layout without the priority step (`[serve] engine_nice = 0`), *short_slice* the default with the gateway "
   "asking Linux for 100 µs scheduler slices (`[serve] gateway_slice_us = 100`), *one_process* the gateway in "
   "serve's process, *inline_accept* "
   "the default with small mails accepted on the gateway's event loop (`[gateway] inline_accept_bytes = 65536`), "
   "*gateway_only* "
   "`serve --gateway-only` (the same gateway, its runs left queued: nothing processed beside it), and *bare_sink* no "
   "serve at all but the floor under all of them (`pipeline.audit.base.baresink`: aiosmtpd that fsyncs the mail, "
   "commits a row and answers 250, with no pipeline behind it: what these clients and this machine cost by "
   "themselves); variants interleaved, one alive at a time (each turn starts its serve, warms it up, measures, "
   "stops it):\n\n"
   + views.markdown(client_latency.summary(views.rows(m, client_latency.SCENARIO))))

# %%
md("## 5. Limits and breaking points\n\n" + "\n".join(views.limit_lines(m)) +
   "\n\nHostile inputs with the default limits:\n\n" + views.markdown(views.hostile_table(m)))

# %%
fault_table, fault_cases = views.fault_table(m), views.fault_cases(m)
md("### Faults survived\n\nEach fault injected into a real `python -m pipeline serve` driven over SMTP by sender "
   "processes that retry after a 4xx or a dropped connection, like an MTA (notebook `09_faults`). *lost*: acked "
   "(250) but no run, or a run that never ended; *duplicated*: more than one run or digest for one Message-ID; "
   "*untyped*: a failed run or task whose reason is not one of `pipeline.errors`' reasons; *recover s*: fault "
   "removed → first 250 (`kill_serve`: kill → first 250 once the restarted serve answered; `hung_gateway`: hang "
   "→ first 250 once the hung process was gone, so a reply it sent just before cannot count); *drain s*: fault "
   "removed → "
   "last acked run ended; *4xx after s*: fault injected → first refusal senders saw; *slowest scrape s*: serve's "
   "`/metrics` scraped every 0.5 s during the fault (with Prometheus's default 10 s scrape timeout, a slower "
   "scrape is a failed one); *acked meanwhile* (`spool_replaced`): mails acked into the new spool directory before "
   "serve noticed it was not the one it had opened (each must still end in one run); *stop s* (`stop_overrun`): "
   "SIGTERM → serve's exit, with the store locked (the grace plus `[serve] stop_margin_s` is the bound); "
   "*waiting* (a full work dir or outbox): the most runs seen queued again after their start, waiting for room "
   "(sampled every 0.25 s while full), and *waiting, no reason*: the most of them whose reason did not say why "
   "(what `show` prints); "
   "*WAL peak MB* / *WAL after MB* (`wal_reader`): the run store's write-ahead log while "
   "another process held an old snapshot during the burst, and after it went and more mail came; "
   "`store_server_down`, `scheduler_killed` and `scheduler_frozen` are the scale-out engines failing under a serve "
   "that uses them (`scheduler_frozen`: SIGSTOP, then SIGCONT; *4xx after s* includes `[executor] "
   "scheduler_silent_s`, 5 s here).\n\n" + views.markdown(fault_table) +
   "\n\nOutcome per judged case (bad inputs; the run whose extraction worker was killed):\n\n"
   + views.markdown(fault_cases) + "\n\n" + views.wild_mail_line(m)
   + ("\n\nRelays as they behave in the wild (`bad_relay`: a scripted relay on loopback, one mail per behaviour; "
      "greylisting answers 451 to RCPT until the third session, *dropped* loses the connection mid-DATA once, "
      "*quit_421* answers 421 to QUIT after taking the digest, *refused* answers 554 to the final dot):\n\n"
      + views.markdown(relay) if len(relay := views.relay_cases(m)) else ""))

# %%
if len(views.rows(m, "faults", "replies")):
    views.fig_fault_replies(m);

# %%
fmt = lambda table: views.markdown(table, floatfmt=".4g")  # noqa: E731
md("### Hostile senders\n\nIssue 11 against a real `python -m pipeline serve` driven by client processes "
   "(notebook `10_hostile_senders`); *before*/*after*: the setting that switches the behaviour, off and on.\n\n"
   "**Sessions** (`gateway.max_sessions` set for the run): per number of idle sessions held open, what those "
   "connections got first (220: a session; 421: refused by the limit) and how many serve held, what a normal "
   "client got and its connect → 250 latency; *after_release*: some idle sessions closed; *churn*: connections "
   "made one after another while every slot is full, with serve's log bytes and tracebacks for them.\n\n"
   + fmt(hostileviews.sessions_table(m)) +
   "\n\n**Memory**: peak RSS of serve alone and of its worker processes while large mails arrive at once; "
   "before: `gateway.stream_data` and `ingest.parse_isolate` off, no in-flight cap; after: both on with the "
   "default cap (a sender over it gets 452 and tries again, as an MTA does).\n\n"
   + fmt(hostileviews.comparison_table(m, "memory")) +
   "\n\n**Head of line**: a hostile slow PDF, then 1 s later a normal one; latency is DATA end → run ended; "
   "`ingest.fair_extraction` off (before) and on (after); text left by a failed hostile run is partial text."
   "\n\n" + fmt(hostileviews.comparison_table(m, "head_of_line")) +
   "\n\n**Head of line, many PDFs**: a mail of several hostile slow PDFs, then 1 s after its extraction began a "
   "mail of one normal PDF; `ingest.fair_by_mail` off (before: the workers are shared PDF by PDF, and all of one "
   "mail's PDFs go to the pool at once) and on (after: mail by mail, at most `ingest.workers` of one mail's PDFs "
   "at once); `ingest.fair_extraction` on in both.\n\n" + fmt(hostileviews.comparison_table(m, "head_of_line_many")) +
   "\n\n**Mail budget**: the same two mails, the hostile one's PDFs sharing one budget of worker time "
   "(`ingest.mail_timeout_s`): out of reach (before) and set (after, its value in the part's parameters); "
   "*hostile_pdfs_cut_by_the_mail_budget*: its PDFs failed `not_read` once the budget was used (never read, or "
   "not to the end).\n\n"
   + fmt(hostileviews.comparison_table(m, "mail_budget")) +
   "\n\n**Head of line, a crowd**: several mails of slow PDFs at once (the part's parameters say how many), then "
   "a mail of one normal PDF 1 s after most of them are being extracted; before: `runner.extract_pool` off (their "
   "PDFs wait for a worker on the runner threads the next mail's parse needs) and `ingest.newcomer_s` 0 (each "
   "earlier mail has 5 s of worker time before a newer one goes first); after: both on (the defaults); "
   "*crowd_extracting*: the crowd's mails being extracted when the normal one was sent.\n\n"
   + fmt(hostileviews.comparison_table(m, "head_of_line_crowd")))

# %%
md("**Spool lifecycle**: spool and work bytes per 1,000 mails before and after `python -m pipeline purge "
   "--older-than 0`, the bytes purge reports, then a restart with a killed accept's temp file planted: the runs "
   "and digests it re-creates, run ids reused, temp files left.\n\n"
   + fmt(hostileviews.comparison_table(m, "spool")) +
   "\n\n**Abandoned accepts**: client processes open many sessions, send each one's mail and final dot, and "
   "close them all without reading a reply (far more at once than the gateway's accept threads); then every "
   "message is sent again, as an MTA whose mail was not answered does. *accepts_dropped*: mails with no run "
   "(their accept was still waiting for a thread; one already running completes); the spool temp files and the "
   "gateway's descriptors left once the closed sessions settled; messages without exactly one run after the "
   "resend, and resent mails not answered 250.\n\n"
   + fmt(hostileviews.comparison_table(m, "abandoned")) +
   "\n\n**Pipelining**: one client writes nested `MAIL` commands without pause (each answered 503), reading its "
   "replies, while a normal client sends small mails, each on a new connection (connect → 250, from a client "
   "process); `gateway.fair_share_replies` 0 (before: aiosmtpd answers every line a session has buffered before "
   "another session runs) and 16 (after, the default), interleaved on serves of their own, the junk limit lifted "
   "(it would close the flooder); *flood_replies*: the flooder's replies meanwhile. Then, with the default "
   "limits, `NOOP`s and refused commands pipelined on one session: how many were answered before "
   "`gateway.max_junk_commands` closed it with 421 4.7.0.\n\n"
   + fmt(hostileviews.comparison_table(m, "pipelining")) +
   "\n\n**Digest flood**: one client claims one address as the envelope sender of every mail, delivered through a "
   "scripted relay, with `[delivery] max_digests_per_hour` off (before: 0; the default is 100) and at the part's quota "
   "(after), each on a serve of its own: the digests that address got, the mails acked and the runs that "
   "succeeded (a digest over the quota is skipped, its run a success that says why).\n\n"
   + fmt(hostileviews.comparison_table(m, "digest_flood")) + "\n\n" + hostileviews.notes(m))

# %%
if len(views.rows(m, "hostile")):
    hostileviews.fig_hostile_senders(m);

# %%
md("## 6. DAGRunStore\n\nMedian milliseconds (rows: query; columns: runs in the store):\n\n"
   + views.markdown(views.store_table(m).reset_index()))

# %%
md("### Scale-out: PostgreSQL, Dask and several gateways\n\nIssue 12 on real engines (notebook `11_scale_out`): "
   "one durable throwaway PostgreSQL server, a fresh database per variant; Dask LocalClusters of worker processes; "
   "real `python -m pipeline serve` children driven over SMTP. " + scaleoutviews.machine_statement(m, int(info["cpus"]))
   + "\n\n**The email_digest** (a ~1 MB text PDF per mail, all of a round's mails sent at once up to the "
   "concurrency), variants interleaved round by round, each round's serve(s) warmed up by one mail first; runs/s "
   "is acked mails over first send → last run ended, e2e is DATA end → run ended (from the run store), over "
   "every run of every round; pg_2_gateways is a serve and a `serve --gateway-only` on one store and data dir (two gateways, one engine):\n\n" + fmt(scaleoutviews.pipeline_table(m)) +
   "\n\n**Store queries and transitions** (median ms; transitions per second), SQLite and PostgreSQL at each size "
   "(the query set of notebook 06):\n\n" + fmt(scaleoutviews.store_table(m).reset_index()) +
   "\n\n**Writers at once** (transitions/s one per commit from several writer processes at once, each on its "
   "own connection as several serves would be, on the store at its largest size, writer counts in turn; *peak* marks "
   "the best median per backend, the store's capacity that the capacity model and the SLA use; one client alone "
   "waits a round trip per commit, and its bare `SELECT 1` rate is its ceiling):\n\n"
   + fmt(scaleoutviews.writers_table(m)) +
   "\n\n**CPU-bound ingestion on Dask** (dense PDFs straight to the cluster; a task round trip is a no-op task's "
   "submit → result through the package's executor, what the Dask path adds to every task; the bare round trip is "
   "the same task by `client.submit` alone, alternated with it: Dask's own floor here, where distributed's client "
   "batches its messages to the scheduler at most every 10 ms and the scheduler its messages to a worker every "
   "5 ms, intervals fixed in its source):\n\n" + fmt(scaleoutviews.ingestion_table(m)) +
   "\n\n**Three gateways on one PostgreSQL store** (a third of the Message-IDs sent to two gateways at once; "
   "counted from the store):\n\n" + fmt(scaleoutviews.gateways_table(m)) +
   "\n\n**Capacity model.** " + scaleoutviews.capacity_statement(m) + "\n\n" + fmt(scaleoutviews.capacity_table(m))
   + ("\n\n" + scaleoutviews.notes(m) if scaleoutviews.notes(m) else ""))

# %%
if len(views.rows(m, "scale_out")):
    scaleoutviews.fig_scale_out(m);

# %%
from pipeline.audit.reporting import peerviews  # noqa: E402  (this section's own views)

md("### Beside Prefect, Dagster and Airflow\n\n" + peerviews.report_markdown(m))
if len(peerviews.ratio_table(m)):
    peerviews.fig_peers(peerviews.ratio_table(m));

# %%
optim, engines = views.optimization_table(m), views.engine_table(m)
md("## 7. Optimizations, before and after\n\nEach switch measured both ways in this session, interleaved after a "
   "warm-up (spread: min–max over the repetitions). The store and gateway switches are settings "
   "(`StoreConfig`, `GatewayConfig`); the ingestion ones are `IngestConfig.isolate` (worker processes) and "
   "`IngestConfig.stream_text`:\n\n" + views.markdown(optim) +
   "\n\nPDF ingestion engines (median seconds; `pypdf/x` is how many times faster x is than single-worker "
   "pypdf; the shipped default is PDFium with pages split across two workers" +
   views.engines_not_measured(info.get("params")) + "):\n\n" + views.markdown(engines))

# %%
counts, errors = views.code_quality_tables(m)
md("## 8. Code quality audit\n\n" + (
    "Tool counts on `pipeline/` (ruff, mypy, coverage of the fast tests, and an AST survey of logging calls):\n\n"
    + views.markdown(counts, floatfmt=".4g") + "\n\nError handling per component (typed errors raised in each "
    "module, found by reading the source; what a user sees at that edge):\n\n" + views.markdown(errors)
    + "\n\nThe test suite turns `ResourceWarning` into an error and fails a test that leaves threads, "
    "listening sockets or open file descriptors behind (`tests/leaks.py`; `tests/test_hygiene.py` shows the "
    "check catching an open file)." if len(counts) else "No code-quality measurements were recorded in this session."))

# %%
from pipeline.audit.reporting import alertbaselines  # noqa: E402  (this section's own views)
from pipeline.audit.scenarios import monitoring, regression_gate

md("## 9. Baselines, monitoring and SLAs\n\nExpected range per operation type on this machine (median, p95, "
   "interquartile p25–p75):\n\n" + views.markdown(views.baselines_table(m)) + "\n\n### Monitoring a running serve\n\n"
   + monitoring.monitoring_markdown(m) + "\n\n**Alert thresholds against the measured baseline of the same "
   "traffic** (headroom = threshold / baseline, in the metric's base unit: seconds, bytes, runs; a rule below "
   "its baseline would fire on ordinary mail):\n\n" + views.markdown(alertbaselines.baseline_table(m)) +
   "\n\n### The regression gate, checked\n\nA throwaway commit adds a fixed amount of work to every store write; "
   "the commit A/B compares it with its parent, and the parent with itself, while CPU-bound processes run beside "
   "it (notebook `13_regression_gate`). *ratio*: candidate/base slowness, median of the repetitions, with its "
   "bootstrap interval; the verdict is *regressed* only when the whole interval is above 1.10:\n\n"
   + views.markdown(regression_gate.gate_table(m)))

# %%
md(f"""## 10. How to reproduce

```
make audit            # standard profile: fixtures, every notebook, this report, outbox.json, TASK_CARDS.md
python scripts/run_audit.py --profile quick|standard|full
```

Executed notebooks of this session: `data/audit-runs/{session_id}/`. Notebook run times (papermill):

""" + views.markdown(views.rows(m, "batch", "notebook_seconds")[["notebook", "value"]].rename(
    columns={"value": "seconds"}) if len(views.rows(m, "batch")) else views.rows(m, "batch")))
