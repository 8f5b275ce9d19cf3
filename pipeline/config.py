"""Settings, one frozen dataclass per concern.

Library code takes these as arguments and never reads the environment; only
the CLI builds them from flags and an optional TOML file (``load_settings``).
Optimization switches live here too, so the audit can run baseline and
optimized variants side by side.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

MB = 1024 * 1024


@dataclass(frozen=True)
class StoreConfig:
    """Where the run store lives and how SQLite is tuned."""

    path: Path = Path("data/runs.sqlite3")
    wal: bool = True  # journal_mode=WAL: readers never block the writer
    synchronous: str = "NORMAL"  # with WAL, NORMAL is crash-safe for the process; FULL also for power loss
    busy_timeout_ms: int = 10_000

    def validate(self) -> None:
        if self.synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigurationError(f"store.synchronous must be OFF, NORMAL, FULL or EXTRA, not {self.synchronous!r}")
        if self.busy_timeout_ms < 0:
            raise ConfigurationError("store.busy_timeout_ms must be >= 0")


@dataclass(frozen=True)
class RunnerConfig:
    """How tasks run: pool sizes, default retries and timeouts."""

    thread_workers: int = 16
    process_workers: int = 2
    default_retries: int = 0
    default_timeout_s: float | None = None
    retry_base_delay_s: float = 0.5
    retry_max_delay_s: float = 30.0

    def validate(self) -> None:
        if self.thread_workers < 1 or self.process_workers < 1:
            raise ConfigurationError("runner worker counts must be >= 1")
        if self.retry_base_delay_s < 0 or self.retry_max_delay_s < self.retry_base_delay_s:
            raise ConfigurationError("runner retry delays must satisfy 0 <= base <= max")


@dataclass(frozen=True)
class EngineConfig:
    """How many runs are active at once and how liveness is tracked."""

    max_active_runs: int = 32
    heartbeat_interval_s: float = 2.0
    stale_after_s: float = 30.0  # a running run with an older heartbeat belongs to a dead process
    shutdown_grace_s: float = 10.0

    def validate(self) -> None:
        if self.max_active_runs < 1:
            raise ConfigurationError("engine.max_active_runs must be >= 1")
        if self.heartbeat_interval_s <= 0 or self.stale_after_s <= self.heartbeat_interval_s:
            raise ConfigurationError("engine.stale_after_s must exceed heartbeat_interval_s > 0")


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
    poll_interval_s: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigurationError(f"gateway.port {self.port} is not a TCP port")
        if self.max_message_bytes <= 0:
            raise ConfigurationError("gateway.max_message_bytes must be > 0")
        if self.watch_mode not in {"inotify", "poll"}:
            raise ConfigurationError("gateway.watch_mode must be 'inotify' or 'poll'")


@dataclass(frozen=True)
class IngestConfig:
    """Bounds on one PDF: a hostile file costs at most these."""

    max_attachment_bytes: int = 30 * MB
    max_pages: int = 5_000
    max_decompressed_bytes: int = 75 * MB  # per stream, enforced by pypdf
    timeout_s: float = 60.0
    memory_limit_bytes: int = 1024 * MB  # address-space cap of the extraction worker
    isolate: bool = True  # extract in worker processes so time and memory caps can be enforced
    workers: int = 2  # extraction worker processes (one per core is right for CPU-bound pypdf)
    engine: str = "pdfium"  # "pdfium" (pypdfium2; bounded by the worker's memory cap) or "pypdf" (pure Python)
    page_workers: int = 2  # >1: split one document's pages across that many workers at once
    stream_text: bool = True  # write each page's text as it comes; False holds the whole text first (baseline)
    summary_sentences: int = 3

    def validate(self) -> None:
        if min(self.max_attachment_bytes, self.max_pages, self.max_decompressed_bytes) <= 0:
            raise ConfigurationError("ingest limits must be > 0")
        if self.timeout_s <= 0:
            raise ConfigurationError("ingest.timeout_s must be > 0")
        if self.engine not in ("pypdf", "pdfium"):
            raise ConfigurationError(f"ingest.engine must be 'pypdf' or 'pdfium', not {self.engine!r}")
        if self.engine == "pdfium" and not self.isolate:
            raise ConfigurationError("ingest.engine 'pdfium' needs isolate = true: PDFium has no decompression "
                                     "limit, only the worker's memory cap bounds a bomb")
        if not 1 <= self.page_workers <= self.workers:
            raise ConfigurationError("ingest.page_workers must be between 1 and ingest.workers")


@dataclass(frozen=True)
class DeliveryConfig:
    """Where digests go: an SMTP relay URL or, by default, a Maildir outbox."""

    relay: str | None = None  # e.g. "smtp://127.0.0.1:2525"
    outbox: Path = Path("data/outbox")
    sender: str = "digest@localhost"
    recipient: str | None = None  # default: the original sender

    def validate(self) -> None:
        if self.relay and not self.relay.startswith("smtp://"):
            raise ConfigurationError(f"delivery.relay must look like smtp://host:port, not {self.relay!r}")


@dataclass(frozen=True)
class Settings:
    """All settings of one pipeline process."""

    data_dir: Path = Path("data")
    store: StoreConfig = field(default_factory=StoreConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)

    def validate(self) -> Settings:
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate()
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


def load_settings(path: Path | None = None, data_dir: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional TOML file, then ``data_dir``, then per-section overrides.

    The TOML file has one table per section (``[store]``, ``[gateway]`` ...)
    whose keys are the dataclass fields. Unknown keys raise ConfigurationError.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"{path}: cannot read settings: {exc}") from exc
    root = Path(data_dir or raw.pop("data_dir", "data"))
    settings = Settings.for_data_dir(root)
    for section, values in raw.items():
        current = getattr(settings, section, None)
        if not dataclasses.is_dataclass(current) or not isinstance(values, dict):
            raise ConfigurationError(f"{path}: unknown settings section [{section}]")
        settings = replace(settings, **{section: _replace_section(current, values, section)})
    for section, values in overrides.items():
        settings = replace(settings, **{section: _replace_section(getattr(settings, section), values, section)})
    return settings.validate()


def _replace_section(current: Any, values: dict[str, Any], section: str) -> Any:
    known = {f.name: f for f in fields(current)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigurationError(f"unknown setting(s) in [{section}]: {', '.join(sorted(unknown))}")
    converted = {k: Path(v) if isinstance(getattr(current, k), Path) else v for k, v in values.items()}
    if "allowed_recipient_domains" in converted:
        converted["allowed_recipient_domains"] = tuple(values["allowed_recipient_domains"])
    return replace(current, **converted)
