"""Digest: per document its name, pages, words and a short extractive summary.

The summary picks the most informative sentences by word frequency
(stop words ignored), ties broken by position, so the same text always gives
the same summary. The digest has a plain-text and an HTML body; every piece
of user text in the HTML is escaped. Parts of the mail that were not digested
(not a PDF, a multipart without boundary and no PDF in it) are listed with the
reason, so nothing the sender attached disappears without a word.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_SUMMARY_CHARS = 200_000  # summarise the first 200k characters: enough for a gist, bounded in time
MAX_SENTENCE_CHARS = 300
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[^\W\d_]{3,}")
STOP_WORDS = frozenset("""
the and for are but not you all any can had her was one our out day get has him his how man new now old see
two way who boy did its let put say she too use that with have this will your from they know want been good
much some time very when come here just like long make many more only over such take than them well were what
which their there would could should about after again also into most other these those then while where
""".split())


@dataclass(frozen=True)
class Digest:
    """The two bodies of a digest mail."""

    subject: str
    text: str
    html: str


def summarize(text: str, sentences: int = 3) -> list[str]:
    """Return up to ``sentences`` of the most informative sentences of ``text``, in document order."""
    candidates = [" ".join(s.split()) for s in _SENTENCE.split(text[:MAX_SUMMARY_CHARS].replace("\f", " "))]
    candidates = [s for s in candidates if len(_WORD.findall(s)) >= 3]
    if not candidates:
        return []
    tokens = [[w.lower() for w in _WORD.findall(s) if w.lower() not in STOP_WORDS] for s in candidates]
    freq = Counter(w for words in tokens for w in words)
    scores = [sum(freq[w] for w in set(words)) / (1 + len(words)) ** 0.5 for words in tokens]
    best = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))[:sentences]
    return [_clip(candidates[i]) for i in sorted(best)]


def _clip(sentence: str) -> str:
    return sentence if len(sentence) <= MAX_SENTENCE_CHARS else sentence[: MAX_SENTENCE_CHARS - 1] + "…"


def describe_documents(attachments: list[dict[str, Any]], results: list[Any], errors: Mapping[str, Mapping[str, str]],
                       sentences: int) -> list[dict[str, Any]]:
    """Join each PDF attachment with its ingestion result or error into one document entry."""
    documents = []
    for index, attachment in enumerate(attachments):
        result = results[index] if index < len(results) else None
        entry: dict[str, Any] = {"name": attachment["name"], "size": attachment["size"]}
        if result:
            text = Path(result["text_path"]).read_text(encoding="utf-8", errors="replace")[:MAX_SUMMARY_CHARS]
            entry.update(pages=result["pages"], words=result["words"], has_text=result["has_text"],
                         pages_failed=result.get("pages_failed", 0), summary=summarize(text, sentences))
        else:
            error = errors.get(f"ingest_pdf[{index}]", {"type": "not_ingested", "message": "no result"})
            entry.update(error=error["type"], message=error["message"])
        documents.append(entry)
    return documents


def render_digest(email: dict[str, Any], documents: list[dict[str, Any]]) -> Digest:
    """Render the plain-text and HTML bodies of the digest."""
    subject = f"Digest: {email.get('subject') or '(no subject)'}"
    lines = [f"Digest of your message \"{email.get('subject') or '(no subject)'}\" from {email['from']}", ""]
    parts = [f"<h1>{html.escape(subject)}</h1>",
             f"<p>Digest of your message from {html.escape(email['from'])}.</p>"]
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


def _lost_pages(doc: dict[str, Any]) -> str:
    """ "3 of 412 pages could not be read", or "" when every page was read."""
    failed = doc.get("pages_failed", 0)
    return f"{failed} of {doc['pages']} pages could not be read" if failed else ""


def _text_block(doc: dict[str, Any]) -> list[str]:
    if "error" in doc:
        return [f"* {doc['name']}: could not be read ({doc['error']}: {doc['message']})", ""]
    head = f"* {doc['name']}: {doc['pages']} pages, {doc['words']} words"
    if _lost_pages(doc):
        head += f" ({_lost_pages(doc)})"
    if not doc["has_text"]:
        return [head + " (no text layer: scanned images?)", ""]
    return [head, *[f"    {s}" for s in doc["summary"]], ""]


def _html_block(doc: dict[str, Any]) -> str:
    name = html.escape(doc["name"])
    if "error" in doc:
        return f"<h2>{name}</h2><p>Could not be read: {html.escape(doc['error'])}: {html.escape(doc['message'])}</p>"
    lost = f"; {_lost_pages(doc)}" if _lost_pages(doc) else ""
    stats = f"<p>{doc['pages']} pages, {doc['words']} words{lost}</p>"
    if not doc["has_text"]:
        return f"<h2>{name}</h2>{stats}<p>No text layer (scanned images?).</p>"
    items = "".join(f"<li>{html.escape(s)}</li>" for s in doc["summary"])
    return f"<h2>{name}</h2>{stats}<ul>{items}</ul>"
