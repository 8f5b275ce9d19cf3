#!/usr/bin/env python3
"""Benchmark the EmailGateway over real SMTP on loopback.

    python scripts/bench_gateway.py [--messages 2000] [--senders 8] [--json]

Clients are separate processes on the same machine, so on 2 cores they
compete with the server: the small-message round runs with 8 and with 4
senders. Prints median, p95 and p99 of trigger latency (DATA end -> run queued, from the
run store) and client latency (send -> 250), durable small messages per second,
and 5 MB messages arriving 4 at a time while small senders keep going.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit import gatewaybench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--senders", type=int, nargs="+", default=[8, 4],
                        help="concurrent client processes; one small-message round per value (default 8 4)")
    parser.add_argument("--large-mb", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for senders in args.senders:
            rows += gatewaybench.small_messages(Path(tmp) / f"small-{senders}", args.messages, senders)
        rows += gatewaybench.large_messages(Path(tmp) / "large", args.large_mb)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"host": platform.node(), "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
            "commit": commit}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(f"gateway benchmark; {meta}")
    for r in rows:
        extra = f" p95 {r['p95']:9.2f} p99 {r['p99']:9.2f}" if "p99" in r else ""
        where = f"senders={r['senders']}" if "senders" in r else f"{r['concurrent']} x {r['message_mb']} MB"
        print(f"  {r['metric']:<36} {where:<16} median {r['median']:8.2f}{extra} {r['unit']}  (n={r['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
