"""A throwaway, real PostgreSQL server for tests and the audit: ``TemporaryPostgres``.

It runs Debian's (or any installed) ``initdb``/``pg_ctl``/``postgres`` in a
fresh directory under /tmp, listening on a free 127.0.0.1 port, with its
unix socket inside that directory, and removes everything on ``stop()``.
PostgreSQL refuses to run as root, so when this process is root (CI is) the
directory is handed to an unprivileged user (``nobody`` by default) and every
PostgreSQL binary runs as that user. The directory is not pytest's
``tmp_path``: that one is 0700 root, which ``nobody`` cannot enter.

``durable=False`` starts the server with ``fsync=off`` (fast tests; a crash
of the server process still loses nothing committed, only an OS crash
would); the audit keeps the default ``durable=True`` so its figures include
real WAL flushes.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pipeline.errors import ConfigurationError, StartupError

from .serveproc import free_port

INSTALL_HINT = "Debian: apt-get install postgresql (.ci/run installs it)"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it


class PostgresUnavailableError(ConfigurationError):
    """No PostgreSQL server binaries (initdb, pg_ctl, postgres) are installed on this machine."""

    reason = "postgres_unavailable"


class PostgresStartError(StartupError):
    """The throwaway server did not start; the message quotes the end of its log."""


@dataclass(frozen=True)
class PgBinaries:
    """Paths of the server programs this module runs."""

    initdb: Path
    pg_ctl: Path
    postgres: Path
    version: str


def find_binaries() -> PgBinaries | None:
    """Find initdb, pg_ctl and postgres: on PATH first, then the newest /usr/lib/postgresql/*/bin; None if absent."""
    on_path = [shutil.which(name) for name in ("initdb", "pg_ctl", "postgres")]
    if all(on_path):
        initdb, pg_ctl, postgres = (Path(p).resolve() for p in on_path if p)
        return PgBinaries(initdb, pg_ctl, postgres, _version(postgres))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: [int(x) for x in re.findall(r"\d+", p)], reverse=True)
    for initdb_path in versions:
        bindir = Path(initdb_path).parent
        if (bindir / "pg_ctl").exists() and (bindir / "postgres").exists():
            return PgBinaries(bindir / "initdb", bindir / "pg_ctl", bindir / "postgres", _version(bindir / "postgres"))
    return None


def _version(postgres: Path) -> str:
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"\d+(\.\d+)+", out.stdout) if out.returncode == 0 else None
    return found.group(0) if found else "unknown"


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigurationError("PostgreSQL support needs psycopg: "
                                 "pip install 'email-digest-pipeline[postgres]'") from exc
    return psycopg


class TemporaryPostgres:
    """A PostgreSQL server in a temp dir on a loopback port, from ``start()`` (or ``with``) to ``stop()``.

    ``url`` names the ``postgres`` database as superuser ``postgres`` (trust
    auth, loopback only); ``create_database`` makes more. ``settings`` adds
    ``-c name=value`` server options. Raises PostgresUnavailableError when
    PostgreSQL is not installed and PostgresStartError when it does not come up.
    """

    def __init__(self, durable: bool = True, run_as: str = "nobody", settings: dict[str, str] | None = None,
                 start_timeout_s: float = 60.0) -> None:
        self.binaries = find_binaries()
        if self.binaries is None:
            raise PostgresUnavailableError(f"PostgreSQL is not installed ({INSTALL_HINT})")
        self.durable = durable
        self.settings = {"max_connections": "200", **(settings or {})}
        self.start_timeout_s = start_timeout_s
        try:  # PostgreSQL refuses to run as root
            self._user = pwd.getpwnam(run_as) if os.geteuid() == 0 else None
        except KeyError:
            raise PostgresStartError(f"running as root, and there is no user {run_as!r} to run PostgreSQL as: "
                                     "pass run_as=<an unprivileged user>") from None
        self.port = 0
        self.root: Path | None = None
        self._starter_pid = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Self:
        """Create the cluster and start the server; wait until it accepts connections."""
        self.root = Path(tempfile.mkdtemp(prefix="pgtmp-", dir="/tmp"))
        self._starter_pid = os.getpid()
        atexit.register(self.stop)  # never leave a server behind a crashed audit
        try:
            if self._user is not None:
                os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
            self._run(str(self.binaries_.initdb), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                      "--encoding=UTF8", "--no-locale", "--no-sync")
            self._start_on_free_port()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown, immediate if that hangs) and remove its directory; idempotent."""
        atexit.unregister(self.stop)
        if self.root is None or os.getpid() != self._starter_pid:  # a forked child's exit is not ours to act on
            return
        pid = self.pid
        if pid:
            for mode in ("fast", "immediate"):
                if self.pg_ctl("stop", "-m", mode, "-w", "-t", "30", check=False).returncode == 0:
                    break
            _reap(pid)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    # -- what callers use --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return self.database_url("postgres")

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (inside the temp dir)."""
        return self._root / "data"

    @property
    def log_file(self) -> Path:
        """The server log (postgres's stderr)."""
        return self._root / "server.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, None when the server is not running."""
        return self._postmaster_pid(self.data_dir)

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str, encoding: str = "UTF8") -> str:
        """Create an empty database ``name`` (lowercase identifier) in ``encoding`` and return its URL."""
        self._admin(f"CREATE DATABASE {_checked(name)} ENCODING '{_checked(encoding.lower()).upper()}' "
                    f"TEMPLATE template0")
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting whoever is still connected to it."""
        self._admin(f"DROP DATABASE IF EXISTS {_checked(name)} WITH (FORCE)")

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``pg_ctl ARGS -D <data dir>`` as the server's user (fault injection: stop, restart, kill).

        ``start`` and ``restart`` get this server's options, log file and ``-w`` unless given;
        raises PostgresStartError when ``check`` and pg_ctl fails.
        """
        extra: list[str] = []
        if args and args[0] in ("start", "restart"):
            extra += [] if "-l" in args else ["-l", str(self.log_file)]
            extra += [] if "-o" in args else ["-o", self._server_options()]
            extra += [] if "-w" in args or "-W" in args else ["-w", "-t", str(int(self.start_timeout_s))]
        return self._run(str(self.binaries_.pg_ctl), *args, "-D", str(self.data_dir), *extra, check=check)

    # -- internals ---------------------------------------------------------------------------------

    @property
    def binaries_(self) -> PgBinaries:
        assert self.binaries is not None  # checked in __init__
        return self.binaries

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise StartupError("the temporary PostgreSQL server is not started")
        return self.root

    def _server_options(self) -> str:
        opts = {"listen_addresses": "127.0.0.1", "port": str(self.port),
                "unix_socket_directories": str(self._root), **self.settings}
        if not self.durable:
            opts.setdefault("fsync", "off")
            opts.setdefault("full_page_writes", "off")
        return " ".join(f"-c {key}={value}" for key, value in opts.items())

    def _start_on_free_port(self) -> None:
        for attempt in range(_START_ATTEMPTS):
            self.port = free_port()
            done = self.pg_ctl("start", check=False)
            if done.returncode == 0:
                return
            log = self._log_tail()
            if "could not bind" not in log or attempt == _START_ATTEMPTS - 1:
                raise PostgresStartError(f"PostgreSQL did not start (pg_ctl: {done.stderr.strip()[-300:]}); "
                                         f"end of {self.log_file}:\n{log}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program as the server's user, in its directory, with a C locale."""
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self._root)}
        done = subprocess.run(list(cmd), cwd=self._root, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=self.start_timeout_s + 30, **kwargs)
        if check and done.returncode != 0:
            raise PostgresStartError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} failed "
                                     f"(exit {done.returncode}): {(done.stderr or done.stdout).strip()[-600:]}")
        return done

    def _admin(self, statement: str) -> None:
        psycopg = _psycopg()
        with psycopg.connect(self.url, autocommit=True, connect_timeout=30) as conn:
            conn.execute(statement)

    @staticmethod
    def _postmaster_pid(data_dir: Path) -> int | None:
        try:
            first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        if not first.strip().isdigit():
            return None
        try:  # a server killed with -9 leaves its pid file behind
            os.kill(int(first), 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, and another user's (not root, server run by someone else)
            pass
        return int(first)


def _checked(name: str) -> str:
    if not _DB_NAME.match(name):
        raise ValueError(f"database name must be a lowercase identifier, not {name!r}")
    return name


def _reap(pid: int, timeout_s: float = 10.0) -> None:
    """Collect the postmaster if it became our child (a subreaper adopts it when pg_ctl exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not our child: init reaps it
            return
        time.sleep(0.05)
