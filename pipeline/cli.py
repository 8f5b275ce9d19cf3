"""Command line: ``python -m pipeline COMMAND``; each command is a thin shell over the library.

Errors the pipeline raises on purpose become one line on stderr and exit
code 2; a failed run makes ``ingest`` exit 1, a partial one (some attachments
unreadable, the rest digested) exit 3. The read commands (``runs``,
``show``) never create anything: on a data dir where nothing has run yet
they see an empty store. Every command closes its store on every path.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import select
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Only light modules here: --help, runs and show must start at once (issue 16). A command that needs the
# service, the workflows or housekeeping imports it itself; a test checks what the read commands import.
from . import store as s
from .cli_format import format_run, in_dag_order, utc_text, workflow_order  # noqa: F401 - re-exported
from .cli_parser import MAX_INT, build_parser, positive_int, positive_number  # noqa: F401 - re-exported
from .config import Settings, StoreConfig, load_settings
from .errors import ConfigurationError, PipelineError, StoreIOError, UnknownRunError

log = logging.getLogger("pipeline")
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Register ``fn`` as the CLI command named after it."""
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def settings_from(args: argparse.Namespace) -> Settings:
    """Build Settings from ``--config``, ``--data-dir`` and the command's own flags."""
    gateway: dict[str, Any] = {}
    if getattr(args, "host", None):
        gateway["host"] = args.host
    if getattr(args, "port", None) is not None:
        gateway["port"] = args.port
    if getattr(args, "max_message_mb", None):
        gateway["max_message_bytes"] = math.ceil(args.max_message_mb * 1024 * 1024)  # 1e-9 MB is a byte, not 0
    if getattr(args, "no_drop_folder", False):
        gateway["drop_folder"] = False
    if getattr(args, "allow_remote", False):
        gateway["allow_remote"] = True
    delivery = {"relay": args.deliver} if getattr(args, "deliver", None) else {}
    store = {"url": args.store_url} if getattr(args, "store_url", None) else {}
    metrics = {"port": args.metrics_port} if getattr(args, "metrics_port", None) is not None else {}
    if getattr(args, "allow_remote", False):
        metrics["allow_remote"] = True
    return load_settings(args.config, args.data_dir, gateway=gateway, delivery=delivery, store=store,
                         executor=executor_options(args), metrics=metrics, given_as=OPTION_OF_SETTING)


# the settings the command-line options above set: a value refused is reported by the option the user typed
OPTION_OF_SETTING = {"gateway.host": "--host", "gateway.port": "--port",
                     "gateway.max_message_bytes": "--max-message-mb", "gateway.drop_folder": "--no-drop-folder",
                     "gateway.allow_remote": "--allow-remote", "metrics.allow_remote": "--allow-remote",
                     "metrics.port": "--metrics-port", "delivery.relay": "--deliver", "store.url": "--store-url",
                     "executor.kind": "--executor", "executor.scheduler": "--scheduler"}


def executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """The [executor] overrides of ``--executor`` and ``--scheduler`` (a scheduler means Dask)."""
    kind, scheduler = getattr(args, "executor", None), getattr(args, "scheduler", None)
    if scheduler and kind == "local":
        raise ConfigurationError("--scheduler names a Dask cluster: it needs --executor dask, not local")
    options: dict[str, Any] = {"kind": "dask"} if scheduler else {}
    if kind:
        options["kind"] = kind
    if scheduler:
        options["scheduler"] = scheduler
    return options


def serve_role(args: argparse.Namespace) -> str:
    """The serve role the flags ask for; ConfigurationError for a flag that role does not use."""
    from . import service

    if args.workers_only:
        unused = [flag for flag, value in (("--host", args.host), ("--port", args.port),
                                           ("--allow-remote", args.allow_remote),
                                           ("--max-message-mb", args.max_message_mb),
                                           ("--no-drop-folder", args.no_drop_folder)) if value]
        if unused:
            raise ConfigurationError(f"--workers-only does not listen: drop {', '.join(unused)}")
        return service.WORKERS
    if args.gateway_only:
        unused = [flag for flag, value in (("--executor", args.executor), ("--scheduler", args.scheduler),
                                           ("--deliver", args.deliver)) if value]
        if unused:
            raise ConfigurationError(f"--gateway-only runs no tasks: give {', '.join(unused)} to the "
                                     "--workers-only processes")
        return service.GATEWAY
    return service.ALL


def open_store(args: argparse.Namespace, create: bool = False) -> s.DAGRunStore:
    """Open the run store named by the settings (it must exist unless ``create``)."""
    return s.open_store(settings_from(args).store, create=create)


@contextmanager
def existing_store(args: argparse.Namespace) -> Iterator[s.DAGRunStore | None]:
    """Yield the run store if it exists, else None (creating nothing); close it on leaving."""
    config = settings_from(args).store
    if nothing_ran_yet(config):  # an empty store, not an error (issue 10)
        yield None
        return
    with _open_for_reading(config) as store:
        yield store


def nothing_ran_yet(config: StoreConfig) -> bool:
    """True for a SQLite store that is absent or an empty file with no WAL (``touch``, a restore that failed):
    a read command shows it empty and writes nothing into it (it used to write a whole schema into the file)."""
    if config.is_postgres:
        return False
    try:
        if config.path.stat().st_size:
            return False
    except FileNotFoundError:
        return True
    except OSError:
        return False  # opening it says why
    wal = Path(f"{config.path}-wal")  # a new store's schema may sit in its WAL before a checkpoint
    return not wal.exists() or wal.stat().st_size == 0


