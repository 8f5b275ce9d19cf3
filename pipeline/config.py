"""Settings, one frozen dataclass per concern.

Library code takes these as arguments and never reads the environment; only
the CLI builds them from flags and an optional TOML file (``load_settings``).
Optimization switches live here too, so the audit can run baseline and
optimized variants side by side.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import ConfigurationError

MB = 1024 * 1024
# typo guards (20000 for 20 would start 20,000 interpreters; a cap setrlimit cannot take failed every run)
MIN_WORKER_MEMORY, MAX_WORKER_MEMORY = 128 * MB, 1 << 40  # an extraction worker's imports need about 96 MB
MAX_PROCESSES, MAX_THREADS, MAX_ACTIVE_RUNS = 256, 1024, 100_000
# the longest any duration setting may be (a ``_s`` field; ``_ms`` in milliseconds): longer than any wait here
# needs, and far inside what the OS's timers, select() and SQLite's busy timeout take (past ~2.9e8 years of
# seconds, or 2^31 ms, they raise OverflowError in the thread that waits, which then dies)
MAX_DURATION_S = 86_400.0


@dataclass(frozen=True)
class StoreConfig:
    """Where the run store lives and how SQLite is tuned."""

    path: Path = Path("data/runs.sqlite3")
    # "postgresql://user@host:5432/db" picks PostgresRunStore (extra [postgres]); empty: the SQLite file at path
    url: str = ""
    pool_size: int = 8  # PostgreSQL connections a process keeps open (psycopg_pool); ignored for SQLite
    wal: bool = True  # journal_mode=WAL: readers never block the writer
    synchronous: str = "NORMAL"  # with WAL, NORMAL is crash-safe for the process; FULL also for power loss
    busy_timeout_ms: int = 10_000
    # SQLite: wait for the write lock by trying every 0.1-1 ms (true), or by SQLite's busy handler, which sleeps
    # 1, 2, 5 ... 100 ms between tries (false); see SqliteRunStore._begin and scripts/bench_lock.py
    lock_polling: bool = True

    def validate(self) -> None:
        if self.synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigurationError(f"store.synchronous must be OFF, NORMAL, FULL or EXTRA, not {self.synchronous!r}")
        if self.busy_timeout_ms < 0:
            raise ConfigurationError("store.busy_timeout_ms must be >= 0")
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise ConfigurationError(f"store.url must start with postgresql:// (or be empty for SQLite), "
                                     f"not {self.url.split(':', 1)[0]!r}")
        if self.pool_size < 1:
            raise ConfigurationError("store.pool_size must be >= 1")

    @property
    def is_postgres(self) -> bool:
        """True when runs live in PostgreSQL rather than the SQLite file."""
        return bool(self.url)


@dataclass(frozen=True)
class RunnerConfig:
    """How tasks run: pool sizes, default retries and timeouts."""

    thread_workers: int = 16
    # threads of their own for tasks that wait on another host (deliver through a relay, executor "io"): a relay
    # that hangs holds these, not the threads that parse and ingest every other mail (a prober's relay hanging
    # after DATA held all 16 for its 10-minute timeout, and no mail was parsed meanwhile)
    io_workers: int = 8
    process_workers: int = 2
    default_retries: int = 0
    default_timeout_s: float | None = None
    retry_base_delay_s: float = 0.5
    retry_max_delay_s: float = 30.0
    # where build_digest and deliver run: "process", the pool of process_workers (the email package's header
    # parsing and the summary off the engine's GIL: small mails 1.24x per second in small_mail_drain), or "thread";
    # "auto": the pool, but threads for `ingest` (whose few runs end before a pool has started); deliver keeps
    # to the io_workers threads when it sends through a relay (workflows.email_digest_dag)
    stage_executor: str = "auto"
    # threads that take a process-pool or Dask try's result to its run (the store writes, the next task's submit);
    # 0: the pool's own result thread does it, and while it writes, no other result or submission moves (baseline)
    completion_threads: int = 4

    def validate(self) -> None:
        if self.thread_workers < 1 or self.process_workers < 1 or self.io_workers < 1:
            raise ConfigurationError("runner worker counts must be >= 1")
        if self.process_workers > MAX_PROCESSES or max(self.thread_workers, self.io_workers) > MAX_THREADS:
            raise ConfigurationError(f"runner.process_workers must be at most {MAX_PROCESSES}, and "
                                     f"runner.thread_workers and io_workers at most {MAX_THREADS}")
        if self.completion_threads < 0:
            raise ConfigurationError("runner.completion_threads must be >= 0 (0: on the pool's result thread)")
        if self.stage_executor not in ("auto", "process", "thread"):
            raise ConfigurationError(f"runner.stage_executor must be \"auto\", \"process\" or \"thread\", "
                                     f"not {self.stage_executor!r}")
        if self.retry_base_delay_s < 0 or self.retry_max_delay_s < self.retry_base_delay_s:
            raise ConfigurationError("runner retry delays must satisfy 0 <= base <= max")
        if self.default_timeout_s is not None and self.default_timeout_s <= 0:
            raise ConfigurationError(f"runner.default_timeout_s must be > 0 (or left out: no timeout), "
                                     f"not {self.default_timeout_s:g}")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where CPU-heavy tasks run: local worker processes (default) or a Dask distributed cluster (extra [dask])."""

    kind: str = "local"  # "local" | "dask"
    scheduler: str = ""  # "tcp://host:8786" with kind = "dask"; empty: a LocalCluster in this process (tests, trials)
    local_workers: int = 2  # workers of that LocalCluster
    worker_memory_mb: int = 1024  # memory limit of each LocalCluster worker (the nanny restarts one over it)
    pages_per_task: int = 400  # with dask, a document over this many pages is split into page-range futures
    # refuse to send a task to a scheduler that has no worker (the run waits queued, the engine reports why, the
    # gateway answers 451) rather than let it wait out its timeout; false for a cluster that starts workers
    # only on demand (adaptive, from zero)
    require_workers: bool = True
    # a scheduler that has not answered the client's 2-second refresh for this long (frozen, a stalled link) gets
    # no task: the run waits queued and serve answers 451, as with no worker
    scheduler_silent_s: float = 30.0

    def validate(self) -> None:
        if self.kind not in ("local", "dask"):
            raise ConfigurationError(f"executor.kind must be 'local' or 'dask', not {self.kind!r}")
        if self.scheduler and not self.scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
            raise ConfigurationError(f"executor.scheduler must be an address like tcp://host:8786, "
                                     f"not {self.scheduler!r}")
        if self.local_workers < 1 or self.worker_memory_mb < 64 or self.pages_per_task < 1:
            raise ConfigurationError("executor: local_workers >= 1, worker_memory_mb >= 64, pages_per_task >= 1")
        if self.scheduler_silent_s < 5:  # below the client's own refresh (2 s) and its jitter, a live one is silent
            raise ConfigurationError(f"executor.scheduler_silent_s must be >= 5, not {self.scheduler_silent_s:g}")


