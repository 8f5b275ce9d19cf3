"""Files wrapped in other files (a prober's finds): a ZIP archive's PDFs are read; other wrappers are named in
the digest as not read, never taken for one PDF, and a PDF uuencoded with ``uuencode -m`` is read."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest
from helpers import send_for_run_id as send

from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig
from pipeline.stages import parse

ONE, TWO = fx.text_pdf(1, seed=1), fx.text_pdf(2, seed=2)


def _mail(*parts: tuple[bytes, str, str]) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "alice@example.com", "digest@pipeline.local", "files"
    msg.set_content("see attached")
    for data, ctype, name in parts:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def _summary(tmp_path: Path, raw: bytes, **limits) -> dict:
    return parse.summarize_message(raw, tmp_path / "work", IngestConfig(**limits))


def _zip(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def test_every_pdf_in_a_zip_archive_is_read_and_its_other_files_are_listed(tmp_path):
    """A stored ZIP of two PDFs was digested as one document (PDFium read the last PDF in its bytes)."""
    archive = _zip({"docs/one.pdf": ONE, "two.pdf": TWO, "notes.txt": b"hello"})
    info = _summary(tmp_path, _mail((archive, "application/zip", "docs.zip")))
    assert [a["name"] for a in info["attachments"]] == ["one.pdf", "two.pdf"]
    assert [Path(a["path"]).read_bytes() for a in info["attachments"]] == [ONE, TWO]
    assert info["skipped"] == [{"name": "notes.txt", "reason": "not a PDF (in a ZIP archive)"}]


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
                         ids=["deflate", "bzip2", "lzma"])
def test_a_damaged_zip_member_is_an_unread_document_and_the_mails_other_pdfs_are_read(tmp_path, compression):
    """A prober's find: a damaged deflate stream raised zlib.error (LZMAError for LZMA) through the parse, an
    untyped failure retried for nothing, and the mail's good PDF was never digested."""
    archive = bytearray(_zip({"invoice.pdf": fx.text_pdf(3, seed=7)}, compression))
    for i in range(250, 310):  # inside the member's compressed bytes, as a bit-flipped download
        archive[i] ^= 0x5A
    info = _summary(tmp_path, _mail((ONE, "application/pdf", "good.pdf"), (bytes(archive), "application/zip",
                                                                           "invoices.zip")))
    [good, damaged] = info["attachments"]
    assert good["name"] == "good.pdf" and Path(good["path"]).read_bytes() == ONE
    assert damaged["name"] == "invoice.pdf" and damaged["unread"].startswith("in a ZIP archive that cannot be read (")


def test_a_zip_whose_directory_names_an_unknown_version_is_listed_as_unreadable(tmp_path):
    archive = bytearray(_zip({"invoice.pdf": ONE}))
    archive[archive.index(b"PK\x01\x02") + 6] = 149  # "version needed to extract" 14.9: NotImplementedError
    info = _summary(tmp_path, _mail((bytes(archive), "application/zip", "invoices.zip")))
    assert [(a["name"], a["unread"]) for a in info["attachments"]] == [
        ("invoices.zip", "a ZIP archive that cannot be read (zip file version 14.9): its files are not read")]


def test_a_gzip_file_is_read_for_the_one_file_it_holds(tmp_path):
    """A probe's scan.pdf.gz was an unread document (the run partial), and a DMARC report's .xml.gz too."""
    import gzip

    damaged = bytearray(gzip.compress(TWO))
    damaged[40:60] = b"\x00" * 20
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as out:
        info = tarfile.TarInfo("a.pdf")
        info.size = len(ONE)
        out.addfile(info, io.BytesIO(ONE))
    info = _summary(tmp_path, _mail((gzip.compress(ONE), "application/gzip", "scan.pdf.gz"),
                                    (gzip.compress(b"<feedback/>"), "application/gzip", "report.xml.gz"),
                                    (bytes(damaged), "application/octet-stream", "two.pdf.gz"),
                                    (tar.getvalue(), "application/gzip", "docs.tar.gz")))
    [scan, two, docs] = info["attachments"]
    assert scan["name"] == "scan.pdf" and Path(scan["path"]).read_bytes() == ONE
    assert two["name"] == "two.pdf" and two["unread"].startswith("a gzip file that cannot be read (")
    assert docs["name"] == "docs.tar.gz" and docs["unread"] == "a tar archive (gzip-compressed): its files are not read"
    assert info["skipped"] == [{"name": "report.xml", "reason": "not a PDF (in a gzip file)"}]


