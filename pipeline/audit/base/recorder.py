"""AuditRecorder: sessions, measurements, spans and SLA results in one DuckDB file.

Long format, one row per figure, every row tied to its session; sessions are
appended, never overwritten. Rows go in as DataFrames (DuckDB reads them in
bulk; ``executemany`` manages about 2,400 rows/s). The file is opened per
call and closed again, because DuckDB lets one process hold it for writing and
a notebook reading it meanwhile would otherwise be locked out.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from ... import tracing

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS session (session_id VARCHAR PRIMARY KEY, started_at TIMESTAMP, profile VARCHAR,
        git_sha VARCHAR, git_dirty BOOLEAN, host VARCHAR, cpu VARCHAR, cpus INTEGER, python VARCHAR,
        packages JSON, params JSON)""",
    """CREATE TABLE IF NOT EXISTS measurement (session_id VARCHAR, scenario VARCHAR, variant VARCHAR,
        metric VARCHAR, value DOUBLE, unit VARCHAR, rep INTEGER, tags JSON)""",
    """CREATE TABLE IF NOT EXISTS span (session_id VARCHAR, scenario VARCHAR, variant VARCHAR, name VARCHAR,
        start_s DOUBLE, duration_s DOUBLE, attrs JSON)""",
    """CREATE TABLE IF NOT EXISTS sla_result (session_id VARCHAR, sla VARCHAR, target DOUBLE, observed DOUBLE,
        unit VARCHAR, comparison VARCHAR, passed BOOLEAN, source VARCHAR)""",
]
# a session whose scenario notebooks all ran (an interrupted one has no row): only those are compared against.
# Made once; the sessions of an older file that have any measured SLA are taken as ended.
SESSION_END = [
    "CREATE TABLE session_end (session_id VARCHAR PRIMARY KEY, ended_at TIMESTAMP)",
    "INSERT INTO session_end SELECT DISTINCT r.session_id, s.started_at FROM sla_result r JOIN session s "
    "USING (session_id) WHERE r.observed IS NOT NULL",
]
# what the audit itself writes into the checkout: not a change to the code it measured
AUDIT_OUTPUTS = ("docs/performance/PERFORMANCE_AUDIT_SPRINT4.md", "docs/performance/PERFORMANCE_AUDIT_SPRINT4_files",
                 "outbox.json", "TASK_CARDS.md")
MEASUREMENT_COLUMNS = ["variant", "metric", "value", "unit", "rep", "tags"]
KEY_PACKAGES = ["pypdfium2", "pypdf", "aiosmtpd", "psycopg", "distributed", "prometheus-client", "duckdb", "pandas",
                "matplotlib", "papermill", "nbconvert", "watchdog"]


