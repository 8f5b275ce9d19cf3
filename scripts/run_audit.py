#!/usr/bin/env python3
"""Run the audit. Until the notebook batch lands, this runs a demo workload through the engine.

    python scripts/run_audit.py --profile quick|standard|full
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit.demo import run_demo  # noqa: E402

RUNS = {"quick": 50, "standard": 500, "full": 5000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(RUNS), default="standard")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    summary = run_demo(args.data_dir, RUNS[args.profile])
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
