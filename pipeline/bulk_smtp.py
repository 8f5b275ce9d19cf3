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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, syntax

log = logging.getLogger(__name__)
CRLF = b"\r\n"
END = b"\r\n.\r\n"


class BulkDataSMTP(SMTP):
    """SMTP whose DATA command reads the message in large pieces."""

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
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_data()
        if content is None:
            self._set_post_data_state()
            await self.push("552 Error: Too much mail data")
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self) -> bytes | None:
        """Read up to the terminator and undo dot-stuffing; None if over the size limit (drained anyway)."""
        try:
            pieces = await self._read_pieces()
        except (asyncio.CancelledError, asyncio.IncompleteReadError) as exc:
            # aiosmtpd's eof_received cancels this task; should EOF reach the reader first, end the same way
            log.info("Connection lost during DATA")
            self._writer.close()
            if isinstance(exc, asyncio.IncompleteReadError):
                raise asyncio.CancelledError from exc
            raise
        return None if pieces is None else unstuff(b"".join(pieces))

    async def _read_pieces(self) -> list[bytes] | None:
        """The data as sent (still dot-stuffed), without the terminator's dot line; None if over the limit."""
        limit = self.data_size_limit
        first, ended = await self._read_start()
        pieces, size = [first], len(first)
        while not ended:
            piece = await self._next_piece()
            ended = piece.endswith(END)
            if ended:
                piece = piece[:-3]  # drop ".CRLF"; the CRLF before it ends the last line
            size += len(piece)
            if limit and size > limit:
                pieces = []  # keep draining, but hold nothing: the answer will be 552
            else:
                pieces.append(piece)
        return None if limit and size > limit else pieces

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


def overlap(data: bytes) -> int:
    """Length of the longest end of ``data`` that begins the terminator (0 to 4)."""
    return next((n for n in range(len(END) - 1, 0, -1) if data.endswith(END[:n])), 0)


def unstuff(raw: bytes) -> bytes:
    """Undo dot-stuffing (RFC 5321 4.5.2): a line that begins with "." loses that first "."."""
    # "\r\n." cannot overlap itself, so one replace() removes exactly one dot per line
    return (raw[1:] if raw.startswith(b".") else raw).replace(b"\r\n.", CRLF)


class GatewayController(Controller):
    """aiosmtpd Controller that builds BulkDataSMTP (or plain SMTP when ``bulk_data`` is off)."""

    def __init__(self, handler: object, *, bulk_data: bool = True, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.bulk_data = bulk_data

    def factory(self) -> SMTP:
        return (BulkDataSMTP if self.bulk_data else SMTP)(self.handler, **self.SMTP_kwargs)