@dataclass(frozen=True)
class EngineConfig:
    """How many runs are active at once and how liveness is tracked."""

    max_active_runs: int = 32
    heartbeat_interval_s: float = 2.0
    stale_after_s: float = 30.0  # a running run with an older heartbeat belongs to a dead process
    shutdown_grace_s: float = 10.0
    unhealthy_after: int = 3  # consecutive failures of a background loop before the engine reports unhealthy
    backoff_base_s: float = 0.1  # a failing loop (or a run broken by the environment) waits this long, doubling
    backoff_max_s: float = 5.0
    max_internal_requeues: int = 3  # a run broken by a non-environmental error: requeued this often, then "internal"
    # a pass of a background loop (claiming runs, heartbeats) or of a timer or completion callback running this
    # long is a hang: the engine is unhealthy (451) until it returns (0: never)
    stuck_after_s: float = 60.0
    # an idle dispatcher looks for queued runs this often; a store that wakes it when another process queues a
    # run (PostgreSQL NOTIFY, SQLite pipeline.wakeup) makes this a fallback; other stores are polled every 1 s
    queue_poll_s: float = 5.0
    # queued runs claimed in one transaction (at most the free slots); 1, the default: a transaction per claimed
    # run (batches of 8: no consistent gain at draining small mails, issue 16; a broken start hands the rest back)
    claim_batch: int = 1

    def validate(self) -> None:
        if not 1 <= self.max_active_runs <= MAX_ACTIVE_RUNS:
            raise ConfigurationError(f"engine.max_active_runs must be 1 to {MAX_ACTIVE_RUNS:,}")
        if self.claim_batch < 1:
            raise ConfigurationError("engine.claim_batch must be >= 1")
        if self.queue_poll_s <= 0:
            raise ConfigurationError("engine.queue_poll_s must be > 0")
        if self.heartbeat_interval_s <= 0 or self.stale_after_s <= self.heartbeat_interval_s:
            raise ConfigurationError("engine.stale_after_s must exceed heartbeat_interval_s > 0")
        if self.unhealthy_after < 1 or self.max_internal_requeues < 0:
            raise ConfigurationError("engine.unhealthy_after must be >= 1 and engine.max_internal_requeues >= 0")
        if not 0 < self.backoff_base_s <= self.backoff_max_s:
            raise ConfigurationError("engine backoff must satisfy 0 < backoff_base_s <= backoff_max_s")
        if self.stuck_after_s < 0:
            raise ConfigurationError("engine.stuck_after_s must be >= 0 (0: never)")


