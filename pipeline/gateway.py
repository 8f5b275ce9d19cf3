"""EmailGateway: the SMTP front door. Accept = spool durably, queue a run, then answer 250.

The aiosmtpd handler does no parsing: the fsync and the run-store commit run
in a small thread pool, so a 5 MB message never stalls the event loop that
serves every other sender. SIZE is advertised and enforced (552), and an
optional allow-list of recipient domains answers 550 to the rest.

Never ``250`` for work that will not run. Failures are translated here, at
the edge, into SMTP replies a sender's MTA retries on:

    UnavailableError (engine unhealthy)   451 4.3.0 Service temporarily unavailable (the problem is logged)
    SpoolError with disk_full             452 4.3.1 Insufficient system storage
    other SpoolError, any StoreError      451 4.3.0 (one log line each, no traceback)
    anything unexpected                   451 4.3.0 (logged with its traceback)

Health is checked before spooling, so an unhealthy service does not fill the spool.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from . import tracing
from .bulk_smtp import GatewayController
from .config import GatewayConfig
from .engine import WorkflowEngine
from .errors import PipelineError, SpoolError, StartupError, StoreError, UnavailableError
from .spool import Spool
from .store import Run
from .workflows import EMAIL_DIGEST

log = logging.getLogger(__name__)


class EmailGateway:
    """Turn incoming messages (SMTP, drop folder, CLI) into queued runs of a workflow."""

    def __init__(self, engine: WorkflowEngine, spool: Spool, config: GatewayConfig | None = None,
                 workflow: str = EMAIL_DIGEST) -> None:
        self.engine, self.spool = engine, spool
        self.config = config or GatewayConfig()
        self.config.validate()
        self.workflow = workflow
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-accept")
        self._controller: GatewayController | None = None

    def accept(self, raw: bytes, *, source: str = "smtp", mail_from: str = "", rcpt_tos: tuple[str, ...] = (),
               data_end_at: float | None = None, dedup: bool = True) -> Run:
        """Store ``raw`` durably and queue its run; the same message twice returns the first run.

        ``dedup=False`` always makes a new run (reprocessing a message on purpose); the first run of a
        message still carries its key, so spool reconciliation never mistakes it for a lost message.
        Raises ``UnavailableError`` (engine unhealthy; nothing is spooled), ``SpoolError`` or ``StoreError``.
        """
        data_end_at = time.time() if data_end_at is None else data_end_at
        self.check_available()
        with tracing.span("gateway.accept", source=source, size=len(raw)):
            spooled = self.spool.store(raw)
            payload: dict[str, Any] = {"spool": str(spooled.path), "source": source, "size": spooled.size,
                                       "mail_from": mail_from, "rcpt_tos": list(rcpt_tos), "data_end_at": data_end_at}
            started = time.time()
            run = self.engine.trigger(self.workflow, payload, spooled.dedup_key)
            if not dedup and run.queued_at < started:  # seen before: reprocess as a new, key-less run
                run = self.engine.trigger(self.workflow, payload, None)
        tracing.send(tracing.MESSAGE_ACCEPTED, run_id=run.run_id, data_end_at=data_end_at,
                     accepted_at=time.time(), size=spooled.size)
        log.info("accepted %s message of %d bytes from %s as run %s", source, spooled.size, mail_from or "-",
                 run.run_id)
        return run

    def check_available(self) -> None:
        """Raise ``UnavailableError`` if the engine reports itself unhealthy (its loops keep failing)."""
        if self.engine.healthy:
            return
        problem = self.engine.health_problem or "the workflow engine is unhealthy"
        raise UnavailableError(" ".join(str(problem).split())[:200])  # one line: it goes into an SMTP reply

    # -- SMTP ------------------------------------------------------------------

    def start(self) -> EmailGateway:
        """Listen for SMTP on the configured host and port (127.0.0.1:8025 by default).

        Raises ``StartupError`` (one line) if the address cannot be bound: port in use, no such address, ...
        """
        host, port = self.config.host, self.config.port
        check_port_free(host, port)  # aiosmtpd would wait its whole ready timeout before reporting this
        controller = GatewayController(_SmtpHandler(self), bulk_data=self.config.bulk_data, hostname=host,
                                       port=port, data_size_limit=self.config.max_message_bytes, ready_timeout=10)
        try:
            controller.start()
        except OSError as exc:  # lost a race for the port, or the loop did not come up (TimeoutError)
            controller.stop(no_assert=True)
            controller.loop.close()
            raise StartupError(f"cannot listen for SMTP on {host}:{port}: {exc}") from exc
        self._controller = controller
        log.info("SMTP gateway listening on %s:%d (max message %d bytes)", host, port, self.config.max_message_bytes)
        return self

    def stop(self) -> None:
        """Stop listening; messages already answered 250 are safe in the spool and the store."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        self._pool.shutdown(wait=True)

    def recipient_allowed(self, address: str) -> bool:
        """True if no allow-list is set or the address's domain is on it."""
        domains = self.config.allowed_recipient_domains
        return not domains or address.rpartition("@")[2].lower() in {d.lower() for d in domains}


class _SmtpHandler:
    """aiosmtpd handler hooks; each does one thing."""

    def __init__(self, gateway: EmailGateway) -> None:
        self.gateway = gateway

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if not self.gateway.recipient_allowed(address):
            return "550 5.7.1 Recipient domain not accepted here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data_end_at = time.time()
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        accept = partial(self.gateway.accept, raw, mail_from=envelope.mail_from or "",
                         rcpt_tos=tuple(envelope.rcpt_tos), data_end_at=data_end_at)
        try:
            if self.gateway.config.accept_off_loop:  # the fsyncs and the commit must not stall other sessions
                run = await asyncio.get_running_loop().run_in_executor(self.gateway._pool, accept)
            else:  # the baseline the switch measures against
                run = accept()
        except Exception as exc:  # answer "try later" rather than drop: the sender keeps the message
            return smtp_reply_for(exc)
        return f"250 2.0.0 OK queued as run {run.run_id}"


def smtp_reply_for(exc: Exception) -> str:
    """Return the temporary-failure reply for a message that could not be accepted, and log one line."""
    if isinstance(exc, UnavailableError):
        log.warning("answered 451: service unavailable: %s", exc)
        return "451 4.3.0 Service temporarily unavailable, try again later"  # the detail (paths) stays in the log
    if isinstance(exc, SpoolError) and exc.disk_full:
        log.warning("answered 452: %s", exc)
        return "452 4.3.1 Insufficient system storage"
    if isinstance(exc, (SpoolError, StoreError)):
        log.warning("answered 451: %s: %s", type(exc).__name__, exc)
    elif isinstance(exc, PipelineError):
        log.error("answered 451: %s: %s", type(exc).__name__, exc)
    else:  # not a fault we expected: keep the traceback
        log.error("could not accept a message; answered 451", exc_info=exc)
    return "451 4.3.0 Temporary failure storing the message, try again later"


def check_port_free(host: str, port: int) -> None:
    """Raise ``StartupError`` if ``host:port`` cannot be bound for listening now (port 0 is always free)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen for SMTP on {host}:{port}: {exc.strerror}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server does
            try:
                sock.bind(address)
            except OSError as exc:
                raise StartupError(_bind_problem(host, port, exc)) from exc


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use (another serve running? choose another with --port)"
    if exc.errno == errno.EACCES:
        return f"port {port} on {host}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}:{port}: {host} is not an address of this machine"
    return f"cannot listen for SMTP on {host}:{port}: {exc.strerror or exc}"
