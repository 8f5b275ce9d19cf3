"""Line-level profile of each stage's hot functions (line_profiler), as tidy rows.

Runs one mail through the stage functions in this process (extraction not
isolated, so the profiler sees pypdf's calls from our code).
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from line_profiler import LineProfiler

from ...config import DeliveryConfig, IngestConfig
from ...spool import Spool
from ...sqlite_store import SqliteRunStore
from ...stages import deliver, digest, ingest, parse
from ...store import Transition
from ..base import fixtures as fx
from ..base.harness import row

HOT_FUNCTIONS: dict[str, list[Any]] = {
    "Email": [Spool.store, parse.summarize_message, parse.extract_attachments],
    "Ingestion": [ingest.extract_text, ingest._stream_pages],
    "Digest": [digest.summarize, digest.render_digest],
    "Delivery": [deliver.compose_reply],
    # the bodies, not sql_store's retry wrapper around them
    "Store": [inspect.unwrap(SqliteRunStore.record_transitions), inspect.unwrap(SqliteRunStore.create_runs)],
}


def profile_lines(pdf: Path, top: int = 5) -> pd.DataFrame:
    """Profile one pass of every stage on ``pdf``; return the ``top`` lines by time per stage."""
    profiler = LineProfiler()
    owner = {}
    for stage, functions in HOT_FUNCTIONS.items():
        for fn in functions:
            profiler.add_function(fn)
            owner[(fn.__code__.co_filename, fn.__code__.co_firstlineno)] = (stage, fn.__qualname__)
    with tempfile.TemporaryDirectory(prefix="lineprof-") as tmp:
        profiler.enable_by_count()
        try:
            _one_pass(Path(tmp), Path(pdf))
        finally:
            profiler.disable_by_count()
    stats = profiler.get_stats()
    rows: list[dict[str, Any]] = []
    for (filename, first_line, name), timings in stats.timings.items():
        stage, qualname = owner.get((filename, first_line), ("?", name))
        source = inspect.getsourcelines(_function(qualname))[0] if qualname else []
        by_time = sorted(timings, key=lambda t: -t[2])[:top]
        for lineno, hits, total in by_time:
            code = source[lineno - first_line].strip() if 0 <= lineno - first_line < len(source) else ""
            rows.append(row("baseline", "line_seconds", total * stats.unit, "s", 0, stage=stage, function=qualname,
                            line=lineno, hits=hits, code=code[:120]))
    return pd.DataFrame(rows)


def _function(qualname: str) -> Any:
    for functions in HOT_FUNCTIONS.values():
        for fn in functions:
            if fn.__qualname__ == qualname:
                return fn
    return None


def _one_pass(work: Path, pdf: Path) -> None:
    raw = fx.email_with([(pdf.name, pdf.read_bytes())])
    spool = Spool(work / "spool")
    spool.store(raw)
    spool.close()
    limits = IngestConfig(isolate=False, max_attachment_bytes=200 * 1024 * 1024, max_pages=100_000, timeout_s=900)
    info = parse.summarize_message(raw, work, limits)
    result = ingest.extract_text(Path(info["attachments"][0]["path"]), work / "text.txt", limits)
    docs = digest.describe_documents(info["attachments"], [result.__dict__], {}, 3)
    rendered = digest.render_digest(info, docs)
    deliver.compose_reply(rendered, info, DeliveryConfig(), to=deliver.reply_address(info["from"]))
    store = SqliteRunStore(work / "runs.sqlite3")
    run = store.create_runs([("lineprof", {}, None)])[0][0]
    store.create_tasks(run.run_id, [f"t{i}" for i in range(200)])
    store.record_transitions([Transition(run.run_id, f"t{i}", "success", 1, 0.0) for i in range(200)])
    store.close()
