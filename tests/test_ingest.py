"""Ingestion of real PDFs with pypdf, in the capped worker processes, including hostile files."""

from dataclasses import replace

import pytest

from pipeline.audit import fixtures as fx
from pipeline.config import IngestConfig
from pipeline.errors import CorruptPdfError, EncryptedPdfError, PdfTooLargeError
from pipeline.stages.ingest import ingest_pdf

LIMITS = IngestConfig()


@pytest.fixture
def pdf(tmp_path):
    def write(data: bytes, name: str = "doc.pdf"):
        path = tmp_path / name
        path.write_bytes(data)
        return path
    return write


@pytest.mark.parametrize("isolate", [True, False])
def test_text_is_streamed_to_a_file(pdf, tmp_path, isolate):
    result = ingest_pdf(pdf(fx.text_pdf(4)), tmp_path / "out.txt", replace(LIMITS, isolate=isolate))
    text = (tmp_path / "out.txt").read_text()
    assert result.pages == 4 and text.count("\f") == 4
    assert result.words == len(text.split()) > 3000 and result.has_text


@pytest.mark.parametrize("method", ["rc4", "aes"])
def test_encrypted_with_empty_password_opens(pdf, tmp_path, method):
    result = ingest_pdf(pdf(fx.text_pdf(2, encrypt=method)), tmp_path / "t.txt", LIMITS)
    assert result.pages == 2 and result.words > 1000


@pytest.mark.parametrize("method", ["rc4", "aes"])
def test_encrypted_with_password_fails_as_encrypted(pdf, tmp_path, method):
    with pytest.raises(EncryptedPdfError, match="password") as err:
        ingest_pdf(pdf(fx.text_pdf(2, encrypt=method, user_password="s3cret")), tmp_path / "t.txt", LIMITS)
    assert err.value.reason == "encrypted"


@pytest.mark.parametrize("data", [fx.truncated(fx.text_pdf(5)), fx.random_bytes(4000), b""],
                         ids=["truncated", "random", "empty"])
def test_damaged_files_fail_as_corrupt_with_pypdf_message(pdf, tmp_path, data):
    with pytest.raises(CorruptPdfError) as err:
        ingest_pdf(pdf(data), tmp_path / "t.txt", LIMITS)
    assert err.value.reason == "corrupt" and len(str(err.value)) > 10


def test_scan_without_text_layer_succeeds_with_zero_words(pdf, tmp_path):
    result = ingest_pdf(pdf(fx.image_pdf(2)), tmp_path / "t.txt", LIMITS)
    assert (result.pages, result.words, result.has_text) == (2, 0, False)


def test_kerned_text_is_extracted(pdf, tmp_path):
    result = ingest_pdf(pdf(fx.kerned_pdf(2)), tmp_path / "t.txt", LIMITS)
    assert result.pages == 2 and result.words > 500


def test_decompression_bomb_is_stopped(pdf, tmp_path):
    with pytest.raises(PdfTooLargeError, match="decompression limit"):
        ingest_pdf(pdf(fx.bomb_pdf(100 * 1024 * 1024)), tmp_path / "t.txt", LIMITS)


def test_page_and_size_limits(pdf, tmp_path):
    with pytest.raises(PdfTooLargeError, match="over the 3-page limit"):
        ingest_pdf(pdf(fx.text_pdf(4)), tmp_path / "t.txt", replace(LIMITS, max_pages=3))
    with pytest.raises(PdfTooLargeError, match="over the 1,000-byte limit"):
        ingest_pdf(pdf(fx.text_pdf(1)), tmp_path / "t.txt", replace(LIMITS, max_attachment_bytes=1000))


def test_time_limit_stops_extraction(pdf, tmp_path):
    with pytest.raises(PdfTooLargeError, match="longer than"):
        ingest_pdf(pdf(fx.kerned_pdf(60)), tmp_path / "t.txt", replace(LIMITS, timeout_s=0.05))


def test_memory_cap_stops_a_hungry_document(pdf, tmp_path):
    # pypdf's own decompression cap raised out of the way: only the worker's address-space cap stops this
    limits = replace(LIMITS, max_decompressed_bytes=2**31, memory_limit_bytes=300 * 1024 * 1024)
    with pytest.raises(PdfTooLargeError, match="more than 314,572,800 bytes of memory"):
        ingest_pdf(pdf(fx.bomb_pdf(400 * 1024 * 1024)), tmp_path / "t.txt", limits)
    assert ingest_pdf(pdf(fx.text_pdf(1), "after.pdf"), tmp_path / "t.txt", limits).pages == 1  # pool recovered
