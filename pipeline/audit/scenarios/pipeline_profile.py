"""The pipeline profile measured on a real ``python -m pipeline serve``: what production runs.

Serve runs as a child process with its own data dir (``serveproc.ServeProcess``),
driven over SMTP by sender processes. Stage times come from its run store (read
from outside, as ``concurrency.stage_times`` computes them); resource figures from
its process tree, each process named by its role (``serve``, ``extract worker``),
never by pid: per process peak RSS and CPU seconds, and per stage (task windows
from the store) the peak and increment of serve's RSS and of the extraction
workers' summed RSS, sampled with ``memory_profiler.memory_usage``. A py-spy
sampling profile of the tree (``--subprocesses``) is recorded as speedscope JSON
(parsed into self and total time per function) and as a flame-graph SVG; when
py-spy cannot attach, the rows say so and the profile goes on without it.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import memory_profiler
import pandas as pd
import psutil

from ...config import Settings
from ...store import SUCCESS, open_store
from ..base import fixtures as fx
from ..base.faultcheck import wait_terminal
from ..base.harness import frame, row
from ..base.paths import short_site
from ..base.recorder import AuditRecorder
from ..base.serveproc import (
    EXTRACT_WORKER,
    GATEWAY_PROCESS,
    STAGE_POOL,
    Senders,
    ServeProcess,
    digests_by_original,
    serving,
)
from .concurrency import stage_times, task_windows

SCENARIO = "pipeline_profile"
PYSPY_ATTACH_S = 10.0  # how long the load waits for py-spy to attach (it says "Sampling process" then)
SERVE, EXTRACT = "serve", "extract worker"
WORKERS = "extract workers"  # the extraction workers' RSS summed, in the per-stage memory rows
# Seed stage of each task kind, for the per-stage memory rows.
TASK_STAGES = {"parse_email": "Ingestion", "ingest_pdf": "Ingestion", "build_digest": "Digest",
               "deliver": "Delivery"}
SPEEDSCOPE, FLAMEGRAPH = "serve-profile.speedscope.json", "serve-flamegraph.svg"
Rows = list[dict[str, Any]]


def role_of(proc: psutil.Process, serve_pid: int) -> str:
    """``serve``, ``gateway``, ``extract worker``, ``stage pool`` or ``other child``: what a process of serve's
    tree is, never its pid (the gateway process accepts the mail since issue 17; the stage pool, the runner's
    process pool and its fork server, runs build_digest and deliver since issue 16)."""
    if proc.pid == serve_pid:
        return SERVE
    try:
        command = proc.cmdline()
        if any(GATEWAY_PROCESS in part for part in command):
            return "gateway"
        if any(EXTRACT_WORKER in part for part in command):
            return EXTRACT
        return "stage pool" if any(STAGE_POOL in part for part in command) else "other child"
    except psutil.Error:
        return "other child"


class TreeSampler:
    """Sample RSS (``memory_profiler.memory_usage``, MB) and CPU time of each process of serve's tree on a
    background thread, every ``interval_s``, until the block ends."""

    def __init__(self, serve: ServeProcess, interval_s: float = 0.02) -> None:
        assert serve.proc is not None
        self.serve_pid, self.interval_s = serve.proc.pid, interval_s
        self._serve = serve
        self.samples: list[tuple[int, float, int, str, float]] = []  # (round, time, pid, role, rss MB)
        self.roles: dict[int, str] = {}
        self.cpu: dict[int, list[float]] = {}  # pid -> [cpu seconds when first seen, latest cpu seconds]
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-tree-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._sample(0, baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise RuntimeError("the serve tree sampler failed; its figures are incomplete") from self.error

    def _tree(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.serve_pid), *self._serve.descendants()]
        except psutil.Error:
            return []

    def _run(self) -> None:
        rnd = 1
        try:
            while not self._stop.wait(self.interval_s):
                self._sample(rnd)
                rnd += 1
        except Exception as exc:  # raised in the scenario's thread on exit: a sampler must not die silently
            self.error = exc

    def _sample(self, rnd: int, baseline: bool = False) -> None:
        for proc in self._tree():
            try:
                role = self.roles.setdefault(proc.pid, role_of(proc, self.serve_pid))
                measured = memory_profiler.memory_usage(proc.pid, interval=0, timestamps=True)
                times = proc.cpu_times()
            except psutil.Error:  # the process ended between listing and sampling
                continue
            if not measured or measured[0] is None:
                continue
            mb, at = measured[0]
            self.samples.append((rnd, at, proc.pid, role, mb))
            cpu = times.user + times.system
            # a process started during the load counts from zero; one running before from its baseline
            self.cpu.setdefault(proc.pid, [cpu if baseline else 0.0, cpu])[1] = cpu

    def frame(self) -> pd.DataFrame:
        """Samples as ``round, time, pid, role, rss_mb``."""
        return pd.DataFrame(self.samples, columns=["round", "time", "pid", "role", "rss_mb"])


def process_rows(sampler: TreeSampler) -> Rows:
    """Peak RSS and CPU seconds over the load per process, labelled by role (rep numbers processes of a role)."""
    samples = sampler.frame()
    rows: Rows = []
    seen: dict[str, int] = defaultdict(int)
    for pid, (first, last) in sorted(sampler.cpu.items()):
        role = sampler.roles[pid]
        index = seen[role]
        seen[role] += 1
        peak = samples[samples.pid == pid].rss_mb.max()
        rows.append(row("baseline", "process_peak_rss_mb", float(peak), "MB", index, process=role))
        rows.append(row("baseline", "process_cpu_seconds", last - first, "s", index, process=role))
    return rows


def role_totals(samples: pd.DataFrame) -> pd.DataFrame:
    """Per sampling round: time and summed RSS (MB) of serve and of the extraction workers, as columns."""
    if samples.empty:
        return pd.DataFrame(columns=["time", SERVE, WORKERS])
    labelled = samples.assign(role=samples.role.replace({EXTRACT: WORKERS}))
    totals = labelled.pivot_table(index="round", columns="role", values="rss_mb", aggfunc="sum")
    totals["time"] = samples.groupby("round").time.min()
    return totals.reset_index(drop=True)


def stage_memory_rows(samples: pd.DataFrame, windows: dict[str, list[tuple[float, float]]],
                      interval_s: float) -> Rows:
    """Per task kind and process (serve; extraction workers summed): ``peak`` RSS while any such task ran, and
    ``increment``, the largest rise of one task instance over the RSS sampled just before it started.

    A task that no sample fell into (shorter than the gap between samples, which grows when the machine is
    busy) gets the first sample taken after it started.
    Tasks overlap under load, so a window's figure is the process's memory while at least one such task ran.
    """
    totals = role_totals(samples)
    rows: Rows = []
    for task, spans in windows.items():
        for role in (SERVE, WORKERS):
            if role not in totals:
                continue
            series = totals[["time", role]].dropna()
            peak, increment = float("nan"), float("nan")
            for start, end in spans:
                inside = series[(series.time >= start) & (series.time <= end)][role]
                if inside.empty:
                    inside = series[series.time >= start][role].iloc[:1]
                before = series[series.time <= start][role]
                if inside.empty:
                    continue
                peak = max(peak, inside.max()) if peak == peak else inside.max()
                if not before.empty:
                    rise = inside.max() - before.iloc[-1]
                    increment = max(increment, rise) if increment == increment else rise
            tags = {"task": task, "stage": TASK_STAGES.get(task, task), "process": role,
                    "processes": int(samples[samples.role == (EXTRACT if role == WORKERS else SERVE)].pid.nunique()),
                    "interval_s": interval_s, "tasks": len(spans)}
            for stat, value in (("peak", peak), ("increment", increment)):
                if value == value:  # not NaN: some sample fell into a window
                    rows.append(row("baseline", "stage_memory_mb", value, "MB", 0, stat=stat, **tags))
    return rows


# -- py-spy ----------------------------------------------------------------------------------------------------


def pyspy_path() -> str | None:
    """The py-spy executable next to this interpreter, else on PATH, else None."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@contextmanager
