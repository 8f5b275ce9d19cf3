"""Stage functions on real inputs: file names, MIME parsing, summaries, digest rendering, the reply."""

import pytest

from pipeline.audit.base import fixtures as fx
from pipeline.config import DeliveryConfig, IngestConfig
from pipeline.errors import DeliveryError, ParseError
from pipeline.stages import deliver, digest, parse


@pytest.mark.parametrize("name", ["../../x.pdf", "/etc/passwd.pdf", "a\x00b.pdf", "x" * 5000 + ".pdf",
                                  "..\\..\\windows.pdf", "Résumé 📄.pdf", "\udcff\udcfe.pdf", "", None, ".hidden",
                                  "CON.pdf", "name\r\nBcc: x.pdf"])
def test_safe_filename_stays_in_its_directory(tmp_path, name):
    safe = parse.safe_filename(name, 3)
    target = (tmp_path / safe).resolve()
    assert target.parent == tmp_path.resolve()
    assert safe.startswith("003-") and len(safe) <= 80
    assert "/" not in safe and "\\" not in safe and "\x00" not in safe and "\n" not in safe
    target.write_bytes(b"ok")  # it is a valid file name on this system


def test_display_name_is_one_printable_line():
    assert parse.display_name("evil\r\nBcc: x.pdf", 0) == "evilBcc: x.pdf"
    assert parse.display_name(None, 1) == "attachment-2"


def test_parse_rejects_garbage_with_reason(tmp_path):
    with pytest.raises(ParseError, match="no header block") as err:
        parse.parse_message(fx.random_bytes(500))
    assert err.value.reason == "malformed_email"
    with pytest.raises(ParseError, match="^From: no such header: "):  # no envelope sender: From is all there is
        parse.summarize_message(b"Subject: hi\r\n\r\nbody\r\n", tmp_path, IngestConfig())


def test_summarize_message_writes_only_pdfs(tmp_path):
    raw = fx.email_with([("a.pdf", fx.text_pdf(1)), ("notes.txt", b"plain text"), ("big.pdf", fx.text_pdf(3))])
    info = parse.summarize_message(raw, tmp_path, IngestConfig(max_attachment_bytes=9000))
    assert [a["name"] for a in info["attachments"]] == ["a.pdf", "big.pdf"]
    assert info["skipped"] == [{"name": "notes.txt", "reason": "not a PDF (application/octet-stream)"}]
    assert info["attachments"][0]["path"].startswith(str(tmp_path / "attachments"))
    assert info["attachments"][1]["path"] is None and "over the 9,000-byte limit" in info["attachments"][1]["rejected"]
    assert info["from"] == "alice@example.com" and info["message_id"] == "<fixture-1@example.com>"


def test_summary_is_deterministic_and_in_document_order():
    text = ("Cats sleep. The pipeline ingests PDF documents and builds digests. "
            "Digests summarise PDF documents for the pipeline users. Weather was fine today anyway. "
            "The pipeline delivers digests of PDF documents by mail.")
    first = digest.summarize(text, 2)
    assert first == digest.summarize(text, 2)
    assert len(first) == 2 and all(s in text for s in first)
    assert text.index(first[0]) < text.index(first[1])
    assert "Cats sleep." not in first  # too short to be a sentence worth quoting


def test_digest_names_pages_whose_fonts_have_no_unicode_map_in_a_document_with_text():
    doc = {"name": "mixed.pdf", "size": 1, "pages": 12, "words": 900, "has_text": True, "pages_unmapped": 3,
           "summary": ["A sentence of the readable pages."]}
    rendered = digest.render_digest({"subject": "s", "from": "a@example.com"}, [doc])
    assert "mixed.pdf: 12 pages, 900 words (the text of 3 pages cannot be read: its fonts map" in rendered.text
    assert "    A sentence of the readable pages." in rendered.text
    assert "; the text of 3 pages cannot be read" in rendered.html
    one = digest.render_digest({"subject": "s", "from": "a@example.com"}, [{**doc, "pages_unmapped": 1}])
    assert "(the text of 1 page cannot be read" in one.text


def test_digest_escapes_user_text_in_html():
    email = {"subject": "<script>alert(1)</script>", "from": "a@example.com", "skipped": ["<b>x</b>.doc"]}
    docs = [{"name": "<img src=x onerror=y>.pdf", "size": 1, "error": "corrupt", "message": "<bad> & worse"}]
    rendered = digest.render_digest(email, docs)
    assert "<script>" not in rendered.html and "&lt;script&gt;" in rendered.html
    assert "<img" not in rendered.html and "&lt;bad&gt; &amp; worse" in rendered.html
    assert "<script>alert(1)</script>" in rendered.text  # plain text stays as written


