"""Mail as real clients send it, which Python's email package misreads: the PDF is still found (mime_repair).

Raw messages, byte for byte as scanners, Exchange and phones write them,
through ``summarize_message``; the scanner's mail also over real SMTP to a
real service whose digest reaches a real relay.
"""

import base64
import quopri
from pathlib import Path

import pytest
from helpers import send_for_run_id as send

from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig
from pipeline.errors import ParseError
from pipeline.stages import parse

LIMITS = IngestConfig()
PDF = fx.text_pdf(1)
B64 = base64.encodebytes(PDF).replace(b"\n", b"\r\n")


def mail(headers: bytes, parts: bytes = b"", top: bytes = b"From: Alice <alice@example.com>\r\n",
         boundary: bytes = b"B") -> bytes:
    """``top`` and ``headers``, a multipart/mixed declaration, a blank line, then ``parts`` (a text part and the
    PDF by default) and the closing delimiter."""
    parts = parts or (b"--%s\r\nContent-Type: text/plain\r\n\r\nScan attached.\r\n--%s\r\n" % (boundary, boundary)
                      + b"Content-Type: application/pdf; name=\"scan.pdf\"\r\n"
                      b"Content-Disposition: attachment; filename=\"scan.pdf\"\r\n"
                      b"Content-Transfer-Encoding: base64\r\n\r\n" + B64)
    return (top + headers + b"Message-ID: <wild@example.com>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"%s\"\r\n\r\n%s\r\n--%s--\r\n" % (boundary, parts, boundary))


def pdfs(raw: bytes, tmp_path) -> list[bytes]:
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    return [Path(a["path"]).read_bytes() for a in info["attachments"]]


SCANNER = mail(b"To: d@example.net\r\nSubject: Scanned document from MFP-4521 in building 3,\r\n"
               b"please review before Friday\r\n")  # a long Subject folded without indenting its second line


def test_a_subject_folded_without_indent_keeps_the_mime_structure(tmp_path):
    info = parse.summarize_message(SCANNER, tmp_path, LIMITS)
    assert info["subject"] == "Scanned document from MFP-4521 in building 3, please review before Friday"
    assert info["message_id"] == "<wild@example.com>" and [a["name"] for a in info["attachments"]] == ["scan.pdf"]
    assert pdfs(SCANNER, tmp_path / "again") == [PDF]