def pyspy_recording(pid: int, out_dir: Path, duration_s: float, rate: int) -> Iterator[dict[str, Any]]:
    """Record ``pid`` and its subprocesses with two py-spy processes over the same window: speedscope JSON
    aggregated by function (``--function``) and a flame-graph SVG by line. The window opens once both have
    attached and closes when the block ends (py-spy stops on SIGINT and writes its files), or after
    ``duration_s`` at most, so it spans the load the block drives however long that takes to start. Yields
    a status dict that is filled in when the block ends (``recorded``, ``reason``, file paths, the window's
    ``duration_s``); never raises for py-spy failing. A ``duration_s`` of 0 switches py-spy off."""
    seconds = max(1, round(duration_s)) if duration_s > 0 else 0  # py-spy takes whole seconds only
    status: dict[str, Any] = {"recorded": False, "reason": "py-spy not installed", "duration_s": seconds,
                              "rate": rate}
    exe = pyspy_path()
    if duration_s <= 0:
        status["reason"] = "switched off (duration 0)"
    if exe is None or duration_s <= 0:
        yield status
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    common = ["record", "--pid", str(pid), "--subprocesses", "--rate", str(rate), "--duration", str(seconds)]
    plans = {"speedscope": (out_dir / SPEEDSCOPE, ["--format", "speedscope", "--function"]),
             "flamegraph": (out_dir / FLAMEGRAPH, ["--format", "flamegraph"])}
    procs = {name: subprocess.Popen([exe, *common, *extra, "--output", str(path)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # it speaks on stdout
             for name, (path, extra) in plans.items()}
    # the load starts once both sample: a short load sent at once could end before py-spy has attached
    said = {name: _await_sampling(proc, PYSPY_ATTACH_S) for name, proc in procs.items()}
    opened = time.monotonic()
    try:
        yield status
    finally:
        status["duration_s"] = round(min(time.monotonic() - opened, seconds), 1)
        for name, proc in procs.items():  # the load ended: stop sampling (py-spy writes what it has on SIGINT)
            if proc.poll() is None:
                if b"Sampling process" not in said[name]:  # still attaching: a SIGINT before its handler is in
                    said[name] += _await_sampling(proc, PYSPY_ATTACH_S)  # place kills it, and it writes nothing
                proc.send_signal(signal.SIGINT)
        errors = []
        for name, proc in procs.items():
            try:
                err, _ = proc.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                err, _ = proc.communicate()
            err = said[name] + err
            if proc.returncode != 0 or not plans[name][0].exists():
                errors.append(f"{name}: exit {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}")
        status.update(recorded=not errors, reason="; ".join(errors),
                      **{name: path for name, (path, _) in plans.items() if path.exists()})


def _await_sampling(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    """Read py-spy's output until it says it is sampling (attached), it exits, or ``timeout_s``; return what it
    said (the rest is read at its end)."""
    assert proc.stdout is not None
    said, deadline = b"", time.monotonic() + timeout_s
    try:
        while b"Sampling process" not in said and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.05)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                said += chunk
    except OSError as exc:  # its pipe gone: the load starts anyway, and py-spy's exit tells what happened
        said += f"(reading py-spy's output failed: {exc})".encode()
    return said


def parse_speedscope(path: Path, roles: dict[int, str], default_pid: int) -> pd.DataFrame:
    """Self and total seconds per function and process role from a py-spy speedscope file.

    Self time: samples whose innermost frame is the function; total: samples with the function anywhere on
    the stack (counted once per sample). Columns: ``process, function, site, self_s, total_s, self_share``
    (share of the role's sampled seconds); sites are machine-independent (``paths.short_site``).
    """
    data = json.loads(Path(path).read_text())
    frames = data["shared"]["frames"]
    sites = [(f["name"], short_site(f.get("file") or "", f.get("line"))) for f in frames]
    # with --subprocesses py-spy puts a frame 'process <pid>:"<command line>"' (no file) at each stack's root
    synthetic = {i for i, f in enumerate(frames) if not f.get("file") and f["name"].startswith("process ")}
    self_s: dict[tuple[str, int], float] = defaultdict(float)
    total_s: dict[tuple[str, int], float] = defaultdict(float)
    sampled: dict[str, float] = defaultdict(float)
    for profile in data["profiles"]:
        found = re.match(r"Process (\d+)", profile.get("name", ""))
        role = roles.get(int(found.group(1)) if found else default_pid, "other child")
        for full, weight in zip(profile["samples"], profile["weights"], strict=True):
            stack = [i for i in full if i not in synthetic]
            if not stack:
                continue
            sampled[role] += weight
            self_s[(role, stack[-1])] += weight  # speedscope stacks run root -> leaf
            for index in set(stack):
                total_s[(role, index)] += weight
    out = [{"process": role, "function": sites[i][0], "site": sites[i][1], "self_s": self_s.get((role, i), 0.0),
            "total_s": seconds, "self_share": self_s.get((role, i), 0.0) / sampled[role]}
           for (role, i), seconds in total_s.items()]
    table = pd.DataFrame(out, columns=["process", "function", "site", "self_s", "total_s", "self_share"])
    return table.sort_values(["process", "self_s"], ascending=[True, False]).reset_index(drop=True)


def clean_flamegraph(path: Path, roles: dict[int, str], title: str) -> None:
    """Rewrite py-spy's SVG so it names no pid, command line or machine path: the title becomes ``title``,
    each process's root frame its role."""
    text = Path(path).read_text()
    text = re.sub(r'(<text id="title"[^>]*>)[^<]*(</text>)', lambda m: m.group(1) + title + m.group(2), text)

    def process(match: re.Match[str]) -> str:
        return "process " + roles.get(int(match.group(1)), "other child")

    # py-spy labels each process's root frame 'process <pid>:&quot;<command line>&quot;', cut short with '..'
    # in a narrow frame's text: up to the closing quote or the end of the element
    text = re.sub(r"process (\d+):&quot;(?:(?!&quot;)[^<])*(?:&quot;)?", process, text)
    Path(path).write_text(text)


def pyspy_rows(status: dict[str, Any], roles: dict[int, str], serve_pid: int, top: int) -> Rows:
    """Whether py-spy recorded (and why not), and the ``top`` functions by self time per process role."""
    rows = [row("baseline", "pyspy_recorded", float(status["recorded"]), "bool", 0, reason=status["reason"],
                duration_s=status["duration_s"], rate=status["rate"],
                flamegraph=FLAMEGRAPH if "flamegraph" in status else "",
                speedscope=SPEEDSCOPE if "speedscope" in status else "")]
    if "speedscope" not in status:
        return rows
    table = parse_speedscope(status["speedscope"], roles, serve_pid)
    for role, group in table[table.self_s > 0].groupby("process"):
        for rank, item in enumerate(group.head(top).itertuples()):
            tags = {"process": role, "function": item.function, "site": item.site}
            rows += [row("baseline", "self_seconds", item.self_s, "s", rank, **tags),
                     row("baseline", "self_share", item.self_share, "fraction", rank, **tags),
                     row("baseline", "total_seconds", item.total_s, "s", rank, **tags)]
    return rows


# -- the scenario ----------------------------------------------------------------------------------------------


def profile_serve(pdfs: list[Path], work: Path, emails: int = 20, senders: int = 4,
                  recorder: AuditRecorder | None = None, artefacts: Path | None = None, pyspy_s: float = 60.0,
                  pyspy_rate: int = 100, memory_interval_s: float = 0.02, top: int = 15,
                  timeout_s: float = 600.0) -> pd.DataFrame:
    """Profile ``python -m pipeline serve`` under ``emails`` mails (each with one of ``pdfs`` in turn) sent by
    ``senders`` processes after a one-mail warm-up: stage times per run, per-process resources, per-stage
    memory and a py-spy profile of the load, at most its first ``pyspy_s`` seconds (files in ``artefacts``)."""
    attachments = [(Path(p).name, Path(p).read_bytes()) for p in pdfs]
    messages = [(f"<profile-{i}@audit>", fx.email_with([attachments[i % len(attachments)]],
                                                      message_id=f"<profile-{i}@audit>")) for i in range(emails)]
    work = Path(work)
    with serving(work / "data", work) as serve:
        assert serve.proc is not None
        _warm_up(serve, work, timeout_s)
        with TreeSampler(serve, memory_interval_s) as sampler, \
                pyspy_recording(serve.proc.pid, artefacts or work, pyspy_s, pyspy_rate) as status:
            with Senders(serve.port, messages, work, senders) as sending:
                sending.wait(timeout_s)
            wait_terminal(serve.data_dir, [mid for mid, _ in messages], timeout_s)
        rows = _run_rows(serve.data_dir, [mid for mid, _ in messages], sampler, memory_interval_s)
        delivered = digests_by_original(serve.data_dir / "outbox")
    rows.append(row("baseline", "digests_delivered", sum(delivered[mid] for mid, _ in messages), "count", 0))
    rows += process_rows(sampler)
    if "flamegraph" in status:
        clean_flamegraph(status["flamegraph"], sampler.roles,
                         f"py-spy: python -m pipeline serve and its workers, {status['duration_s']} s at "
                         f"{pyspy_rate} Hz under {emails} mails from {senders} senders")
    rows += pyspy_rows(status, sampler.roles, sampler.serve_pid, top)
    if recorder is not None:
        recorder.record(SCENARIO, pd.DataFrame(rows))
    return frame(rows)


def _warm_up(serve: ServeProcess, work: Path, timeout_s: float) -> None:
    """One mail with a PDF through serve before measuring: workers started, modules imported (not counted)."""
    mid = "<profile-warmup@audit>"
    with Senders(serve.port, [(mid, fx.email_with([("warmup.pdf", fx.text_pdf(1))], message_id=mid))], work,
                 1) as sending:
        sending.wait(timeout_s)
    wait_terminal(serve.data_dir, [mid], timeout_s)


def _run_rows(data_dir: Path, message_ids: list[str], sampler: TreeSampler, interval_s: float) -> Rows:
    """Stage seconds and end-to-end seconds per run, runs failed, and per-stage memory, from serve's store."""
    store = open_store(Settings.for_data_dir(data_dir).store, create=False)
    rows: Rows = []
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    try:
        runs = sorted((run for run in store.list_runs(limit=10**9) if run.dedup_key in set(message_ids)),
                      key=lambda run: run.queued_at)
        for rep, run in enumerate(runs):
            for stage, seconds in stage_times(store, run).items():
                rows.append(row("baseline", "stage_seconds", seconds, "s", rep, stage=stage, run_state=run.state))
            rows.append(row("baseline", "end_to_end_seconds", (run.ended_at or 0) - run.payload["data_end_at"],
                            "s", rep))
            for task, spans in task_windows(store, run).items():
                windows[task] += spans
    finally:
        store.close()
    rows.append(row("baseline", "runs_failed", sum(run.state != SUCCESS for run in runs), "count", 0,
                    runs=len(runs)))
    return rows + stage_memory_rows(sampler.frame(), dict(windows), interval_s)
