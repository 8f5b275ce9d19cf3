"""Every PDF anywhere in the MIME tree is found; what is not digested is listed with its reason (issue 11).

Real raw messages go through ``summarize_message``; the end-to-end cases go
over real SMTP to a real service whose digest reaches a real relay.
"""

import base64
import threading
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
from helpers import send_for_run_id as send

from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig
from pipeline.errors import ParseError
from pipeline.stages import digest, parse, text_normal

LIMITS = IngestConfig()
PDF = fx.text_pdf(1)
KINDS = (b"mixed", b"alternative", b"related")


def pdf_part(name: bytes = b"deep.pdf", data: bytes = PDF) -> bytes:
    return (b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"" + name + b"\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(data).replace(b"\n", b"\r\n"))


def nested(depth: int, inner: bytes = b"") -> bytes:
    """A mail whose ``inner`` part sits inside ``depth`` nested multiparts (mixed, alternative, related, ...)."""
    opening = b"".join(b'Content-Type: multipart/%s; boundary="b%d"\r\n\r\n--b%d\r\n' % (KINDS[i % 3], i, i)
                       for i in range(depth))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return (b"From: alice@example.com\r\nSubject: nested\r\nMessage-ID: <nested@example.com>\r\n"
            b"MIME-Version: 1.0\r\n" + opening + (inner or pdf_part()) + closing)


def without_boundary(body: bytes, headers: bytes = b"") -> bytes:
    return (b"From: alice@example.com\r\nSubject: no boundary\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed\r\n" + headers + b"\r\n" + body)


def empty_parts(count: int) -> bytes:
    return (b"From: alice@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            + b"--b\r\n\r\n" * count + b"--b--\r\n")


def forward(inner: EmailMessage, pdfs: list[tuple[str, bytes]] = ()) -> EmailMessage:
    """``inner`` attached as message/rfc822, as a mail client forwards it, beside ``pdfs``."""
    outer = EmailMessage()
    outer["From"] = "alice@example.com"
    outer["Subject"] = "Fwd: " + str(inner["Subject"])
    outer.set_content("Forwarding this.")
    for name, data in pdfs:
        outer.add_attachment(data, maintype="application", subtype="pdf", filename=name)
    outer.add_attachment(inner)
    return outer


def mail(pdfs: list[tuple[str, bytes]], subject: str = "original") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "carol@example.org"
    msg["Subject"] = subject
    msg.set_content("see attached")
    for name, data in pdfs:
        msg.add_attachment(data, maintype="application", subtype="pdf", filename=name)
    return msg


@pytest.mark.parametrize("depth", range(1, LIMITS.max_mime_depth + 1))
def test_a_pdf_nested_at_any_depth_up_to_the_limit_is_found(tmp_path, depth):
    info = parse.summarize_message(nested(depth), tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["deep.pdf"] and info["skipped"] == []
    assert Path(info["attachments"][0]["path"]).read_bytes() == PDF


def test_nesting_one_level_past_the_limit_is_malformed_email(tmp_path):
    too_deep = LIMITS.max_mime_depth + 1
    with pytest.raises(ParseError, match=f"nested {too_deep} levels deep, over the limit of") as err:
        parse.summarize_message(nested(too_deep), tmp_path, LIMITS)
    assert err.value.reason == "malformed_email"
    parse.summarize_message(nested(5), tmp_path, IngestConfig(max_mime_depth=5))
    with pytest.raises(ParseError, match="over the limit of 4"):
        parse.summarize_message(nested(5), tmp_path, IngestConfig(max_mime_depth=4))


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "worker-thread"])
def test_mime_nested_a_thousand_deep_is_malformed_email_not_recursion_error(tmp_path, in_thread):
    outcome: list[BaseException] = []

    def attempt():
        try:
            parse.summarize_message(nested(1000), tmp_path, LIMITS)
        except BaseException as exc:  # noqa: BLE001 - the test wants to see whatever comes out
            outcome.append(exc)

    if in_thread:  # the runner parses in a thread: a smaller stack must not turn into a crash either
        worker = threading.Thread(target=attempt)
        worker.start()
        worker.join(timeout=120)
    else:
        attempt()
    assert len(outcome) == 1 and type(outcome[0]) is ParseError, outcome
    assert outcome[0].reason == "malformed_email" and "nested" in str(outcome[0])
    assert not isinstance(outcome[0].__cause__, RecursionError) and outcome[0].__suppress_context__


@pytest.mark.parametrize(("body", "headers"), [
    (PDF, b""),
    (base64.encodebytes(PDF), b"Content-Transfer-Encoding: base64\r\n"),
    (base64.encodebytes(PDF), b""),  # base64 with no header saying so, as some clients send it
], ids=["raw-pdf", "base64", "base64-undeclared"])
def test_a_multipart_without_boundary_that_is_a_pdf_is_digested(tmp_path, body, headers):
    info = parse.summarize_message(without_boundary(body, headers), tmp_path, LIMITS)
    assert [a["size"] for a in info["attachments"]] == [len(PDF)] and info["skipped"] == []
    assert Path(info["attachments"][0]["path"]).read_bytes() == PDF


def test_a_multipart_without_boundary_and_no_pdf_is_listed_as_skipped(tmp_path):
    info = parse.summarize_message(without_boundary(b"just some text\r\n"), tmp_path, LIMITS)
    assert info["attachments"] == []
    assert info["skipped"] == [{"name": "attachment-1", "reason": parse.NO_PDF_WITHOUT_BOUNDARY}]


def test_a_boundaryless_multipart_nested_in_a_good_one_is_read_too(tmp_path):
    inner = (b"Content-Type: multipart/related\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             + base64.encodebytes(PDF).replace(b"\n", b"\r\n"))
    info = parse.summarize_message(nested(2, inner), tmp_path, LIMITS)
    assert [a["size"] for a in info["attachments"]] == [len(PDF)]


def test_pdfs_in_forwarded_messages_are_digested(tmp_path):
    inner = forward(mail([("inner.pdf", PDF)], "twice forwarded"), [("middle.pdf", fx.text_pdf(2))])
    raw = forward(inner, [("outer.pdf", fx.text_pdf(3))]).as_bytes(policy=SMTP)
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["outer.pdf", "middle.pdf", "inner.pdf"]
    assert info["skipped"] == [] and info["from"] == "alice@example.com"


def test_body_text_is_not_listed_but_every_other_part_is(tmp_path):
    msg = mail([])
    msg.add_alternative("<p>see attached</p>", subtype="html")  # the body: multipart/alternative
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="a.pdf")
    msg.add_attachment(b"PK\x03\x04 not really", maintype="application", subtype="zip", filename="notes.zip")
    msg.add_attachment("a note", filename="note.txt")
    info = parse.summarize_message(msg.as_bytes(policy=SMTP), tmp_path, LIMITS)
    assert [(a["name"], a.get("unread")) for a in info["attachments"]] == [
        ("a.pdf", None), ("notes.zip", "a ZIP archive that cannot be read (File is not a zip file): its files are not "
                          "read")]  # it may hold PDFs: its ingest_pdf fails as not_read
    assert info["skipped"] == [{"name": "note.txt", "reason": "not a PDF (text/plain)"}]


def test_a_thousand_parts_are_read_and_one_more_is_malformed_email(tmp_path):
    info = parse.summarize_message(empty_parts(parse.MAX_PARTS - 1), tmp_path, LIMITS)
    assert info["attachments"] == info["skipped"] == []  # empty parts are text/plain without a name: body text
    for count in (parse.MAX_PARTS, 100_000):  # the second is refused by the scan before any parsing
        with pytest.raises(ParseError, match="more than 1,000 parts") as err:
            parse.summarize_message(empty_parts(count), tmp_path, LIMITS)
        assert err.value.reason == "malformed_email"


def _parts_bomb(spelling: str, parts: int = 20_000) -> bytes:
    """``parts`` empty parts under a boundary spelled as the raw-byte scan of check_part_count does not read."""
    boundary, end = (b"B" * 250, b"\r\n") if spelling == "long" else (b"ABCD", b"\r" if spelling == "cr" else b"\r\n")
    param = b'boundary*0="AB"; boundary*1="CD"' if spelling == "rfc2231" else b'boundary="' + boundary + b'"'
    head = b"From: a@example.com" + end + b"MIME-Version: 1.0" + end + b"Content-Type: multipart/mixed; " + param
    return head + end + end + (b"--" + boundary + end + end) * parts + b"--" + boundary + b"--" + end


@pytest.mark.parametrize("spelling", ["rfc2231", "cr", "long"])
def test_parts_are_counted_by_the_parser_whatever_the_boundarys_spelling(spelling):
    """A prober's find: a boundary in RFC 2231 pieces, bare-CR line ends or a 250-character boundary passed the
    byte scan, and the parser built every part: 400,000 of them held a parse worker for 45 s while every other
    mail's parse waited. The parser itself stops at part MAX_PARTS + 1 (it used to parse all, and only the
    walk over the parts refused them)."""
    with pytest.raises(ParseError, match="more than 1,000 parts") as err:
        parse.parse_message(_parts_bomb(spelling))
    assert err.value.reason == "malformed_email"


def _multipart(*parts: bytes, kind: bytes = b"mixed") -> bytes:
    body = b"".join(b"--P\r\n" + part + b"\r\n" for part in parts)
    return (b"From: alice@example.com\r\nSubject: wild\r\nMIME-Version: 1.0\r\nContent-Type: multipart/" + kind +
            b'; boundary="P"\r\n\r\n' + body + b"--P--\r\n")


def test_pdfs_as_mailers_in_the_wild_label_them_are_digested_and_mac_file_information_is_not(tmp_path):
    """Prober's finds: a base64 PDF as application/x-pdf without a Content-Transfer-Encoding, and PDFs behind a
    BOM, blank lines or NULs (PDFium reads them) were listed "not a PDF"; AppleDouble's resource fork, named
    like the PDF it describes, was digested as a second, "corrupt" report.pdf."""
    b64 = base64.encodebytes(PDF).replace(b"\n", b"\r\n")
    raw = _multipart(
        b'Content-Type: application/x-pdf; name="Rechnung"\r\n\r\n' + b64,
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"\xef\xbb\xbf\r\n" + b"\x00" * 64 + fx.distinct(PDF, 2)).replace(b"\n", b"\r\n"),
        b'Content-Type: multipart/appledouble; boundary="A"\r\n\r\n--A\r\n'
        b'Content-Type: application/applefile; name="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        b"AAUWBwACAAA=\r\n--A\r\n" + pdf_part(b"report.pdf", fx.distinct(PDF, 3)) + b"\r\n--A--")
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["Rechnung", "attachment-2", "report.pdf"]
    assert all(Path(a["path"]).read_bytes().startswith(PDF) for a in info["attachments"])
    assert info["skipped"] == [{"name": "report.pdf", "reason": "not a PDF (application/applefile: Mac file "
                                                                "information)"}]


def test_the_same_pdf_attached_twice_is_digested_once_and_the_copy_listed(tmp_path):
    """A forward with the original re-attached, a ZIP holding the attached PDF, the same file under another
    name: each copy was extracted and digested again. A copy is listed, naming the document it repeats."""
    import io
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("inner.pdf", PDF)
    other = fx.text_pdf(1, seed=2)
    raw = _multipart(pdf_part(b"report.pdf"), pdf_part(b"other.pdf", other), pdf_part(b"copy.pdf"),
                     b"Content-Type: application/zip; name=a.zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                     + base64.encodebytes(archive.getvalue()), pdf_part(b"again.pdf", b"\r\n\r\n" + other))
    info = parse.summarize_message(raw, tmp_path, LIMITS)
    assert [a["name"] for a in info["attachments"]] == ["report.pdf", "other.pdf"]
    assert info["skipped"] == [{"name": "copy.pdf", "reason": "the same file as report.pdf (above)"},
                               {"name": "inner.pdf", "reason": "the same file as report.pdf (above)"},
                               {"name": "again.pdf", "reason": "the same file as other.pdf (above)"}]
    assert sorted(p.name for p in (tmp_path / "attachments").iterdir()) == ["000-report.pdf", "001-other.pdf"]


def test_copies_of_a_pdf_over_the_size_limit_are_each_rejected(tmp_path):
    raw = _multipart(pdf_part(b"big.pdf"), pdf_part(b"big-copy.pdf"))
    info = parse.summarize_message(raw, tmp_path, IngestConfig(max_attachment_bytes=len(PDF) - 1))
    assert [(a["name"], a["path"], "over the" in a["rejected"]) for a in info["attachments"]] == [
        ("big.pdf", None, True), ("big-copy.pdf", None, True)]


def test_what_a_part_or_a_pdf_title_says_reaches_the_digest_without_control_characters(tmp_path):
    """A prober's find: a Content-Type with NUL, backspaces and a terminal escape, and a PDF title with BEL, NUL
    and U+202E (turning "exe.fdp" into "pdf.exe", the spoof names are cleaned of), reached the digest as sent."""
    raw = _multipart(b"Content-Type: application/x-\x00\x08\x1b[2J; name=n.bin\r\n\r\nbinary")
    [skipped] = parse.summarize_message(raw, tmp_path, LIMITS)["skipped"]
    assert skipped["reason"].isprintable() and skipped["reason"].startswith("not a PDF (application/x-")
    title = text_normal.pick_title("Invoice \u202eexe.fdp \x07\x00end", "")
    assert title == "Invoice exe.fdp end"


def test_skipped_parts_and_their_reasons_are_in_the_digest():
    email = {"subject": "s", "from": "a@example.com",
             "skipped": [{"name": "notes.zip", "reason": "not a PDF (application/zip)"},
                         {"name": "<b>x</b>", "reason": parse.NO_PDF_WITHOUT_BOUNDARY}, "old-style.doc"]}
    rendered = digest.render_digest(email, [])
    assert "* notes.zip: not a PDF (application/zip)" in rendered.text
    assert f"* <b>x</b>: {parse.NO_PDF_WITHOUT_BOUNDARY}" in rendered.text
    assert "* old-style.doc: not a PDF" in rendered.text  # a run parsed before the reasons existed
    assert "&lt;b&gt;x&lt;/b&gt;: multipart whose parts" in rendered.html and "<b>x" not in rendered.html




def test_nested_forwarded_and_skipped_parts_reach_the_digest_over_smtp(service_factory, smtp_sink):
    service = service_factory()
    msg = forward(mail([("forwarded.pdf", fx.text_pdf(2))]), [("direct.pdf", PDF)])
    msg.add_attachment(b"\x00\x01", maintype="application", subtype="octet-stream", filename="blob.bin")
    run = service.engine.wait(send(service, msg.as_bytes(policy=SMTP)), timeout=120)
    assert run.state == "success", run.reason
    text = smtp_sink[0].wait_for(1)[0].get_body(("plain",)).get_content()
    assert "(direct.pdf): 1 page," in text and "(forwarded.pdf): 2 pages" in text
    assert "* blob.bin: not a PDF (application/octet-stream)" in text


def test_mime_a_thousand_deep_over_smtp_fails_the_run_as_malformed_email(service_factory):
    service = service_factory()
    run = service.engine.wait(send(service, nested(1000)), timeout=120)
    assert run.state == "failed" and run.reason.startswith("parse_email: malformed_email"), run.reason
    parse_task = {t.task_id: t for t in service.store.get_tasks(run.run_id)}["parse_email"]
    assert parse_task.error_type == "malformed_email" and "nested" in parse_task.error_message
    assert "RecursionError" not in (parse_task.error_message or "")

