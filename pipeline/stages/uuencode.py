"""Files a text body carries uuencoded: ``begin 644 name`` ... ``end`` (classic), and ``begin-base64 644 name``
... ``====`` (``uuencode -m``), as old mailers and some mail gateways still send attachments.

Without this the digest said the mail had no PDF (the base64 form too, a prober's find). yEnc is not read.
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


def uuencoded_files(body: bytes) -> Iterator[tuple[str, bytes]]:
    """The files ``body`` carries, as (name, bytes); at most MAX_FILES, each read up to its end line or the next
    ``begin`` (so the body is read once, whatever it holds). Damaged lines are decoded as far as they go (as the
    email package does for x-uuencode parts)."""
    for begin in islice(_BEGIN.finditer(body), MAX_FILES):
        stop = _STOP.search(body, begin.end())
        lines = body[begin.end():stop.start() if stop else len(body)].splitlines()
        data = _from_base64(lines) if begin.group(1) else _from_uu(lines)
        yield begin.group(2).decode("utf-8", "replace"), data


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
