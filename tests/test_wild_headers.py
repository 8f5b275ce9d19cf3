"""Headers as hostile or careless senders write them: each costs at most its own mail, and only when it must.

Found by a prober against a real serve: a 1 MB From: (50,000 addresses) took a minute of a parse worker,
holding up every other mail; comments nested a few hundred deep failed parsing with an untyped RecursionError,
retried; ``Message-ID: <>`` and a missing From: failed mails whose PDFs and envelope sender were fine; a PDF
uuencoded in the body vanished without a word. Raw messages through ``summarize_message`` (SMTP mail carries
the gateway's Return-Path; drop-folder mail does not), and two over real SMTP to a real service.
"""

import base64
import binascii
import time
from pathlib import Path

import pytest
from helpers import send_for_run_id as send

from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig
from pipeline.errors import ParseError
from pipeline.stages import parse
from pipeline.stages.mailpolicy import MAX_HEADER_CHARS

LIMITS = IngestConfig()
PDF = fx.text_pdf(1)
ENVELOPE = b"Return-Path: <alice@example.com>\r\n"  # what the gateway writes above every SMTP message
NESTED = b"(" * 600 + b")" * 600
MANY = ", ".join(f"u{i}@example.com" for i in range(50_000)).encode()  # about 1 MB


def mail(headers: bytes, envelope: bytes = ENVELOPE, body: bytes | None = None) -> bytes:
    """A mail with ``headers`` (give From: among them) and one base64 PDF attachment, or a text ``body`` only."""
    top = envelope + headers + b"Subject: figures\r\nMIME-Version: 1.0\r\n"
    if body is not None:
        return top + b"Content-Type: text/plain\r\n\r\n" + body
    return top + (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
                  b"--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\n"
                  b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(PDF) + b"--B--\r\n")


def summary(raw: bytes, tmp_path: Path) -> dict:
    return parse.summarize_message(raw, tmp_path, LIMITS)


def test_a_megabyte_from_is_not_parsed_and_smtp_mail_is_still_digested(tmp_path):
    started = time.process_time()
    info = summary(mail(b"From: " + MANY + b"\r\n"), tmp_path)
    assert info["from"] == "" and info["return_path"] == "alice@example.com"  # answered at its envelope sender
    assert [a["name"] for a in info["attachments"]] == ["a.pdf"]
    with pytest.raises(ParseError, match=f"^From: cannot parse .*over the {MAX_HEADER_CHARS:,} a parsed header"):
        summary(mail(b"From: " + MANY + b"\r\n", envelope=b""), tmp_path / "drop")  # no envelope: From is all
    assert time.process_time() - started < 30  # CPU seconds, as a bound only: it took about 60 s per mail


def test_a_long_free_text_header_is_cut_not_refused(tmp_path):
    info = summary(mail(b"From: alice@example.com\r\nSubject: " + b"=?utf-8?q?caf=C3=A9?= " * 100_000 + b"\r\n"),
                   tmp_path)
    assert info["subject"].startswith("café") and len(info["attachments"]) == 1


def test_a_content_type_with_fifty_thousand_parameters_is_malformed_email_naming_it(tmp_path):
    params = b"; ".join(b"p%d=v" % i for i in range(50_000))
    raw = mail(b"From: alice@example.com\r\n", body=b"hi\r\n").replace(b"text/plain", b"text/plain; " + params)
    with pytest.raises(ParseError, match="^Content-Type: .*characters long, over the") as err:
        summary(raw, tmp_path)
    assert err.value.reason == "malformed_email"


@pytest.mark.parametrize("name", ["Content-Disposition", "Content-Type"])
def test_comments_nested_too_deep_in_a_part_header_are_malformed_email_naming_the_header(tmp_path, name):
    raw = mail(b"From: alice@example.com\r\n")
    line = b"Content-Type: application/pdf" if name == "Content-Type" else b"Content-Disposition: attachment"
    raw = raw.replace(line, line + b" " + NESTED)
    with pytest.raises(ParseError, match="nested too deep to parse") as err:
        summary(raw, tmp_path)
    assert err.value.reason == "malformed_email" and str(err.value).startswith(name.split("-")[0] + "-")
    assert "MIME: parts nested" not in str(err.value)  # one part: it was reported as MIME nesting


