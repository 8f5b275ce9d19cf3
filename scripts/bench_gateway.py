#!/usr/bin/env python3
"""Benchmark the EmailGateway over real SMTP on loopback.

    python scripts/bench_gateway.py [--messages 2000] [--senders 8] [--json]
                                    [--serve-senders 1 8] [--serve-mails 50] [--serve-reps 2] [--no-serve]

Clients are separate processes on the same machine, so on 2 cores they
compete with the server: the small-message round runs with 8 and with 4
senders. Prints median, p95 and p99 of trigger latency (DATA end -> run queued, from the
run store) and client latency (send -> 250), durable small messages per second,
and 5 MB messages arriving 4 at a time while small senders keep going.

Then what a sender of a real, busy ``python -m pipeline serve`` waits (issue 17,
``pipeline.audit.scenarios.client_latency``): closed-loop sender processes, a new connection
per mail, timed from the client (connect -> final 250, MAIL -> 250) next to the
store's DATA end -> run queued, while serve processes the runs; the shipped
settings, ``[serve] engine_nice = 0`` and ``[serve] gateway_process = false``,
interleaved after a warm-up, plus a round with a 5 MB mail beside the small ones. With
``--engine-nice 0 5 12`` the serves compared are instead the shipped settings with those
``[serve] engine_nice`` values (how the default of 12 was chosen), and with
``--gateway-slice-us 0 100`` those ``[serve] gateway_slice_us`` values:

    python scripts/bench_gateway.py --serve-only --serve-senders 8 --serve-reps 3 --engine-nice 0 5 12
    python scripts/bench_gateway.py --serve-only --serve-senders 8 --serve-reps 6 --gateway-slice-us 0 100
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

from pipeline.audit.scenarios import client_latency, gateway_bench  # noqa: E402


def setting_variants(name: str, values: list[int] | None) -> dict[str, client_latency.Variant] | None:
    """One serve per value of the ``[serve]`` setting ``name`` (None: the scenario's own layouts)."""
    if not values:
        return None
    return {f"{name}_{n}": ({"serve": {name: n}}, ()) for n in values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--senders", type=int, nargs="+", default=[8, 4],
                        help="concurrent client processes; one small-message round per value (default 8 4)")
    parser.add_argument("--large-mb", type=float, default=5.0)
    parser.add_argument("--serve-senders", type=int, nargs="+", default=[1, 8],
                        help="closed-loop senders against a real serve; one round per value (default 1 8)")
    parser.add_argument("--serve-mails", type=int, default=50, help="mails per sender and round (default 50)")
    parser.add_argument("--serve-reps", type=int, default=2, help="turns per serve layout (default 2)")
    parser.add_argument("--engine-nice", type=int, nargs="+", default=None,
                        help="compare serves with these [serve] engine_nice values instead of the layouts")
    parser.add_argument("--gateway-slice-us", type=int, nargs="+", default=None,
                        help="compare serves with these [serve] gateway_slice_us values instead of the layouts")
    parser.add_argument("--no-serve", action="store_true", help="skip the client-side rounds against serve")
    parser.add_argument("--serve-only", action="store_true", help="only the client-side rounds against serve")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.engine_nice and args.gateway_slice_us:
        parser.error("compare one setting at a time: --engine-nice or --gateway-slice-us")
    variants = (setting_variants("engine_nice", args.engine_nice)
                or setting_variants("gateway_slice_us", args.gateway_slice_us))
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for senders in [] if args.serve_only else args.senders:
            rows += gateway_bench.small_messages(Path(tmp) / f"small-{senders}", args.messages, senders)
        if not args.serve_only:
            rows += gateway_bench.large_messages(Path(tmp) / "large", args.large_mb)
        serve = [] if args.no_serve else client_latency.summary(client_latency.client_latency(
            Path(tmp) / "serve", tuple(args.serve_senders), args.serve_mails, args.serve_reps,
            args.large_mb, variants=variants)).to_dict("records")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"host": platform.node(), "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
            "commit": commit}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "serve_rows": serve}, indent=2, default=str))
        return 0
    print(f"gateway benchmark; {meta}")
    for r in rows:
        extra = f" p95 {r['p95']:9.2f} p99 {r['p99']:9.2f}" if "p99" in r else ""
        where = f"senders={r['senders']}" if "senders" in r else f"{r['concurrent']} x {r['message_mb']} MB"
        print(f"  {r['metric']:<36} {where:<16} median {r['median']:8.2f}{extra} {r['unit']}  (n={r['n']})")
    if serve:
        print("serve, busy, as its senders see it (client: connect or MAIL -> 250; server: DATA end -> queued)")
    for r in serve:
        beside = f" +{args.large_mb:g} MB" if r["large"] else ""
        where = f"{r['variant']} senders={r['senders']}{beside} {r['kind']}"
        unit = "msg/s" if r["metric"] == "accepted_per_s" else "ms"
        p99 = "" if r["metric"] == "accepted_per_s" else f" p99 {r['p99']:9.2f}"
        print(f"  {r['metric']:<20} {where:<40} median {r['median']:8.2f}{p99} {unit}  (n={r['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