@pytest.mark.parametrize("encoding", ["7bit", "base64"])
def test_the_scanners_mail_forwarded_whole_keeps_its_pdf(tmp_path, encoding):
    """A prober's find: the header repair ran on the top message only, so the scanner's mail forwarded as
    message/rfc822 (in clear, or in base64 as Exchange sends it) lost its Content-Type to the body and its PDF
    without a word: "The message had no PDF attachments"."""
    inner = SCANNER if encoding == "7bit" else base64.encodebytes(SCANNER).replace(b"\n", b"\r\n")
    part = (b"--F\r\nContent-Type: text/plain\r\n\r\nSee the scan below.\r\n--F\r\n"
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n" + inner)
    raw = mail(b"Subject: Fwd: scan\r\n", part, boundary=b"F")
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["scan.pdf"] and info["skipped"] == []
    assert pdfs(raw, tmp_path / "again") == [PDF]


@pytest.mark.parametrize(("top", "headers"), [
    (b"From: alice@example.com\r\nX-Broken header without colon\r\n", b"Subject: stray\r\n"),
    (b"From : Alice <alice@example.com>\r\n", b"Subject: obsolete syntax\r\n"),  # RFC 5322 4.5.3
    (b"Return-Path: <alice@example.com>\r\nFrom : alice@example.com\r\n", b"Subject: after the trace\r\n"),
], ids=["stray-line-under-from", "space-before-colon", "space-before-colon-after-return-path"])
def test_a_broken_header_line_costs_neither_the_sender_nor_the_pdf(tmp_path, top, headers):
    info = parse.summarize_message(mail(headers, top=top), tmp_path, LIMITS)
    assert info["from"] == "alice@example.com" and len(info["attachments"]) == 1
    assert pdfs(mail(headers, top=top), tmp_path / "again") == [PDF]


def test_a_body_begun_without_its_blank_line_is_left_as_the_body(tmp_path):
    raw = b"From: alice@example.com\r\nSubject: short\r\nHello there,\r\nno blank line before me.\r\n"
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert info["subject"] == "short" and info["attachments"] == [] and info["skipped"] == []


def forwarded(encoding: bytes, encoded: bytes) -> bytes:
    inner = mail(b"Subject: the original\r\n", top=b"From: Bob <bob@example.org>\r\n", boundary=b"INNER")
    return mail(b"Subject: Fwd: the original\r\n",
                b"--B\r\nContent-Type: text/plain\r\n\r\nForwarding.\r\n--B\r\nContent-Type: message/rfc822\r\n"
                b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + encoded(inner))


@pytest.mark.parametrize(("encoding", "encode"), [
    (b"base64", lambda inner: base64.encodebytes(inner).replace(b"\n", b"\r\n")),
    (b"quoted-printable", lambda inner: quopri.encodestring(inner)),
], ids=["base64", "quoted-printable"])
def test_a_forward_in_base64_or_quoted_printable_gives_its_pdf(tmp_path, encoding, encode):
    info = parse.summarize_message(forwarded(encoding, encode), tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["scan.pdf"] and info["skipped"] == []
    assert pdfs(forwarded(encoding, encode), tmp_path / "again") == [PDF]


@pytest.mark.parametrize("header", [b"Content-Transfer-Encoding: base64 \r\n",
                                    b"Content-Transfer-Encoding: Base64\t\r\n", b""],
                         ids=["trailing-blank", "tab", "missing"])
def test_a_base64_pdf_is_decoded_whatever_its_transfer_encoding_header_says(tmp_path, header):
    part = (b"--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\n"
            + header + b"\r\n" + B64)
    assert pdfs(mail(b"Subject: scanner\r\n", part), tmp_path) == [PDF]


def test_a_file_name_of_four_byte_characters_fits_a_file_system_name(tmp_path):
    name = "\U00020000" * 70 + "." + "\U00020001" * 12
    part = (b"--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename*=utf-8''"
            + "".join(f"%{b:02X}" for b in name.encode()).encode() + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + B64)
    info = parse.summarize_message(mail(b"Subject: long name\r\n", part), tmp_path, LIMITS)
    (item,) = info["attachments"]
    stored = item["path"].rsplit("/", 1)[1]
    assert len(stored.encode()) <= 255 and stored.startswith("000-\U00020000")
    assert Path(item["path"]).read_bytes() == PDF and item["name"].startswith("\U00020000")


def test_the_scanners_mail_is_digested_over_smtp(service_factory, smtp_sink):
    service = service_factory()
    run = service.engine.wait(send(service, SCANNER), timeout=120)
    assert run.state == "success", run.reason
    assert run.dedup_key == "<wild@example.com>"  # the gateway reads the repaired header block too
    text = smtp_sink[0].wait_for(1)[0].get_body(("plain",)).get_content()
    assert "(scan.pdf): 1 page," in text and "no PDF attachments" not in text


def test_an_mbox_from_line_with_8bit_bytes_is_read_and_keyed(tmp_path):
    from pipeline import spool

    raw = b"From caf\xc3\xa9@example.com Mon Jan  1 00:00:00 2026\n" + mail(b"Subject: mbox\r\n")
    assert spool.message_id_of(raw) == "<wild@example.com>"  # the gateway and the drop folder key it
    assert pdfs(raw, tmp_path) == [PDF]


def test_a_quoted_printable_forward_with_long_header_lines_gives_its_pdf(tmp_path):
    long_subject = b"Subject: " + b"a rather long subject line about the quarterly figures " * 3 + b"\r\n"
    inner = mail(long_subject + b"Received: from mx.example.net by mx.example.org with ESMTPS id " + b"x" * 90
                 + b"\r\n", top=b"From: Bob <bob@example.org>\r\n", boundary=b"----=_NextPart_000_0012_01DA" * 3)
    raw = mail(b"Subject: Fwd\r\n", b"--B\r\nContent-Type: message/rfc822\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + quopri.encodestring(inner))
    assert pdfs(raw, tmp_path) == [PDF]


def test_a_forward_labelled_base64_but_sent_in_clear_is_read_as_sent(tmp_path):
    inner = mail(b"Subject: the original\r\n", top=b"From: Bob <bob@example.org>\r\n", boundary=b"INNER")
    raw = mail(b"Subject: Fwd\r\n", b"--B\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n"
               b"\r\n" + inner)
    assert pdfs(raw, tmp_path) == [PDF]


def test_a_boundary_right_under_the_headers_keeps_every_part(tmp_path):
    two = (b"--B\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + B64 + b"--B\r\nContent-Type: application/pdf; name=\"b.pdf\"\r\nContent-Transfer-Encoding: base64\r\n"
           b"\r\n" + base64.encodebytes(fx.distinct(PDF, 2)).replace(b"\n", b"\r\n"))
    raw = mail(b"Subject: no blank line\r\n", two).replace(b"boundary=\"B\"\r\n\r\n--B", b"boundary=\"B\"\r\n--B", 1)
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["a.pdf", "b.pdf"]


def test_a_forward_nested_too_deep_to_print_back_is_malformed_email(tmp_path):
    from pipeline.errors import ParseError

    deep = b"".join(b"Content-Type: multipart/mixed; boundary=\"n%d\"\r\n\r\n--n%d\r\n" % (i, i) for i in range(400))
    raw = mail(b"Subject: deep\r\n", b"--B\r\nContent-Type: message/rfc822\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\nFrom: x@example.org\r\n" + deep)
    with pytest.raises(ParseError) as err:
        parse.summarize_message(raw, tmp_path, LIMITS)
    assert err.value.reason == "malformed_email"


def test_a_lost_fold_starting_with_dashes_is_still_repaired(tmp_path):
    raw = mail(b"Subject: Scan from MFP\r\n-- building 3, please review\r\nTo: d@example.net\r\n")
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert info["subject"] == "Scan from MFP -- building 3, please review" and len(info["attachments"]) == 1


@pytest.mark.parametrize("boundary", [b"----=_NextPart_000_0001_01D2", b"=_a1/b2:c3?d4@e5", b"part(1),2"])
def test_an_unquoted_boundary_with_a_character_that_needs_quotes_still_splits_the_parts(tmp_path, boundary):
    """A wild-input probe's find: the email package cuts ``boundary=----=_NextPart_000`` at the "=", finds no
    part, and the PDF was listed as "multipart without boundary: no PDF found" in a run that succeeded."""
    raw = mail(b"Subject: invoice\r\n", boundary=boundary).replace(b'boundary="%s"' % boundary, b"boundary=" + boundary)
    assert b'"' + boundary not in raw
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["scan.pdf"] and info["skipped"] == []
    assert pdfs(raw, tmp_path / "again") == [PDF]


def test_a_nested_multipart_that_reuses_its_parents_boundary_loses_no_pdf_after_it(tmp_path):
    """Webmail (the Zimbra sample of mail-parser's corpus) nests a multipart/alternative with the boundary of the
    multipart/mixed around it: its closing delimiter closed the parent too, the PDF after it was read as the
    parent's epilogue and lost without a word, and the empty alternative listed as "no PDF found"."""
    parts = (b"--B\r\nContent-Type: multipart/alternative; boundary=\"B\"\r\n\r\n"
             b"--B\r\nContent-Type: text/plain\r\n\r\nSee the invoice.\r\n"
             b"--B\r\nContent-Type: text/html\r\n\r\n<p>See the invoice.</p>\r\n--B--\r\n\r\n"
             b"--B\r\nContent-Type: application/pdf; name=\"invoice.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             + B64)
    raw = mail(b"Subject: invoice\r\n", parts)
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["invoice.pdf"] and info["skipped"] == []
    assert pdfs(raw, tmp_path / "again") == [PDF]


def test_an_epilogue_of_plain_text_adds_no_part(tmp_path):
    raw = mail(b"Subject: scan\r\n") + b"This is the epilogue. --B is not on a line of its own.\r\n"
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["scan.pdf"] and info["skipped"] == []


def test_an_epilogue_of_closing_delimiters_and_parts_is_read_without_an_untyped_error(tmp_path):
    """A reviewer's find: an epilogue that begins with a closing delimiter parsed as a multipart of no parts, and
    adding its text to the parts list failed the parse with a TypeError (untyped, retried)."""
    parts = (b"--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n--B--\r\n--B--\r\n"
             b"--B\r\nContent-Type: application/pdf; name=\"late.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             + B64)
    info = parse.summarize_message(mail(b"Subject: late\r\n", parts), tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["late.pdf"] and info["skipped"] == []



@pytest.mark.parametrize("content_type", [b"application/octet-stream", b"text/plain"])
@pytest.mark.parametrize("name", [b"Forwarded.EML", b"Original message.msg"])
def test_a_mail_attached_as_an_eml_file_has_its_pdf_read(tmp_path, content_type, name):
    """A wild-input probe's find: a forward attached as ``forwarded.eml`` (not message/rfc822) was listed "not a
    PDF (application/octet-stream)", the PDF inside it never read, in a run that succeeded; the next probe's was
    a mail's text named ``.msg``."""
    inner = base64.encodebytes(mail(b"Subject: the scan\r\n")).replace(b"\n", b"\r\n")
    part = (b"--F\r\nContent-Type: text/plain\r\n\r\nForwarding the scan.\r\n--F\r\n"
            b"Content-Type: " + content_type + b"; name=\"" + name + b"\"\r\n"
            b"Content-Disposition: attachment; filename=\"" + name + b"\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + inner)
    raw = mail(b"Subject: Fwd: scan\r\n", part, boundary=b"F")
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["scan.pdf"] and info["skipped"] == []
    assert pdfs(raw, tmp_path / "again") == [PDF]


OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)  # a compound file's header: Outlook's .msg, old .doc


@pytest.mark.parametrize("content_type", [b"application/vnd.ms-outlook", b"application/octet-stream"])
def test_an_attached_outlook_message_is_not_read_and_says_so(tmp_path, content_type):
    """A probe's find: an attached .msg (a forward from Outlook, which may hold PDFs) was a plain "not a PDF" in a
    run that succeeded; like winmail.dat, it is an item that fails not_read, so the run ends partial."""
    part = (b"--F\r\nContent-Type: " + content_type + b"; name=\"Fwd Contract.msg\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(OLE).replace(b"\n", b"\r\n"))
    info = parse.summarize_message(mail(b"Subject: Fwd: contract\r\n", part, boundary=b"F"), tmp_path, LIMITS)
    assert [(a["name"], a.get("unread")) for a in info["attachments"]] == [
        ("Fwd Contract.msg", "an Outlook message (.msg): its files are not read")]


def test_an_old_word_document_is_not_taken_for_an_outlook_message(tmp_path):
    part = (b"--F\r\nContent-Type: application/msword; name=\"report.doc\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(OLE).replace(b"\n", b"\r\n"))
    info = parse.summarize_message(mail(b"Subject: report\r\n", part, boundary=b"F"), tmp_path, LIMITS)
    assert info["attachments"] == [] and info["skipped"] == [{"name": "report.doc",
                                                              "reason": "not a PDF (application/msword)"}]


def test_an_outlook_msg_file_given_as_a_mail_is_named_for_what_it_is(tmp_path):
    with pytest.raises(ParseError, match="^not an email: an Outlook .msg file"):
        parse.summarize_message(OLE, tmp_path, LIMITS)


def test_a_forward_attached_as_a_file_that_cannot_be_parsed_is_listed_and_the_mail_still_read(tmp_path):
    """A reviewer's find: a forwarded .eml of 1,001 parts failed the whole mail (malformed_email), its PDF beside
    it with it; before the .eml repair it was listed "not a PDF". The repair gives up and lists it again."""
    inner = (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=I\r\n\r\n"
             + b"--I\r\nContent-Type: text/plain\r\n\r\nx\r\n" * 1001 + b"--I--\r\n")
    part = (b"--F\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + B64 + b"--F\r\nContent-Type: application/octet-stream; name=\"fw.eml\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(inner).replace(b"\n", b"\r\n"))
    info = parse.summarize_message(mail(b"Subject: Fwd\r\n", part, boundary=b"F"), tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["scan.pdf"]
    assert info["skipped"] == [{"name": "fw.eml", "reason": "not a PDF (application/octet-stream)"}]


def test_a_note_named_eml_that_is_no_mail_is_still_listed(tmp_path):
    """A reviewer's find: ``notes.eml`` holding "Note: call me" was read as a mail of no parts and vanished from
    the digest's list; a parse with none of a mail's headers leaves the part as it was."""
    part = (b"--F\r\nContent-Type: text/plain; name=\"notes.eml\"\r\n"
            b"Content-Disposition: attachment; filename=\"notes.eml\"\r\n\r\nNote: call me\r\n")
    info = parse.summarize_message(mail(b"Subject: notes\r\n", part, boundary=b"F"), tmp_path, LIMITS)
    assert info["skipped"] == [{"name": "notes.eml", "reason": "not a PDF (text/plain)"}]


def test_a_second_content_type_naming_the_multipart_is_read(tmp_path):
    """A probe's find (SpamAssassin's badmime2 has the shape): a stray ``Content-Type: text/plain`` above the real
    multipart one; the parser reads the first only, and the mail's PDF vanished in a run that succeeded."""
    raw = mail(b"Content-Type: text/plain\r\n")
    assert raw.index(b"Content-Type: text/plain\r\n") < raw.index(b"Content-Type: multipart/mixed")
    assert pdfs(raw, tmp_path) == [PDF]
    info = parse.summarize_message(mail(b"Content-Type: text/plain\r\n", boundary=b"C").replace(
        b"--C", b"--D"), tmp_path / "other", LIMITS)  # its delimiter lines are not in the body: text, as before
    assert info["attachments"] == []


def test_base64_encoded_in_padded_pieces_is_decoded_whole(tmp_path):
    """A probe's find: a script that base64-encodes each 1,000 bytes it reads pads each piece, and the email
    package stopped at the first padding: the PDF was its first 1,000 bytes, failed "corrupt"."""
    pieces = b"".join(base64.encodebytes(PDF[i:i + 1000]) for i in range(0, len(PDF), 1000))
    assert pieces.count(b"=") > 1 and len(PDF) % 1000  # padding inside, not only at the end
    raw = mail(b"", b"--B\r\nContent-Type: application/pdf; name=\"chunks.pdf\"\r\n"
                    b"Content-Transfer-Encoding: base64\r\n\r\n" + pieces.replace(b"\n", b"\r\n"))
    assert pdfs(raw, tmp_path) == [PDF]


@pytest.mark.parametrize("prefix", [b"\xef\xbb\xbf", b"\r\n\r\n", b"\xef\xbb\xbf\n"],
                         ids=["bom", "blank-lines", "both"])
def test_a_byte_order_mark_or_blank_lines_before_the_headers_are_ignored(tmp_path, prefix):
    """A probe's finds (files a Windows tool or a script saved): a BOM failed the mail "From: no such header", and
    blank lines first "not an email: no header block"."""
    info = parse.summarize_message(prefix + mail(b"Subject: saved\r\n"), tmp_path, LIMITS)
    assert (info["from"], info["subject"], len(info["attachments"])) == ("alice@example.com", "saved", 1)