class AuditRecorder:
    """Write and read one audit DuckDB file."""

    def __init__(self, path: Path | str = Path("data/audit.duckdb"), session_id: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.session_id = session_id
        with self.connect() as db:
            for statement in SCHEMA:
                db.execute(statement)
            if db.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'session_end'").fetchone() == (0,):
                db.execute("BEGIN")  # the table and its backfill together, or neither
                for statement in SESSION_END:
                    db.execute(statement)
                db.execute("COMMIT")

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the file for one block of work, then close it."""
        db = duckdb.connect(str(self.path), read_only=read_only)
        try:
            yield db
        finally:
            db.close()

    def start_session(self, profile: str, params: dict[str, Any] | None = None) -> str:
        """Record a new session with this machine's and commit's facts; return its id."""
        self.session_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        row = {"session_id": self.session_id, "started_at": datetime.now(UTC).replace(tzinfo=None),
               "profile": profile, **machine_facts(), "params": json.dumps(params or {}, default=str)}
        self._insert("session", pd.DataFrame([row]))
        return self.session_id

    def end_session(self) -> None:
        """Record that every scenario notebook of this session ran (the report compares only such sessions)."""
        with self.connect() as db:
            db.execute("INSERT OR REPLACE INTO session_end VALUES (?, ?)",
                       [self._require_session(), datetime.now(UTC).replace(tzinfo=None)])

    def ended(self, session_id: str) -> bool:
        """Whether ``session_id`` ran to its end (``end_session``)."""
        return not self.query("SELECT 1 FROM session_end WHERE session_id = ?", [session_id]).empty

    def record(self, scenario: str, frame: pd.DataFrame) -> int:
        """Append tidy measurement rows (columns ``MEASUREMENT_COLUMNS``) for ``scenario``; return the count."""
        if frame.empty:
            return 0
        rows = frame.reindex(columns=MEASUREMENT_COLUMNS).copy()
        rows["tags"] = rows["tags"].map(lambda t: json.dumps(t if isinstance(t, dict) else {}, default=str))
        rows["rep"] = rows["rep"].fillna(0).astype(int)
        rows.insert(0, "scenario", scenario)
        rows.insert(0, "session_id", self._require_session())
        self._insert("measurement", rows)
        return len(rows)

    def record_spans(self, scenario: str, variant: str, spans: list[dict[str, Any]]) -> int:
        """Append spans (``name``, ``start_s``, ``duration_s``, ``attrs``) captured during a scenario."""
        if not spans:
            return 0
        rows = pd.DataFrame(spans, columns=["name", "start_s", "duration_s", "attrs"])
        rows["attrs"] = rows["attrs"].map(lambda a: json.dumps(a, default=str))
        rows.insert(0, "variant", variant)
        rows.insert(0, "scenario", scenario)
        rows.insert(0, "session_id", self._require_session())
        self._insert("span", rows)
        return len(rows)

    def record_sla(self, frame: pd.DataFrame) -> None:
        """Append SLA results (sla, target, observed, unit, comparison, passed, source)."""
        rows = frame.copy()
        rows.insert(0, "session_id", self._require_session())
        self._insert("sla_result", rows)

    def query(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        """Run a read query and return a DataFrame."""
        with self.connect() as db:
            return db.execute(sql, params or []).df()

    def measurements(self, scenario: str | None = None, session_id: str | None = None) -> pd.DataFrame:
        """Measurement rows of a session (this one by default), tags decoded into a dict column."""
        sql = "SELECT * FROM measurement WHERE session_id = ?"
        params: list[Any] = [session_id or self._require_session()]
        if scenario:
            sql += " AND scenario = ?"
            params.append(scenario)
        frame = self.query(sql, params)
        frame["tags"] = frame["tags"].map(json.loads)
        return frame

    def _insert(self, table: str, frame: pd.DataFrame) -> None:
        with self.connect() as db:
            db.register("incoming", frame)
            db.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
            db.unregister("incoming")

    def _require_session(self) -> str:
        if not self.session_id:
            raise RuntimeError("start_session() first (or pass session_id)")
        return self.session_id


def machine_facts() -> dict[str, Any]:
    """Commit, host, CPU model and count, Python and key package versions."""
    sha = _git("rev-parse", "HEAD")
    outputs = [f":(top,exclude){path}" for path in AUDIT_OUTPUTS]  # an earlier audit's report is no code change
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ":/", *outputs)) if sha else None
    packages: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"git_sha": sha or "unknown", "git_dirty": dirty, "host": platform.node(), "cpu": _cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "packages": json.dumps(packages)}


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class SpanBuffer:
    """A tracing recorder that keeps spans in memory until the scenario writes them."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record_span(self, name: str, start_s: float, duration_s: float, attrs: dict[str, Any]) -> None:
        with self._lock:
            self.spans.append({"name": name, "start_s": start_s, "duration_s": duration_s, "attrs": attrs})


@contextmanager
def capture_spans() -> Iterator[SpanBuffer]:
    """Install a SpanBuffer as the tracing recorder for the block."""
    buffer = SpanBuffer()
    tracing.set_recorder(buffer)
    try:
        yield buffer
    finally:
        tracing.set_recorder(None)

