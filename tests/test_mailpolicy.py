"""The stages' email policy: the standard library's, with each header class made once."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser

from pipeline.stages.mailpolicy import DEFAULT

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
