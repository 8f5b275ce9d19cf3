"""PipelineService: one process with the engine, the SMTP gateway and the drop folder.

This is what ``python -m pipeline serve`` runs and what ``ingest`` uses
without the listeners. On start it also reconciles the spool with the run
store: a message fsynced just before a crash, whose run was never committed,
still gets its run (deduplicated, so never two).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from .config import Settings
from .dropfolder import DropFolder
from .engine import WorkflowEngine
from .gateway import EmailGateway
from .spool import Spool
from .sqlite_store import SqliteRunStore
from .stages.parse import wrap_pdf
from .workflows import EMAIL_DIGEST, email_digest_dag

log = logging.getLogger(__name__)
RECONCILE_WINDOW_S = 86400.0  # spool files younger than this are checked against the store at start


class PipelineService:
    """Compose store, engine, gateway and drop folder from one Settings."""

    def __init__(self, settings: Settings, *, listen: bool = True) -> None:
        self.settings = settings.validate()
        self.listen = listen
        self.store = SqliteRunStore(settings.store)
        self.engine = WorkflowEngine(self.store, settings)
        self.engine.register(email_digest_dag(settings))
        self.spool = Spool(Path(settings.data_dir) / "spool")
        self.gateway = EmailGateway(self.engine, self.spool, settings.gateway)
        self.drop_folder = DropFolder(Path(settings.data_dir) / "inbox",
                                      lambda raw: self.gateway.accept(raw, source="dropfolder"),
                                      settings.gateway) if listen and settings.gateway.drop_folder else None
        self._stop = threading.Event()

    def start(self, run_workers: bool = True) -> PipelineService:
        """Start the engine, reconcile the spool, then open the listeners.

        ``run_workers=False`` only accepts and queues (benchmarks of the gateway alone).
        """
        if run_workers:
            self.engine.start()
        self.reconcile_spool()
        if self.listen:
            self.gateway.start()
            if self.drop_folder is not None:
                self.drop_folder.start()
        return self

    def reconcile_spool(self) -> int:
        """Make sure every recent spool file has its run; return how many runs this created."""
        cutoff = time.time() - RECONCILE_WINDOW_S
        created = 0
        for path in self.spool.files():
            if path.stat().st_mtime < cutoff:
                continue
            spooled = self.spool.load(path)
            payload = {"spool": str(path), "source": "spool", "size": spooled.size}
            created += self.store.create_run(EMAIL_DIGEST, payload, spooled.dedup_key)[1]
        if created:
            log.warning("spool reconciliation queued %d message(s) whose run was missing", created)
            self.engine.wake()
        return created

    def stop(self, grace_s: float | None = None) -> None:
        """Close the listeners, let running tasks finish within the grace period, close the store."""
        if self.drop_folder is not None:
            self.drop_folder.stop()
        if self.listen:
            self.gateway.stop()
        self.engine.shutdown(grace_s)
        self.store.close()
        self.spool.close()

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then stop gracefully."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        log.info("pipeline serving; data in %s. Ctrl-C to stop.", self.settings.data_dir)
        self._stop.wait()
        log.info("stopping: no new messages; letting running tasks finish (grace %.0f s)",
                 self.settings.engine.shutdown_grace_s)
        self.stop()


def ingest_files(settings: Settings, paths: list[Path], timeout_s: float = 600.0) -> list[int]:
    """Run the workflow synchronously on .eml files (and bare .pdf files); return the run ids in order.

    Always makes new runs (no dedup), so this is also how a message is reprocessed.
    """
    service = PipelineService(settings, listen=False).start()
    try:
        run_ids = []
        for path in paths:
            raw = Path(path).read_bytes()
            if Path(path).suffix.lower() == ".pdf" or raw[:5] == b"%PDF-":
                raw = wrap_pdf(raw, Path(path).name)
            run_ids.append(service.gateway.accept(raw, source="cli", dedup=False).run_id)
        for run_id in run_ids:
            service.engine.wait(run_id, timeout=timeout_s)
        return run_ids
    finally:
        service.stop()
