"""Digest: per document its title, name, pages, words and a short extractive summary.

The summary picks the most informative sentences by word frequency
(stop words ignored), ties broken by position, so the same text always gives
the same summary. It reads the whole text file in two streaming passes (word
counts, then sentence scores), one page at a time, so memory does not grow with
the document; a document too long for the time budget is summarised over the
pages the budget covered, and the digest says which. The digest has a plain-text and an HTML body; every piece
of user text in the HTML is escaped. Parts of the mail that were not digested
(not a PDF, a multipart whose parts could not be found and no PDF in it) are listed with the
reason, so nothing the sender attached disappears without a word.
"""

from __future__ import annotations

import heapq
import html
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dag import instance_id
from .text_normal import IDEOGRAPH, may_be_ideographic, split_sentences

SUMMARY_BUDGET_S = 4.0  # per document, both passes: ~8 MB of text (a 2,400-page manual) on a slow core
MAX_SENTENCE_CHARS = 300
# why a page whose engine text was all control codes has no words: the codes are glyph numbers
UNMAPPED = "its fonts map their characters to no letters (no Unicode map)"
# words of three letters or more in lowercased text: Latin (with accents), Greek, Cyrillic, Armenian, Hebrew,
# Arabic (with their vowel marks), Devanagari, Georgian, Hangul. An explicit class of BMP ranges (one bitmap
# lookup a character): the Unicode-aware [^\W\d_] is 2.5x slower, and this runs over every word of a manual twice
_WORD = re.compile(r"[a-z\u00df-\u00f6\u00f8-\u024f\u0370-\u03ff\u0400-\u052f\u0531-\u0587"
                   r"\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7-\u05f2\u0620-\u065f\u066e-\u06d3"
                   r"\u06d5-\u06dc\u06df-\u06e8\u06ea-\u06ef\u06fa-\u06ff\u0900-\u0963\u0971-\u097f"
                   r"\u10d0-\u10ff\uac00-\ud7a3]{3,}")
STOP_WORDS = frozenset("""
the and for are but not you all any can had her was one our out day get has him his how man new now old see
two way who boy did its let put say she too use that with have this will your from they know want been good
much some time very when come here just like long make many more only over such take than them well were what
which their there would could should about after again also into most other these those then while where
的 了 是 在 和 有 我 他 她 它 不 这 那 个 们 中 一 上 也 到 与 及 或 为 以 对 其 之 而 被 将
の に は を た が で て と し れ さ も な か ら り る い う す こ そ あ や ま
""".split())  # and the commonest grammatical ideographs and kana: each is a word of its own (IDEOGRAPH)


def _words(text: str) -> list[str]:
    """The scoring words of lowercased ``text``: ``_WORD``'s, then its ideographs when those are few (a second
    scan over a Latin text with a curly quote in it was 14% more counting)."""
    found = _WORD.findall(text)
    if may_be_ideographic(text, len(found)):
        found += IDEOGRAPH.findall(text)
    return found


@dataclass(frozen=True)
class Digest:
    """The two bodies of a digest mail."""

    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Summary:
    """The chosen sentences and how much of the document they were chosen from."""

    sentences: list[str]
    pages_covered: int
    pages_total: int


def summarize(text: str, sentences: int = 3) -> list[str]:
    """Return up to ``sentences`` of the most informative sentences of ``text``, in document order."""
    pages = text.split("\f")
    return _best(pages, _frequencies(pages), sentences)


def summarize_file(path: Path, sentences: int = 3, budget_s: float = SUMMARY_BUDGET_S) -> Summary:
    """Summarise a text file (pages separated by form feeds) within ``budget_s``, a page at a time.

    Counting words is about a third of the work, so the first pass stops at a third of the budget; the
    second scores the pages the first one counted, until the budget ends. Pages past that are left out,
    and ``pages_covered`` says so.
    """
    started = time.monotonic()
    covered, total, freq = 0, 0, Counter[str]()
    for page in _pages(path):
        total += 1
        if covered == total - 1 and (not covered or time.monotonic() < started + budget_s / 3):  # >= 1 page
            freq.update(_words(page.lower()))  # stop words are dropped once, below: C-speed counting
            covered = total
    for word in STOP_WORDS:
        freq.pop(word, None)
    scored = [0]
    best = _best(_counted(_pages(path, covered), scored, started + budget_s), freq, sentences)
    return Summary(best, scored[0], total)


def _counted(pages: Iterator[str], count: list[int], deadline: float) -> Iterator[str]:
    """``pages`` until ``deadline``, counting them into ``count[0]``."""
    for page in pages:
        if count[0] and time.monotonic() > deadline:
            return
        count[0] += 1
        yield page


