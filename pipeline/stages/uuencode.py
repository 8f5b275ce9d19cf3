"""Files a text body carries uuencoded: ``begin 644 name`` ... ``end`` (classic), and ``begin-base64 644 name``
... ``====`` (``uuencode -m``), as old mailers and some mail gateways still send attachments.

Without this the digest said the mail had no PDF (the base64 form too, a prober's find). yEnc (``=ybegin ...
name=x`` ... ``=yend``, Usenet's, which some mailers use too) is read as well: a probe's yEnc PDF was lost without
a word.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from itertools import islice

MAX_FILES = 1000  # files read from one body (the MIME part limit's size)
_BEGIN = re.compile(rb"^begin(-base64)? [0-7]{3,4} +([^\r\n]*?)[ \t]*\r?$", re.MULTILINE)
_STOP = re.compile(rb"^(?:end[ \t]*\r?$|====[ \t]*\r?$|begin(?:-base64)? [0-7]{3,4} )", re.MULTILINE)


_YBEGIN = re.compile(rb"^=ybegin .*?name=([^\r\n]*?)[ \t]*\r?$", re.MULTILINE)
_YSTOP = re.compile(rb"^=y(?:end|begin)", re.MULTILINE)
_YPART = re.compile(rb"^=ypart [^\r\n]*\r?\n", re.MULTILINE)
_YENC = bytes((i - 42) % 256 for i in range(256))  # each byte is the file's plus 42
_YENC_ESCAPED = bytes((i - 106) % 256 for i in range(256))  # after "=": plus 64 more


def uuencoded_files(body: bytes) -> Iterator[tuple[str, bytes]]:
    """The files ``body`` carries, as (name, bytes); at most MAX_FILES, each read up to its end line or the next
    ``begin`` (so the body is read once, whatever it holds). Damaged lines are decoded as far as they go (as the
    email package does for x-uuencode parts). yEnc files follow the uuencoded ones."""
    count = 0
    for begin in islice(_BEGIN.finditer(body), MAX_FILES):
        stop = _STOP.search(body, begin.end())
        lines = body[begin.end():stop.start() if stop else len(body)].splitlines()
        data = _from_base64(lines) if begin.group(1) else _from_uu(lines)
        count += 1
        yield begin.group(2).decode("utf-8", "replace"), data
    if b"=ybegin " not in body:
        return
    for begin in islice(_YBEGIN.finditer(body), MAX_FILES - count):
        stop = _YSTOP.search(body, begin.end())
        yield begin.group(1).decode("utf-8", "replace"), _from_yenc(body[begin.end():stop.start() if stop else None])


def _from_yenc(text: bytes) -> bytes:
    """A yEnc body's bytes (one part: a ``=ypart`` line is dropped), with bytes.translate: C speed."""
    pieces = _YPART.sub(b"", text, count=1).replace(b"\r", b"").replace(b"\n", b"").split(b"=")
    return pieces[0].translate(_YENC) + b"".join(p[:1].translate(_YENC_ESCAPED) + p[1:].translate(_YENC)
                                                 for p in pieces[1:])


def _from_base64(lines: list[bytes]) -> bytes:
    text = b"".join(line.strip() for line in lines)
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return b""  # not base64 after all: no file (its name is still listed)


def _from_uu(lines: list[bytes]) -> bytes:
    decoded = bytearray()
    for line in lines:
        line = line.rstrip(b" \t")
        if not line:
            continue
        try:
            decoded += binascii.a2b_uu(line)
        except binascii.Error:  # a line cut short or padded oddly: the bytes its length byte announces
            length = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                decoded += binascii.a2b_uu(line[:length])
            except binascii.Error:
                break  # not uuencode after all: what came before stands
    return bytes(decoded)