def test_a_mime_tree_too_deep_for_the_parser_is_still_blamed_on_the_nesting(tmp_path):
    """With ~1,000 nested multiparts the stack runs out inside a part's Content-Type parse; the message must
    still name the nesting, not the header (a reviewer's find)."""
    from test_mime import nested

    with pytest.raises(ParseError, match=r"^MIME: parts nested too deep to parse"):
        summary(nested(1000), tmp_path)


def test_a_from_nested_too_deep_is_shown_as_none_for_smtp_mail_and_refused_from_the_drop_folder(tmp_path):
    headers = b"From: alice@example.com " + NESTED + b"\r\nMessage-ID: <a@x> " + NESTED + b"\r\n"
    info = summary(mail(headers), tmp_path)
    assert info["from"] == "" and info["message_id"] is None and len(info["attachments"]) == 1
    with pytest.raises(ParseError, match=r"^From: cannot parse .*\(nested too deep to parse\)"):
        summary(mail(headers, envelope=b""), tmp_path / "drop")


def test_list_mail_resent_by_a_header_nested_too_deep_is_still_list_mail(tmp_path):
    info = summary(mail(b"From: alice@example.com\r\nList-Id: <l.example.com>\r\nResent-From: " + NESTED + b"\r\n"),
                   tmp_path)
    assert info["automated"] == {"kind": "list", "why": "mailing-list mail (List-Id)", "resent_from": ""}


@pytest.mark.parametrize("value", [b"<>", b"<<<>>> junk", b"", b"<a@[ >", b"<a@[ ]>"])
def test_an_unreadable_message_id_costs_only_the_threading(tmp_path, value):
    """A prober's find: ``<a@[ >`` makes Python's header parser raise UnboundLocalError (a NameError, a bug of
    its own), which failed the whole run untyped, every PDF with it."""
    info = summary(mail(b"From: alice@example.com\r\nMessage-ID: " + value + b"\r\n"), tmp_path)
    assert info["message_id"] is None and [a["name"] for a in info["attachments"]] == ["a.pdf"]


@pytest.mark.parametrize("headers", [b"", b"From: undisclosed-recipients:;\r\n", b"From: j\xfcrgen@example.com\r\n"],
                         ids=["no-from", "empty-group", "latin1-address"])
def test_smtp_mail_without_a_usable_from_is_digested_and_drop_folder_mail_is_refused(tmp_path, headers):
    info = summary(mail(headers), tmp_path)
    assert info["from"] == "" and info["return_path"] == "alice@example.com" and len(info["attachments"]) == 1
    with pytest.raises(ParseError, match="^From: ") as err:
        summary(mail(headers, envelope=b""), tmp_path / "drop")
    assert err.value.reason == "malformed_email"


@pytest.mark.parametrize("envelope", [ENVELOPE, b""], ids=["smtp", "drop-folder"])
def test_a_display_name_that_decodes_to_cr_lf_keeps_its_sender(tmp_path, envelope):
    """The email package refuses a whole From: whose encoded display name decodes to CR/LF (an injection
    attempt, or a careless mailer): SMTP mail's digest showed no sender, and drop-folder mail failed "nobody
    to reply to" though its address was fine. The address is kept and the name cleaned to one line."""
    info = summary(mail(b"From: =?utf-8?q?Ann=0D=0ABcc=3A_eve=40x.org?= <ann@example.com>\r\n", envelope),
                   tmp_path)
    assert (info["from"], info["from_name"]) == ("ann@example.com", "Ann Bcc: eve@x.org")
    assert len(info["attachments"]) == 1


@pytest.mark.parametrize("envelope", [ENVELOPE, b""], ids=["smtp", "drop-folder"])
@pytest.mark.parametrize("sender", [b"ceo@bigbank.example <anna@example.com>", b"anna.b@example <anna@example.com>",
                                    b"ceo@bigbank.example\r\n <anna@example.com>"])