def _pages(path: Path, limit: int | None = None) -> Iterator[str]:
    """The pages of a text file (form-feed separated), read in 1 MiB blocks; the first ``limit`` only."""
    count, rest = 0, ""
    with open(path, encoding="utf-8", errors="replace") as src:
        while block := src.read(1 << 20):
            *pages, rest = (rest + block).split("\f")
            for page in pages:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield page
    if rest.strip() and (limit is None or count < limit):
        yield rest


def _frequencies(pages: list[str]) -> Counter[str]:
    freq = Counter(w for page in pages for w in _words(page.lower()))
    for word in STOP_WORDS:
        freq.pop(word, None)
    return freq


def _best(pages: Iterator[str] | list[str], freq: Counter[str], count: int) -> list[str]:
    """The ``count`` best-scoring sentences (frequency of their distinct content words over their length), each
    once: a footer repeated on every page filled a whole summary."""
    best: list[tuple[float, int, str]] = []  # a min-heap of (score, -position, sentence)
    chosen: set[str] = set()  # the sentences in it
    position = 0
    frequency = freq.__getitem__  # Counter's: 0 for a word the first pass did not count
    for page in pages:
        for sentence in split_sentences(page):
            found = _words(sentence.lower())
            if len(found) < 3 or sentence in chosen:  # a heading, a page number, a table row; a repeat
                continue
            # set operations and C-level counting: a list of the content words per sentence was 12% more time
            distinct = set(found)
            length = len(found)
            if not distinct.isdisjoint(STOP_WORDS):
                length -= sum(map(STOP_WORDS.__contains__, found))  # one C-level pass (found.count per stop word
                distinct -= STOP_WORDS  # was a pass each: a reviewer's 1.6 MB run-on page took 0.38 s, not 0.22)
            position += 1
            item = (sum(map(frequency, distinct)) / (1 + length) ** 0.5, -position, sentence)
            if len(best) < count:
                heapq.heappush(best, item)
                chosen.add(sentence)
            elif item > best[0]:
                chosen.discard(heapq.heapreplace(best, item)[2])
                chosen.add(sentence)
    return [_clip(sentence) for _, _, sentence in sorted(best, key=lambda item: -item[1])]


def _clip(sentence: str) -> str:
    return sentence if len(sentence) <= MAX_SENTENCE_CHARS else sentence[: MAX_SENTENCE_CHARS - 1] + "…"


def _without_saved_name(message: str, attachment: Mapping[str, Any]) -> str:
    """The error without the attachment's name the store's copy starts with (the name it was saved under, or,
    for one refused before it was saved, its own): the digest already names the attachment as its sender did."""
    names = [Path(attachment["path"]).name] if attachment.get("path") else []
    for name in [*names, str(attachment.get("name") or "")]:
        if name and message.startswith(name + ": "):
            return message[len(name) + 2:]
    return message


def describe_documents(attachments: list[dict[str, Any]], results: list[Any], errors: Mapping[str, Mapping[str, str]],
                       sentences: int) -> list[dict[str, Any]]:
    """Join each PDF attachment with its ingestion result or error into one document entry."""
    documents = []
    for index, attachment in enumerate(attachments):
        result = results[index] if index < len(results) else None
        entry: dict[str, Any] = {"name": attachment["name"], "size": attachment["size"]}
        if result:
            summary = summarize_file(Path(result["text_path"]), sentences)
            entry.update(pages=result["pages"], words=result["words"], has_text=result["has_text"],
                         pages_failed=result.get("pages_failed", 0), summary=summary.sentences,
                         pages_unmapped=result.get("pages_unmapped", 0),
                         title=result.get("title", ""), pages_summarised=summary.pages_covered,
                         pages_in_text=summary.pages_total)
        else:
            error = errors.get(instance_id("ingest_pdf", index), {"type": "not_ingested", "message": "no result"})
            entry.update(error=error["type"], message=_without_saved_name(error["message"], attachment))
        documents.append(entry)
    return documents