def test_reply_cannot_be_given_extra_headers():
    email = {"subject": "x", "from": "alice@example.com", "message_id": "<a@b>\r\nBcc: evil@example.com"}
    rendered = digest.Digest("Digest: hi\r\nBcc: evil@example.com", "text", "<p>html</p>")
    msg = deliver.compose_reply(rendered, email, DeliveryConfig(), to=deliver.reply_address(email["from"]))
    raw = msg.as_bytes()
    assert b"\nBcc:" not in raw and "In-Reply-To" not in msg
    assert msg["Subject"] == "Digest: hi Bcc: evil@example.com"


EXCHANGE_ID = "<AM0PR04MB6545E1B8B1C2D3E4F5A6B7C8D9E0F1A2B3C4D5E6F7A8B9C0@AM0PR04MB6545.eurprd04.prod.outlook.com>"


@pytest.mark.parametrize("to", ["alice@example.com", "jörg@example.com"])  # the UTF-8 address: the other policy
def test_a_reply_to_an_exchange_length_message_id_threads_under_it(to):
    """A 99-character id written as it is (one line, under RFC 5322's 998), not as encoded words a reader
    cannot match against the original."""
    msg = deliver.compose_reply(digest.Digest("Digest: x", "t", "<p>h</p>"), {"message_id": EXCHANGE_ID},
                                DeliveryConfig(), to=deliver.reply_address(to))
    raw = msg.as_bytes()
    assert f"\nIn-Reply-To: {EXCHANGE_ID}\n".encode() in raw and f"\nReferences: {EXCHANGE_ID}\n".encode() in raw
    assert b"=?" not in raw.split(b"\n\n", 1)[0]


def test_a_utf8_message_id_is_not_threaded_rather_than_written_encoded():
    msg = deliver.compose_reply(digest.Digest("Digest: x", "t", "<p>h</p>"), {"message_id": "<ünï@example.com>"},
                                DeliveryConfig(), to=deliver.reply_address("alice@example.com"))
    assert "In-Reply-To" not in msg and b"=?" not in msg.as_bytes().split(b"\n\n", 1)[0]


def test_reply_refuses_a_non_address():
    with pytest.raises(DeliveryError, match="not a single mailbox address") as err:
        deliver.reply_address("a@b, c@d")
    assert err.value.retryable is False


def test_outbox_delivery_writes_maildir(tmp_path):
    rendered = digest.Digest("Digest: x", "text body", "<p>html</p>")
    config = DeliveryConfig(outbox=tmp_path / "outbox")
    to = deliver.reply_address("alice@example.com")
    msg = deliver.compose_reply(rendered, {"message_id": "<m@x>"}, config, to=to)
    where = deliver.send_message(msg, config)
    saved = (tmp_path / "outbox" / "new").iterdir().__next__().read_bytes()
    assert where.startswith(str(tmp_path / "outbox" / "new")) and b"In-Reply-To: <m@x>" in saved


def test_the_digest_names_an_unreadable_attachment_once():
    """The store's copy of a failed ingest names the attachment (saved name, or its own when it was refused
    before it was saved); the digest, which names it already, leaves that prefix out."""
    attachments = [{"name": "big.pdf", "size": 30_000_000, "path": None},
                   {"name": "cut.pdf", "size": 10, "path": "/data/work/7/attachments/001-cut.pdf"}]
    errors = {"ingest_pdf[0]": {"type": "too_large", "message": "big.pdf: attachment is 30,000,000 bytes"},
              "ingest_pdf[1]": {"type": "corrupt", "message": "001-cut.pdf: PDFium: Data format error"}}
    docs = digest.describe_documents(attachments, [], errors, 2)
    assert [(d["name"], d["message"]) for d in docs] == [("big.pdf", "attachment is 30,000,000 bytes"),
                                                         ("cut.pdf", "PDFium: Data format error")]


def test_a_mail_without_a_from_header_says_so_in_its_digest():
    """A prober's find: the first line ended in "from " with nothing after it."""
    rendered = digest.render_digest({"subject": "scan", "from": ""}, [])
    assert rendered.text.splitlines()[0] == 'Digest of your message "scan" from (no address in From:)'
