"""What a reader sees: the same clean words from both engines, sentences cut where sentences end, a title,
a summary of the whole document (or a statement of what it covers), and honest headers."""

from __future__ import annotations

import random
import string
import time
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from pipeline.audit.base import fixtures as fx
from pipeline.config import DeliveryConfig, IngestConfig
from pipeline.stages import deliver, digest
from pipeline.stages.pdf_text import extract_text
from pipeline.stages.text_normal import count_words, normalize_page, pick_title, split_sentences

TYPESET = [b"Quarterly Report", b"The pipeline de-", b"scribed the \x01le and the \x02ow of \x03ce work.",
           b"A soft\xad", b"hyphen here, and https://CRAN.R-", b"project.org/package=gss is a URL.",
           b"Control\x07 characters vanish."]


@pytest.mark.parametrize("engine", ["pypdf", "pdfium"])
def test_both_engines_give_the_same_clean_words_from_a_typeset_page(tmp_path, engine):
    pdf = tmp_path / "typeset.pdf"
    pdf.write_bytes(fx.typeset_pdf(TYPESET, title=b"Microsoft Word - q3.docx"))
    result = extract_text(pdf, tmp_path / "text.txt", IngestConfig(engine=engine))
    text = Path(result.text_path).read_text()
    assert text.split() == ("Quarterly Report The pipeline described the file and the flow of ffice work. A "
                            "softhyphen here, and https://CRAN.R-project.org/package=gss is a URL. Control "
                            "characters vanish.").split()
    assert not any(c in text for c in "\ufffe\u00ad\ufb01\ufb02\ufb03\x02\x07")
    assert result.words == len(text.split())
    assert result.title == "Quarterly Report"  # the metadata title is a word processor's file name: junk


@pytest.mark.parametrize("engine", ["pypdf", "pdfium"])
def test_a_metadata_title_is_used_when_it_is_a_title(tmp_path, engine):
    pdf = tmp_path / "titled.pdf"
    pdf.write_bytes(fx.typeset_pdf([b"1", b"some body text here"], title=b"R Installation and Administration"))
    assert extract_text(pdf, tmp_path / "t.txt", IngestConfig(engine=engine)).title == \
        "R Installation and Administration"
    pdf.write_bytes(fx.typeset_pdf([b"1", b"some body text here."]))
    assert extract_text(pdf, tmp_path / "t.txt", IngestConfig(engine=engine)).title == ""


def test_only_the_part_with_the_first_page_names_the_title(tmp_path):
    pdf = tmp_path / "two.pdf"
    pdf.write_bytes(fx.text_pdf(4))
    limits = IngestConfig(engine="pdfium")
    assert extract_text(pdf, tmp_path / "a.txt", limits, shard=(1, 2)).title == ""


def test_normalisation_keeps_real_hyphens_and_page_structure():
    assert normalize_page("well-\nKnown and e-mail") == "well-\nKnown and e-mail"  # not lowercase on both sides
    assert normalize_page("exam-\nple") == "example"
    assert normalize_page("a\fb\r\nc\rd") == "a\nb\nc\nd"  # a form feed is our page separator
    assert normalize_page("see www.r-\nproject.org") == "see www.r-project.org"


def test_sentences_end_at_sentence_ends_only():
    text = ("Package gss (https://CRAN.R-project.org/package=gss). See e.g. Fig. 3 for details. "
            "J. R. R. Tolkien wrote it in 1954. The U.S. Army uses v2.3 daily! Really? "
            "Read https://example.org/a.b. Next one")
    assert list(split_sentences(text)) == [
        "Package gss (https://CRAN.R-project.org/package=gss).", "See e.g. Fig. 3 for details.",
        "J. R. R. Tolkien wrote it in 1954.", "The U.S. Army uses v2.3 daily!", "Really?",
        "Read https://example.org/a.b. Next one"]  # a URL's last dot is kept with it, the safe side


def test_pick_title_rejects_junk_and_falls_back_to_the_first_heading():
    assert pick_title("  An  Introduction to R ", "") == "An Introduction to R"
    for junk in ("", "untitled", "report.docx", "Microsoft Word - x", "12", "Untitled - Notepad", "notes.txt - Notepad",
                 "Untitled document", "Untitled-1", "Document1", "Book1", "Microsoft Excel - Book1", "Presentation3"):
        assert pick_title(junk, "\n\nQuarterly Report\nThe body starts here.") == "Quarterly Report"
    assert pick_title(None, "The first line is a sentence.\n1\n") == ""
    for title in ("Untitled Territories of the North", "Documenting Rivers", "Book of Hours", "Notepad Tips"):
        assert pick_title(title, "Heading") == title  # the words alone make no junk


def _long_text(tmp_path: Path, pages: int) -> Path:
    """Pages of words seen once each, and on the last page the sentence the document keeps repeating."""
    rnd = random.Random(7)

    def sentence() -> str:
        return " ".join("".join(rnd.choice(string.ascii_lowercase) for _ in range(8)) for _ in range(9)) + "."

    last = "Extraction workers extract extraction text; extraction workers extract text fast."
    path = tmp_path / "long.txt"
    path.write_text("\f".join([" ".join(sentence().capitalize() for _ in range(20)) for _ in range(pages - 1)]
                              + [(last + " ") * 30]) + "\f")
    return path


def test_the_summary_reads_the_whole_document(tmp_path):
    summary = digest.summarize_file(_long_text(tmp_path, 400), sentences=1)
    assert (summary.pages_covered, summary.pages_total) == (400, 400)
    assert summary.sentences and "extraction" in summary.sentences[0].lower()


