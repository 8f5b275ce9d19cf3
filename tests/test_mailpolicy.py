"""The stages' email policy: the standard library's, with each header class made once."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser

import pytest

from pipeline.stages.mailpolicy import (
    CACHED_HEADER_CHARS,
    CACHED_HEADERS,
    DEFAULT,
    MAX_HEADER_CHARS,
    HeaderTooLongError,
)

RAW = (b"From: =?utf-8?q?J=C3=B6rg?= <jorg@example.com>\r\nTo: a@example.com, \"B, C\" <b@example.com>\r\n"
       b"Subject: =?utf-8?b?w6l0w6k=?= report\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
       b"Message-ID: <m1@example.com>\r\nX-Odd: \xff raw byte\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhi\r\n")


def test_headers_parse_exactly_as_with_the_standard_policy_but_raw_8bit_text():
    ours, theirs = BytesParser(policy=DEFAULT).parsebytes(RAW), BytesParser(policy=policy.default).parsebytes(RAW)
    for name in ("From", "To", "Subject", "Date", "Message-ID", "X-Odd", "Content-Type"):
        assert type(ours[name]).__mro__[1:] == type(theirs[name]).__mro__[1:]
        if name != "X-Odd":
            assert str(ours[name]) == str(theirs[name])
    assert (str(ours["X-Odd"]), str(theirs["X-Odd"])) == ("\u00ff raw byte", "\ufffd raw byte")  # Windows-1252
    assert [a.addr_spec for a in ours["To"].addresses] == ["a@example.com", "b@example.com"]
    assert ours.as_bytes() == theirs.as_bytes()


def test_one_class_per_kind_of_header_whatever_the_name():
    registry = DEFAULT.header_factory
    assert registry["Subject"] is registry["subject"]
    assert registry["X-One"] is registry["X-Two"]  # unknown names share the unstructured kind: the cache stays small
    assert registry["To"] is not registry["Subject"]


def test_a_header_read_again_is_not_parsed_again_and_the_kept_ones_are_few():
    msg = BytesParser(policy=DEFAULT).parsebytes(RAW)
    assert msg["Content-Type"] is msg["Content-Type"]  # the email package parses it at every read
    assert msg.get_content_type() == "text/plain" and msg["Content-Type"].params["charset"] == "utf-8"
    registry = DEFAULT.header_factory
    for i in range(3 * CACHED_HEADERS):
        registry("Subject", f"subject {i}")
    assert registry._parsed.cache_info().currsize <= CACHED_HEADERS


def test_a_long_header_is_not_kept_and_one_too_long_is_refused_at_every_read():
    registry = DEFAULT.header_factory
    long = "x" * (CACHED_HEADER_CHARS + 1)
    assert registry("Subject", long) == registry("Subject", long)
    assert registry("Subject", long) is not registry("Subject", long)
    too_long = "a@example.com, " * (MAX_HEADER_CHARS // 15 + 1)
    for _ in range(2):  # an error is never kept as if it were a header
        with pytest.raises(HeaderTooLongError):
            registry("To", too_long)