def test_an_address_written_as_the_display_name_is_not_taken_for_the_sender(tmp_path, envelope, sender):
    """A prober's find (the shape of MimeKit's issue358 sample): the email package took the unquoted address in
    the display name for the mailbox and dropped the bracketed one, so a drop-folder mail's digest went to a
    third party. The bracketed address is the sender, as mail readers show it."""
    info = summary(mail(b"From: " + sender + b"\r\n", envelope), tmp_path)
    assert info["from"] == "anna@example.com" and info["from_name"] in ("ceo@bigbank.example", "anna.b@example")
    info = summary(mail(b"From: Anna <anna@example.com>, ceo@bigbank.example\r\n", envelope), tmp_path / "two")
    assert info["from"] == "anna@example.com"  # a list of mailboxes: the first, as before
    info = summary(mail(b"From: anna@example.com, bob@other.example <eve@evil.example>\r\n", envelope),
                   tmp_path / "list")
    assert info["from"] == "anna@example.com"  # a reviewer's: a list is no display name


def uuencode(data: bytes, name: str) -> bytes:
    lines = b"".join(binascii.b2a_uu(data[i:i + 45]) for i in range(0, len(data), 45))
    return b"begin 644 " + name.encode() + b"\n" + lines + b"`\nend\n"


def test_a_pdf_uuencoded_in_the_body_is_digested_and_another_file_is_listed(tmp_path):
    body = b"Report attached.\r\n\r\n" + uuencode(PDF, "report.pdf") + b"\r\n" + uuencode(b"a,b\n1,2\n", "t.csv")
    info = summary(mail(b"From: alice@example.com\r\n", body=body), tmp_path)
    assert [a["name"] for a in info["attachments"]] == ["report.pdf"]
    assert Path(info["attachments"][0]["path"]).read_bytes() == PDF
    assert info["skipped"] == [{"name": "t.csv", "reason": "not a PDF (uuencoded in the body)"}]


def test_a_yenc_pdf_in_the_body_is_digested_and_another_file_is_listed(tmp_path):
    """A probe's find: a yEnc PDF in a text body was lost without a word (the digest: no PDF attachments)."""
    body = b"Here it is:\r\n\r\n" + fx.yencoded(PDF, "invoice 2026.pdf") + b"\r\n" + fx.yencoded(b"a,b\n1,2\n", "t.csv")
    assert b"\n=}\r" in fx.yencoded(b"\x13", "eq")  # 0x13 + 42 is "=": escaped, as are NUL, LF and CR
    info = summary(mail(b"From: alice@example.com\r\n", body=body), tmp_path)
    assert [a["name"] for a in info["attachments"]] == ["invoice 2026.pdf"]
    assert Path(info["attachments"][0]["path"]).read_bytes() == PDF
    assert info["skipped"] == [{"name": "t.csv", "reason": "not a PDF (uuencoded in the body)"}]
    assert [data for _, data in parse.uuencoded_files(fx.yencoded(bytes(range(256)) * 3, "all.bin"))] == [
        bytes(range(256)) * 3]


def test_a_uuencoded_block_cut_short_gives_what_it_has_and_a_hostile_body_is_read_once():
    cut = uuencode(PDF, "r.pdf")[:200]  # no end line: the mail was truncated
    [(name, data)] = parse.uuencoded_files(cut)
    whole = (200 - len(b"begin 644 r.pdf\n")) // 62 * 45  # the lines that arrived whole (45 bytes in 62 chars)
    assert name == "r.pdf" and len(data) > whole and data[:whole] == PDF[:whole]
    files = list(parse.uuencoded_files(b"begin 644 x\n" * 200_000))
    assert len(files) == parse.MAX_PARTS and files[0] == ("x", b"")


def test_uuencoded_files_in_many_bodies_count_against_one_bound_for_the_mail(tmp_path):
    """A reviewer's find: 50 text parts of 1,000 empty uuencoded files each made 50,000 attachments from 1 MB."""
    body = b"begin 644 a.pdf\r\nend\r\n" * 1000
    parts = b"".join(b"--B\r\nContent-Type: text/plain\r\n\r\n" + body for _ in range(50))
    top = ENVELOPE + b"From: alice@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    raw = top + parts + b"--B--\r\n"
    with pytest.raises(ParseError, match="more than 1,000 parts"):
        summary(raw, tmp_path)
    assert len(list((tmp_path / "attachments").iterdir())) <= parse.MAX_PARTS


