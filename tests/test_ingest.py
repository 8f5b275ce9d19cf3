"""Ingestion of real PDFs with pypdf and PDFium, in the capped worker processes, including hostile files."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.audit.base import fixtures as fx
from pipeline.config import IngestConfig
from pipeline.errors import ConfigurationError, CorruptPdfError, EncryptedPdfError, PdfTooLargeError
from pipeline.stages.ingest import ingest_pdf

LIMITS = IngestConfig()
KERNED_300 = fx.kerned_pdf(300)
ENGINES = [IngestConfig(engine="pypdf", page_workers=1), IngestConfig(engine="pypdf", page_workers=2),
           IngestConfig(engine="pdfium", page_workers=1), IngestConfig()]
engines = pytest.mark.parametrize("limits", ENGINES, ids=["pypdf", "pypdf-2w", "pdfium", "pdfium-2w(default)"])


@engines
def test_text_is_streamed_to_a_file_in_page_order(pdf, tmp_path, limits):
    result = ingest_pdf(pdf(fx.text_pdf(5)), tmp_path / "out.txt", limits)
    text = (tmp_path / "out.txt").read_text()
    assert result.pages == 5 and text.count("\f") == 5
    assert result.words == len(text.split()) > 3000 and result.has_text
    reference = tmp_path / "ref.txt"
    ingest_pdf(pdf(fx.text_pdf(5), "ref.pdf"), reference, replace(limits, page_workers=1))
    assert text.split() == reference.read_text().split()  # shards joined in page order


def test_in_process_extraction_matches_the_worker(pdf, tmp_path):
    inline = ingest_pdf(pdf(fx.text_pdf(2)), tmp_path / "a.txt", IngestConfig(engine="pypdf", isolate=False,
                                                                                page_workers=1))
    worker = ingest_pdf(pdf(fx.text_pdf(2), "b.pdf"), tmp_path / "b.txt", replace(ENGINES[0]))
    assert (inline.pages, inline.words) == (worker.pages, worker.words)


@pytest.mark.parametrize("engine", ["pypdf", "pdfium"])
def test_holding_the_text_baseline_writes_the_same_file(pdf, tmp_path, engine):
    path = pdf(fx.text_pdf(3))
    streamed = ingest_pdf(path, tmp_path / "s.txt", IngestConfig(engine=engine, page_workers=1))
    held = ingest_pdf(path, tmp_path / "h.txt", IngestConfig(engine=engine, page_workers=1, stream_text=False))
    assert (tmp_path / "s.txt").read_text() == (tmp_path / "h.txt").read_text()
    assert (held.pages, held.words, held.chars) == (streamed.pages, streamed.words, streamed.chars)


def test_pdfium_needs_isolation():
    with pytest.raises(ConfigurationError, match="needs isolate"):
        IngestConfig(engine="pdfium", isolate=False).validate()


@engines
@pytest.mark.parametrize("method", ["rc4", "aes"])
def test_encrypted_with_empty_password_opens(pdf, tmp_path, method, limits):
    result = ingest_pdf(pdf(fx.text_pdf(2, encrypt=method)), tmp_path / "t.txt", limits)
    assert result.pages == 2 and result.words > 1000


@engines
@pytest.mark.parametrize("method", ["rc4", "aes"])
def test_encrypted_with_password_fails_as_encrypted(pdf, tmp_path, method, limits):
    with pytest.raises(EncryptedPdfError, match="password") as err:
        ingest_pdf(pdf(fx.text_pdf(2, encrypt=method, user_password="s3cret")), tmp_path / "t.txt", limits)
    assert err.value.reason == "encrypted"


@pytest.mark.parametrize("data", [fx.truncated(fx.text_pdf(5)), fx.random_bytes(4000), b""],
                         ids=["truncated", "random", "empty"])
@engines
def test_damaged_files_fail_as_corrupt_with_the_engine_message(pdf, tmp_path, data, limits):
    with pytest.raises(CorruptPdfError) as err:
        ingest_pdf(pdf(data), tmp_path / "t.txt", limits)
    assert err.value.reason == "corrupt" and len(str(err.value)) > 10


@engines
def test_scan_without_text_layer_succeeds_with_zero_words(pdf, tmp_path, limits):
    result = ingest_pdf(pdf(fx.image_pdf(2)), tmp_path / "t.txt", limits)
    assert (result.pages, result.words, result.has_text) == (2, 0, False)


@engines
def test_kerned_text_is_extracted(pdf, tmp_path, limits):
    result = ingest_pdf(pdf(fx.kerned_pdf(2)), tmp_path / "t.txt", limits)
    assert result.pages == 2 and result.words > 500


def test_decompression_bomb_is_stopped_by_pypdf_limit(pdf, tmp_path):
    with pytest.raises(PdfTooLargeError, match="over a pypdf limit: Limit reached while decompressing"):
        ingest_pdf(pdf(fx.bomb_pdf(100 * 1024 * 1024)), tmp_path / "t.txt", ENGINES[0])


def test_decompression_bomb_is_stopped_by_pdfium_memory_cap(pdf, tmp_path):
    limits = replace(LIMITS, memory_limit_bytes=300 * 1024 * 1024)
    with pytest.raises(PdfTooLargeError, match="over the 314,572,800-byte memory cap"):
        ingest_pdf(pdf(fx.bomb_pdf(600 * 1024 * 1024)), tmp_path / "t.txt", limits)
    assert ingest_pdf(pdf(fx.text_pdf(1), "after.pdf"), tmp_path / "t.txt", limits).pages == 1  # workers replaced


@engines
def test_page_and_size_limits(pdf, tmp_path, limits):
    with pytest.raises(PdfTooLargeError, match="over the 3-page limit"):
        ingest_pdf(pdf(fx.text_pdf(4)), tmp_path / "t.txt", replace(limits, max_pages=3))
    with pytest.raises(PdfTooLargeError, match="over the 1,000-byte limit"):
        ingest_pdf(pdf(fx.text_pdf(1)), tmp_path / "t.txt", replace(limits, max_attachment_bytes=1000))


@engines
def test_time_limit_stops_extraction(pdf, tmp_path, limits):
    with pytest.raises(PdfTooLargeError, match="longer than"):
        ingest_pdf(pdf(KERNED_300), tmp_path / "t.txt", replace(limits, timeout_s=0.02))


def test_memory_cap_stops_a_hungry_document(pdf, tmp_path):
    # pypdf's own decompression cap raised out of the way: only the worker's address-space cap stops this
    limits = replace(ENGINES[0], max_decompressed_bytes=2**31, memory_limit_bytes=300 * 1024 * 1024)
    with pytest.raises(PdfTooLargeError, match="more than 314,572,800 bytes of memory"):
        ingest_pdf(pdf(fx.bomb_pdf(400 * 1024 * 1024)), tmp_path / "t.txt", limits)
    assert ingest_pdf(pdf(fx.text_pdf(1), "after.pdf"), tmp_path / "t.txt", limits).pages == 1  # pool recovered


def test_the_pdf_engines_sit_in_a_leaf_module_below_ingest_and_the_worker():
    stages = Path(__file__).resolve().parent.parent / "pipeline" / "stages"

    def imports(name: str) -> set[str]:
        tree = ast.parse((stages / name).read_text())
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert not {"ingest", "extract_worker"} & imports("pdf_text.py")
    assert "ingest" not in imports("extract_worker.py")  # the old ingest <-> extract_worker circle