@dataclass(frozen=True)
class GatewayConfig:
    """The SMTP listener and the drop folder; loopback and bounded by default."""

    host: str = "127.0.0.1"
    port: int = 8025
    max_message_bytes: int = 50 * MB
    allowed_recipient_domains: tuple[str, ...] = ()  # empty: accept any recipient
    drop_folder: bool = True
    bulk_data: bool = True  # read DATA in chunks (BulkDataSMTP); False: aiosmtpd's line-by-line reader
    watch_mode: str = "inotify"  # "inotify" (watchdog) or "poll"
    accept_off_loop: bool = True  # store and queue each message in a thread; False: on the SMTP event loop
    # > 0: a message up to this size accepted on the event loop (inline_accept.py): better with the gateway alone,
    # mixed beside a busy engine on the same SQLite store (its commit waits for the write lock on the loop)
    inline_accept_bytes: int = 0
    lean_sessions: bool = True  # LeanSMTP's cheap session start and cached address parse; False: aiosmtpd's own
    poll_interval_s: float = 1.0
    # Limits on what senders can hold (issue 11). None: a quarter of the process's open-file limit, at most 500.
    max_sessions: int | None = None  # concurrent SMTP sessions; one more is answered 421 4.3.2 and closed
    command_timeout_s: float = 60.0  # a session idle this long between commands is closed (421)
    # storing and queueing one message (in the accept pool) that takes longer is answered 451 (a store or disk
    # that does not answer: a sender would otherwise wait for command_timeout_s, then get 421 blaming it); the
    # accept goes on, and its run stands if it completes (the sender's retry then finds it). Keep it under
    # command_timeout_s, or the session's idle timeout answers first
    accept_timeout_s: float = 30.0
    session_timeout_s: float = 900.0  # no session lasts longer than this, whatever it sends
    max_inflight_bytes: int = 256 * MB  # DATA bytes being received across all sessions; beyond: 452 4.3.1
    # RCPT TO per transaction (RFC 5321 4.5.3.1.8: at least 100 must be taken); one more: 452 4.5.3. Unbounded,
    # 4 sessions of 250,000 recipients each held 2.9 GB in serve and its gateway, and 1.1 GB in the run store
    max_recipients: int = 100
    # a client pipelining commands is answered this many at a time, taking turns with the other sessions; 0:
    # every buffered command first (aiosmtpd's way, the baseline: one such client held everyone's mail)
    fair_share_replies: int = 16
    # commands that carry no mail (NOOP, RSET, VRFY, EXPN, HELP, HELO, EHLO, and any command refused with 5xx)
    # between two mails' data, in the spirit of Postfix's junk and error limits; one more: 421 4.7.0, closed
    max_junk_commands: int = 100
    stream_data: bool = True  # write DATA to the spool as it arrives; False: hold it whole first (baseline)
    # Who may trigger a digest (issue 11). Empty: anyone who can connect, so only loopback is allowed.
    allowed_sender_domains: tuple[str, ...] = ()  # envelope sender (MAIL FROM) domains; others get 550 5.7.1
    allow_remote: bool = False  # listen on a non-loopback host; needs allowed_sender_domains too

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigurationError(f"gateway.port must be a TCP port, 0-65535 (0: any free port), not {self.port}")
        if self.max_message_bytes <= 0:
            raise ConfigurationError("gateway.max_message_bytes must be > 0")
        if self.inline_accept_bytes < 0:
            raise ConfigurationError("gateway.inline_accept_bytes must be >= 0 (0: every message in the thread pool)")
        if self.watch_mode not in {"inotify", "poll"}:
            raise ConfigurationError("gateway.watch_mode must be 'inotify' or 'poll'")
        if self.poll_interval_s <= 0:  # 0 would spin a core in the process that answers SMTP
            raise ConfigurationError(f"gateway.poll_interval_s must be > 0, not {self.poll_interval_s:g}")
        if self.max_recipients < 1:
            raise ConfigurationError(f"gateway.max_recipients must be >= 1, not {self.max_recipients}")
        if self.fair_share_replies < 0:
            raise ConfigurationError(f"gateway.fair_share_replies must be >= 0 (0: no turns), not "
                                     f"{self.fair_share_replies}")
        if self.max_junk_commands < 1:
            raise ConfigurationError(f"gateway.max_junk_commands must be >= 1 (EHLO counts), not "
                                     f"{self.max_junk_commands}")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ConfigurationError("gateway.max_sessions must be >= 1 (or left out for the automatic limit)")
        if self.command_timeout_s <= 0 or self.session_timeout_s < self.command_timeout_s:
            raise ConfigurationError("gateway timeouts must satisfy 0 < command_timeout_s <= session_timeout_s")
        if self.accept_timeout_s <= 0:
            raise ConfigurationError(f"gateway.accept_timeout_s must be > 0, not {self.accept_timeout_s:g}")
        if self.max_inflight_bytes < self.max_message_bytes:
            raise ConfigurationError(f"gateway.max_inflight_bytes ({_mb(self.max_inflight_bytes)}) must be >= "
                                     f"gateway.max_message_bytes ({_mb(self.max_message_bytes)}): raise "
                                     "max_inflight_bytes too ([gateway] in the --config file)")
        self._check_exposure()

    def _check_exposure(self) -> None:
        """Refuse to listen beyond this machine unless asked to and told whom to accept mail from."""
        if is_loopback(self.host):
            return
        if not self.allow_remote:
            raise ConfigurationError(
                f"refusing to listen on {self.host}: anyone who can connect could have digests of PDF text mailed "
                "to any address; set gateway.allow_remote = true (or --allow-remote) and "
                "gateway.allowed_sender_domains")
        if not self.allowed_sender_domains:
            raise ConfigurationError(f"listening on {self.host} needs gateway.allowed_sender_domains "
                                     "(the envelope sender domains that may trigger a digest)")