def test_a_gzip_file_cut_short_is_unreadable_and_one_of_two_members_is_read_whole(tmp_path):
    """A reviewer's finds: a truncated scan.pdf.gz went on as a PDF (failed "corrupt"), a gzip header alone as an
    "empty file", and a file of two gzip members was cut to the first."""
    import gzip

    whole = gzip.compress(TWO)
    two_members = gzip.compress(TWO[:2000]) + gzip.compress(TWO[2000:])
    info = _summary(tmp_path, _mail((whole[:len(whole) * 6 // 10], "application/gzip", "cut.pdf.gz"),
                                    (whole[:10], "application/gzip", "header.pdf.gz"),
                                    (two_members, "application/gzip", "two.pdf.gz")))
    [cut, header, two] = info["attachments"]
    assert cut["unread"] == header["unread"] == "a gzip file that cannot be read (the file is cut short): " + \
        "its files are not read"
    assert two["name"] == "two.pdf" and Path(two["path"]).read_bytes() == TWO


def test_a_gzip_bomb_is_cut_at_the_attachment_limit(tmp_path):
    import gzip

    bomb = gzip.compress(b"%PDF-1.4\n" + b"0" * 5_000_000)  # a few KB inflating to 5 MB
    [item] = _summary(tmp_path, _mail((bomb, "application/gzip", "big.pdf.gz")),
                      max_attachment_bytes=1_000_000)["attachments"]
    assert item["path"] is None and "over the 1,000,000-byte limit" in item["rejected"]


def test_a_zip_member_over_the_attachment_limit_is_rejected_without_reading_it_all(tmp_path):
    bomb = _zip({"big.pdf": b"%PDF-1.4\n" + b"0" * 5_000_000}, zipfile.ZIP_DEFLATED)  # a few KB inflating to 5 MB
    info = _summary(tmp_path, _mail((bomb, "application/zip", "big.zip")), max_attachment_bytes=1_000_000)
    [item] = info["attachments"]
    assert item["name"] == "big.pdf" and "over the 1,000,000-byte limit" in item["rejected"]


def test_wrappers_that_are_not_read_are_named_not_taken_for_a_pdf(tmp_path):
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:  # uncompressed: one PDF's %PDF- in its first KB
        for name, data in (("one.pdf", ONE), ("two.pdf", TWO)):
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))
    tnef = b"\x78\x9f\x3e\x22" + b"\x00" * 40 + ONE  # winmail.dat's signature, a PDF inside
    info = _summary(tmp_path, _mail((tar.getvalue(), "application/x-tar", "docs.tar"),
                                    (tnef, "application/ms-tnef", "winmail.dat"),
                                    (b"0\x82opaque", "application/pkcs7-mime", "smime.p7m"),
                                    (ONE, "text/x-moz-deleted", "Deleted: report.pdf")))
    assert info["skipped"] == [] and [(a["name"], a["path"], a["unread"]) for a in info["attachments"]] == [
        ("docs.tar", None, "a tar archive: its files are not read"),
        ("winmail.dat", None, "an Outlook TNEF wrapper (winmail.dat): its files are not read"),
        ("smime.p7m", None, "an S/MIME wrapper (signed or encrypted): its files are not read"),
        ("Deleted: report.pdf", None, "an attachment the sender's mail program deleted: its files are not read")]


