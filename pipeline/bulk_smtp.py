"""BulkDataSMTP: aiosmtpd's SMTP with a DATA phase that reads in large pieces.

aiosmtpd reads DATA line by line on the event loop: about 68,000 base64 lines
for a 5 MB attachment, a few microseconds each, during which every other
sender waits. Here ``StreamReader.readuntil(b"\\r\\n.\\r\\n")`` finds the
terminator in C and hands back the data in pieces as large as the socket
delivers. Only public StreamReader API is used, so bytes a client pipelines
after the data (``RSET``, ``QUIT``) stay in the reader for the command loop.

Only ``<CRLF>.<CRLF>`` ends the data: ``\\n.\\r\\n``, ``\\r\\n.\\n``,
``\\r.\\r\\n`` and ``\\n.\\n`` are body bytes (no SMTP smuggling). The data starts
at the beginning of a line, so a first line that is the lone dot (an empty
message) ends it too; StreamReader cannot peek, so the first few bytes are read
exactly (``_read_start``) until no terminator can begin in them.

Behaviour kept from aiosmtpd (its result is byte for byte the same): the size
limit counts the bytes as sent and answers 552 after draining the data, never
holding more than the limit plus one piece; dot-stuffing is undone as RFC 5321
4.5.2 says (a line that begins with "." loses that first "."); the handler's
``handle_DATA`` is called the same way; a connection closed mid-DATA closes
the session without a reply. Not kept: the 1,000-byte line-length check
(aiosmtpd answers 500 to a longer line; we accept it, our parser does not care),
and ``decode_data`` (the content is always bytes).

Streaming (issue 11): if the handler has a ``handle_DATA_START`` hook that
returns a ``DataWriter`` (the gateway's spool writer), each piece is unstuffed
(``Unstuffer``: a ``CRLF.`` may straddle two pieces) and written to it as it
arrives, and ``handle_DATA`` finds the writer in ``envelope.writer`` instead of
the content in ``envelope.content``: the session never holds the message.
Without the hook (or when it returns None) the content is gathered whole, as
before. Every piece is charged to the shared ``InflightBudget``; when it runs
out the rest is drained unstored and the answer is ``452 4.3.1``. Whatever
ends the DATA (552, 452, a lost connection), the writer is aborted and the
budget given back; once ``handle_DATA`` has the writer, the handler owns it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, Envelope, syntax

from . import metrics
from .smtp_limits import InflightClaim, LimitedSMTP, RefusedConnection, SessionLimits

log = logging.getLogger(__name__)
CRLF = b"\r\n"
END = b"\r\n.\r\n"
TOO_MUCH_DATA = "552 Error: Too much mail data"
NO_ROOM = "452 4.3.1 Insufficient system storage"
CANCELLED_WAIT_S = 5.0  # at a stop, the longest the loop waits for its cancelled sessions to end


class DataWriter(Protocol):
    """Where streamed DATA goes (the spool's writer): ``write`` must not raise, ``abort`` discards it all."""

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class DataEnvelope(Envelope):
    """aiosmtpd's Envelope plus the writer the data was streamed into (None: the data is in ``content``)."""

    def __init__(self) -> None:
        super().__init__()
        self.writer: DataWriter | None = None


class BulkDataSMTP(LimitedSMTP):
    """SMTP whose DATA command reads the message in large pieces (and streams it, if the handler asks)."""

    def _create_envelope(self) -> DataEnvelope:
        return DataEnvelope()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        # Before the 354: should the hook fail, the client has sent no data that could be read as commands
        writer = await self._call_handler_hook("DATA_START")
        sink: StreamSink | MemorySink = MemorySink() if writer is MISSING or writer is None else StreamSink(writer)
        claim = InflightClaim(self.limits.inflight)
        try:
            status = await self._receive(sink, claim)
        finally:
            claim.release()  # accepted, refused or lost: these bytes are no longer in flight
        self._set_post_data_state()
        self.junk_commands = 0  # a mail: the commands that carry none count afresh
        await self.push(status)

    async def _receive(self, sink: StreamSink | MemorySink, claim: InflightClaim) -> str:
        """Answer 354, read the data into ``sink``, then hand it to the handler; return the reply."""
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            refusal = await self._read_data(sink, claim)
        except BaseException:
            sink.abort()
            raise
        if refusal:
            sink.abort()
            return metrics.smtp_reply("DATA", refusal)
        envelope = self.envelope
        assert isinstance(envelope, DataEnvelope)
        if isinstance(sink, StreamSink):
            sink.close()
            envelope.writer = sink.writer  # from here on the handler owns it
        else:
            envelope.content = envelope.original_content = sink.content()
        self.reset_idle_timer()  # the accept may take a while: it is not the client being idle
        status = await self._call_handler_hook("DATA")
        return "250 OK" if status is MISSING else str(status)

    async def _read_data(self, sink: Sink, claim: InflightClaim) -> str | None:
        """Read up to the terminator into ``sink``; return None, or the refusal (552, 452) after draining."""
        try:
            return await self._read_pieces(sink, claim)
        except (asyncio.CancelledError, asyncio.IncompleteReadError) as exc:
            # aiosmtpd's eof_received cancels this task; should EOF reach the reader first, end the same way
            log.info("Connection lost during DATA")
            self._writer.close()
            if isinstance(exc, asyncio.IncompleteReadError):
                raise asyncio.CancelledError from exc
            raise
        except Exception as exc:  # a bug: the rest of the data must never be read as commands, so hang up
            self.limits.log.report(f"DATA failed: {type(exc).__name__}", "closed a session whose DATA failed",
                                   exc_info=exc)
            self._writer.close()
            raise asyncio.CancelledError from exc

    async def _read_pieces(self, sink: Sink, claim: InflightClaim) -> str | None:
        """Feed the data as sent (still dot-stuffed, without the terminator's dot line) to ``sink``.

        Over the size limit or the in-flight budget, keep draining but hold nothing: the answer is 552 or 452.
        """
        limit = self.data_size_limit
        piece, ended = await self._read_start()
        size, refusal = 0, None
        while True:
            size += len(piece)
            if refusal is None:
                refusal = TOO_MUCH_DATA if limit and size > limit else None if claim.take(len(piece)) else NO_ROOM
                if refusal:
                    sink.abort()
                    claim.release()
                else:
                    sink.write(piece)
            if ended:
                return refusal
            piece = await self._next_piece()
            self.reset_idle_timer()
            ended = piece.endswith(END)
            if ended:
                piece = piece[:-3]  # drop ".CRLF"; the CRLF before it ends the last line

    async def _read_start(self) -> tuple[bytes, bool]:
        """Read the first bytes until no terminator can begin in them; return (those bytes, terminator seen).

        The data starts as if after a CRLF. Reading exactly the bytes that would complete a partial
        terminator never waits for bytes a valid client does not send: its data still ends in one.
        """
        seen = CRLF
        while partial := overlap(seen):
            seen += await self._reader.readexactly(len(END) - partial)
            end = seen.find(END)
            if end != -1:
                return seen[2:end + 2], True
        return seen[2:], False

    async def _next_piece(self) -> bytes:
        """Bytes up to and including the next ``CRLF.CRLF``, or as many as the reader holds without one."""
        try:
            return await self._reader.readuntil(END)
        except asyncio.LimitOverrunError as exc:
            # None within the reader's limit: take the bytes before any possible start of one (so a
            # terminator never straddles two pieces), or those before one found beyond the limit
            return await self._reader.readexactly(exc.consumed)


class Sink(Protocol):
    """Where ``_read_pieces`` puts the data as sent (dot-stuffed)."""

    def write(self, piece: bytes) -> None: ...

    def abort(self) -> None: ...


class MemorySink:
    """Gather the data whole (aiosmtpd's way, and the baseline of ``stream_data``)."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, piece: bytes) -> None:
        self.pieces.append(piece)

    def abort(self) -> None:
        self.pieces = []

    def content(self) -> bytes:
        """The message, dot-stuffing undone."""
        return unstuff(b"".join(self.pieces))


class StreamSink:
    """Unstuff each piece and pass it on to a ``DataWriter``; nothing but a two-byte carry is kept."""

    def __init__(self, writer: DataWriter) -> None:
        self.writer = writer
        self.unstuffer = Unstuffer()

    def write(self, piece: bytes) -> None:
        if out := self.unstuffer.feed(piece):
            self.writer.write(out)

    def close(self) -> None:
        """Pass on the carried bytes: the data has ended."""
        if out := self.unstuffer.flush():
            self.writer.write(out)

    def abort(self) -> None:
        self.writer.abort()


class Unstuffer:
    """``unstuff`` piece by piece: the same bytes out, however the input is split.

    The data is treated as if it followed a CRLF (so a first line's dot goes too); the last one or two
    bytes of a piece that could begin ``CRLF.`` wait for the next piece.
    """

    def __init__(self) -> None:
        self._carry = CRLF
        self._skip = len(CRLF)  # the CRLF we started with is not data

    def feed(self, piece: bytes) -> bytes:
        """Return the unstuffed bytes that are certain now."""
        data = self._carry + piece
        keep = 2 if data.endswith(CRLF) else 1 if data.endswith(b"\r") else 0
        ready, self._carry = data[: len(data) - keep], data[len(data) - keep:]
        return self._emit(ready.replace(b"\r\n.", CRLF))

    def flush(self) -> bytes:
        """Return what is still carried (the data has ended)."""
        data, self._carry = self._carry, b""
        return self._emit(data)

    def _emit(self, out: bytes) -> bytes:
        skip = min(self._skip, len(out))
        self._skip -= skip
        return out[skip:]


def overlap(data: bytes) -> int:
    """Length of the longest end of ``data`` that begins the terminator (0 to 4)."""
    return next((n for n in range(len(END) - 1, 0, -1) if data.endswith(END[:n])), 0)


def unstuff(raw: bytes) -> bytes:
    """Undo dot-stuffing (RFC 5321 4.5.2): a line that begins with "." loses that first "."."""
    # "\r\n." cannot overlap itself, so one replace() removes exactly one dot per line
    return (raw[1:] if raw.startswith(b".") else raw).replace(b"\r\n.", CRLF)


class GatewayController(Controller):
    """aiosmtpd Controller that builds BulkDataSMTP (or LimitedSMTP when ``bulk_data`` is off) within ``limits``.

    A connection beyond ``limits.max_sessions`` gets a ``RefusedConnection`` (421, closed) instead of an SMTP
    session. The loop's exception handler is ``limits.log``'s: one line per cause per interval.
    """

    def __init__(self, handler: object, *, bulk_data: bool = True, limits: SessionLimits | None = None,
                 lean_sessions: bool = True, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.bulk_data, self.lean_sessions = bulk_data, lean_sessions
        self.limits = limits or SessionLimits()
        self.loop.set_exception_handler(self.limits.log.loop_exception_handler)

    def cancel_tasks(self, stop_loop: bool = True) -> None:
        """Cancel every task on the loop and stop it once they have ended (at most ``CANCELLED_WAIT_S``).

        aiosmtpd's own stops the loop at once: a session waiting on its accept in the pool needs another turn of
        the loop to end its cancelled wait, so it was left pending, and serve's stop logged "Task was destroyed but
        it is pending!" (its accept goes on in the pool either way, and its run stands)."""
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        if stop_loop:
            self.loop.create_task(self._stop_when_ended(tasks))

    async def _stop_when_ended(self, tasks: set[asyncio.Task[Any]]) -> None:
        if tasks:
            await asyncio.wait(tasks, timeout=CANCELLED_WAIT_S)
        self.loop.stop()

    def factory(self) -> SMTP | RefusedConnection:
        if not self.limits.open_session():
            return RefusedConnection()
        try:
            return (BulkDataSMTP if self.bulk_data else LimitedSMTP)(self.handler, limits=self.limits,
                                                                     lean=self.lean_sessions, **self.SMTP_kwargs)
        except BaseException:
            self.limits.close_session()
            raise