def render_digest(email: dict[str, Any], documents: list[dict[str, Any]]) -> Digest:
    """Render the plain-text and HTML bodies of the digest."""
    subject = f"Digest: {email.get('subject') or '(no subject)'}"
    # a mail without one ended its line in "from "; "undisclosed-recipients:;" (a group, no address) has none too
    sender = email.get("from") or "(no address in From:)"
    lines = [f"Digest of your message \"{email.get('subject') or '(no subject)'}\" from {sender}", ""]
    parts = [f"<h1>{html.escape(subject)}</h1>",
             f"<p>Digest of your message from {html.escape(sender)}.</p>"]
    if not documents:
        lines.append("The message had no PDF attachments.")
        parts.append("<p>The message had no PDF attachments.</p>")
    for doc in documents:
        lines += _text_block(doc)
        parts.append(_html_block(doc))
    skipped = skipped_parts(email.get("skipped") or [])
    if skipped:
        lines += ["Parts not digested:", *[f"* {name}: {reason}" for name, reason in skipped]]
        items = "".join(f"<li>{html.escape(name)}: {html.escape(reason)}</li>" for name, reason in skipped)
        parts.append(f"<p>Parts not digested:</p><ul>{items}</ul>")
    return Digest(subject, "\n".join(lines) + "\n", "<html><body>" + "".join(parts) + "</body></html>")


def skipped_parts(skipped: list[Any]) -> list[tuple[str, str]]:
    """(name, why) of each part the parse step left out; a bare name (runs parsed before issue 11) was a non-PDF."""
    return [(str(s), "not a PDF") if isinstance(s, str) else (str(s["name"]), str(s["reason"])) for s in skipped]


def _sizes(doc: dict[str, Any]) -> str:
    """"12 pages, 3,400 words", one of each in the singular ("1 pages" was in every one-page digest)."""
    pages, words = doc["pages"], doc["words"]
    return f"{pages:,} page{'' if pages == 1 else 's'}, {words:,} word{'' if words == 1 else 's'}"


def _lost_pages(doc: dict[str, Any]) -> str:
    """ "3 of 412 pages could not be read", or "" when every page was read."""
    failed = doc.get("pages_failed", 0)
    return f"{failed} of {doc['pages']} pages could not be read" if failed else ""


def _unmapped(doc: dict[str, Any]) -> str:
    """ "the text of 3 pages cannot be read: ...", or "" when every page with characters had letters."""
    count = doc.get("pages_unmapped", 0)
    if not count or not doc["has_text"]:
        return ""  # a document with no text at all says so in its own line (``_no_text``)
    return f"the text of {count:,} page{'' if count == 1 else 's'} cannot be read: {UNMAPPED}"


def _no_text(doc: dict[str, Any]) -> str:
    """Why a document has no words: its fonts have no Unicode map, or no text layer at all (scanned images?)."""
    return f"text that cannot be read: {UNMAPPED}" if doc.get("pages_unmapped") else "no text layer: scanned images?"


def _coverage(doc: dict[str, Any]) -> str:
    """ "summary of pages 1-120 of 2,400 (the time budget ran out)", or "" when the whole text was read."""
    covered, total = doc.get("pages_summarised"), doc.get("pages_in_text")
    if covered is None or total is None or covered >= total:
        return ""
    return f"summary of pages 1-{covered:,} of {total:,} (the time budget ran out)"


def _text_block(doc: dict[str, Any]) -> list[str]:
    if "error" in doc:
        return [f"* {doc['name']}: could not be read ({doc['error']}: {doc['message']})", ""]
    named = f"\"{doc['title']}\" ({doc['name']})" if doc.get("title") else doc["name"]
    head = f"* {named}: {_sizes(doc)}"
    notes = [note for note in (_lost_pages(doc), _unmapped(doc), _coverage(doc)) if note]
    if notes:
        head += f" ({'; '.join(notes)})"
    if not doc["has_text"]:
        return [head + f" ({_no_text(doc)})", ""]
    return [head, *[f"    {s}" for s in doc["summary"]], ""]


def _html_block(doc: dict[str, Any]) -> str:
    name = html.escape(doc["name"])
    if "error" in doc:
        return f"<h2>{name}</h2><p>Could not be read: {html.escape(doc['error'])}: {html.escape(doc['message'])}</p>"
    if doc.get("title"):
        name = f"{html.escape(doc['title'])} <small>({name})</small>"
    notes = "".join(f"; {html.escape(note)}" for note in (_lost_pages(doc), _unmapped(doc), _coverage(doc)) if note)
    stats = f"<p>{_sizes(doc)}{notes}</p>"
    if not doc["has_text"]:
        return f"<h2>{name}</h2>{stats}<p>{html.escape(_no_text(doc)[0].upper() + _no_text(doc)[1:])}</p>"
    items = "".join(f"<li>{html.escape(s)}</li>" for s in doc["summary"])
    return f"<h2>{name}</h2>{stats}<ul>{items}</ul>"
