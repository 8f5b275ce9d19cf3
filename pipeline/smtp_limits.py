"""Limits on what SMTP senders can hold: sessions, time, bytes in flight, and log volume.

Without them about 1,100 idle connections exhausted the common 1,024 open-file
limit: accept() failed with EMFILE in a loop, every new client waited, and
asyncio logged a traceback per failure (issue 11). So:

- ``SessionLimits.max_sessions`` (default: a quarter of the soft RLIMIT_NOFILE,
  at most 500, read when the gateway is built) bounds concurrent sessions. One
  more connection gets ``421 4.3.2`` from a ``RefusedConnection`` and is closed
  at once: no greeting, no SMTP handler, its descriptor freed immediately.
- ``LimitedSMTP`` closes a session idle for ``command_timeout_s`` and any
  session older than ``session_timeout_s`` with ``421 4.4.2`` (aiosmtpd's own
  idle timeout closes silently).
- ``InflightBudget`` counts DATA bytes received and not yet accepted or refused,
  across all sessions (``BulkDataSMTP`` charges it; the gateway checks a
  declared ``SIZE=`` against it at MAIL).
- ``LimitedSMTP`` also takes its turn: a client that pipelines thousands of
  commands in one write was answered in full before any other session got a
  reply (one such client held a normal sender's mail 9 s, 45 of them kept EHLO
  unanswered until the sender's idle timer cut it off). A session lets the
  others go after every ``fair_share_replies`` replies, and one that sends more
  than ``max_junk_commands`` commands that carry no mail (NOOP, RSET, VRFY, EXPN,
  HELP, HELO, EHLO, and any command refused with 5xx) before its next
  mail's data is closed with ``421 4.7.0``, in the spirit of Postfix's junk
  command and error limits.
- ``RateLimitedLog`` (``ratelog``) writes at most one line per cause per interval,
  with the number suppressed since; it also serves as the event loop's exception
  handler, where asyncio reports accept() errors and unretrieved task errors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from collections.abc import Callable, Coroutine
from typing import Any

from aiosmtpd.smtp import SMTP

from .config import GatewayConfig
from .errors import ConfigurationError
from .ratelog import LOG_INTERVAL_S, RateLimitedLog
from .smtp_lean import LeanSMTP

log = logging.getLogger(__name__)
MAX_DEFAULT_SESSIONS = 500
TOO_MANY = b"421 4.3.2 Too many connections, try again later\r\n"
IDLE_TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
SESSION_TIMEOUT = "421 4.4.2 Session timeout, closing connection"
TOO_MUCH_JUNK = "421 4.7.0 Too many commands without a mail, closing connection"


def default_max_sessions() -> int:
    """A quarter of this process's soft open-file limit, at most 500: each session may hold a socket and a
    spool file, and the store, the workers and the drop folder need descriptors too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_DEFAULT_SESSIONS
    return max(1, min(MAX_DEFAULT_SESSIONS, soft // 4))


class InflightBudget:
    """DATA bytes received and not yet accepted or refused, across all sessions (event loop only)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.used = cap, 0

    @property
    def remaining(self) -> int:
        """Bytes that may still arrive before new data is refused with 452."""
        return max(0, self.cap - self.used)

    def take(self, size: int) -> bool:
        """Charge ``size`` bytes; False (and nothing charged) if that would pass the cap."""
        if self.used + size > self.cap:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        """Return bytes charged earlier."""
        self.used = max(0, self.used - size)


class InflightClaim:
    """The bytes one DATA command holds against the budget; ``release`` returns them all (safe twice)."""

    def __init__(self, budget: InflightBudget) -> None:
        self.budget, self.held = budget, 0

    def take(self, size: int) -> bool:
        """Charge ``size`` more bytes to this claim; False if the budget has no room for them."""
        if not self.budget.take(size):
            return False
        self.held += size
        return True

    def release(self) -> None:
        """Give every byte of this claim back."""
        self.budget.give_back(self.held)
        self.held = 0


class SessionLimits:
    """What all sessions of one listener share: the session count, the timeouts, the budget, one log."""

    def __init__(self, *, max_sessions: int | None = None, command_timeout_s: float = 60.0,
                 session_timeout_s: float = 900.0, max_inflight_bytes: int = 256 * 1024 * 1024,
                 fair_share_replies: int = 16, max_junk_commands: int = 100,
                 log_interval_s: float = LOG_INTERVAL_S) -> None:
        self.max_sessions = max_sessions or default_max_sessions()
        self.fair_share_replies, self.max_junk_commands = fair_share_replies, max_junk_commands
        self.command_timeout_s, self.session_timeout_s = command_timeout_s, session_timeout_s
        self.inflight = InflightBudget(max_inflight_bytes)
        self.log = RateLimitedLog(log, log_interval_s)
        self.sessions = 0  # changed on the event loop only

    @classmethod
    def from_config(cls, config: GatewayConfig) -> SessionLimits:
        """The limits a GatewayConfig asks for (the automatic session limit is read now). ConfigurationError for a
        ``max_sessions`` over half the open-file limit: a session may hold a socket and a spool file, and past
        the limit asyncio's accept loop spins on EMFILE (a probe's 200 sessions under ``ulimit -n 64``: a core
        busy, senders timing out unanswered, serve healthy)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if config.max_sessions is not None and soft != resource.RLIM_INFINITY and config.max_sessions > soft // 2:
            raise ConfigurationError(f"gateway.max_sessions = {config.max_sessions} needs up to two open files a "
                                     f"session, and this process may open {soft} (ulimit -n): set it to "
                                     f"{max(1, soft // 4)} or less, or raise the limit")
        return cls(max_sessions=config.max_sessions, command_timeout_s=config.command_timeout_s,
                   session_timeout_s=config.session_timeout_s, max_inflight_bytes=config.max_inflight_bytes,
                   fair_share_replies=config.fair_share_replies, max_junk_commands=config.max_junk_commands)

    def open_session(self) -> bool:
        """Count one more session; False (nothing counted) if the limit is reached."""
        if self.sessions >= self.max_sessions:
            self.log.report("session limit", "refused a connection with 421: %d sessions open "
                            "(gateway.max_sessions)", self.sessions)
            return False
        self.sessions += 1
        return True

    def close_session(self) -> None:
        """Count one session less."""
        self.sessions = max(0, self.sessions - 1)


class RefusedConnection(asyncio.Protocol):
    """What a connection beyond the session limit gets: ``421 4.3.2`` and an immediate close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(TOO_MANY)
        close_soon(transport)


def close_soon(transport: asyncio.WriteTransport) -> None:
    """Close after the reply is sent, or at once if the peer does not read (a full buffer would wait forever)."""
    if transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


Command = Callable[[Any, str], Coroutine[Any, Any, Any]]


def _junk(command: Command) -> Command:
    """aiosmtpd's ``command``, counted against the session's junk limit (its HELP text kept: ``wraps``)."""
    @functools.wraps(command)
    async def counted(self: LimitedSMTP, arg: str) -> None:
        if not self.count_junk():
            await command(self, arg)
    return counted


def _mail(command: Command) -> Command:
    """aiosmtpd's DATA, after which the junk count starts afresh if a mail's data was taken (a DATA refused
    with 503 before any data reset it: 99 NOOPs and a bare DATA, for ever)."""
    @functools.wraps(command)
    async def mail(self: LimitedSMTP, arg: str) -> None:
        taking = bool(self.envelope is not None and self.envelope.rcpt_tos) and not arg
        await command(self, arg)
        if taking:
            self.junk_commands = 0
    return mail


def _refusal(status: Any) -> bool:
    """A 5xx reply. Not a 4xx: a client that pipelines 500 recipients gets 400 "452 too many recipients" and
    must send them in another transaction (RFC 5321), not be cut off."""
    return status[:1] in ("5", b"5")


class LimitedSMTP(LeanSMTP):
    """aiosmtpd's SMTP that counts itself against ``limits``, closes idle or long sessions and junk floods with
    421, and takes its turn with the other sessions (module docstring)."""

    junk_commands = 0  # since the session's last DATA
    _replies = 0
    smtp_NOOP = _junk(SMTP.smtp_NOOP)
    smtp_RSET = _junk(SMTP.smtp_RSET)
    smtp_VRFY = _junk(SMTP.smtp_VRFY)
    smtp_EXPN = _junk(SMTP.smtp_EXPN)  # type: ignore[assignment]  # (typed differently upstream)
    smtp_HELP = _junk(SMTP.smtp_HELP)
    smtp_HELO = _junk(SMTP.smtp_HELO)
    smtp_EHLO = _junk(SMTP.smtp_EHLO)
    smtp_DATA = _mail(SMTP.smtp_DATA)  # BulkDataSMTP's own DATA resets the count the same way

    def __init__(self, handler: Any, *, limits: SessionLimits, lean: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", limits.command_timeout_s)  # aiosmtpd's idle timer, reset by every command
        self.lean = lean  # before aiosmtpd's __init__, which introspects this session
        super().__init__(handler, **kwargs)
        self.limits = limits
        self._counted = True  # the controller counted this session before building it
        self._session_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._session_timer is None  # STARTTLS calls this again for the same session
        super().connection_made(transport)
        if first:
            self._session_timer = self.loop.call_later(self.limits.session_timeout_s, self._close_with,
                                                       SESSION_TIMEOUT, "session timeout")

    def connection_lost(self, error: Exception | None) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._counted:
            self._counted = False
            self.limits.close_session()
        super().connection_lost(error)

    def count_junk(self) -> bool:
        """Count one command that carried no mail; past the limit, close with 421 and return True."""
        self.junk_commands += 1
        if self.junk_commands <= self.limits.max_junk_commands:
            return False
        self._close_with(TOO_MUCH_JUNK, "too many commands without a mail")
        return True

    async def push(self, status: Any) -> None:
        """Send one reply; a 5xx refusal counts as junk (a reviewer's client pipelined nested MAILs, 65,170 503s in
        8 s, never closed); after every ``limits.fair_share_replies``, let the other sessions run. aiosmtpd reads
        a line and writes its reply without suspending while the client's pipelined lines are buffered: one
        client could hold the event loop for as long as it kept writing."""
        await super().push(status)
        if _refusal(status):
            self.count_junk()
        self._replies += 1
        every = self.limits.fair_share_replies
        if every and self._replies % every == 0:
            await asyncio.sleep(0)

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle timer fired: say why before closing."""
        self._close_with(IDLE_TIMEOUT, "idle timeout")

    def _close_with(self, reply: str, cause: str) -> None:
        """Answer ``reply`` and close; a DATA in progress is abandoned (its handler is cancelled)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.limits.log.report(cause, "closed an SMTP session from %s: %s", getattr(self.session, "peer", "?"),
                               cause, level=logging.INFO)
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(reply.encode("ascii") + b"\r\n")
        close_soon(transport)

    def reset_idle_timer(self) -> None:
        """Restart the idle timer: data is arriving, so the session is not idle."""
        self._reset_timeout()

    def data_received(self, data: bytes) -> None:
        """Any bytes arriving make the session not idle: a DATA trickled slower than a line per
        ``command_timeout_s`` (the DATA reader resets the timer once per ~1,000-byte piece) is not cut off
        while it still sends; ``session_timeout_s`` still ends it."""
        super().data_received(data)
        if self.transport is not None and self._timeout_handle is not None:
            self._reset_timeout()

    async def smtp_AUTH(self, arg: str) -> None:
        """Refuse AUTH as Postfix does without SASL: the gateway offers none (EHLO never listed it). aiosmtpd's
        HELP listed it and its AUTH answered 538 "encryption required", as if a STARTTLS (not offered either)
        would let a client in; without aiosmtpd's help text HELP no longer lists it."""
        await self.push("502 5.5.1 Error: authentication not enabled")

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        """No 503 for a transaction without HELO/EHLO (Postfix and sendmail take one by default; RFC 5321 puts
        the greeting on the client): the session is named after the peer's address instead."""
        if self.session is not None and not self.session.host_name:
            peer = self.session.peer
            self.session.host_name = f"[{peer[0]}]" if isinstance(peer, tuple) and peer else "[unknown]"
        return False
