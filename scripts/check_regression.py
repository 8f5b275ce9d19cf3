#!/usr/bin/env python3
"""Fail when a candidate is slower than a baseline beyond the noise.

    python scripts/check_regression.py --baseline SESSION [--candidate SESSION] [--db data/audit.duckdb]
    python scripts/check_regression.py --base-commit REV [--candidate-commit REV] [--probe trigger] [--reps 5]
                                       [--measure cpu|wall|instructions]

Sessions: the candidate defaults to the latest session; every timing series both sessions share is
compared by a bootstrap interval on the ratio of medians. Commits: one probe runs in both commits'
trees alternately (A B A B), which separates the code from the machine's drift between sessions; the
candidate defaults to the working tree, the measure to CPU time (instructions need valgrind).

Three verdicts: unchanged (exit 0), regressed (exit 1), inconclusive (exit 3: the interval straddles
the threshold, so the noise hides whether it was crossed); 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit.base.recorder import AuditRecorder  # noqa: E402
from pipeline.audit.reporting.abcommits import MEASURES, PROBES, ABError, compare_commits  # noqa: E402
from pipeline.audit.reporting.regression import EXIT_CODES, as_rows, compare_sessions, overall, same_machine  # noqa: E402
from pipeline.audit.reporting.report import session_info  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="baseline audit session")
    parser.add_argument("--candidate", help="default: the latest session")
    parser.add_argument("--base-commit", help="compare commits instead: the base revision")
    parser.add_argument("--candidate-commit", help="default: the working tree")
    parser.add_argument("--probe", choices=PROBES, default="trigger", help="what to measure in both commits")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per commit")
    parser.add_argument("--measure", choices=MEASURES, default="cpu",
                        help="commits: CPU seconds of the probe (default), wall time, or cachegrind instructions")
    parser.add_argument("--db", type=Path, default=Path("data/audit.duckdb"))
    parser.add_argument("--min-effect", type=float, default=0.10, help="slowdowns smaller than this never fail")
    parser.add_argument("--allow-other-machine", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.base_commit:
        return _commits(args)
    if not args.baseline:
        parser.error("give --baseline SESSION or --base-commit REV")
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
    verdict = overall(verdicts)
    if args.json:
        print(json.dumps({"baseline": args.baseline, "candidate": candidate, "verdict": verdict,
                          "series": as_rows(verdicts)}, indent=2))
    else:
        for v in verdicts:
            print(f"{v.verdict.upper():<12} x{v.ratio:5.2f} [{v.low:.2f}, {v.high:.2f}]  {v.key}")
        counts = {name: sum(v.verdict == name for v in verdicts) for name in EXIT_CODES}
        print(f"{verdict}: {counts['regressed']} of {len(verdicts)} series regressed, {counts['inconclusive']} "
              f"inconclusive ({args.baseline} -> {candidate})")
    return EXIT_CODES[verdict]


def _commits(args: argparse.Namespace) -> int:
    try:
        v = compare_commits(args.base_commit, args.candidate_commit, args.probe, args.reps, args.min_effect,
                            measure=args.measure)
    except ABError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(as_rows([v])[0], indent=2))
    else:
        print(f"{v.verdict.upper():<12} x{v.ratio:5.2f} [{v.low:.2f}, {v.high:.2f}]  {v.key}  "
              f"(medians {v.baseline_median:.4g} -> {v.candidate_median:.4g}, {v.measure})")
    return EXIT_CODES[v.verdict]


if __name__ == "__main__":
    sys.exit(main())
