#!/usr/bin/env python3
"""Benchmark the DAGRunStore at size: canonical queries, write throughput, runner overhead, concurrency.

    python scripts/bench_store.py                 # 1,000,000 runs / 5,000,000 task instances
    python scripts/bench_store.py --runs 100000 --json

The filled store is cached at data/bench/store-<runs>.sqlite3 and reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit.scenarios import store_queries  # noqa: E402
from pipeline.sqlite_store import SqliteRunStore  # noqa: E402

TARGETS = {"point_list": ("median", "<=", 1.0), "aggregate": ("median", "<=", 50.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000, help="runs to fill (5 task instances each)")
    parser.add_argument("--repeat", type=int, default=200, help="repetitions per point query")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--json", action="store_true", help="print the result rows as JSON")
    args = parser.parse_args()

    path = args.data_dir / f"store-{args.runs}.sqlite3"
    store = SqliteRunStore(path)
    have = store.count_runs_by_state()
    missing = args.runs - sum(have.values())
    if missing > 0:
        with tqdm(total=missing, desc="filling store", unit="run", file=sys.stderr) as bar:
            t0 = time.perf_counter()
            store_queries.fill_store(store, missing, progress=bar.update)
        print(f"filled {missing:,} runs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    rows = list(tqdm(store_queries.query_timings(store, args.repeat), desc="queries", total=9, file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = SqliteRunStore(Path(tmp) / "writes.sqlite3")
        rows += list(store_queries.write_throughput(scratch))
        scratch.close()
        rows += list(store_queries.runner_overhead_rows(Path(tmp) / "runner"))
        rows.append(store_queries.concurrent_runs(Path(tmp) / "concurrency"))
    store.close()
    meta = {"runs": args.runs, "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "sqlite": __import__("sqlite3").sqlite_version}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(f"store with {args.runs:,} runs; {meta}")
        for r in rows:
            if "median" in r:
                p95 = f"p95 {r['p95']:10.3f}" if r.get("p95") is not None else " " * 14
                print(f"  {r['metric']:<46} median {r['median']:12.3f} {p95} {r['unit']}")
            else:
                print(f"  {r['metric']:<46} {json.dumps({k: v for k, v in r.items() if k != 'metric'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
