"""The command line's argument parser: the global options, one helper per command, and the argparse types.

``pipeline.cli`` re-exports ``build_parser`` and the types; only light modules are imported here (issue 16).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import store as s

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_subparsers() returns


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every command."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Email-triggered PDF digest pipeline.")
    _global_options(parser)
    parser.set_defaults(data_dir=None, config=None, verbose=False, store_url=None)
    common = argparse.ArgumentParser(add_help=False)  # the same options after the command name, too
    _global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_runs, _add_show, _add_purge, _add_serve, _add_ingest):
        add(sub, common)
    return parser


def _add_runs(sub: Commands, common: argparse.ArgumentParser) -> None:
    """Add the ``runs`` command (list runs) and its options."""
    runs = sub.add_parser("runs", parents=[common], help="list runs, newest first")
    runs.add_argument("--workflow", help="only runs of this workflow")
    runs.add_argument("--state", choices=s.RUN_STATES, help="only runs in this state")
    runs.add_argument("--limit", type=positive_int, default=20, help="at most this many runs (default 20)")
    runs.add_argument("--before", type=positive_int, metavar="RUN_ID", help="only runs older than this id (next page)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_show(sub: Commands, common: argparse.ArgumentParser) -> None:
    """Add the ``show`` command (show one run) and its options."""
    show = sub.add_parser("show", parents=[common], help="one run with its task instances")
    show.add_argument("run_id", type=positive_int, metavar="RUN_ID")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_purge(sub: Commands, common: argparse.ArgumentParser) -> None:
    """Add the ``purge`` command (delete old finished runs) and its options."""
    purge = sub.add_parser("purge", parents=[common],
                           help="delete finished runs older than N days with their spool and work files")
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                       help="age in days (0: every finished run); digests in the outbox are kept")
    purge.add_argument("--dry-run", action="store_true", help="only say how many runs would be purged")


def _add_serve(sub: Commands, common: argparse.ArgumentParser) -> None:
    """Add the ``serve`` command (run the gateway and the workers) and its options."""
    serve = sub.add_parser("serve", parents=[common],
                           help="run the SMTP gateway, the drop folder and the workers until Ctrl-C")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; others need --allow-remote)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback --host (also needs [gateway] allowed_sender_domains)")
    serve.add_argument("--port", type=int, help="SMTP port (default 8025)")
    serve.add_argument("--deliver", metavar="smtp://HOST:PORT", help="relay for digests (default: data/outbox Maildir)")
    serve.add_argument("--max-message-mb", type=positive_number, help="largest accepted message (default 50)")
    serve.add_argument("--no-drop-folder", action="store_true", help="do not watch data/inbox")
    serve.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (default: off)")
    roles = serve.add_mutually_exclusive_group()
    roles.add_argument("--gateway-only", action="store_true",
                       help="accept and queue only (SMTP, drop folder, spool reconciliation); --workers-only "
                            "processes sharing the store and the data dir run the work (a SQLite store: same "
                            "host only; several hosts: a PostgreSQL --store-url and a shared data dir)")
    roles.add_argument("--workers-only", action="store_true",
                       help="claim and run queued runs only: no SMTP, no drop folder")
    serve.add_argument("--executor", choices=("local", "dask"),
                       help="where PDF extraction runs: local worker processes (default) or a Dask cluster")
    serve.add_argument("--scheduler", metavar="tcp://HOST:8786",
                       help="the Dask scheduler to submit to (implies --executor dask; default with dask: "
                            "a local cluster in this process)")


def _add_ingest(sub: Commands, common: argparse.ArgumentParser) -> None:
    """Add the ``ingest`` command (run the workflow on files now) and its options."""
    ingest = sub.add_parser("ingest", parents=[common], help="run the digest workflow now on .eml or .pdf files")
    ingest.add_argument("files", nargs="+", type=Path, metavar="FILE")
    ingest.add_argument("--deliver", metavar="smtp://HOST:PORT",
                        help="relay for digests (default: data/outbox Maildir)")


def _path_given(text: str) -> Path:
    """A path option's value; an empty one (``--data-dir "$DATA"`` with DATA unset) is refused: as a path it is
    the current directory, and the store, spool and outbox would be written there."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset variable?) would mean the current directory")
    return Path(text)


def _global_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """Add --data-dir, --config and -v; a SUPPRESS default lets them follow the command without hiding them."""
    parser.add_argument("--data-dir", type=_path_given, default=default,
                        help="where the run store, spool and outbox live (default: data)")
    parser.add_argument("--config", type=_path_given, default=default,
                        help="TOML settings file (sections: store, gateway, ingest, executor, ...)")
    parser.add_argument("--store-url", default=default, metavar="postgresql://USER@HOST/DB",
                        help="keep runs in this PostgreSQL database (extra [postgres]) instead of the "
                             "data dir's SQLite file; the same as [store] url")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log at DEBUG level (and the SMTP library's per-connection lines)")


MAX_INT = 2**63 - 1  # the largest run id or count a store can hold (SQLite's INTEGER)


def positive_int(text: str) -> int:
    """argparse type: an integer from 1 to MAX_INT (``--limit -5`` is a mistake, not "no limit")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_INT}, not {value}")
    return value


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (``nan`` and ``inf`` parse as floats, but are no size)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text}")
    return value