def test_hostile_headers_over_smtp_end_in_one_typed_run_each_and_a_digest_where_one_is_due(service_factory):
    """Through the real parse worker: the nested Content-Type is malformed_email on its first try (it was an
    untyped 'error', retried), and the megabyte From: mail is digested to its envelope sender."""
    service = service_factory()
    nested = mail(b"From: alice@example.com\r\nMessage-ID: <nested@x>\r\n", envelope=b"").replace(
        b"Content-Type: application/pdf", b"Content-Type: application/pdf " + NESTED)
    big_from = mail(b"From: " + MANY + b"\r\nMessage-ID: <many@x>\r\n", envelope=b"")
    failed = service.engine.wait(send(service, nested), timeout=120)
    digested = service.engine.wait(send(service, big_from), timeout=120)
    assert failed.state == "failed" and failed.reason.startswith("parse_email: malformed_email: Content-Type:")
    [parse_task] = [t for t in service.store.get_tasks(failed.run_id) if t.task_id == "parse_email"]
    assert parse_task.try_number == 1, parse_task
    assert digested.state == "success", digested.reason


def test_a_mail_of_hundreds_of_pdfs_keeps_its_result_small_and_says_how_many_were_left_out(tmp_path):
    """A prober's find: 300 one-page PDFs with 100-character names (1.7 MB) made a 77 KB parse result, over the
    store's 64 KB, and the whole run failed bad_output. Now the first PDFs that fit are digested and the digest
    names how many more were left out; their files are removed."""
    import json

    from pipeline.store import MAX_INLINE_OUTPUT

    pdf = fx.text_pdf(1)
    raw = fx.email_with([(f"{i:03d}-" + "n" * 96 + ".pdf", fx.distinct(pdf, i)) for i in range(300)])
    info = summary(raw, tmp_path)
    assert len(json.dumps(info)) <= parse.RESULT_BUDGET < MAX_INLINE_OUTPUT
    kept = len(info["attachments"])
    assert 50 < kept < 300 and [a["name"][:3] for a in info["attachments"]] == [f"{i:03d}" for i in range(kept)]
    assert info["skipped"][-1] == {"name": f"{300 - kept} more PDF(s)", "reason": f"not digested: the first {kept} "
                                   f"PDFs' names fill the {parse.RESULT_BUDGET // 1024} KB a mail's list of PDFs "
                                   "may take"}
    assert len(list((tmp_path / "attachments").iterdir())) == kept


def test_latin1_labels_read_as_windows_1252_and_raw_8bit_names_as_cp1252(tmp_path):
    """A prober's finds: Outlook's curly quotes and dash under an ISO-8859-1 label were dropped ("It s the Q3
    report final"), and a raw Latin-1 sender name showed as "J�rgen"; a raw Latin-1 file name showed as
    "Pr�sentation.pdf" (the email package replaced its bytes before we saw them)."""
    raw = (ENVELOPE + b"From: J\xfcrgen M\xfcller <j@example.com>\r\n"
           b"Subject: =?iso-8859-1?Q?It=92s_the_=93Q3=94_report_=96_final?=\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"Pr\xe4sentation.pdf\"\r\n\r\n"
           + PDF + b"\r\n--B--\r\n")
    info = summary(raw, tmp_path)
    assert info["subject"] == "It\u2019s the \u201cQ3\u201d report \u2013 final"
    assert info["from_name"] == "J\u00fcrgen M\u00fcller"
    assert [a["name"] for a in info["attachments"]] == ["Pr\u00e4sentation.pdf"]


