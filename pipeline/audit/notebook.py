"""Small helpers the notebooks share: where the files are, and which session to write to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import fixtures as fx
from .base.recorder import AuditRecorder
from .reporting.report import ROOT


def resolve(path: str | Path) -> Path:
    """A path as given, or relative to the repository root (notebooks run from notebooks/ in JupyterLab)."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def scratch_dir(db_path: str, name: str) -> Path:
    """A notebook's working directory beside the session's DuckDB file: ``data/<name>`` for ``make audit``,
    the batch's own data dir when the tests run the quick audit (never the repository's ``data/`` then)."""
    return resolve(db_path).parent / name


def open_recorder(db_path: str, session_id: str | None, profile: str, params: dict[str, Any] | None = None
                  ) -> AuditRecorder:
    """The batch's session, or, run interactively (``session_id`` None), a new session of its own."""
    recorder = AuditRecorder(resolve(db_path), session_id)
    if session_id is None:
        recorder.start_session(f"{profile}-interactive", params or {})
    return recorder


def fixture(fixtures_dir: str, profile: str, name: str) -> Path:
    """The path of fixture ``name`` of ``profile`` (generated on first use)."""
    return fixtures_of(fixtures_dir, profile)[name]


def fixtures_of(fixtures_dir: str, profile: str, kind: str | None = None) -> dict[str, Path]:
    """All fixtures of ``profile`` by name (only those of ``kind`` if given), generating what is missing."""
    items = fx.build_fixtures(profile, resolve(fixtures_dir))
    return {i["name"]: Path(i["path"]) for i in items if kind is None or i["kind"] == kind}


def fixture_items(fixtures_dir: str, profile: str, hostile: bool = False) -> list[dict[str, Any]]:
    """Fixture descriptions (name, kind, mb, path): the size fixtures, or the hostile ones."""
    items = fx.build_fixtures(profile, resolve(fixtures_dir))
    return [i for i in items if (i["kind"] == "hostile") == hostile]
