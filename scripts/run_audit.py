#!/usr/bin/env python3
"""Run the performance audit: fixtures, every scenario notebook (papermill), the report (nbconvert),
outbox.json and TASK_CARDS.md.

    python scripts/run_audit.py --profile quick|standard|full

quick: a few minutes (CI); standard: `make audit`; full: hunts breaking points.

Exit code: 0 when every SLA was measured and met (status ``done``), 4 when the audit ran but an SLA
failed or was not measured (``sla_failed``/``incomplete``: the report and outbox are written all the
same), 1 when the audit itself failed (a notebook raised), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.audit.batch import (  # noqa: E402
    EXIT_CODES,
    PROFILES,
    AuditBatchError,
    BatchPaths,
    render_report,
    run_batch,
    summary_line,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="standard")
    parser.add_argument("--data-dir", type=Path, help="fixtures, DuckDB and executed notebooks (default data/)")
    parser.add_argument("--report-dir", type=Path, help="where the markdown report goes (default docs/performance/)")
    parser.add_argument("--outbox", type=Path, help="completion report path (default outbox.json)")
    parser.add_argument("--task-cards", type=Path, help="task card file to update (default TASK_CARDS.md)")
    parser.add_argument("--cell-timeout", type=int, default=1800, help="seconds one notebook cell may take")
    parser.add_argument("--report-only", metavar="SESSION",
                        help="measure nothing: redraw the report of SESSION from data/audit.duckdb")
    args = parser.parse_args()
    paths = BatchPaths()
    for name in ("data_dir", "report_dir", "outbox", "task_cards"):
        if getattr(args, name):
            setattr(paths, name, getattr(args, name).resolve())
    # a CI job cancelled (SIGTERM) stops as Ctrl-C does: one line, exit 130, nothing of the report written. The
    # serves a notebook started stop with its kernel (serveproc.stop_with_parent), not left running
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.report_only:
            print(f"report of session {args.report_only}: {render_report(args.report_only, paths)}")
            return 0
        outbox = run_batch(args.profile, paths, args.cell_timeout)
    except AuditBatchError as exc:
        print(f"audit failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("audit interrupted: the session is left unfinished (later reports do not compare against it); "
              "the report, outbox.json and TASK_CARDS.md are as they were", file=sys.stderr)
        return 130
    print(summary_line(outbox))
    return EXIT_CODES[outbox["status"]]


if __name__ == "__main__":
    sys.exit(main())