@pytest.mark.parametrize("encoding", ["cp1252", "utf-8"])
def test_raw_8bit_file_names_and_subjects_read_as_utf8_or_else_windows_1252(tmp_path, encoding):
    """Raw 8-bit bytes (no RFC 2047 or 2231 encoding) in a Subject, a Content-Type name and a Content-Disposition
    filename: UTF-8 stays UTF-8 (RFC 6532), anything else is Windows-1252 ("caf\xe9" and the euro sign)."""
    def raw(text: str) -> bytes:
        return text.encode(encoding)

    mail_bytes = (ENVELOPE + b"From: a@example.com\r\nSubject: " + raw("Caf\u00e9 \u20ac") + b"\r\n"
                  b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
                  b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\""
                  + raw("caf\u00e9.pdf") + b"\"\r\n\r\n" + PDF + b"\r\n--B\r\n"
                  b"Content-Type: application/pdf; name=\"" + raw("\u20ac \u00fcber.pdf") + b"\"\r\n\r\n"
                  + fx.distinct(PDF, 2) + b"\r\n--B--\r\n")
    info = summary(mail_bytes, tmp_path)
    assert info["subject"] == "Caf\u00e9 \u20ac"
    assert [a["name"] for a in info["attachments"]] == ["caf\u00e9.pdf", "\u20ac \u00fcber.pdf"]


def test_a_raw_latin1_sender_address_is_still_refused_not_guessed(tmp_path):
    """Only free text and file names are read as Windows-1252: an address that is not UTF-8 names no mailbox."""
    with pytest.raises(ParseError, match="not valid UTF-8"):
        summary(mail(b"From: J\xfcrgen <j\xfcrgen@example.com>\r\n", envelope=b""), tmp_path)


def test_a_long_file_name_cut_for_the_digest_keeps_its_extension():
    name = "Quarterly report of the northern region " * 5 + ".pdf"
    shown = parse.display_name(name, 0)
    assert len(shown) == parse.MAX_NAME_CHARS and shown.endswith("….pdf")


def attached(headers: bytes) -> bytes:
    """A mail whose one PDF part has ``headers`` (its Content-Type and Content-Disposition)."""
    return (ENVELOPE + b"From: a@example.com\r\nSubject: figures\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n" + headers + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(PDF) + b"--B--\r\n")


@pytest.mark.parametrize("headers", [
    b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"Rechnung.pdf\";\r\n"
    b" filename*=utf-8''Rechnung%20M%C3%A4rz.pdf",
    b"Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n"
    b" filename*=utf-8''Rechnung%20M%C3%A4rz.pdf; filename=\"Rechnung.pdf\"",
    b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"Rechnung.pdf\";\r\n"
    b" filename*0*=utf-8''Rechnung%20M%C3%A4; filename*1=\"rz.pdf\"",
    b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"Rechnung.pdf\"; "
    b"filename*=iso-8859-1''Rechnung%20M%E4rz.pdf",
    b"Content-Type: application/pdf; name=\"Rechnung.pdf\"; name*=utf-8''Rechnung%20M%C3%A4rz.pdf",
], ids=["plain-first", "rfc2231-first", "rfc2231-pieces", "latin-1", "content-type-name"])
def test_an_rfc2231_file_name_wins_over_the_plain_one_beside_it(tmp_path, headers):
    """RFC 6266 4.3: the plain ``filename`` is the fallback for old readers. The email package takes the one
    written first, so a mail whose fallback came first was digested as "Rechnung.pdf"."""
    info = summary(attached(headers), tmp_path)
    assert [a["name"] for a in info["attachments"]] == ["Rechnung M\u00e4rz.pdf"]


@pytest.mark.parametrize(("value", "name"), [
    (b"filename*=utf-8''\xe5\xa0\xb1\xe5\x91\x8a.pdf", "\u5831\u544a.pdf"),
    (b"filename=\"a.pdf\"; filename*=utf-8''\xe5\xa0\xb1\xe5\x91\x8a.pdf", "\u5831\u544a.pdf"),
    (b"filename*=utf-8''Rechnung M\xc3\xa4rz.pdf", "Rechnung M\u00e4rz.pdf"),
    (b"filename*=iso-8859-1''M\xe4rz Bericht.pdf", "M\u00e4rz Bericht.pdf"),
], ids=["utf8", "utf8-beside-plain", "utf8-with-space", "latin-1"])
def test_an_rfc2231_name_written_with_raw_8bit_bytes_is_decoded_with_its_charset(tmp_path, value, name):
    """Writers put raw bytes where RFC 2231 wants %-escapes; read as text first, they came out as literal
    ``\\u5831`` escapes (a reviewer's find)."""
    headers = b"Content-Type: application/pdf\r\nContent-Disposition: attachment; " + value
    assert [a["name"] for a in summary(attached(headers), tmp_path)["attachments"]] == [name]