def _mb(size: int) -> str:
    return f"{size / MB:,.6g} MB"


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in {"localhost", "localhost.localdomain", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass(frozen=True)
class IngestConfig:
    """Bounds on one PDF: a hostile file costs at most these."""

    max_attachment_bytes: int = 30 * MB
    max_pages: int = 5_000
    max_decompressed_bytes: int = 75 * MB  # per stream, enforced by pypdf
    timeout_s: float = 60.0
    memory_limit_bytes: int = 1024 * MB  # address-space cap of the extraction worker
    isolate: bool = True  # extract in worker processes so time and memory caps can be enforced
    workers: int = 2  # extraction worker processes (one per core: extraction is CPU-bound with either engine)
    engine: str = "pdfium"  # "pdfium" (pypdfium2; bounded by the worker's memory cap) or "pypdf" (pure Python)
    page_workers: int = 2  # >1: split one document's pages across that many workers at once
    stream_text: bool = True  # write each page's text as it comes; False holds the whole text first (baseline)
    summary_sentences: int = 3
    max_mime_depth: int = 32  # multipart nesting deeper than this fails the run as malformed_email
    parse_isolate: bool = True  # parse MIME in a capped worker process; False: in the pipeline process (baseline)
    fair_extraction: bool = True  # documents share the workers page chunk by page chunk; False: whole shards

    def validate(self) -> None:
        for name in ("max_attachment_bytes", "max_pages", "max_decompressed_bytes", "memory_limit_bytes", "workers",
                     "max_mime_depth"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"ingest.{name} must be > 0, not {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ConfigurationError("ingest.timeout_s must be > 0")
        if not MIN_WORKER_MEMORY <= self.memory_limit_bytes <= MAX_WORKER_MEMORY:  # too little: not even imports
            raise ConfigurationError(f"ingest.memory_limit_bytes must be {MIN_WORKER_MEMORY // MB:,} MB to "
                                     f"{MAX_WORKER_MEMORY // MB:,} MB, not {self.memory_limit_bytes:,}")
        if self.workers > MAX_PROCESSES:
            raise ConfigurationError(f"ingest.workers must be at most {MAX_PROCESSES}, not {self.workers} "
                                     f"(one process each, all started at once)")
        if self.engine not in ("pypdf", "pdfium"):
            raise ConfigurationError(f"ingest.engine must be 'pypdf' or 'pdfium', not {self.engine!r}")
        if self.engine == "pdfium" and not self.isolate:
            raise ConfigurationError("ingest.engine 'pdfium' needs isolate = true: PDFium has no decompression "
                                     "limit, only the worker's memory cap bounds a bomb")
        if not 1 <= self.page_workers <= self.workers:
            raise ConfigurationError("ingest.page_workers must be between 1 and ingest.workers")
        if not 0 <= self.summary_sentences <= 100:
            raise ConfigurationError(f"ingest.summary_sentences must be 0-100, not {self.summary_sentences}")


@dataclass(frozen=True)
class DeliveryConfig:
    """Where digests go: an SMTP relay URL or, by default, a Maildir outbox."""

    relay: str | None = None  # e.g. "smtp://127.0.0.1:2525"
    outbox: Path = Path("data/outbox")
    sender: str = "digest@localhost"
    recipient: str | None = None  # default: the original sender
    # a relay or outbox that fails for a while (a relay restarting, greylisting's usual 5 minutes, a full disk)
    # is tried again with pauses doubling from [runner] retry_base_delay_s up to retry_max_delay_s: with these
    # defaults over 13-26 minutes (the pauses are jittered), before the run fails with reason delivery
    retries: int = 20
    retry_max_delay_s: float = 120.0
    # digests through the relay to one address in any hour; past it a digest is skipped (its run says why): a
    # client can claim any envelope sender and have digests mailed to a third party. 0: no limit
    max_digests_per_hour: int = 0

    def validate(self) -> None:
        if self.relay:
            _check_relay(self.relay)
        if self.retries < 0 or not self.retry_max_delay_s > 0:
            raise ConfigurationError("delivery.retries must be >= 0 and delivery.retry_max_delay_s > 0")
        if self.max_digests_per_hour < 0:
            raise ConfigurationError(f"delivery.max_digests_per_hour must be >= 0 (0: no limit), "
                                     f"not {self.max_digests_per_hour}")
        for name in ("sender", "recipient"):
            value = getattr(self, name)
            if value is not None and not _is_one_mailbox(value):
                raise ConfigurationError(f"delivery.{name} must be one mail address like digest@example.com, "
                                         f"not {value!r}")
        if self.recipient and _addr_spec(self.recipient) == _addr_spec(self.sender):
            raise ConfigurationError(f"delivery.recipient is delivery.sender ({self.sender}): no digest would ever "
                                     f"go out (a digest is never sent to its own sender: it could loop)")


def _check_relay(relay: str) -> None:
    """A relay URL this client can use: smtp://host[:port], nothing else (it speaks no TLS and no AUTH, so a
    user:password in the URL would be sent nowhere, and shown in every failed run's reason)."""
    from urllib.parse import urlsplit

    shape = "delivery.relay must look like smtp://host:port"
    try:
        url = urlsplit(relay)
        url.port  # noqa: B018 - parsed only to refuse a port that is not a number or out of range
    except ValueError as exc:  # a port that is not a number, or out of range
        raise ConfigurationError(f"{shape}: {exc}") from exc
    if url.scheme.lower() != "smtp":
        raise ConfigurationError(f"{shape}, not {relay!r} (smtps and other schemes are not supported)")
    if url.username is not None or url.password is not None:
        raise ConfigurationError(f"{shape}: no user or password (the relay client speaks no AUTH)")
    if not url.hostname or url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigurationError(f"{shape}, not {relay!r}")


# local@domain, both dot-atoms (RFC 5322 3.4.1): the usual shape, which the email package reads as one mailbox
_PLAIN_MAILBOX = re.compile(r"[\w!#$%&'*+/=?^`{|}~-]+(\.[\w!#$%&'*+/=?^`{|}~-]+)*@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*",
                            re.ASCII)


def _addr_spec(value: str) -> str:
    """The address in ``value`` (``Digest <d@example.org>`` is ``d@example.org``), lower case, its domain in
    punycode as delivery writes it, for comparing (a Unicode recipient equal to a punycode sender passed)."""
    from email.utils import parseaddr

    local, at, domain = parseaddr(value)[1].lower().rpartition("@")
    return f"{local}{at}{ascii_domain(domain)}" if at else domain  # no "@": rpartition leaves it all in domain


def ascii_domain(domain: str) -> str:
    """``domain`` in punycode (IDNA 2008 with UTS 46 mapping, as mail programs do); one IDNA refuses stays as
    it is, and then needs a relay with SMTPUTF8 like a UTF-8 local part."""
    if domain.isascii():
        return domain
    import idna  # only a Unicode domain pays for the import

    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain


def _is_one_mailbox(value: str) -> bool:
    """True when ``value`` parses (RFC 5322, email.headerregistry) as exactly one mailbox with a domain."""
    if _PLAIN_MAILBOX.fullmatch(value):  # spares every CLI start the email package's import (issue 16)
        return True
    from email import errors as email_errors
    from email import policy

    try:
        mailboxes = [a for a in policy.default.header_factory("To", value).addresses if a.username and a.domain]
    except (ValueError, LookupError, TypeError, AttributeError, email_errors.MessageError):
        return False  # what the email package raises on odd input instead of recording a defect
    return len(mailboxes) == 1 and value.isprintable()


@dataclass(frozen=True)
class ServeConfig:
    """How ``serve`` lays out its processes (issue 17)."""

    # accept SMTP (spool fsync, run commit, reply) in a child process of its own, so the pipeline's threads
    # never hold the GIL the event loop needs; False: the gateway runs in serve's own process (the baseline)
    gateway_process: bool = True
    # with the gateway in its own process: how many nice steps (0-19, added to serve's own nice value) the
    # engine and its extraction workers run below the gateway, so a busy machine answers senders first; 0: none.
    # Linux only (per-thread nice values).
    # 12, not 5 as before: 5 (weight 335 against the gateway's 1,024) still let the engine take a core from the
    # gateway for tens of ms; at 12 (weight 70) 8 senders' median, mails accepted and p99 beside a 5 MB mail
    # improved in every run, their p99 alone in the three bench runs, not in two audit sessions (README, Benchmarks)
    engine_nice: int = 12
    # the scheduler slice (µs) the gateway process asks Linux for (6.12+; pipeline.priority.request_slice): a
    # short one lets a waking gateway preempt a running engine thread at once; 0: the kernel's (1.4 ms here).
    # Not shown to help: in the audit, whichever slice the default had, the other measured better (README,
    # Benchmarks); the audit measures 100 as short_slice
    gateway_slice_us: int = 0
    # the gateway process says it is alive from its event loop every second; one silent this long (a loop that
    # hangs: a deadlock, a callback that never returns) is killed and restarted, as a dead one is; 0: never
    gateway_hung_after_s: float = 30.0
    # a stop (SIGTERM, Ctrl-C) that takes this long past [engine] shutdown_grace_s ends the process anyway: a run
    # store that does not answer (a frozen PostgreSQL server, a network path that stalls) held serve for as long
    # as it lasted; the runs it held are requeued by the next start's recovery; 0: wait for ever
    stop_margin_s: float = 30.0

    def validate(self) -> None:
        """Reject an engine_nice outside 0-19, a slice Linux would not take, and a negative stop margin."""
        if not 0 <= self.engine_nice <= 19:
            raise ConfigurationError(f"[serve] engine_nice must be 0-19 (nice steps), got {self.engine_nice}")
        if self.gateway_hung_after_s and self.gateway_hung_after_s < 2:  # signs of life come once a second
            raise ConfigurationError("[serve] gateway_hung_after_s must be 0 (never) or 2 s or more, got "
                                     f"{self.gateway_hung_after_s:g}")
        if not 0 <= self.stop_margin_s <= 86_400:
            raise ConfigurationError(f"[serve] stop_margin_s must be 0 (wait for ever) to 86,400 s, got "
                                     f"{self.stop_margin_s:g}")
        if self.gateway_slice_us != 0 and not 100 <= self.gateway_slice_us <= 100_000:
            raise ConfigurationError("[serve] gateway_slice_us must be 0 (the kernel's) or 100-100000 (µs), "
                                     f"got {self.gateway_slice_us}")


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus ``/metrics`` endpoint of serve (``pipeline.metrics``); port 0: off."""

    port: int = 0
    host: str = "127.0.0.1"
    allow_remote: bool = False  # listen on a non-loopback host (``--allow-remote`` sets it, as for SMTP)

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigurationError(f"metrics.port must be a TCP port, 0-65535 (0: no metrics endpoint), "
                                     f"not {self.port}")
        if not is_loopback(self.host) and not self.allow_remote:
            raise ConfigurationError(f"refusing to serve metrics on {self.host}: set metrics.allow_remote = true "
                                     "(or --allow-remote) to expose them beyond this machine")


def _check_durations(section: str, config: Any) -> None:
    """Every duration of ``config`` (a field named ``*_s``, or ``*_ms``) between 0 and ``MAX_DURATION_S``."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        unit = "s" if f.name.endswith("_s") else "ms" if f.name.endswith("_ms") else None
        if unit is None:
            continue
        limit = MAX_DURATION_S * (1000 if unit == "ms" else 1)
        if not 0 <= value <= limit:
            raise ConfigurationError(f"{section}.{f.name} must be between 0 and {limit:,.0f} {unit} (a day), "
                                     f"not {value:g}")


@dataclass(frozen=True)
class Settings:
    """All settings of one pipeline process."""

    data_dir: Path = Path("data")
    store: StoreConfig = field(default_factory=StoreConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> Settings:
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate()
                _check_durations(f.name, value)
        return self

    @classmethod
    def for_data_dir(cls, data_dir: Path | str, **sections: Any) -> Settings:
        """Return settings whose store and outbox live under ``data_dir``."""
        data_dir = Path(data_dir)
        base = cls(
            data_dir=data_dir,
            store=StoreConfig(path=data_dir / "runs.sqlite3"),
            delivery=DeliveryConfig(outbox=data_dir / "outbox"),
        )
        return replace(base, **sections).validate()


def load_settings(path: Path | None = None, data_dir: Path | str | None = None, *,
                  given_as: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional TOML file, then ``data_dir``, then per-section overrides.

    The TOML file has an optional top-level ``data_dir`` and one table per section
    (``[store]``, ``[gateway]`` ...) whose keys are the dataclass fields. Each value is
    checked against its field's annotated type. Raises ConfigurationError, one line naming
    the file, section and key, for an unknown section or key (with the nearest valid name),
    a value of the wrong type, or a value the section's ``validate()`` refuses. ``given_as`` names the
    command-line option of an override (``{"gateway.port": "--port"}``): its errors name what the user typed.
    A relative path in the file (``data_dir``, ``[store] path``, ``[delivery] outbox``) is relative to the file's
    directory, as most tools take it; ``data_dir`` and the overrides stay relative to the current directory.
    """
    source = str(path) if path is not None else ""
    raw = _read_toml(path) if path is not None else {}
    home = Path(path).parent if path is not None else None
    if isinstance(raw.get("data_dir"), str) and not raw["data_dir"].strip():  # as a Path, "" is "."
        raise ConfigurationError(f"{source}: data_dir is empty: it would mean the current directory; give a path")
    file_dir = _checked(raw.pop("data_dir"), Path, f"{source}: data_dir", home) if "data_dir" in raw else None
    settings = Settings.for_data_dir(data_dir or file_dir or "data")
    for section, values in raw.items():
        settings = _with_section(settings, section, values, source, home=home)
    for section, values in overrides.items():
        settings = _with_section(settings, section, values, "", given_as or {})
    return settings.validate()


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # only with --config: a start without a settings file does not pay for it

    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read settings: {exc}") from exc


def _with_section(settings: Settings, section: str, values: Any, source: str,
                  given_as: Mapping[str, str] | None = None, home: Path | None = None) -> Settings:
    """Return ``settings`` with ``values`` applied to ``section``; ``source`` (the file) prefixes errors, and a
    key of ``values`` that ``given_as`` names is called by its command-line option in them. A relative path
    value is taken relative to ``home`` (the file's directory) if given."""
    prefix = f"{source}: " if source else ""
    sections = [f.name for f in fields(settings) if dataclasses.is_dataclass(getattr(settings, f.name))]
    if section not in sections:
        what = f"settings section [{_shown(section)}]" if isinstance(values, dict) else f"setting {_shown(section)}"
        raise ConfigurationError(f"{prefix}unknown {what} {_nearest(section, [*sections, 'data_dir'])}")
    if not isinstance(values, dict):
        raise ConfigurationError(f"{prefix}[{section}] must be a table of settings, not {_describe_value(values)}")
    updated = _replace_section(getattr(settings, section), values, section, prefix, home)
    try:
        updated.validate()
        _check_durations(section, updated)
    except ConfigurationError as exc:
        options = {f"{section}.{key}": (given_as or {}).get(f"{section}.{key}") for key in values}
        raise ConfigurationError(f"{prefix}{_as_given(str(exc), options)}") from exc
    return replace(settings, **{section: updated})


def _as_given(message: str, options: Mapping[str, str | None]) -> str:
    """``message`` with each setting (``gateway.port``) named as the option that gave it (``--port``): a user who
    typed ``--port 70000`` need not know the settings file's key."""
    for key, option in options.items():
        if option:
            message = re.sub(rf"(?<![\w.]){re.escape(key)}(?!\w)", option, message)
    return message


def _replace_section(current: Any, values: dict[str, Any], section: str, prefix: str = "",
                     home: Path | None = None) -> Any:
    """Return ``current`` with ``values`` replaced, each checked against the field's annotated type (a relative
    path relative to ``home``, if given)."""
    hints = get_type_hints(type(current))
    known = [f.name for f in fields(current)]
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigurationError(f"{prefix}unknown setting [{section}] {_shown(key)} {_nearest(key, known)}")
        checked[key] = _checked(value, hints[key], f"{prefix}[{section}] {key}", home)
    return replace(current, **checked)


def _nearest(name: str, known: list[str]) -> str:
    import difflib  # only for an error message

    close = difflib.get_close_matches(name, known, n=1)
    return f"(did you mean {close[0]}?)" if close else f"(known: {', '.join(known)})"


def _shown(name: str) -> str:
    return name if name.isidentifier() else repr(name)[:60]


_WRONG = object()  # _convert's answer for a value that does not fit the type
_TYPE_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
               float: ("a finite number", "finite numbers"),
               str: ("a string", "strings"), Path: ("a path (a string)", "paths")}


def _checked(value: Any, hint: Any, where: str, home: Path | None = None) -> Any:
    """Return ``value`` as field type ``hint`` holds it, a path with ``~`` expanded and, if relative, joined to
    ``home`` (if given); ConfigurationError "<where> must be X, not Y" if it cannot."""
    converted = _convert(value, hint)
    if converted is _WRONG:
        raise ConfigurationError(f"{where} must be {_describe_type(hint)}, not {_describe_value(value)}")
    if isinstance(converted, Path):  # "~/pdata" in a file was <the file's dir>/~/pdata
        converted = converted.expanduser()
    return home / converted if home is not None and isinstance(converted, Path) else converted


def _convert(value: Any, hint: Any) -> Any:
    """Fit a TOML value to a field type: ints are floats too, strings paths; bools are never numbers."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        fits = (_convert(value, arm) for arm in args if arm is not type(None))
        return next((v for v in fits if v is not _WRONG), _WRONG)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _WRONG
        item_types = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args)
        items = [_convert(v, t) for v, t in zip(value, item_types, strict=False)]
        return _WRONG if len(item_types) != len(value) or _WRONG in items else tuple(items)
    if isinstance(value, bool) and hint is not bool:
        return _WRONG
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf
        return _WRONG
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint is Any:
        return value
    return value if isinstance(value, origin or hint) else _WRONG


def _describe_type(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"a list of {_TYPE_NAMES.get(args[0], ('', 'values'))[1]}"
    return _TYPE_NAMES.get(hint, (getattr(hint, "__name__", str(hint)), ""))[0]


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    kind = {int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(type(value))
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"the {kind} {shown}" if kind else f"a {type(value).__name__} ({shown})"
