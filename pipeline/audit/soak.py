"""The soak scenario's loop: many runs, memory sampled after gc, tracemalloc growth by site."""

from __future__ import annotations

import tempfile
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import RunnerConfig, Settings
from ..dag import DAG
from ..engine import WorkflowEngine
from ..store import open_store
from . import fixtures as fx
from .harness import running_pipeline
from .memory import LeakVerdict, judge_leak, sample_point, top_growth, traced


def run_soak(runs: int, warmup: int, every: int, dag: DAG | None = None) -> tuple[list[dict[str, float]], LeakVerdict]:
    """Run ``warmup`` then ``runs`` runs in batches of ``every``; sample memory after each batch.

    With ``dag=None`` the real email_digest pipeline runs (a one-page PDF per mail, accepted through
    the gateway, digest delivered over SMTP); otherwise ``dag`` runs on a bare engine.
    """
    if dag is None:
        with running_pipeline() as (service, _sink):
            pdf = fx.text_pdf(1)
            counter = iter(range(10**9))

            def batch(n: int) -> None:
                ids = [service.gateway.accept(fx.email_with([("a.pdf", pdf)], message_id=f"<soak-{next(counter)}@a>"),
                                              source="audit").run_id for _ in range(n)]
                for run_id in ids:
                    service.engine.wait(run_id, timeout=120)

            return _measure(batch, runs, warmup, every)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        settings = replace(Settings.for_data_dir(Path(tmp)), runner=RunnerConfig(thread_workers=4))
        store = open_store(settings.store)
        with WorkflowEngine(store, settings) as engine:
            engine.register(dag)

            def batch(n: int) -> None:
                ids = [engine.trigger(dag.workflow_id).run_id for _ in range(n)]
                for run_id in ids:
                    engine.wait(run_id, timeout=120)

            result = _measure(batch, runs, warmup, every)
        store.close()
        return result


def _measure(batch: Any, runs: int, warmup: int, every: int) -> tuple[list[dict[str, float]], LeakVerdict]:
    batch(warmup)
    points = []
    with traced():
        before = tracemalloc.take_snapshot()
        done = 0
        points.append(sample_point(done))
        with tqdm(total=runs, desc="soak", unit="run") as bar:
            while done < runs:
                n = min(every, runs - done)
                batch(n)
                done += n
                points.append(sample_point(done))
                bar.update(n)
        after = tracemalloc.take_snapshot()
    return points, judge_leak(points, top_growth(before, after))