def test_a_plain_file_name_alone_is_read_as_before(tmp_path):
    headers = b"Content-Type: application/pdf; name=\"type.pdf\"\r\nContent-Disposition: attachment; filename=\"a.pdf\""
    assert [a["name"] for a in summary(attached(headers), tmp_path)["attachments"]] == ["a.pdf"]


@pytest.mark.parametrize(("label", "wide", "text"), [
    ("gb2312", "gb18030", "\u9555\u5b57 \u62a5\u544a"),  # 镕 is GBK, not GB 2312
    ("GBK", "gb18030", "\u62a5\u4ef7 \u20ac"),  # the euro sign is in GB18030, not in Python's GBK
    ("ks_c_5601-1987", "cp949", "\ub620 \ubcf4\uace0\uc11c"),  # Outlook's label; 똠 only in Windows-949
    ("big5", "big5hkscs", "\u556b\u5605"),  # Hong Kong characters
], ids=["gb2312", "gbk", "ks_c_5601-1987", "big5"])
def test_a_charset_label_is_read_as_its_superset_like_mail_readers_do(tmp_path, label, wide, text):
    """A mail labelled gb2312 whose subject, sender name and file names hold GBK characters came out with
    U+FFFD (the email package decodes each label strictly); read as GB18030, as mail readers do."""
    data = text.encode(wide)
    word = f"=?{label}?B?{base64.b64encode(data).decode()}?=".encode()
    pct = "".join(f"%{b:02X}" for b in data).encode()
    raw = (ENVELOPE + b"From: " + word + b" <a@example.com>\r\nSubject: " + word + b"\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"" + word + b".pdf\"\r\n\r\n"
           + PDF + b"\r\n--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
           b"filename*=" + label.encode() + b"''" + pct + b".pdf\r\n\r\n" + fx.distinct(PDF, 2) + b"\r\n--B--\r\n")
    info = summary(raw, tmp_path)
    assert (info["subject"], info["from_name"]) == (text, text)
    assert [a["name"] for a in info["attachments"]] == [text + ".pdf"] * 2


@pytest.mark.parametrize(("label", "codec", "text"), [
    ("windows-874", "cp874", "\u0e43\u0e1a\u0e41\u0e08\u0e49\u0e07\u0e2b\u0e19\u0e35\u0e49"),  # Thai Outlook
    ("Windows-31J", "cp932", "\u8acb\u6c42\u66f8"), ("x-sjis", "cp932", "\u8acb\u6c42\u66f8"),  # Java
    ("iso-8859-8-i", "iso8859-8", "\u05de\u05e2\u05e0\u05d4"),
    ("x-mac-cyrillic", "mac-cyrillic", "\u0421\u0447\u0435\u0442"),
])
def test_charset_labels_python_lacks_are_read_as_mail_readers_read_them(tmp_path, label, codec, text):
    """A probe's finds: subjects and file names labelled windows-874, Windows-31J, iso-8859-8-i, x-mac-cyrillic
    came out as U+FFFD (Python's codecs know none of these labels)."""
    data = text.encode(codec)
    word = f"=?{label}?B?{base64.b64encode(data).decode()}?=".encode()
    pct = "".join(f"%{b:02X}" for b in data).encode()
    raw = (ENVELOPE + b"From: alice@example.com\r\nSubject: " + word + b"\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain; charset="
           + label.encode() + b"\r\n\r\n" + data + b"\r\n--B\r\nContent-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; filename*=" + label.encode() + b"''" + pct + b".pdf\r\n\r\n" + PDF
           + b"\r\n--B--\r\n")
    info = summary(raw, tmp_path)
    assert (info["subject"], [a["name"] for a in info["attachments"]]) == (text, [text + ".pdf"])


