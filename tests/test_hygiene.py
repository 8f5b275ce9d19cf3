"""The leak checks every test runs under can see a leak (a check that cannot fail proves nothing)."""

from leaks import fds_opened_since, open_fds

from pipeline.config import IngestConfig
from pipeline.stages.extract_worker import pool_for


def test_an_open_file_is_seen_and_a_closed_one_is_not(tmp_path):
    before = open_fds()
    handle = open(tmp_path / "f.txt", "w")
    try:
        leaked = fds_opened_since(before)
        assert list(leaked.values()) == [str(tmp_path / "f.txt")]
    finally:
        handle.close()
    assert fds_opened_since(before) == {}


def test_the_extraction_workers_pipes_are_not_counted_as_leaks(tmp_path):
    from pipeline.audit.base import fixtures as fx
    from pipeline.stages.ingest import ingest_pdf

    limits = IngestConfig(workers=1, page_workers=1, memory_limit_bytes=900 * 1024 * 1024)  # a pool of its own
    before = open_fds()
    (tmp_path / "a.pdf").write_bytes(fx.text_pdf(1))
    ingest_pdf(tmp_path / "a.pdf", tmp_path / "a.txt", limits)
    assert pool_for(limits).pipe_fds()  # the worker stays, pipes open, for the next document
    assert fds_opened_since(before) == {}
