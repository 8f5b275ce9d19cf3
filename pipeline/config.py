"""Settings, one frozen dataclass per concern.

Library code takes these as arguments and never reads the environment; only
the CLI builds them from flags and an optional TOML file (``load_settings``).
Optimization switches live here too, so the audit can run baseline and
optimized variants side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# ascii_domain, is_loopback, MAX_DURATION_S, MetricsConfig and ServeConfig lived here: callers still import them here
from .addresses import address_key, ascii_domain, check_relay, is_loopback, is_one_mailbox  # noqa: F401
from .errors import ConfigurationError
from .serve_config import MetricsConfig, ServeConfig
from .settings_file import MAX_DURATION_S, check_durations, checked_value, read_toml, with_section  # noqa: F401

MB = 1024 * 1024
# typo guards (20000 for 20 would start 20,000 interpreters; a cap setrlimit cannot take failed every run)
MIN_WORKER_MEMORY, MAX_WORKER_MEMORY = 128 * MB, 1 << 40  # an extraction worker's imports need about 96 MB
MAX_PROCESSES, MAX_THREADS, MAX_ACTIVE_RUNS = 256, 1024, 100_000


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
    # ingest_pdf waits for an extraction worker on threads of its own, engine.max_active_runs x ingest.workers of
    # them (with fair_by_mail every active mail's PDFs find one, and the workers' fair queue orders them; without
    # it, ingest_pdf stays on thread_workers), not on thread_workers:
    # ten mails of slow PDFs held all 16, and the next mail's parse waited for one of their PDFs to end (notebook
    # 10's head_of_line_crowd measures this with ingest.newcomer_s, both off and on); off: ingest_pdf shares
    # thread_workers (before). With ingest.isolate
    # off (text extracted on the thread itself) or on Dask it never applies
    extract_pool: bool = True
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
    # mails share the workers as mails: one mail's PDFs go to the pool at most `workers` at once, and a free worker
    # serves the mail that holds the fewest; False: each PDF on its own, all at once (baseline)
    fair_by_mail: bool = True
    # worker time all of one mail's documents may use together (with fair_by_mail and fair_extraction, in local
    # workers): past it, its documents not done fail not_read; a mail of a thousand tiny slow PDFs cost a thousand
    # timeout_s
    mail_timeout_s: float = 600.0
    # worker time under which a mail (and a document) goes ahead of those that have had more, at the workers, at most
    # one slice (1 s, or timeout_s / 8): ten mails of slow PDFs each had 5 s of them before a one-page mail after
    # them had any; 0: off (only the 5 s rule, before)
    newcomer_s: float = 1.0

    def validate(self) -> None:
        for name in ("max_attachment_bytes", "max_pages", "max_decompressed_bytes", "memory_limit_bytes", "workers",
                     "max_mime_depth"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"ingest.{name} must be > 0, not {getattr(self, name)}")
        for name in ("timeout_s", "mail_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"ingest.{name} must be > 0, not {getattr(self, name)}")
        if not 0 <= self.newcomer_s <= 1:  # a slice is at most 1 s (stages.ingest.SLICE_S)
            raise ConfigurationError(f"ingest.newcomer_s must be 0 to 1 (s: one slice at most), not {self.newcomer_s}")
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
    # client can claim any envelope sender and have digests mailed to a third party, and a loop no rule of
    # autoreply recognises stays slow. 0: no limit
    max_digests_per_hour: int = 100

    def validate(self) -> None:
        if self.relay:
            check_relay(self.relay)
        if self.retries < 0 or not self.retry_max_delay_s > 0:
            raise ConfigurationError("delivery.retries must be >= 0 and delivery.retry_max_delay_s > 0")
        if self.max_digests_per_hour < 0:
            raise ConfigurationError(f"delivery.max_digests_per_hour must be >= 0 (0: no limit), "
                                     f"not {self.max_digests_per_hour}")
        for name in ("sender", "recipient"):
            value = getattr(self, name)
            if value is not None and not is_one_mailbox(value):
                raise ConfigurationError(f"delivery.{name} must be one mail address like digest@example.com, "
                                         f"not {value!r}")
        if self.recipient and address_key(self.recipient) == address_key(self.sender):
            raise ConfigurationError(f"delivery.recipient is delivery.sender ({self.sender}): no digest would ever "
                                     f"go out (a digest is never sent to its own sender: it could loop)")


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
                check_durations(f.name, value)
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
    raw = read_toml(path) if path is not None else {}
    home = Path(path).parent if path is not None else None
    if isinstance(raw.get("data_dir"), str) and not raw["data_dir"].strip():  # as a Path, "" is "."
        raise ConfigurationError(f"{source}: data_dir is empty: it would mean the current directory; give a path")
    file_dir = checked_value(raw.pop("data_dir"), Path, f"{source}: data_dir", home) if "data_dir" in raw else None
    settings = Settings.for_data_dir(data_dir or file_dir or "data")
    for section, values in raw.items():
        settings = with_section(settings, section, values, source, home=home)
    for section, values in overrides.items():
        settings = with_section(settings, section, values, "", given_as or {})
    return settings.validate()