@pytest.mark.parametrize(("disposition", "name"), [
    (b"attachment; filename=Report Final 2026.pdf", "Report Final 2026.pdf"),
    (b'attachment; filename="C:\\Users\\anna\\Desktop\\Quarterly report.pdf"', "Quarterly report.pdf"),
    (b"attachment; filename==?utf-8?q?caf=C3=A9_report.pdf?=", "caf\u00e9 report.pdf"),
    (b'attachment; filename="a \\"quoted\\" name.pdf"', 'a "quoted" name.pdf'),  # escapes stay escapes
    (b"attachment; filename=plain.pdf; size=3", "plain.pdf"),
    ("attachment; filename=R\u00e9sum\u00e9 final.pdf".encode(), "R\u00e9sum\u00e9 final.pdf"),  # a reviewer's
    (b'attachment; filename="=?utf-8?q?C:\\docs\\caf=C3=A9.pdf?="', "C:\\docs\\caf\u00e9.pdf"),  # as before
], ids=["unquoted-blanks", "windows-path", "unquoted-encoded-word", "escaped-quotes", "plain", "unquoted-8bit",
        "encoded-word-with-backslashes"])
def test_file_names_as_mailers_write_them(tmp_path, disposition, name):
    """A probe's finds: an unquoted name with blanks was cut at the first ("Report"), a Windows path in quotes lost
    its backslashes ("C:UsersannaDesktopQuarterly report.pdf"), an unquoted encoded word gave no name at all."""
    raw = (ENVELOPE + b"From: alice@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B"
           b"\r\n\r\n--B\r\nContent-Type: application/pdf\r\nContent-Disposition: " + disposition + b"\r\n\r\n"
           + PDF + b"\r\n--B--\r\n")
    assert [a["name"] for a in summary(raw, tmp_path)["attachments"]] == [name]


