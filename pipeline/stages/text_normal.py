"""What a PDF's text layer needs before a person reads it: one normalisation for both engines.

Engines hand back typesetting artefacts rather than words: PDFium marks a soft
hyphen with U+FFFE (or U+0002), pypdf keeps U+00AD; ligature glyphs come out as
one code point (``ﬁ``); words split at a line end keep their hyphen; URLs wrap
across lines; control characters leak from broken encodings. Every page goes
through ``normalize_page`` in the extraction worker, so the stored text, its
word count and the digest all see the same words whichever engine read them.

``split_sentences`` ends a sentence at ``.``/``!``/``?`` (and the Arabic, Urdu and
Devanagari ones) only when what follows starts a new one (anything but a lowercase
letter, in any script), never after an abbreviation or an initial, and never
inside a URL (a decimal point has no space after it), which is what extractive summaries otherwise cut in half;
and always at a CJK full stop (。！？), which has no space after it.

Chinese and Japanese put no space between words: ``count_words`` counts each
ideograph and kana as a word (``IDEOGRAPH`` is the class the digest scores them by).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ..errors import showable

# soft hyphens: PDFium's U+FFFE and U+0002 markers, and the real U+00AD
_SOFT = "\ufffe\u0002\u00ad"
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "st", "\ufb06": "st"})
_HAS_LIGATURE = re.compile("[\ufb00-\ufb06]")
# C0/C1 controls except tab and newline (a form feed is our page separator: a page must not contain one), and
# bidi embeddings, overrides and isolates: they reached summaries, where U+202E turns "exe.fdp" into "pdf.exe"
# (right-to-left text needs none of them: its direction is the letters' own), and lone surrogates: pypdf
# takes a font's codes for text when it has no Unicode map, and U+D800-U+DFFF cannot be written as UTF-8
_CONTROLS = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
                       r"\ufeff\uffff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SOFT_AT_LINE_END = re.compile(rf"[{_SOFT}][ \t]*\n[ \t]*")
# a soft-hyphen mark inside a URL was the URL's own hyphen at a line end ("https://CRAN.R<FFFE>project.org")
_SOFT_IN_URL = re.compile(r"((?:https?:|www\.)[^\s\ufffe]*)\ufffe")
# "exam-\nple": a hyphen between two lowercase letters across a line end is typesetting, not spelling
_HYPHEN_AT_LINE_END = re.compile(r"(?<=[a-z\u00df-\u00ff])-[ \t]*\n[ \t]*(?=[a-z\u00df-\u00ff])")
# a URL that wraps: its line ends inside it (after / . - _ = ? & # or ://) and the next line goes on without a space
_URL_WRAP = re.compile(r"((?:https?:|www\.)[^\s]*[/.\-_=?&#:])[ \t]*\n[ \t]*(?=[A-Za-z0-9/%~_-])")


def normalize_page(text: str) -> str:
    """The page's text with soft hyphens, ligatures, hyphenated line ends, wrapped URLs and controls repaired.

    Each repair runs only when its marker is on the page (a substring test is a fast C scan): most pages
    need one or two of them, and this runs on every page of every document.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\f" in text:
        text = text.replace("\f", "\n")
    soft = [mark for mark in _SOFT if mark in text]
    if soft:
        text = _SOFT_AT_LINE_END.sub("", text)
        if "\ufffe" in text:
            text = _SOFT_IN_URL.sub(r"\1-", text)  # PDFium takes any hyphen that ends a line for a soft one
    if _HAS_LIGATURE.search(text):
        text = text.translate(_LIGATURES)
    if "http" in text or "www." in text:
        text = _URL_WRAP.sub(r"\1", text)  # before hyphens: a hyphen that ends a URL's line is the URL's own
    if "-" in text:
        text = _HYPHEN_AT_LINE_END.sub("", text)
    for mark in soft:
        text = text.replace(mark, "")
    if not _CONTROLS.search(text):
        return text
    if _SURROGATE.search(text):  # a high and a low one side by side are one character (an emoji): join them
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return _CONTROLS.sub("", text)


# abbreviations after which a period does not end a sentence (lowercase, without the period)
ABBREVIATIONS = frozenset("""
e.g i.e etc cf vs viz al approx ca fig figs eq eqs no nos vol vols pp p ch sec secs ref refs ed eds
mr mrs ms dr prof sr jr st mt inc ltd co corp dept univ jan feb mar apr jun jul aug sep sept oct nov dec
""".split())
# a candidate end: a CJK full stop (with closing quotes/brackets), or . ! ? (and Arabic ? and full stop, the
# danda) with closing quotes/brackets followed by space and a letter or digit (group 1) that may start a
# sentence: not a lowercase one, in any script (split_sentences checks the rarer ones; the common ones are
# left out here, which keeps the search as fast as it was). One class first: the search skips to it at C speed
_END = re.compile(r"[.!?\u061f\u06d4\u0964\u3002\uff01\uff1f\uff61](?:(?<=[\u3002\uff01\uff1f\uff61])"
                  r"[\"')\]\u201d\u2019\u300d\u300f\uff09]*\s*|[\"')\]\u201d\u2019]*\s+"
                  r"(?=[\"'(\[\u201c\u2018]?([^\W_a-z\u00df-\u00f6\u00f8-\u00ff\u03ac-\u03ce\u0430-\u045f])))")
