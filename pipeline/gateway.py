"""EmailGateway: the SMTP front door. Accept = spool durably, queue a run, then answer 250.

The aiosmtpd handler does no parsing: the fsync and the run-store commit run
in a small thread pool, so a 5 MB message never stalls the event loop that
serves every other sender (with ``inline_accept_bytes`` set, a small one is
accepted on the loop instead: ``inline_accept``).
SIZE is advertised and enforced (552); a declared SIZE more than the spool's disk has free is refused at
MAIL (452), before its data is sent; an optional allow-list of recipient domains answers 550 to the rest.

Issue 11 (what a hostile or careless sender can hold): sessions, idle time,
session time and DATA bytes in flight are bounded (``smtp_limits``); with
``stream_data`` the data goes to a spool writer as it arrives (the file
writes are buffered page-cache writes of 64 KB or more, done on the loop;
the fsyncs, the rename and the commit go to the thread pool), so the serve
process never holds a whole message. ``allowed_sender_domains`` decides who
may trigger a digest at all (550 5.7.1 at MAIL; the null sender is refused
when it is set), and every SMTP message is spooled with a ``Return-Path``
trace header naming the envelope sender (RFC 5321 4.4), so the digest's
addressee survives a crash between the spool's fsync and the run's commit.

Which run a message gets (``queue``):
    same Message-ID (or no Message-ID and same bytes), same spool file   the first run (a duplicate)
    same Message-ID, different spool file (other content or sender)     a new run keyed
                                                                        "<message-id> sha256:<hash>", WARNING logged
So a message answered 250 is never dropped as a duplicate of a different one.

Never ``250`` for work that will not run. Failures are translated here, at
the edge, into SMTP replies a sender's MTA retries on:

    UnavailableError (engine unhealthy)   451 4.3.0 Service temporarily unavailable (the problem is logged)
    SpoolError with disk_full             452 4.3.1 Insufficient system storage
    other SpoolError, any StoreError      451 4.3.0 (one log line each, no traceback)
    anything unexpected                   451 4.3.0 (logged with its traceback)

Health is checked before spooling (streamed data: before the spool file is
made durable; the partial file is removed), so an unhealthy service does not
fill the spool.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
import unicodedata
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from . import metrics, tracing
from .bulk_smtp import DataEnvelope, GatewayController
from .config import GatewayConfig, is_loopback
from .engine import WorkflowEngine
from .errors import (
    AcceptStalledError,
    PipelineError,
    SpoolError,
    StartupError,
    StoreBusyError,
    StoreError,
    UnavailableError,
)
from .inline_accept import InlineAccepts
from .ratelog import RateLimitedLog, cause_of
from .smtp_limits import SessionLimits
from .spool import Spool, SpooledMessage, SpoolWriter, return_path_header
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
        self.limits = SessionLimits.from_config(self.config)  # the automatic session limit is read here
        self.refusals = RateLimitedLog(log)  # the 4xx answers to DATA: one line per kind per interval
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-accept")
        self.inline_accepts = InlineAccepts(self.config.inline_accept_bytes)
        self._controller: GatewayController | None = None
        # whether the workers can take runs (None: yes); serve's gateway process hears it from its parent
        self.health: Callable[[], str | None] = lambda: engine.health_problem
        self.storing = StoringTrouble()

    def accept(self, raw: bytes, *, source: str = "smtp", mail_from: str = "", rcpt_tos: tuple[str, ...] = (),
               data_end_at: float | None = None, dedup: bool = True, head: bytes = b"") -> Run:
        """Store ``head + raw`` durably and queue its run (see ``queue`` for which run).

        ``head`` is written before ``raw`` (the SMTP path's Return-Path trace header). Raises
        ``UnavailableError`` (engine unhealthy; nothing is spooled), ``SpoolError`` or ``StoreError``.
        """
        data_end_at = time.time() if data_end_at is None else data_end_at
        self.check_available()
        with tracing.span("gateway.accept", source=source, size=len(head) + len(raw)):
            spooled = self.spool.store(raw, head=head)
            run, _ = self.queue(spooled, source=source, mail_from=mail_from, rcpt_tos=rcpt_tos,
                             data_end_at=data_end_at, dedup=dedup)
        self._accepted(run, spooled, source, mail_from, data_end_at)
        return run

    def accept_spooled(self, writer: SpoolWriter, *, source: str = "smtp", mail_from: str = "",
                       rcpt_tos: tuple[str, ...] = (), data_end_at: float | None = None) -> Run:
        """Make a message streamed into ``writer`` durable and queue its run; the writer is finished or aborted.

        Raises like ``accept``; when the engine is unhealthy the partial file is removed, nothing is spooled.
        """
        data_end_at = time.time() if data_end_at is None else data_end_at
        try:
            self.check_available()
        except UnavailableError:
            writer.abort()
            raise
        with tracing.span("gateway.accept", source=source, size=writer.size):
            spooled = writer.finish()
            run, _ = self.queue(spooled, source=source, mail_from=mail_from, rcpt_tos=rcpt_tos,
                             data_end_at=data_end_at)
        self._accepted(run, spooled, source, mail_from, data_end_at)
        return run

    def queue(self, spooled: SpooledMessage, *, source: str, mail_from: str = "", rcpt_tos: tuple[str, ...] = (),
              data_end_at: float | None = None, dedup: bool = True) -> tuple[Run, bool]:
        """Queue the run of a message already in the spool, or find the run it has; return (run, created).

        The same key with the same spool file is a duplicate: its first run is returned. A Message-ID
        already used by another spool file (other content, or another envelope sender) gets a new run keyed
        ``"<message-id> sha256:<hash>"`` and a WARNING; that message sent again returns that run.
        ``dedup=False`` always makes a new run (reprocessing on purpose); the first run of a message still
        carries its key, so spool reconciliation never mistakes it for a lost message. No health check here
        (``accept`` does it before spooling). Raises ``StoreError``.
        """
        payload: dict[str, Any] = {
            "spool": str(spooled.path), "source": source, "size": spooled.size, "mail_from": mail_from,
            "rcpt_tos": list(rcpt_tos), "data_end_at": time.time() if data_end_at is None else data_end_at}
        reused_key = f"{spooled.message_id} sha256:{spooled.sha256}" if spooled.message_id else None
        # the second key first: once the first message's run is purged, its Message-ID alone must not
        # give the second message (sent again) another run
        run = self.engine.store.find_run(self.workflow, reused_key) if reused_key else None
        created = False
        if run is None:
            run, created = self.engine.submit(self.workflow, payload, spooled.dedup_key)
            if reused_key and not created and Path(str(run.payload.get("spool", ""))).name != spooled.path.name:
                log.warning("Message-ID %s of run %s reused by a different message (%s): queued under key %r",
                            spooled.message_id, run.run_id, spooled.path.name, reused_key)
                run, created = self.engine.submit(self.workflow, payload, reused_key)
        if not dedup and not created:  # seen before: reprocess as a new, key-less run
            run, created = self.engine.submit(self.workflow, payload, None)
        return run, created

    def _accepted(self, run: Run, spooled: SpooledMessage, source: str, mail_from: str, data_end_at: float) -> None:
        metrics.message_accepted(spooled.size, time.time() - data_end_at)
        tracing.send(tracing.MESSAGE_ACCEPTED, run_id=run.run_id, data_end_at=data_end_at,
                     accepted_at=time.time(), size=spooled.size)
        log.info("accepted %s message of %d bytes from %s as run %s", source, spooled.size, mail_from or "-",
                 run.run_id)

    def check_available(self) -> None:
        """Raise ``UnavailableError`` if the engine reports itself unhealthy (its loops keep failing), or storing
        mail failed just now (``StoringTrouble``)."""
        problem = self.health() or self.storing.problem()
        if problem is None:
            return
        raise UnavailableError(" ".join(str(problem).split())[:200])  # one line: it goes into an SMTP reply

    # -- SMTP ------------------------------------------------------------------

    def start(self, sockets: list[socket.socket] | None = None) -> EmailGateway:
        """Listen for SMTP on ``sockets`` (bound by the serve that started this process), or else on the
        configured host and port (127.0.0.1:8025 by default).

        Raises ``StartupError`` (one line) if the address cannot be bound: port in use, no such address, ...
        """
        sockets = sockets or listen_sockets(self.config.host, self.config.port)
        host, port = sockets[0].getsockname()[:2]
        controller = _SocketController(_SmtpHandler(self), sockets, bulk_data=self.config.bulk_data,
                                       lean_sessions=self.config.lean_sessions,
                                       limits=self.limits, data_size_limit=self.config.max_message_bytes,
                                       server_hostname=socket.getfqdn(),  # once: aiosmtpd asks DNS per session
                                       ready_timeout=10)
        try:
            controller.start()
        except OSError as exc:  # the loop did not come up (TimeoutError)
            controller.stop(no_assert=True)
            controller.loop.close()
            for sock in sockets:
                sock.close()
            raise StartupError(f"cannot listen for SMTP on {host}:{port}: {exc}") from exc
        self._controller = controller
        log.info("SMTP gateway listening on %s:%d (max message %d bytes, at most %d sessions%s)", host, port,
                 self.config.max_message_bytes, self.limits.max_sessions,
                 "" if self.config.max_sessions else ", a quarter of the open-file limit")
        if not is_loopback(host):  # allowed only with allow_remote and a sender allow-list (config)
            log.warning("SMTP on %s reaches beyond this machine, with no TLS and no AUTH: anyone who can connect and "
                        "claim a sender of %s can have digests mailed; put an authenticating MTA in front", host,
                        ", ".join(self.config.allowed_sender_domains))
        return self

    def every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` on the SMTP event loop every ``interval_s`` (after ``start``): a sign that the loop runs."""
        assert self._controller is not None, "start() first"
        loop = self._controller.loop

        def tick() -> None:
            try:
                fn()
            finally:
                loop.call_later(interval_s, tick)

        loop.call_soon_threadsafe(tick)

    def stop(self) -> None:
        """Stop listening; messages already answered 250 are safe in the spool and the store."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
            self.limits.log.flush()
            self.refusals.flush()
        self._pool.shutdown(wait=True)

    def recipient_allowed(self, address: str) -> bool:
        """True if no allow-list is set or the address's domain is on it."""
        return domain_allowed(address, self.config.allowed_recipient_domains)

    def sender_allowed(self, address: str) -> bool:
        """True if no sender allow-list is set, or the envelope sender's domain is on it (never for ``<>``)."""
        domains = self.config.allowed_sender_domains
        return not domains or (address not in ("", "<>") and domain_allowed(address, domains))


def domain_allowed(address: str, domains: tuple[str, ...]) -> bool:
    """True if ``domains`` is empty or holds the domain of ``address`` (case-insensitive)."""
    domain = address.rpartition("@")[2].strip("<>").rstrip(".").casefold()
    return not domains or domain in {d.strip().lstrip("@").rstrip(".").casefold() for d in domains}


def declared_size(mail_options: list[str]) -> int | None:
    """The ``SIZE=`` a MAIL command declared (RFC 1870), or None."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


def _unusable(address: str, who: str, syntax_code: str, smtputf8: bool) -> str | None:
    """The 553 for an address that is not UTF-8 (aiosmtpd keeps such bytes as surrogates), holds control
    characters (CR, NUL: no digest could ever reach a sender with them), or is not ASCII in a transaction whose
    MAIL FROM did not declare ``smtputf8`` (RFC 6531 3.4; aiosmtpd took it); None for a usable one. Only Cc: the
    joiners IDNA allows in Persian and Indic names are not printable, yet valid."""
    if any("\udc80" <= c <= "\udcff" for c in address):
        return f"553 5.6.7 {who} address is not valid UTF-8"
    if any(unicodedata.category(c) == "Cc" for c in address):
        return f"553 {syntax_code} {who} address has control characters"
    if not smtputf8 and not address.isascii():
        return f"553 5.6.7 {who} address is not ASCII: declare SMTPUTF8 on MAIL FROM (RFC 6531)"
    return None


class _SmtpHandler:
    """aiosmtpd handler hooks; each does one thing."""

    def __init__(self, gateway: EmailGateway) -> None:
        self.gateway = gateway

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        try:  # refused before the data is sent, not after it was read whole (a re-probe's find)
            self.gateway.check_available()
        except UnavailableError as exc:
            return metrics.smtp_reply("MAIL", smtp_reply_for(exc, self.gateway.refusals))
        if not self.gateway.sender_allowed(address):
            return metrics.smtp_reply("MAIL", "550 5.7.1 Sender domain not accepted here")
        unusable = _unusable(address, "Sender", "5.1.7", envelope.smtp_utf8)  # (aiosmtpd set it from the options)
        if unusable:
            return metrics.smtp_reply("MAIL", unusable)
        size = declared_size(mail_options)
        if size is not None and size > self.gateway.limits.inflight.remaining:
            self.gateway.limits.log.report("in-flight limit", "answered 452 at MAIL: SIZE=%d is more than the "
                                           "%d bytes left of gateway.max_inflight_bytes", size,
                                           self.gateway.limits.inflight.remaining)
            return metrics.smtp_reply("MAIL", "452 4.3.1 Insufficient system storage")
        room = self.gateway.spool.free_bytes() if size is not None else None
        if room is not None and size is not None and size > room:  # refused now, not after its data was read
            self.gateway.limits.log.report("spool disk full", "answered 452 at MAIL: SIZE=%d is more than the %d "
                                           "bytes free under the spool", size, room)
            return metrics.smtp_reply("MAIL", "452 4.3.1 Insufficient system storage")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return metrics.smtp_reply("MAIL", "250 OK")

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if not self.gateway.recipient_allowed(address):
            return metrics.smtp_reply("RCPT", "550 5.7.1 Recipient domain not accepted here")
        unusable = "553 5.1.3 Recipient address is empty" if address in ("", "<>") else \
            _unusable(address, "Recipient", "5.1.3", envelope.smtp_utf8)
        if unusable:  # kept in the run's rcpt_tos as sent (a prober's RCPT TO:<d\x00@e.f> was answered 250)
            return metrics.smtp_reply("RCPT", unusable)
        if address.lower() in (r.lower() for r in envelope.rcpt_tos):  # named once already: kept once
            return metrics.smtp_reply("RCPT", "250 OK")
        if len(envelope.rcpt_tos) >= self.gateway.config.max_recipients:  # the client sends the rest again later
            return metrics.smtp_reply("RCPT", "452 4.5.3 Too many recipients")
        envelope.rcpt_tos.append(address)
        return metrics.smtp_reply("RCPT", "250 OK")

    async def handle_DATA_START(self, server: SMTP, session: Session, envelope: Envelope) -> SpoolWriter | None:
        """A spool writer for the data, starting with the Return-Path trace header; None: receive it whole."""
        if not self.gateway.config.stream_data:
            return None
        writer = self.gateway.spool.open_writer()  # a failure to create it is raised by finish(): 452/451
        writer.write(return_path_header(envelope.mail_from or ""))
        return writer

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data_end_at = time.time()
        mail_from, rcpt_tos = envelope.mail_from or "", tuple(envelope.rcpt_tos)
        writer = envelope.writer if isinstance(envelope, DataEnvelope) else None
        if isinstance(writer, SpoolWriter):  # streamed (the one kind of writer handle_DATA_START makes)
            accept = partial(self.gateway.accept_spooled, writer, mail_from=mail_from, rcpt_tos=rcpt_tos,
                             data_end_at=data_end_at)
        else:
            raw = envelope.original_content or envelope.content or b""
            if isinstance(raw, str):
                raw = raw.encode("utf-8", "surrogateescape")
            head = return_path_header(mail_from)
            accept = partial(self.gateway.accept, raw, mail_from=mail_from, rcpt_tos=rcpt_tos,
                             data_end_at=data_end_at, head=head)
        size = writer.size if isinstance(writer, SpoolWriter) else len(head) + len(raw)  # both: as spooled
        inline = self.gateway.inline_accepts
        if self.gateway.config.accept_off_loop and inline.small(size):  # timed on the loop or in the pool alike
            accept = partial(inline.timed, accept)
        try:
            with metrics.ACCEPTS_IN_PROGRESS.track_inprogress():
                # on the loop: the switch's baseline, or a small mail while accepts are fast (no thread hand-off)
                if not self.gateway.config.accept_off_loop or inline.inline(size):
                    run = accept()
                else:  # the fsyncs and the commit must not stall other sessions
                    run = await self._off_loop(accept, writer)
        except Exception as exc:  # answer "try later" rather than drop: the sender keeps the message
            if isinstance(writer, SpoolWriter) and not isinstance(exc, AcceptStalledError):
                writer.abort()  # if the pool refused the job (stopping); after finish() this does nothing
            if isinstance(exc, (SpoolError, StoreError)) and not isinstance(exc, StoreBusyError) and \
                    not getattr(exc, "disk_full", False):  # a lock is the engine's to report, a full disk the
                self.gateway.storing.failed(exc)  # data-dir watch's (each clears when it passes)
            return metrics.smtp_reply("DATA", smtp_reply_for(exc, self.gateway.refusals))
        self.gateway.storing.stored()
        return metrics.smtp_reply("DATA", f"250 2.0.0 OK queued as run {run.run_id}")

    async def _off_loop(self, accept: Callable[[], Run], writer: object) -> Run:
        """Run ``accept`` in the accept pool. A session that ends while it waits there (the client closed the
        connection after its data, or timed out) cancels it: then the spooled data, unaccepted, is given up, its
        temp file closed and removed (an accept already running goes on, and its run stands)."""
        job = self.gateway._pool.submit(accept)
        limit = self.gateway.config.accept_timeout_s
        future = asyncio.wrap_future(job)
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except asyncio.CancelledError:
            future.add_done_callback(_late_accept)
            if job.cancel() and isinstance(writer, SpoolWriter):  # never ran, and never will
                writer.abort()
            raise
        except TimeoutError:  # the job owns the writer now: it goes on, and its run stands if it completes
            future.add_done_callback(_late_accept)
            raise AcceptStalledError(f"storing and queueing a message took over {limit:g} s (the run store or the "
                                     "disk does not answer)") from None

    async def handle_exception(self, error: Exception) -> str:
        """A command failed unexpectedly: one log line per kind per interval, and a reply to retry later."""
        trace = None if isinstance(error, OSError) else error
        self.gateway.limits.log.report(f"session error: {type(error).__name__}", "SMTP session error: %s: %s",
                                       type(error).__name__, error, exc_info=trace)
        return "451 4.3.0 Temporary failure, try again later"


STORING_FRESH_S = 5.0  # a failure to store mail makes the gateway unhealthy this long, unless one is stored


class StoringTrouble:
    """The last failure to store a mail (the spool or the run store refused it), until one is stored or
    STORING_FRESH_S pass: meanwhile the gateway answers 451 before the data and reports unhealthy. A probe's
    run store that refused writes (an immutable WAL) got 451 for every mail while serve said it was healthy;
    nothing else looked, as an idle engine writes nothing."""

    def __init__(self) -> None:
        self._failed_at: float | None = None
        self._why = ""

    def failed(self, exc: Exception) -> None:
        self._failed_at, self._why = time.monotonic(), f"storing mail failed: {type(exc).__name__}: {exc}"[:300]

    def stored(self) -> None:
        self._failed_at = None

    def problem(self) -> str | None:
        failed_at = self._failed_at
        if failed_at is None or time.monotonic() - failed_at > STORING_FRESH_S:
            return None  # after a while the next mail tries again: the store may be right by now
        return self._why


def _late_accept(future: asyncio.Future[Run]) -> None:
    """The end of an accept whose sender was answered before it finished (stalled, or gone)."""
    if future.cancelled():
        return
    error = future.exception()
    if error is None:
        log.info("an accept whose sender was answered before it finished completed: run %s (a retry finds it)",
                 future.result().run_id)
    else:
        log.warning("an accept whose sender was answered before it finished failed: %s: %s",
                    type(error).__name__, error)


def smtp_reply_for(exc: Exception, log: RateLimitedLog) -> str:
    """Return the temporary-failure reply for a message that could not be accepted, and log it: one line per kind
    per interval (an outage refused 100 mails in 5 s, one WARNING each, and an MTA retrying a queue of thousands
    would write a line per try)."""
    kind, cause = type(exc).__name__, cause_of(exc)
    if isinstance(exc, AcceptStalledError):
        log.report(f"answered 451 ({cause})", "answered 451: %s", exc)
        return "451 4.3.0 Temporary failure storing the message, try again later"
    if isinstance(exc, UnavailableError):
        log.report(f"answered 451 ({cause})", "answered 451: service unavailable: %s", exc)
        return "451 4.3.0 Service temporarily unavailable, try again later"  # the detail (paths) stays in the log
    if isinstance(exc, SpoolError) and exc.disk_full:
        log.report("answered 452", "answered 452: %s", exc)
        return "452 4.3.1 Insufficient system storage"
    if isinstance(exc, (SpoolError, StoreError)):
        log.report(f"answered 451 ({cause})", "answered 451: %s: %s", kind, exc)
    elif isinstance(exc, PipelineError):
        log.report(f"answered 451 ({cause})", "answered 451: %s: %s", kind, exc, level=logging.ERROR)
    else:  # not a fault we expected: keep the traceback
        log.report(f"answered 451 ({cause})", "could not accept a message; answered 451", level=logging.ERROR,
                   exc_info=exc)
    return "451 4.3.0 Temporary failure storing the message, try again later"


def listen_sockets(host: str, port: int, backlog: int = 100) -> list[socket.socket]:
    """Bind and listen on every address of ``host`` as asyncio's ``create_server`` would; return the sockets.

    Binding here, not in aiosmtpd, reports a taken port at once (aiosmtpd waits its whole ready timeout),
    and lets serve hand the sockets to its gateway process, keeping them across that process's restarts.
    Raises ``StartupError`` (one line) if an address cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen for SMTP on {host}:{port}: {exc.strerror}") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: the IPv4 address gets its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StartupError(bind_problem(host, port, exc)) from exc
    return sockets


class _SocketController(GatewayController):
    """A GatewayController serving on sockets bound beforehand (``listen_sockets``)."""

    def __init__(self, handler: object, sockets: list[socket.socket], **kwargs: Any) -> None:
        host, port = sockets[0].getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **kwargs)  # where aiosmtpd's start-up probe connects
        self.sockets = sockets

    def _create_server(self) -> Awaitable[Any]:
        return self._serve_all()

    async def _serve_all(self) -> _Servers:
        return _Servers([await self.loop.create_server(self._factory_invoker, sock=sock) for sock in self.sockets])


class _Servers:
    """The asyncio servers of a host name with several addresses, closed together (what aiosmtpd asks of one)."""

    def __init__(self, servers: list[asyncio.AbstractServer]) -> None:
        self.servers = servers

    def close(self) -> None:
        for server in self.servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self.servers:
            await server.wait_closed()


def bind_problem(host: str, port: int, exc: OSError, what: str = "SMTP", option: str = "--port",
                 key: str = "[gateway] port") -> str:
    """One line saying why ``what`` cannot listen on ``host:port``; a port in use names the ``option`` and the
    settings ``key`` that choose another."""
    if exc.errno == errno.EADDRINUSE:
        return (f"{what} port {port} on {host} is in use (another serve running? choose another with {option}, "
                f"or {key} in the --config file)")
    if exc.errno == errno.EACCES:
        return f"{what} port {port} on {host}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}:{port}: {host} is not an address of this machine"
    return f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}"