def test_raw_utf8_with_one_damaged_byte_stays_utf8(tmp_path):
    """A probe's find (flanker's russian-attachment-yahoo): one bad byte in a raw UTF-8 file name made the whole
    name Windows-1252 mojibake ("ÐšÐ°Ñ€Ñ‚Ð¸Ð½ÐºÐ°"); a Windows-1252 name stays Windows-1252."""
    damaged = "\u041a\u0430\u0440\u0442\u0438\u043d\u043a\u0430".encode() + b"\xff.pdf"
    raw = (ENVELOPE + b"From: alice@example.com\r\nSubject: caf\xe9\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; filename=\"" + damaged + b"\"\r\n\r\n" + PDF + b"\r\n--B--\r\n")
    info = summary(raw, tmp_path)
    assert [a["name"] for a in info["attachments"]] == ["\u041a\u0430\u0440\u0442\u0438\u043d\u043a\u0430\ufffd.pdf"]
    assert info["subject"] == "caf\u00e9"
    for charset, text in (("gbk", "\u9884\u7b97\u53d1\u7968"), ("euc-kr", "\ud68c\uc758\ub85d\uc548\ub0b4")):
        legacy = (ENVELOPE + b"From: a@example.com\r\nSubject: " + text.encode(charset) + b"\r\nMIME-Version: 1.0\r\n"
                  b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n\r\nbody\r\n")
        assert summary(legacy, tmp_path / charset)["subject"] == text  # a reviewer's: pairs that look like UTF-8


def test_a_character_cut_between_two_encoded_words_is_read_whole(tmp_path):
    """A probe's find: a mailer cut GB2312 subjects between encoded words mid-character, and each word was decoded
    alone: "第三季�炔莆癖". RFC 2047 6.2 drops the blanks between adjacent words: their bytes are read together."""
    text = "\u5173\u4e8e\u7b2c\u4e09\u5b63\u5ea6\u8d22\u52a1\u62a5\u544a"
    data = text.encode("gb2312")
    words = b" ".join(b"=?gb2312?B?" + base64.b64encode(data[i:i + 5]) + b"?=" for i in range(0, len(data), 5))
    assert len(data) % 2 == 0 and 5 % 2  # odd cuts: characters are split
    raw = ENVELOPE + b"From: alice@example.com\r\nSubject: " + words + b"\r\n\r\nbody\r\n"
    assert summary(raw, tmp_path)["subject"] == text
    plain = ENVELOPE + b"From: a@example.com\r\nSubject: =?utf-8?B?" + base64.b64encode("caf\u00e9".encode()) + \
        b"?= and =?utf-8?B?" + base64.b64encode(b"tea") + b"?=\r\n\r\nbody\r\n"
    assert summary(plain, tmp_path / "2")["subject"] == "caf\u00e9 and tea"  # words apart: not joined


def test_machine_made_mail_from_the_drop_folder_needs_no_usable_from(tmp_path):
    """A wild-input probe's find: a bounce (``From: MAILER DAEMON <>``) through ``ingest`` failed malformed_email,
    "nobody to reply to", though machine-made mail is never answered (by SMTP its run succeeded)."""
    info = summary(mail(b"From: MAILER DAEMON <>\r\nAuto-Submitted: auto-generated\r\n", envelope=b""), tmp_path)
    assert info["from"] == "" and info["automated"]["kind"] == "auto" and len(info["attachments"]) == 1


def test_a_mail_with_no_from_header_says_so_not_that_the_header_said_missing(tmp_path):
    with pytest.raises(ParseError, match="^From: no such header: nobody to reply to$"):
        summary(mail(b"", envelope=b""), tmp_path)
    with pytest.raises(ParseError, match="^From: no usable address in 'undisclosed-recipients:;'"):
        summary(mail(b"From: undisclosed-recipients:;\r\n", envelope=b""), tmp_path)


def _eight_bit_mail(subject: bytes, filename: bytes, charset: bytes) -> bytes:
    """A mail whose Subject and PDF name are raw 8-bit bytes (no RFC 2047 or 2231), its text part labelled."""
    return (ENVELOPE + b"From: alice@example.com\r\nSubject: " + subject + b"\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain; charset=" + charset
            + b"\r\n\r\nhi\r\n--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\""
            + filename + b"\"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(PDF) + b"--B--\r\n")


@pytest.mark.parametrize(("charset", "subject", "filename"), [
    ("windows-1251", "Отчёт за квартал", "Отчёт.pdf"), ("gbk", "季度报告", "报告.pdf"),
    ("shift_jis", "四半期報告書", "報告書.pdf"), ("iso-8859-2", "Zpráva za čtvrtletí", "Zpráva.pdf"),
    ("iso-8859-1", "Café “menu”", "café.pdf"),  # Latin-1 labels are read as Windows-1252, as before
])
def test_raw_8bit_headers_are_read_in_the_charset_the_mail_names_for_its_text(tmp_path, charset, subject,
                                                                                 filename):
    """A wild-input probe's find: old clients write the Subject and file name as raw bytes of their charset and
    label only the text part; read as Windows-1252 they came out "Îò÷¸ò çà êâàðòàë"."""
    codec = "cp1252" if charset == "iso-8859-1" else charset
    raw = _eight_bit_mail(subject.encode(codec), filename.encode(codec), charset.encode())
    info = summary(raw, tmp_path)
    assert info["subject"] == subject and [a["name"] for a in info["attachments"]] == [filename]


def test_the_same_raw_header_reads_per_mail_not_as_the_mail_before_it_was_read(tmp_path):
    """Parsed headers are cached by their text; the text of raw bytes depends on the mail's charset."""
    name = "Отчёт.pdf".encode("cp1251")
    first = summary(_eight_bit_mail(b"one", name, b"windows-1251"), tmp_path / "a")
    second = summary(_eight_bit_mail(b"two", name, b"koi8-r"), tmp_path / "b")
    assert first["attachments"][0]["name"] == "Отчёт.pdf"
    assert second["attachments"][0]["name"] == name.decode("koi8-r")
    utf8 = summary(_eight_bit_mail("Отчёт".encode(), "Отчёт.pdf".encode(), b"koi8-r"), tmp_path / "c")
    assert (utf8["subject"], utf8["attachments"][0]["name"]) == ("Отчёт", "Отчёт.pdf")  # UTF-8 first, always