def test_a_split_message_and_an_encrypted_one_are_named_not_read(tmp_path):
    split = (b"From: alice@example.com\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: message/partial; id=\"abc@example.com\"; number=1; total=2\r\n\r\n"
             b"Content-Type: application/pdf; name=split.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             + base64.encodebytes(ONE[:300]) + b"\r\n")
    info = _summary(tmp_path, split)
    assert info["skipped"] == [] and [a["unread"] for a in info["attachments"]] == [
        "a part of a split message (not put together again)"]
    encrypted = (b"From: alice@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/encrypted; "
                 b"protocol=\"application/pgp-encrypted\"; boundary=B\r\n\r\n--B\r\n"
                 b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--B\r\n"
                 b"Content-Type: application/octet-stream; name=encrypted.asc\r\n\r\n"
                 b"-----BEGIN PGP MESSAGE-----\r\nhQEMA\r\n-----END PGP MESSAGE-----\r\n--B--\r\n")
    info = _summary(tmp_path / "e", encrypted)
    assert info["skipped"] == [] and [a["unread"] for a in info["attachments"]] == [
        "an encrypted message (OpenPGP/MIME)"]


def test_a_pdf_uuencoded_with_base64_is_read(tmp_path):
    body = b"here it is\r\nbegin-base64 644 report.pdf\r\n" + base64.encodebytes(ONE) + b"====\r\n"
    raw = b"From: alice@example.com\r\nSubject: scan\r\n\r\n" + body
    info = _summary(tmp_path, raw)
    [item] = info["attachments"]
    assert item["name"] == "report.pdf" and Path(item["path"]).read_bytes() == ONE


def test_a_zip_of_many_pdfs_is_read_up_to_a_budget_and_the_rest_listed(tmp_path):
    """A deflated archive of many members would otherwise write max_attachment_bytes per member to the work dir
    (a bomb of a thousand members: a thousand times the limit)."""
    from pipeline.stages.wrappers import ARCHIVE_BUDGET

    pdf = b"%PDF-1.4\n" + b"0" * 400_000  # 400 KB each, a few KB deflated; each its own (copies are read once)
    archive = _zip({f"p{i}.pdf": pdf[:-2] + b"%02d" % i for i in range(20)}, zipfile.ZIP_DEFLATED)
    info = _summary(tmp_path, _mail((archive, "application/zip", "many.zip")), max_attachment_bytes=1_000_000)
    read = [a for a in info["attachments"] if not a.get("unread")]
    assert len(read) == ARCHIVE_BUDGET * 1_000_000 // len(pdf)  # 10 of 20 fit the budget
    assert all(Path(a["path"]).stat().st_size == len(pdf) for a in read)  # none cut short
    assert [a.get("unread") for a in info["attachments"][len(read):]] == [
        f"not read: its ZIP archive's files are over {ARCHIVE_BUDGET * 1_000_000:,} bytes in all"] * (20 - len(read))
    assert info["skipped"] == []


def test_members_past_the_budget_are_unread_pdfs_only_when_they_may_be_pdfs(tmp_path):
    """A reviewer's find: once the budget was spent, the .jpg files after the PDFs were failed as PDFs that could
    not be read (the run partial for pictures); they are listed as not PDFs, and a member named .pdf or with no
    type in its name is still an unread document."""
    pdf = b"%PDF-1.4\n" + b"0" * (1_000_000 - 9)  # four fill the budget exactly
    files = {f"p{i}.pdf": pdf[:-1] + b"%d" % i for i in range(4)} | {"a.jpg": b"\xff\xd8", "b.pdf": pdf, "README": b"x"}
    info = _summary(tmp_path, _mail((_zip(files), "application/zip", "mixed.zip")), max_attachment_bytes=1_000_000)
    assert [a["name"] for a in info["attachments"] if a.get("unread")] == ["b.pdf", "README"]
    assert [s["name"] for s in info["skipped"]] == ["a.jpg"]


def test_a_mail_whose_only_pdf_is_in_a_wrapper_is_a_partial_success_that_says_why(service_factory, smtp_sink):
    """A winmail.dat (or an S/MIME .p7m) holding the mail's one PDF ended a plain success: the sender's PDF was
    not digested, and only a line under "Parts not digested" said so. Over real SMTP, digest to a real relay."""
    service = service_factory()
    tnef = b"\x78\x9f\x3e\x22" + b"\x00" * 40 + ONE
    raw = _mail((tnef, "application/ms-tnef", "winmail.dat"))
    run = service.engine.wait(send(service, raw), timeout=120)
    assert run.state == "success" and run.partial, run
    assert run.reason == "partial: 1 of 1 ingest_pdf failed (not_read)"
    [digest] = smtp_sink[0].wait_for(1)
    text = digest.get_body(("plain",)).get_content()
    assert "* winmail.dat: could not be read (not_read: an Outlook TNEF wrapper (winmail.dat): its files are not " \
        "read)" in text, text
    assert "no PDF attachments" not in text


def _docx() -> bytes:
    """A real (if tiny) Word file's ZIP: what a sender attaches as contract.pdf by mistake."""
    return _zip({"[Content_Types].xml": b"<Types/>", "_rels/.rels": b"<Relationships/>",
                 "word/document.xml": b"<w:document/>"}, zipfile.ZIP_DEFLATED)


@pytest.mark.parametrize("ctype, name", [("application/pdf", "contract.pdf"), ("application/octet-stream",
                                                                               "contract.pdf"),
                                         ("application/x-pdf", "contract")])
def test_a_zip_labelled_or_named_a_pdf_with_no_pdf_in_it_is_a_document_not_read(tmp_path, ctype, name):
    """A prober's find: a .docx sent as contract.pdf was "document.xml: not a PDF (in a ZIP archive)", the
    sender's name nowhere, and the run a plain success."""
    info = _summary(tmp_path, _mail((_docx(), ctype, name)))
    assert info["skipped"] == [] and [(a["name"], a["path"], a["unread"]) for a in info["attachments"]] == [
        (name, None, "not a PDF but a ZIP archive (a Word or other office file?)")]


def test_a_zip_with_no_pdf_not_claimed_a_pdf_is_listed_under_its_own_name(tmp_path):
    docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    info = _summary(tmp_path, _mail((_docx(), docx, "report.docx"), (_zip({"a.jpg": b"\xff\xd8", "b.jpg": b"\xff\xd8"}),
                                                                            "application/zip", "photos.zip")))
    assert info["attachments"] == [] and info["skipped"] == [
        {"name": "report.docx", "reason": "not a PDF: a ZIP archive with no PDF in it (3 files)"},
        {"name": "photos.zip", "reason": "not a PDF: a ZIP archive with no PDF in it (2 files)"}]


def test_a_zip_named_a_pdf_with_pdfs_in_it_has_its_pdfs_read(tmp_path):
    archive = _zip({"notes.txt": b"hello", "one.pdf": ONE, "readme.md": b"x", "two.pdf": TWO})
    info = _summary(tmp_path, _mail((archive, "application/pdf", "scans.pdf")))
    assert [Path(a["path"]).read_bytes() for a in info["attachments"]] == [ONE, TWO]
    assert info["skipped"] == [{"name": "notes.txt", "reason": "not a PDF (in a ZIP archive)"},
                               {"name": "readme.md", "reason": "not a PDF (in a ZIP archive)"}]


def test_a_word_file_sent_as_a_pdf_makes_the_run_partial_and_the_digest_names_it(service_factory, smtp_sink):
    """Over real SMTP, digest to a real relay: the sender's name and what the file is, as for a PNG named .pdf."""
    service = service_factory()
    run = service.engine.wait(send(service, _mail((_docx(), "application/pdf", "contract.pdf"))), timeout=120)
    assert run.state == "success" and run.partial, run
    assert run.reason == "partial: 1 of 1 ingest_pdf failed (not_read)"
    [digest] = smtp_sink[0].wait_for(1)
    text = digest.get_body(("plain",)).get_content()
    assert "* contract.pdf: could not be read (not_read: not a PDF but a ZIP archive (a Word or other office " \
        "file?))" in text, text
    assert "document.xml" not in text


def test_ingest_of_a_word_file_named_pdf_exits_3(tmp_path):
    path = tmp_path / "contract.pdf"
    path.write_bytes(_docx())
    done = subprocess.run([sys.executable, "-m", "pipeline", "--data-dir", str(tmp_path / "data"), "ingest",
                           str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["reason"] == "partial: 1 of 1 ingest_pdf failed (not_read)"


def test_a_binhex_file_named_pdf_is_an_unread_document_and_a_certificate_file_is_listed(tmp_path):
    """A probe's finds: BinHex text named report.pdf failed "corrupt" (PDFium's data format error), and an S/MIME
    certificates-only .p7c counted as a PDF that could not be read, making its run partial."""
    binhex = b"(This file must be converted with BinHex 4.0)\r\n:$f*TEQKPH#jdCA0d,R0TG!\r\n"
    info = _summary(tmp_path, _mail((binhex, "application/pdf", "report.pdf"),
                                    (b"0\x82\x01\x00", "application/pkcs7-mime", "smime.p7c")))
    assert [(a["name"], a["unread"]) for a in info["attachments"]] == [
        ("report.pdf", "a BinHex file: its files are not read")]
    assert info["skipped"] == [{"name": "smime.p7c", "reason": "not a PDF (application/pkcs7-mime)"}]
    body = _mail().replace(b"see attached", b"Old Mac users saw '(This file must be converted with BinHex 4.0)'.")
    quoted = _summary(tmp_path / "body", body)  # a body quoting the banner is no file (a reviewer's find)
    assert quoted["attachments"] == []
    signed = _summary(tmp_path / "p7m", _mail((b"0\x82\x01\x00", "application/pkcs7-mime", "smime.p7m")))
    assert [a["unread"] for a in signed["attachments"]] == ["an S/MIME wrapper (signed or encrypted): its files are "
                                                            "not read"]  # content inside: as before