def test_a_summary_cut_by_its_budget_says_what_it_covered(tmp_path):
    summary = digest.summarize_file(_long_text(tmp_path, 400), sentences=1, budget_s=0.0)
    assert 1 <= summary.pages_covered < summary.pages_total == 400
    doc = {"name": "long.pdf", "pages": 400, "words": 5, "has_text": True, "summary": summary.sentences,
           "title": "A Long Manual", "pages_summarised": summary.pages_covered, "pages_in_text": 400}
    rendered = digest.render_digest({"subject": "s", "from": "a@example.com"}, [doc])
    assert f"summary of pages 1-{summary.pages_covered} of 400" in rendered.text
    assert '"A Long Manual" (long.pdf)' in rendered.text and "A Long Manual" in rendered.html


def test_the_digest_date_header_carries_a_real_offset(tmp_path):
    config = DeliveryConfig(outbox=tmp_path / "outbox")
    msg = deliver.compose_reply(digest.Digest("Digest: x", "t", "<p>h</p>"), {}, config,
                                to=deliver.reply_address("alice@example.com"))
    saved = BytesParser(policy=policy.default).parsebytes(msg.as_bytes())
    assert not saved["Date"].endswith("-0000")
    assert abs(parsedate_to_datetime(saved["Date"]).timestamp() - time.time()) < 300


def test_bidi_overrides_are_taken_out_of_page_text():
    """U+202E in a summary turned "invoice exe.fdp" into "invoice pdf.exe" on screen (titles were cleaned of it,
    page text was not); right-to-left letters stay as they are."""
    page = "invoice \u202eexe.fdp\u202c and \u2067isolated\u2069 \u05e9\u05dc\u05d5\u05dd"
    assert normalize_page(page) == "invoice exe.fdp and isolated \u05e9\u05dc\u05d5\u05dd"


def test_a_sentence_repeated_on_every_page_is_summarised_once():
    footer = "This report is confidential and intended for the named recipients of the quarterly review only."
    pages = [f"Revenue grew in region {i} because distributors restocked early in the season. {footer}"
             for i in range(10)]
    summary = digest.summarize("\f".join(pages), 3)
    assert len(summary) == len(set(summary)) == 3 and summary.count(footer) <= 1


# three sentences each in scripts other than Latin, and their word counts
SCRIPTS = {
    "hebrew": ("הדוח הרבעוני מראה שההכנסות גדלו באזור הצפוני. העלויות ירדו לאחר החוזה החדש. "
               "הדירקטוריון אישר את התוכנית.", 16),
    "arabic": ("يظهر التقرير الفصلي أن الإيرادات نمت في المنطقة الشمالية. انخفضت التكاليف بعد العقد الجديد. "
               "وافق المجلس على الخطة.", 18),
    "greek": ("Η τριμηνιαία έκθεση δείχνει ότι τα έσοδα αυξήθηκαν στη βόρεια περιοχή. "
              "Το κόστος μειώθηκε μετά τη νέα σύμβαση. Το συμβούλιο ενέκρινε το σχέδιο.", 23),
    "chinese": ("季度报告显示北部地区收入增长。新合同签订后成本下降。董事会批准了明年的计划。", 35),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_text_in_other_scripts_is_split_counted_and_summarised(script):
    """Hebrew, Arabic and Chinese had no word the summary could score (no summary at all), Greek was never
    split into sentences (the whole page was one), and a page of Chinese counted as one word."""
    text, words = SCRIPTS[script]
    sentences = list(split_sentences(text))
    assert len(sentences) == 3 and "".join(sentences).replace(" ", "") == text.replace(" ", "")
    assert count_words(text) == words
    summary = digest.summarize(text, 2)
    assert len(summary) == 2 and set(summary) <= set(sentences)


@pytest.mark.parametrize("engine", ["pypdf", "pdfium"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_pdf_in_another_script_gets_a_summary_and_its_word_count(tmp_path, script, engine):
    text, words = SCRIPTS[script]
    codes = {ch: number for number, ch in enumerate(sorted(set(text)), start=1)}
    drawn = text[::-1] if script in ("hebrew", "arabic") else text  # right to left: drawn from its end, leftmost first
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(fx.identity_font_pdf([codes[ch] for ch in drawn], {n: ch for ch, n in codes.items()}))
    result = extract_text(pdf, tmp_path / "doc.txt", IngestConfig(engine=engine, isolate=False))
    assert result.words == words
    summary = digest.summarize_file(tmp_path / "doc.txt", 2).sentences
    # the engines' own reordering of right-to-left text puts the paragraph's last full stop at its start
    assert len(summary) == 2 and {s.strip(".") for s in summary} <= {s.strip(".") for s in split_sentences(text)}


@pytest.mark.parametrize(("text", "words"), [
    ("目录\n第一章 总则\n第二章 范围\n第三章 定义\n", 17),  # a short-lined table of contents was counted by its lines
    ("今天天气很好。我们去公园吧！", 12),  # one short line was "1 word"
    ("Hello \u201cworld\u201d again", 3),
])
def test_ideographs_count_as_words_however_the_text_is_cut_in_lines(text, words):
    assert count_words(text) == words


def test_a_surrogate_pair_is_joined_into_its_character_and_a_lone_one_dropped():
    """A font's codes taken for text (pypdf, no Unicode map) can hold an emoji as a pair: it was dropped too."""
    assert normalize_page("a \ud83d\ude00 b \ud800 c") == "a \U0001f600 b  c"
