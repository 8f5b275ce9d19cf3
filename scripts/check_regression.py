#!/usr/bin/env python3
"""Fail when a candidate audit session is slower than a baseline session beyond the noise.

    python scripts/check_regression.py --baseline SESSION [--candidate SESSION] [--db data/audit.duckdb]

The candidate defaults to the latest session. Every timing series both sessions share is compared
by a bootstrap interval on the ratio of medians; exit code 1 if any regressed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit.recorder import AuditRecorder  # noqa: E402
from pipeline.audit.regression import as_rows, compare_sessions, same_machine  # noqa: E402
from pipeline.audit.report import session_info  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--candidate", help="default: the latest session")
    parser.add_argument("--db", type=Path, default=Path("data/audit.duckdb"))
    parser.add_argument("--min-effect", type=float, default=0.10, help="slowdowns smaller than this never fail")
    parser.add_argument("--allow-other-machine", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.db.exists():
        print(f"error: no audit database at {args.db}", file=sys.stderr)
        return 2
    recorder = AuditRecorder(args.db)
    candidate = args.candidate or session_info(recorder)["session_id"]
    same, why = same_machine(recorder, args.baseline, candidate)
    if not same and not args.allow_other_machine:
        print(f"error: sessions are not comparable ({why}); pass --allow-other-machine to compare anyway",
              file=sys.stderr)
        return 2
    verdicts = compare_sessions(recorder, args.baseline, candidate, args.min_effect)
    regressed = [v for v in verdicts if v.regressed]
    if args.json:
        print(json.dumps({"baseline": args.baseline, "candidate": candidate, "series": as_rows(verdicts)}, indent=2))
    else:
        for v in verdicts:
            flag = "REGRESSED" if v.regressed else "ok"
            print(f"{flag:<9} x{v.ratio:5.2f} [{v.low:.2f}, {v.high:.2f}]  {v.key}")
        print(f"{len(regressed)} of {len(verdicts)} series regressed ({args.baseline} -> {candidate})")
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())
