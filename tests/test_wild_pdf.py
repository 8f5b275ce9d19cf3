"""PDFs as broken writers and other tools make them: a lying page count, a certificate-encrypted file, an empty
page tree, a bomb through a filter other than Flate. Each ends the same way with both engines, typed.

Real PDF bytes through ``ingest_pdf`` (in its capped worker processes) with PDFium and with pypdf; the title
over real SMTP to a real service, into the digest a real relay receives.
"""

from pathlib import Path

import pytest
from helpers import send_for_run_id as send

from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig
from pipeline.errors import CorruptPdfError, EncryptedPdfError, PdfTooLargeError
from pipeline.stages import parse, pdf_text
from pipeline.stages.ingest import ingest_pdf

ENGINES = ["pdfium", "pypdf"]


def ingest(tmp_path: Path, pdf: bytes, engine: str, **limits):
    path = tmp_path / "in.pdf"
    path.write_bytes(pdf)
    return ingest_pdf(path, tmp_path / "out.txt", IngestConfig(engine=engine, **limits))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_page_tree_claiming_more_pages_than_the_limit_is_read_for_what_it_has(tmp_path, engine):
    result = ingest(tmp_path, fx.miscounted_pdf(1, 1_000_000), engine, max_pages=10)
    assert (result.pages, result.pages_failed) == (1, 0)
    assert (tmp_path / "out.txt").read_text().strip() == "page 1"
    with pytest.raises(PdfTooLargeError, match="11 pages, over the 10-page limit"):  # a real 11-page file still is
        ingest(tmp_path, fx.miscounted_pdf(11, 11), engine, max_pages=10)
    result = ingest(tmp_path, fx.miscounted_pdf(3, 40), engine, max_pages=10)  # 3 real pages behind /Count 40
    assert (result.pages, result.pages_failed) == (3, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_security_handler_the_engine_cannot_open_is_encrypted_not_corrupt(tmp_path, engine):
    pdf = fx.text_pdf(1, encrypt="rc4").replace(b"/Standard", b"/Unknown1")  # as a certificate handler would be
    with pytest.raises(EncryptedPdfError, match="security handler") as err:
        ingest(tmp_path, pdf, engine)
    assert err.value.reason == "encrypted" and not err.value.retryable


@pytest.mark.parametrize("engine", ENGINES)
def test_an_empty_page_tree_is_corrupt_with_both_engines(tmp_path, engine):
    with pytest.raises(CorruptPdfError) as err:
        ingest(tmp_path, fx.miscounted_pdf(0, 0), engine)
    assert err.value.reason == "corrupt"


def test_max_decompressed_bytes_caps_run_length_streams_too(tmp_path):
    pdf = fx.run_length_pdf(4 * 1024 * 1024)  # 64 KB inflating to 4 MB
    with pytest.raises(PdfTooLargeError, match="over a pypdf limit"):
        ingest(tmp_path, pdf, "pypdf", max_decompressed_bytes=1024 * 1024)
    assert ingest(tmp_path, pdf, "pypdf", max_decompressed_bytes=8 * 1024 * 1024).pages == 1


def test_the_documents_title_reaches_the_digest(service_factory, smtp_sink):
    service = service_factory()
    pdf = fx.typeset_pdf([b"Quarterly figures for the northern region."], title=b"Northern Region Q3")
    run = service.engine.wait(send(service, fx.email_with([("q3.pdf", pdf)], message_id="<title@x>")), timeout=120)
    assert run.state == "success", run.reason
    text = smtp_sink[0].wait_for(1)[0].get_body(("plain",)).get_content()
    assert '* "Northern Region Q3" (q3.pdf): 1 page,' in text


@pytest.mark.parametrize("engine", ENGINES)
def test_a_page_tree_claiming_a_million_pages_with_none_is_corrupt_not_too_large(tmp_path, engine):
    with pytest.raises(CorruptPdfError):
        ingest(tmp_path, fx.miscounted_pdf(0, 1_000_000), engine, max_pages=10)


def _plain_pdf_saying_encrypt() -> bytes:
    """No encryption, an empty page tree, and a stream whose text mentions /Encrypt (a prober's file)."""
    note = b"% see /Encrypt in the spec"
    return fx._pdf_of_objects([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>",
                               b"<< /Length %d >>\nstream\n" % len(note) + note + b"\nendstream"])


def test_a_plain_file_after_an_encrypted_one_is_corrupt_not_encrypted(tmp_path):
    """pypdfium2 reported a document that loads with no page with the error code an earlier failure had left: a
    plain page-less file read after an encrypted one was encrypted (its bytes mentioned /Encrypt), or corrupt
    "(PDFium: Incorrect password error)"; and it never closed such a document (the fd check below)."""
    in_this_thread = {"isolate": False}
    with pytest.raises(EncryptedPdfError):
        ingest(tmp_path, fx.text_pdf(1, encrypt="aes", user_password="secret"), "pdfium", **in_this_thread)
    for pdf in (_plain_pdf_saying_encrypt(), fx.miscounted_pdf(0, 0)):
        with pytest.raises(CorruptPdfError) as err:
            ingest(tmp_path, pdf, "pdfium", **in_this_thread)
        assert str(err.value) == "PDFium: the document has no pages"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_page_count_that_lies_under_the_limit_is_read_for_what_the_file_has(tmp_path, engine):
    """One page behind /Count 4,999 was "4,999 pages, 4,998 could not be read" with PDFium (only a claim over
    the page limit was checked)."""
    result = ingest(tmp_path, fx.miscounted_pdf(1, 4999), engine)
    assert (result.pages, result.pages_failed) == (1, 0)


def test_an_error_text_from_the_file_reaches_no_one_with_its_control_characters(tmp_path):
    """A filter name is the file's own text: pypdf's "Unsupported filter /Evil..." carried terminal escapes,
    BEL, U+202E and a CR/LF (a forged log line) into the digest, serve's log and `show`."""
    import zlib

    content = zlib.compress(b"BT /F1 12 Tf 72 720 Td (page 1) Tj ET")
    evil = b"/Evil#1b#5d0;pwned#07#1b#5b2J#0d#0aInjected#3a#20yes#e2#80#ae"
    pdf = fx._raw_pdf([content]).replace(b"/Filter /FlateDecode", b"/Filter " + evil)
    try:
        result = ingest(tmp_path, pdf, "pypdf")  # PDFium skips a filter it does not know, saying nothing
        said = result.page_error
    except CorruptPdfError as exc:  # no page could be read
        said = str(exc)
    assert said, "the engine read a page it cannot decode"
    assert not any(ch in said for ch in "\x1b\x07\r\n\u202e"), repr(said)


def test_damaged_pages_in_the_middle_and_at_the_end_hide_no_page_after_them(tmp_path):
    """A reviewer's find: with the page count checked from the last page down by bisection, pages 5 and 10 of 10
    damaged made it "4 pages, 0 failed": pages 6-9 were never read and no page was said unreadable."""
    import zlib

    pdf = fx._raw_pdf([zlib.compress(b"BT /F1 12 Tf 72 720 Td (page %d) Tj ET" % (i + 1)) for i in range(10)])
    for page in (4, 9):  # each page object's own number: 4 + 2 * index (fixtures._raw_pdf)
        number = 4 + 2 * page
        pdf = pdf.replace(b"\n%d 0 obj\n<< /Type /Page " % number, b"\n%d 0 obj\n<< /Type /Broken " % number)
    result = ingest(tmp_path, pdf, "pdfium")
    assert (result.pages, result.pages_failed) == (10, 2)
    text = (tmp_path / "out.txt").read_text()
    assert all(f"page {n}" in text for n in (1, 2, 3, 4, 6, 7, 8, 9))


# what mail gateways and broken writers put before a PDF's header: past PDFium's 1 KB it failed "corrupt"
JUNK = [b"G" * 2000, b"X-Mailer-Junk: yes\r\nContent-Type: application/pdf\r\n\r\n" + b"\x00" * 300 + b"G" * 60_000]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("junk", JUNK, ids=["2KB", "60KB"])
def test_a_pdf_behind_junk_is_stored_from_its_header_and_read_by_both_engines(tmp_path, engine, junk):
    pdf = fx.text_pdf(2, seed=3)
    info = parse.summarize_message(fx.email_with([("scan.pdf", junk + pdf)]), tmp_path / "work", IngestConfig())
    [item] = info["attachments"]
    assert Path(item["path"]).read_bytes() == pdf and item["size"] == len(junk) + len(pdf)
    result = ingest_pdf(Path(item["path"]), tmp_path / "junk.txt", IngestConfig(engine=engine))
    assert (result.pages, result.pages_failed) == (2, 0)
    ingest(tmp_path, pdf, engine)  # the same PDF without the junk: the same text
    assert (tmp_path / "junk.txt").read_text() == (tmp_path / "out.txt").read_text()


def test_a_pdf_behind_2kb_of_junk_is_digested_over_smtp(service_factory, smtp_sink):
    service = service_factory()
    raw = fx.email_with([("scan.pdf", JUNK[0] + fx.text_pdf(2, seed=3))], message_id="<junk@x>")
    run = service.engine.wait(send(service, raw), timeout=120)
    assert run.state == "success" and not run.partial, run.reason
    text = smtp_sink[0].wait_for(1)[0].get_body(("plain",)).get_content()
    assert "(scan.pdf): 2 pages" in text and "could not be read" not in text, text


@pytest.mark.parametrize("engine", ENGINES)
def test_a_font_whose_codes_are_surrogates_costs_those_codes_not_the_document(tmp_path, engine):
    """A font without a Unicode map: pypdf takes its codes for the text, and codes in U+D800-U+DFFF were lone
    surrogates that UTF-8 cannot write (the document failed, reason "ingest")."""
    codes = [0xD800 + i for i in range(40)] + [0xDC00 + i for i in range(40)] + [0x20, *b"Plain words"]
    result = ingest(tmp_path, fx.identity_font_pdf(codes), engine)
    text = (tmp_path / "out.txt").read_text(encoding="utf-8")
    assert (result.pages, result.pages_failed) == (1, 0) and text.endswith("Plain words\f")
    assert not any("\ud800" <= ch <= "\udfff" for ch in text)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_empty_file_says_so(tmp_path, engine):
    with pytest.raises(CorruptPdfError, match="an empty file \\(0 bytes\\)"):
        ingest(tmp_path, b"", engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_font_without_a_unicode_map_is_counted_not_taken_for_a_scan(tmp_path, engine):
    """pdf.js bug1001080: a page whose characters come out as glyph numbers (control codes) has no words, and
    its digest said "no text layer: scanned images?"; the pages are now counted apart from scans."""
    result = ingest(tmp_path, fx.identity_font_pdf(list(range(1, 30))), engine)
    assert (result.pages, result.words, result.has_text, result.pages_unmapped) == (1, 0, False, 1)
    result = ingest(tmp_path, fx.identity_font_pdf([1, 2, 3, 0x20, *b"Plain words"]), engine)
    assert (result.has_text, result.pages_unmapped) == (True, 0)  # some letters: the page has text
    assert ingest(tmp_path, fx.image_pdf(1), engine).pages_unmapped == 0  # a scan: nothing at all


def test_the_digest_tells_unreadable_fonts_from_scans_over_smtp(service_factory, smtp_sink):
    service = service_factory()
    raw = fx.email_with([("glyphs.pdf", fx.identity_font_pdf(list(range(1, 30)))), ("scan.pdf", fx.image_pdf(1))],
                        message_id="<glyphs@x>")
    run = service.engine.wait(send(service, raw), timeout=120)
    assert run.state == "success", run.reason
    digest = smtp_sink[0].wait_for(1)[0]
    text, html = (digest.get_body((kind,)).get_content() for kind in ("plain", "html"))
    assert "glyphs.pdf: 1 page, 0 words (text that cannot be read: its fonts map" in text, text
    assert "scan.pdf: 1 page, 0 words (no text layer: scanned images?)" in text, text
    assert "<p>Text that cannot be read: its fonts map" in html and "<p>No text layer: scanned images?</p>" in html


@pytest.mark.parametrize("engine", ENGINES)
def test_a_rotated_pages_lines_read_top_to_bottom(tmp_path, engine):
    """PDFium gave a /Rotate 90 page's lines bottom to top, which scrambled the summary of a rotated spec."""
    import io

    import pypdf

    lines = [b"First line of the page.", b"Second line follows here.", b"Third line ends it."]
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(fx.typeset_pdf(lines)))
    writer.pages[0].rotate(90)
    rotated = io.BytesIO()
    writer.write(rotated)
    ingest(tmp_path, rotated.getvalue(), engine)
    assert (tmp_path / "out.txt").read_text().split() == b" ".join(lines).decode().split()


def _pdf(objects: list[bytes]) -> bytes:
    """A PDF of ``objects`` (object 1 the catalog) with a correct cross-reference table."""
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


LONG_NAME = _pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                  b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
                  b"/Resources << /Font << /F1 5 0 R >> >> >>",
                  b"<< /Length 44 >>\nstream\nBT /F1 12 Tf 72 712 Td (Hello world) Tj ET\nendstream",
                  b"<< /Type /Font /Subtype /Type1 /BaseFont /" + b"A" * 5000 + b" >>"])


def test_a_name_longer_than_any_real_one_is_damage_not_size_with_pypdf(tmp_path):
    """A probe's find (pdf.js's filled-background.pdf): pypdf's LimitReachedError for a token past its length
    was "too_large: over a pypdf limit", for a 3-page file; a name over 127 bytes breaks the PDF's own limits."""
    with pytest.raises(CorruptPdfError, match="damaged: Read stream length of") as err:
        ingest(tmp_path, LONG_NAME, "pypdf")
    assert err.value.reason == "corrupt"


@pytest.mark.parametrize(("message", "damage"), [
    ("Read stream length of 112 exceeds maximum allowed length of 64.", True),  # pdf.js filled-background.pdf
    ("Detected loop with self reference for IndirectObject(2, 0).", True),  # qpdf issue-117.pdf
    ("Detected cycle in /Pages hierarchy when retrieving page.", True),
    # a stream without /Length read past max_decompressed_bytes (a reviewer's find): size, not damage
    ("Read stream length of 78643300 exceeds maximum allowed length of 78643200.", False),
    ("Declared size 99999999 exceeds allowed limit of 5000000!", False),
])
def test_pypdfs_limit_errors_are_told_apart_as_damage_or_size(message, damage):
    assert pdf_text._is_damage(message) is damage
