"""The email policies the stages parse and write mail with: the standard library's, its header classes made once.

``email.headerregistry.HeaderRegistry`` builds a new class (``type(...)``) for every header it parses or
sets. Parsing a small mail and writing its digest made about thirty of them, 0.6 ms of the 1.8 ms a
digest mail took to compose (issue 16, small mails per second). The classes depend only on the header's
kind, never on its value, so a registry that keeps the one class per kind gives the same headers. The
cache is bounded by the number of kinds (a few dozen): unknown header names all share one class.

A MIME header is parsed once. The email package parses a header again each time it is read, and ``parse``
reads a part's Content-Type many times while it looks for attachments (issue 16; the audit's
``optimizations.stage_switches`` times parse, digest and compose both ways). A header object is immutable and
depends only on its name and value, so the last ``CACHED_HEADERS`` of the headers read again and again
(``CACHED_NAMES``) are kept, each at most ``CACHED_HEADER_CHARS`` long. A parse tree costs far more than its text,
and a sender chooses the text: keeping every kind of header up to 1 KB let one mail of many parameter-laden parts
leave tens of MB held (a reviewer's find); as they are, the kept ones stay under ``CACHED_MAX_MB`` whatever they
hold (test_mailpolicy).

A header is parsed at most ``MAX_HEADER_CHARS`` long. The email package's parser costs about 8 ms per KB
of a From: and grows faster than the length: a 1 MB From: of 50,000 addresses took a minute of a worker's
CPU, holding up the parsing of every other mail (a prober sent three). Real headers that are parsed (From,
Content-Type, Message-ID) are far under 1 KB, so a longer one is refused (a structured header) or cut
(free text such as Subject, of which a digest shows 250 characters anyway).

Raw 8-bit bytes in free text and in Content-Type and Content-Disposition (the parser keeps them as surrogate
escapes) are read as UTF-8 (RFC 6532), or else in the charset the mail names for its text (``body_charset``, set
around a mail's reading with ``fallback_charset``), or else as Windows-1252, before the header is parsed: the
email package would replace each byte of a raw Latin-1 "caf\xe9.pdf" or subject with U+FFFD, and a Russian
mail client's raw Windows-1251 subject came out as "Îò÷¸ò", though its text part said charset=windows-1251, as
mail readers then read the headers too. Address headers keep their bytes: an address that is not UTF-8 is
refused where it is read (``headers.addr_spec``), never guessed at.

An RFC 2047 encoded word labelled with a charset mail programs use for a larger one is read as the larger one
(``SUPERSET_CHARSETS``), as mail readers do: a "gb2312" subject holding a GBK character came out with U+FFFD.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import contextvars
import functools
import re
from collections.abc import Iterator
from email import errors as email_errors
from email import policy
from email.headerregistry import (
    BaseHeader,
    HeaderRegistry,
    MessageIDHeader,
    ParameterizedMIMEHeader,
    UnstructuredHeader,
)
from typing import Any

MAX_HEADER_CHARS = 8 * 1024
CACHED_HEADERS, CACHED_HEADER_CHARS = 32, 256  # parsed headers kept (see the module's docstring), up to this long
CACHED_NAMES = frozenset({"content-type", "content-disposition", "content-transfer-encoding", "mime-version"})
CACHED_MAX_MB = 16
EIGHT_BIT_READ = (UnstructuredHeader, ParameterizedMIMEHeader)  # header kinds whose raw 8-bit text is decoded first
# charsets (Python's codec names) that label text holding a larger charset's characters: read as the larger one,
# as mail readers and the WHATWG Encoding Standard do (gb2312 and GBK as GB18030; Outlook's ks_c_5601-1987, which
# Python reads as EUC-KR, as Windows-949; Big5 with the Hong Kong characters). ISO-8859-1 read as Windows-1252 is
# ``headers.readable``'s: its C1 controls are translated after decoding.
SUPERSET_CHARSETS = {"gb2312": "gb18030", "gbk": "gb18030", "euc_kr": "cp949", "big5": "big5hkscs"}
# an RFC 2047 encoded word (with RFC 2231's ``charset*lang``): its charset, and the rest of it
_ENCODED_WORD = re.compile(r"=\?([^?*\s]{1,40})((?:\*[^?\s]*)?\?[bBqQ]\?[^?\s]*\?=)")
FALLBACK_CHARSET = "cp1252"
_fallback = contextvars.ContextVar("fallback_charset", default=FALLBACK_CHARSET)  # the mail being read's
# a part's charset parameter in raw bytes, quoted or bare
_CHARSET_PARAM = re.compile(rb'charset\s*=\s*"?([A-Za-z0-9_.:+-]{1,40})', re.IGNORECASE)
_NO_HINT = frozenset({"ascii", "utf-8", "utf_8"})  # charsets that say nothing about 8-bit bytes that are not UTF-8


class HeaderTooLongError(email_errors.HeaderParseError):
    """A structured header longer than MAX_HEADER_CHARS: not parsed (see the module's docstring)."""


class ReusedHeaderClasses(HeaderRegistry):
    """A HeaderRegistry that makes each header class once and hands it out again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made: dict[type, type[BaseHeader]] = {}
        # thread-safe; errors not kept; keyed by the fallback charset too (a raw 8-bit value reads per mail)
        self._parsed = functools.lru_cache(maxsize=CACHED_HEADERS)(self._parse_as)

    def _kind(self, name: str) -> type:
        return self.registry.get(name.lower(), self.default_class)

    def __getitem__(self, name: str) -> type[BaseHeader]:
        kind = self._kind(name)
        made = self._made.get(kind)
        if made is None:  # two threads may both make it: either class is right, the last one stays
            made = self._made[kind] = super().__getitem__(name)
        return made

    def __call__(self, name: str, value: Any) -> BaseHeader:
        if isinstance(value, str) and len(value) <= CACHED_HEADER_CHARS and name.lower() in CACHED_NAMES:
            return self._parsed(name, value, _fallback.get())  # (a set value may be an Address object: never kept)
        return self._parse(name, value)

    def _parse_as(self, name: str, value: Any, fallback: str) -> BaseHeader:
        """``_parse`` (``fallback``: the cache's key, the charset it reads raw 8-bit bytes with)."""
        return self._parse(name, value)

    def _parse(self, name: str, value: Any) -> BaseHeader:
        if isinstance(value, str) and len(value) > MAX_HEADER_CHARS:
            if not issubclass(self._kind(name), UnstructuredHeader):
                raise HeaderTooLongError(f"{len(value):,} characters long, over the {MAX_HEADER_CHARS:,} a parsed "
                                         "header may have")
            value = value[:MAX_HEADER_CHARS]
        if isinstance(value, str) and not value.isascii() and issubclass(self._kind(name), EIGHT_BIT_READ):
            value = decode_8bit(value)
        if isinstance(value, str) and "=?" in value:
            value = wider_charsets(value)
        return super().__call__(name, value)


# labels mail programs write that Python's codecs do not know, read as mail readers read them (mostly the WHATWG
# Encoding Standard's labels): Thai Outlook's windows-874, Java's Windows-31J and x-sjis, Hebrew's visual-order
# iso-8859-8-i, old Mac mailers' x-mac-* (a probe's subjects and file names in these came out as U+FFFD)
CHARSET_ALIASES = {"windows-874": "cp874", "windows-31j": "cp932", "x-sjis": "cp932", "iso-8859-8-i": "iso8859-8",
                   "iso-8859-8-e": "iso8859-8", "iso-8859-6-i": "iso8859-6", "iso-8859-6-e": "iso8859-6",
                   "x-mac-cyrillic": "mac-cyrillic", "x-mac-roman": "mac-roman", "x-mac-greek": "mac-greek",
                   "x-mac-turkish": "mac-turkish", "x-gbk": "gb18030", "gb_2312-80": "gb18030",
                   "csgb2312": "gb18030", "chinese": "gb18030", "x-euc-jp": "euc_jp"}


def codec_name(label: str) -> str | None:
    """Python's codec name for charset ``label`` (``CHARSET_ALIASES`` first), or None for a label it cannot read."""
    try:
        return codecs.lookup(CHARSET_ALIASES.get(label.strip().lower(), label)).name
    except (LookupError, ValueError):
        return None


def superset_charset(label: str) -> str:
    """The charset to read text labelled ``label`` with: its superset (``SUPERSET_CHARSETS``), else its codec's
    name; ``label`` itself when unknown (the email package says so where it decodes)."""
    name = codec_name(label)
    return label if name is None else SUPERSET_CHARSETS.get(name, name)


# adjacent base64 encoded words of one charset (only blanks between them, which RFC 2047 6.2 says to drop)
_ADJACENT_B_WORDS = re.compile(r"=\?([^?*\s]{1,40})\?[bB]\?[A-Za-z0-9+/=]*\?="
                               r"(?:[ \t\r\n]+=\?\1\?[bB]\?[A-Za-z0-9+/=]*\?=)+")
_B_TEXT = re.compile(r"\?[bB]\?([A-Za-z0-9+/=]*)\?=")


def wider_charsets(text: str) -> str:
    """``text`` with the charset of each RFC 2047 encoded word in it replaced by its superset, and adjacent base64
    words of one charset joined into one: a mailer that cuts a character between two words (a probe's GB2312
    subject: "第三季�炔莆癖") is read as the words' bytes together, which is what RFC 2047 6.2 displays."""
    if "?=" in text and _ADJACENT_B_WORDS.search(text):
        text = _ADJACENT_B_WORDS.sub(_joined_word, text)
    return _ENCODED_WORD.sub(lambda word: "=?" + superset_charset(word.group(1)) + word.group(2), text)


def _joined_word(run: re.Match[str]) -> str:
    try:
        data = b"".join(binascii.a2b_base64(word + "=" * (-len(word) % 4)) for word in _B_TEXT.findall(run.group(0)))
    except (binascii.Error, ValueError):  # not base64 after all: as written
        return run.group(0)
    return f"=?{run.group(1)}?B?{binascii.b2a_base64(data, newline=False).decode('ascii')}?="


def decode_8bit(text: str) -> str:
    """``text`` with its raw 8-bit bytes (surrogate escapes) read as UTF-8, or else in the mail's charset
    (``fallback_charset``; Windows-1252, what a mail without a charset label most often is); ``text`` itself when
    it has none. In a mail that names no such charset, UTF-8 with a damaged byte (at least eight good characters
    beyond ASCII for each bad byte, and four) is still UTF-8: a probe's Cyrillic file names with one bad byte
    came out whole as Windows-1252 mojibake."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte gave (set by code, not parsed): nothing to read
        return text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    fallback = _fallback.get()
    if fallback == FALLBACK_CHARSET:  # a mail naming GBK, EUC-KR or Big5: their byte pairs are often valid UTF-8
        lenient = raw.decode("utf-8", "replace")  # (a reviewer's find: 28 of 5,000 names went wrong at 2 to 1)
        bad = lenient.count("\ufffd")
        if sum(not c.isascii() for c in lenient) - bad >= max(4, 8 * bad):
            return lenient
    return raw.decode(fallback, "replace")


def body_charset(raw: bytes) -> str:
    """The first charset ``raw`` (a whole mail) names for a part other than ASCII and UTF-8, as Python reads it
    (``superset_charset``; ISO-8859-1 as Windows-1252, as ``headers.readable`` does); else Windows-1252."""
    for found in _CHARSET_PARAM.finditer(raw, 0, 256 * 1024):  # the header block and the first parts
        name = codec_name(found.group(1).decode("ascii", "replace"))
        if name is None:
            continue
        if name not in _NO_HINT:
            return FALLBACK_CHARSET if name in ("iso8859-1", "latin-1", "cp1252") else superset_charset(name)
    return FALLBACK_CHARSET


@contextlib.contextmanager
def fallback_charset(charset: str) -> Iterator[None]:
    """Read raw 8-bit header bytes that are not UTF-8 as ``charset`` inside the block (this thread's context)."""
    token = _fallback.set(charset)
    try:
        yield
    finally:
        _fallback.reset(token)


DEFAULT = policy.default.clone(header_factory=ReusedHeaderClasses())
SMTP = DEFAULT.clone(linesep="\r\n")
SMTPUTF8 = DEFAULT.clone(utf8=True)


def _reply_headers() -> ReusedHeaderClasses:
    """The registry a digest is written with: In-Reply-To and References are message ids (one each, the original's).

    As free text (the default), a message id longer than a line (Exchange's are about 90 characters) was
    written as RFC 2047 encoded words, and mail readers no longer put the digest under the original."""
    registry = ReusedHeaderClasses()
    for name in ("in-reply-to", "references"):
        registry.map_to_type(name, MessageIDHeader)  # type: ignore[arg-type]  # a mixin, as every header class
    return registry


REPLY = DEFAULT.clone(header_factory=_reply_headers())  # a digest's headers (compose_reply); parsing uses DEFAULT
REPLY_UTF8 = REPLY.clone(utf8=True)
