#!/usr/bin/env python3
"""How long the CLI takes from a cold start (issue 16): --help, runs, show and ingest as fresh processes.

    python scripts/bench_cli.py                    # ingest of a generated one-page PDF
    python scripts/bench_cli.py --manual           # ingest of the R reference manual (2,415 pages, 6.5 MB)
    python scripts/bench_cli.py --pdf FILE.pdf --reps 5 --json

``--manual`` downloads Debian's r-doc-pdf once (apt-get download, nothing installed) into
data/real-pdfs/. Commands take turns, after a warm-up round; median and p95 of wall and CPU seconds, each
command with the pipeline's modules compiled (as installed) and from source (a checkout without .pyc files
on a machine with PYTHONDONTWRITEBYTECODE set), interleaved.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit.base import realpdfs  # noqa: E402
from pipeline.audit.scenarios import cli_start  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="samples per command (default 10)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pdf", type=Path, help="the PDF `ingest` reads (default: a generated one-page PDF)")
    source.add_argument("--manual", action="store_true", help="ingest the R reference manual (Debian r-doc-pdf)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pdf = args.pdf
    if args.manual:
        try:
            pdf = realpdfs.fetch()
        except realpdfs.NotAvailable as exc:
            print(f"bench_cli: {exc}", file=sys.stderr)
            return 2
    summary = cli_start.summarize(cli_start.measure_cli_start(reps=args.reps, pdf=pdf))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"host": platform.node(), "python": platform.python_version(), "commit": commit,
            "pdf": str(pdf) if pdf else "generated one-page PDF"}
    if args.json:
        print(json.dumps({"meta": meta, "summary": summary}, indent=2))
        return 0
    print(f"CLI cold start; {meta}")
    for r in summary:
        print(f"  {r['bytecode']:<8} {r['command']:<8} wall median {r['wall_median_s']:6.3f} s, "
              f"p95 {r['wall_p95_s']:6.3f} s; "
              f"CPU median {r['cpu_median_s']:6.3f} s  (n={r['n']}, failures={r['failures']})")
    return 1 if any(r["failures"] for r in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