def _open_for_reading(config: StoreConfig) -> s.DAGRunStore:
    """Open the store to read it; a SQLite file that cannot be opened for writing (its directory read-only, a
    backup, serve's data dir seen by another user, a full disk: runs and show failed on a full disk, a prober's
    find) is opened read-only instead of failing."""
    try:
        return s.open_store(config, create=False)
    except StoreIOError as exc:
        if config.is_postgres:
            raise
        why = exc
    from .sqlite_store import SqliteRunStore

    store = SqliteRunStore(config, read_only=True)  # its error, if any, says what to do (an older schema)
    log.info("%s: cannot be opened for writing here (%s): opened read-only", config.path, why)
    return store


@command
def cmd_runs(args: argparse.Namespace) -> int:
    with existing_store(args) as store:
        runs = _paged_runs(store, args) if store else iter(())
        if args.json:
            empty = True  # printed as it is read: the same text json.dumps(list, indent=2) would give
            for run in runs:
                print("[" if empty else ",", textwrap.indent(json.dumps(run.as_dict(), indent=2), "  "), sep="\n",
                      end="")
                empty = False
            print("[]" if empty else "\n]")
            return 0
        print(f"{'RUN':>8}  {'WORKFLOW':<14} {'STATE':<9} {'QUEUED (UTC)':<20} {'SECONDS':>8}  REASON")
        for r in runs:
            duration = f"{r.duration_s:8.3f}" if r.duration_s is not None else " " * 8
            print(f"{r.run_id:>8}  {r.workflow:<14} {r.state:<9} {utc_text(r.queued_at):<20} {duration}  "
                  f"{r.reason or ''}")
    return 0


RUNS_PAGE = 1000  # rows read at a time: ``runs --limit 1000000`` prints as it reads, in bounded memory


def _paged_runs(store: s.DAGRunStore, args: argparse.Namespace) -> Iterator[s.Run]:
    """The runs ``runs`` lists, newest first, read a page at a time (it held them all: 853 MB for 200,000).
    The first page is read before this returns, so a store that cannot be read fails before any output."""
    def page(left: int, before: int | None) -> list[s.Run]:
        return store.list_runs(args.workflow, args.state, min(left, RUNS_PAGE), before)

    def rest(runs: list[s.Run], left: int) -> Iterator[s.Run]:
        while runs:
            yield from runs
            left -= len(runs)
            if len(runs) < RUNS_PAGE or left <= 0:
                return
            runs = page(left, runs[-1].run_id)

    return rest(page(args.limit, args.before), args.limit)


@command
def cmd_show(args: argparse.Namespace) -> int:
    with existing_store(args) as store:
        if store is None:
            raise UnknownRunError(args.run_id)
        print(format_run(store, args.run_id, as_json=args.json))
    return 0


@command
def cmd_purge(args: argparse.Namespace) -> int:
    from . import housekeeping

    settings = settings_from(args)
    if nothing_ran_yet(settings.store):  # a fresh install's purge job has nothing to do, and is no error
        print(f"{'would purge' if args.dry_run else 'purged'} 0 run(s): no run store at {settings.store.path} yet "
              "(nothing has run)")
        return 0
    if args.dry_run:
        runs = housekeeping.purgeable(settings, args.older_than)
        print(f"would purge {runs:,} run(s) that ended more than {args.older_than:g} day(s) ago (dry run: "
              "nothing deleted)")
        return 0
    print(housekeeping.purge(settings, args.older_than, progress=sys.stderr.isatty()).summary())
    return 0


@command
def cmd_serve(args: argparse.Namespace) -> int:
    from .service import GATEWAY, PipelineService

    role = serve_role(args)
    settings = settings_from(args)
    if role == GATEWAY:  # a process that only accepts: answer senders as soon as it wakes
        from .priority import request_slice

        request_slice(settings.serve.gateway_slice_us)
    PipelineService(settings, role=role).serve_forever()
    return 0


@command
def cmd_ingest(args: argparse.Namespace) -> int:
    missing = [str(f) for f in args.files if not f.exists()]
    if missing:
        raise ConfigurationError(f"no such file: {', '.join(missing)}")
    odd = [str(f) for f in args.files if not f.is_file()]
    if odd:  # a directory, a FIFO, a device
        raise ConfigurationError(f"not a regular file: {', '.join(odd)}")
    from .workflows import start_extraction_workers

    settings = settings_from(args)
    start_extraction_workers(settings)  # first: the workers start while this process imports the service
    from .ingest_command import ingest_files

    run_ids = ingest_files(settings, args.files)
    with open_store(args) as store:
        for run_id in run_ids:
            print(format_run(store, run_id, as_json=True))
        runs = [store.get_run(r) for r in run_ids]
    if any(run.state != s.SUCCESS for run in runs):
        return 1
    return 3 if any(run.partial for run in runs) else 0  # 3: digested, but some attachments could not be read


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reading end was closed (poll reports an error on the writing end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), or no poll (not Unix)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # library chatter (aiosmtpd's per-connection lines; psycopg_pool's three lines per store call) only with -v
    for chatty in ("mail.log", "psycopg.pool", "distributed", "tornado"):
        logging.getLogger(chatty).setLevel(logging.NOTSET if args.verbose else logging.WARNING)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that left (``runs | head``) shows here, not as a traceback at exit
        return code
    except BrokenPipeError as exc:
        if not _stdout_reader_gone():  # another pipe: an error like any other
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return 2
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to write: no error at exit
        return 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader left, as head expects
    except PipelineError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # last resort: OS errors should have been translated where they happen
        log.debug("untranslated OSError", exc_info=True)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
