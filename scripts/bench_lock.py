#!/usr/bin/env python3
"""A run insert's wait beside a busy SQLite writer in another process, ``[store] lock_polling`` off and on.

    python scripts/bench_lock.py                     # 5 turns per mode, 300 inserts each, interleaved
    python scripts/bench_lock.py --reps 3 --inserts 500 --json

Each turn starts a writer process (as many nice steps lower as serve's engine) committing one task transition
per transaction in a loop, and times run inserts of this process (like serve's gateway) 5 ms apart. Modes
take turns (off, on, on, off, ...) after a warm-up turn each; the table gives the median over turns of each
turn's median, p99 and max insert time, and the writer's commits/s (what polling costs the other side).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit.scenarios import lock_wait  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="turns per mode (default 5)")
    parser.add_argument("--inserts", type=int, default=300, help="inserts per turn (default 300)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    turns: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-lock-") as tmp:
        for rep in range(-1, args.reps):  # turn -1: warm-up, not counted
            for polling in (False, True) if rep % 2 else (True, False):
                path = Path(tmp) / f"turn{rep}-{int(polling)}.sqlite3"
                result = lock_wait.summarize(lock_wait.contended_inserts(path, polling, args.inserts))
                if rep >= 0:
                    turns[polling].append(result)
                print(f"turn {rep} lock_polling={polling}: p99 {result['p99_ms']:.2f} ms", file=sys.stderr)
    table = {("on" if polling else "off"): {key: statistics.median(t[key] for t in found) for key in found[0]}
             for polling, found in turns.items()}
    if args.json:
        print(json.dumps({"machine": platform.node(), "cpus": _cpus(), "turns": args.reps, "modes": table}))
        return 0
    print(f"{platform.node()}, {_cpus()} CPUs; {args.reps} turns per mode of {args.inserts} inserts; "
          "medians over turns")
    print(f"{'lock_polling':>12} {'median ms':>10} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'writer commits/s':>17}")
    for mode, row in table.items():
        print(f"{mode:>12} {row['median_ms']:10.2f} {row['p95_ms']:8.2f} {row['p99_ms']:8.2f} {row['max_ms']:8.2f} "
              f"{row['writer_commits_per_s']:17,.0f}")
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