# Chinese and Japanese words: each ideograph (CJK unified, extension A, compatibility) and kana is one
IDEOGRAPH = re.compile("[\u3041-\u3096\u30a1-\u30fa\u30fc-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9d]")
# CJK punctuation and full-width forms that are not letters or digits: no word of their own
_CJK_PUNCTUATION = re.compile("[\u3000-\u303f\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")


def may_be_ideographic(text: str, words: int) -> bool:
    """Whether ``text``, in which ``words`` words were found by spaces or letters, may be Chinese or Japanese:
    under one word per 16 characters, and not ASCII. A Latin text (a word per 6 or 7) then costs no scan for
    ideographs, even with a curly quote in it."""
    return words * 16 < len(text) and not text.isascii()


def count_words(text: str) -> int:
    """The words in ``text``: runs between whitespace, and each Chinese or Japanese character (a page of
    Chinese was "2 words"). Any ideograph counts, however the text is cut in lines or pages: a short-lined
    table of contents was counted by its lines, and a document by how it was streamed (a reviewer's find)."""
    words = len(text.split())
    if text.isascii() or not IDEOGRAPH.search(text):
        return words
    rest, ideographs = IDEOGRAPH.subn(" ", text)
    return ideographs + len(_CJK_PUNCTUATION.sub(" ", rest).split()) if ideographs else words


def _ends_sentence(before: str) -> bool:
    """False when the period closing ``before`` belongs to an abbreviation, an initial or a URL."""
    tokens = before.rsplit(None, 1)
    if not tokens:
        return True
    token = tokens[-1]
    if not token.endswith("."):
        return True  # ! or ?
    if token[:-1].endswith((")", "]", "\"", "'", "\u201d", "\u2019")):  # "(see https://x.org)." ends one
        return True
    word = token.rstrip(".").lstrip("\"'([\u201c\u2018").lower()
    if word in ABBREVIATIONS:
        return False
    if re.fullmatch(r"([^\W\d_]\.)*[^\W\d_]", word):  # an initial or an acronym: "J. Smith", "U.S. Army"
        return False
    if "://" in word or word.startswith("www."):  # a URL's own dots and a trailing one are part of it
        return False
    return True  # a word or a number ("in 2019. Then"): "No. 5" is caught as an abbreviation


def split_sentences(text: str) -> Iterator[str]:
    """Sentences of ``text`` with their whitespace collapsed, in order."""
    start = 0
    for match in _END.finditer(text):
        end = match.start() + 1
        after = match.group(1)
        if (after is None or not after.islower()) and _ends_sentence(text[start:end]):
            sentence = " ".join(text[start:match.end()].split())
            if sentence:
                yield sentence
            start = match.end()
    tail = " ".join(text[start:].split())
    if tail:
        yield tail


# what tools write when the author set none: "Untitled - Notepad" (Windows' Print to PDF), "Untitled document"
# (Google Docs), "Untitled-1", "Document1", "Book1", "Presentation1", "Microsoft Excel - Book1", a file name
_JUNK_TITLE = re.compile(r"^(untitled([ -]?\d+| document| - .*)?|.* - notepad|title|(document|book|presentation)\d*"
                         r"|microsoft (word|excel|powerpoint|office \w+) - .*"
                         r"|.*\.(docx?|xlsx?|pptx?|txt|pdf|tex|dvi|odt|rtf|indd|qxd))$", re.I)


def pick_title(metadata_title: str | None, first_page: str) -> str:
    """The document's title: its metadata title unless empty or junk, else its first heading-like line. Control
    characters and bidi overrides go: a title is shown in the digest, where NUL, BEL and U+202E (which turns
    "exe.fdp" into "pdf.exe", the spoof attachment names are cleaned of) came through as sent."""
    title = showable(metadata_title or "")
    if title and not _JUNK_TITLE.match(title) and sum(c.isalpha() for c in title) >= 3:
        return title[:200]
    for line in first_page.splitlines()[:15]:
        line = showable(line)
        letters = sum(c.isalpha() for c in line)
        if letters >= 4 and len(line) <= 120 and letters >= len(line) / 2 and not line.endswith((".", ",", ";")):
            return line
    return ""
