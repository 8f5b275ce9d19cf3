"""Deterministic synthetic PDFs and emails: same parameters, same bytes.

Normal documents are written with fpdf2 (fixed creation date, seeded text);
the two shapes fpdf2 does not write, per-glyph kerned text (TJ arrays) and a
Flate decompression bomb, come from a minimal raw writer. ``build_fixtures``
caches files under ``data/fixtures/`` by a hash of their parameters.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
import zlib
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fpdf import FPDF

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LINES_PER_PAGE = 70
WORDS_PER_LINE = 16
_SYLLABLES = "ka lo mi ne ru ta si po de va ri mo le na tu be ga fi so ze".split()


def vocabulary(seed: int = 7, size: int = 4000) -> list[str]:
    """Pseudo-words from syllables: a vocabulary large enough to compress like real prose."""
    rnd = random.Random(seed)
    return ["".join(rnd.choice(_SYLLABLES) for _ in range(rnd.randint(1, 4))) for _ in range(size)]


def sentences(rnd: random.Random, words: Sequence[str], count: int) -> list[str]:
    """``count`` sentences of 6 to 24 words each."""
    out = []
    for _ in range(count):
        body = " ".join(rnd.choice(words) for _ in range(rnd.randint(6, 24)))
        out.append(body[0].upper() + body[1:] + rnd.choice(".!?"))
    return out


def _new_pdf() -> FPDF:
    from fpdf import FPDF  # imported here: SMTP sender processes import this module for email_with alone

    pdf = FPDF()
    pdf.set_creation_date(EPOCH)
    pdf.set_compression(True)
    pdf.set_font("helvetica", size=8)
    return pdf


def _text_lines(rnd: random.Random, words: Sequence[str]) -> list[str]:
    text = " ".join(sentences(rnd, words, 60)).split()
    return [" ".join(text[i:i + WORDS_PER_LINE]) for i in range(0, LINES_PER_PAGE * WORDS_PER_LINE, WORDS_PER_LINE)]


def text_pdf(pages: int, seed: int = 1, encrypt: str | None = None, user_password: str = "") -> bytes:
    """A dense text PDF (about 2.2 KB and 1,100 words per page).

    ``encrypt`` is None, "rc4" or "aes" (128-bit); with an empty ``user_password`` it opens without one.
    """
    rnd, words = random.Random(seed), vocabulary()
    pdf = _new_pdf()
    if encrypt:
        from fpdf.enums import EncryptionMethod

        method = {"rc4": EncryptionMethod.RC4, "aes": EncryptionMethod.AES_128}[encrypt]
        pdf.set_encryption(owner_password="owner-secret", user_password=user_password, encryption_method=method)
    for _ in range(pages):
        pdf.add_page()
        for line, text in enumerate(_text_lines(rnd, words)):
            pdf.text(10, 10 + line * 4, text)
    return bytes(pdf.output())


def _noise_png(rnd: random.Random, width: int, height: int) -> io.BytesIO:
    from PIL import Image  # fpdf2 depends on Pillow

    image = Image.frombytes("L", (width, height), rnd.randbytes(width * height))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    return buf


def image_pdf(pages: int, seed: int = 1, text_lines: int = 0, image_px: int = 320) -> bytes:
    """One distinct noise image per page (scan-like, about ``image_px``² bytes a page), plus
    ``text_lines`` lines of text per page (a mixed document)."""
    rnd, words = random.Random(seed), vocabulary()
    pdf = _new_pdf()
    for _ in range(pages):
        pdf.add_page()
        pdf.image(_noise_png(rnd, image_px, image_px), x=10, y=10, w=120)
        for line, text in enumerate(_text_lines(rnd, words)[:text_lines]):
            pdf.text(10, 140 + line * 4, text)
    return bytes(pdf.output())


def image_pdf_of_size(megabytes: float, text_lines: int = 0, seed: int = 1, image_px: int = 320) -> bytes:
    """An ``image_pdf`` of about ``megabytes`` MB."""
    return image_pdf(max(1, round(megabytes * 1024 * 1024 / (image_px * image_px))), seed, text_lines, image_px)


def _raw_pdf(page_streams: list[bytes], count: int | None = None) -> bytes:
    """Assemble a minimal valid PDF whose pages draw the given (already Flate-compressed) content streams;
    ``count`` is the page tree's /Count (the number of pages unless a hostile file says otherwise)."""
    n = len(page_streams)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(n))
               + b"] /Count %d >>" % (n if count is None else count),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, stream in enumerate(page_streams):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 3 0 R >> >>"
                       b" /Contents %d 0 R >>" % (5 + 2 * i))
        objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream")
    return _pdf_of_objects(objects)


def miscounted_pdf(pages: int, count: int) -> bytes:
    """``pages`` pages of one line each ("page N") whose page tree claims ``count`` pages: broken writers do it,
    and PDFium believes the claim."""
    return _raw_pdf([zlib.compress(b"BT /F1 12 Tf 72 720 Td (page %d) Tj ET" % (i + 1)) for i in range(pages)],
                    count=count)


def run_length_pdf(decompressed_bytes: int) -> bytes:
    """One page whose content stream is RunLengthDecode-encoded blanks inflating to ``decompressed_bytes``:
    a bomb through a filter other than Flate (128 bytes out per 2 in)."""
    stream = b"\x81 " * (decompressed_bytes // 128) + b"\x80"  # 129: repeat the next byte 128 times; 128: end
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 3 0 R >> >>"
               b" /Contents 5 0 R >>",
               b"<< /Length %d /Filter /RunLengthDecode >>\nstream\n" % len(stream) + stream + b"\nendstream"]
    return _pdf_of_objects(objects)


def kerned_pdf(pages: int, seed: int = 1) -> bytes:
    """Text drawn in short kerned runs (TJ arrays of 1 to 6 glyphs between adjustments), as typesetters write it."""
    rnd, words = random.Random(seed), vocabulary()
    streams = []
    for _ in range(pages):
        ops = [b"BT /F1 8 Tf 10 TL 40 800 Td"]
        for line in _text_lines(rnd, words)[:LINES_PER_PAGE]:
            runs, i = [], 0
            while i < len(line):
                n = rnd.randint(1, 6)
                runs.append(b"(%s) %d" % (line[i:i + n].encode("latin-1"), rnd.randint(-40, 40)))
                i += n
            ops.append(b"[" + b" ".join(runs) + b"] TJ T*")
        ops.append(b"ET")
        streams.append(zlib.compress(b"\n".join(ops), 6))
    return _raw_pdf(streams)


def bomb_pdf(decompressed_bytes: int) -> bytes:
    """One page whose content stream inflates to ``decompressed_bytes`` of spaces."""
    compressor = zlib.compressobj(9)
    chunk = b" " * (1 << 20)
    parts = [compressor.compress(chunk) for _ in range(decompressed_bytes >> 20)]
    parts.append(compressor.compress(b" " * (decompressed_bytes & ((1 << 20) - 1))))
    parts.append(compressor.flush())
    return _raw_pdf([b"".join(parts)])


def damaged_page_pdf(pages: int = 3, damaged: int = 1, damage: str = "object", seed: int = 1) -> bytes:
    """A ``kerned_pdf``-like document whose page ``damaged`` (0-based) is broken; every other page is intact.

    ``damage`` is "object": the page's object is replaced by a non-dictionary (PDFium raises "Failed to load
    page." for that page only; pypdf leaves the page out of its page list), or "filter": the page's content
    stream names a filter no reader implements (pypdf raises NotImplementedError for that page only; PDFium
    reads it as an empty page). Found by trying each damage on both engines (pypdfium2 5.15, pypdf 7.1).
    """
    if damage not in ("object", "filter"):
        raise ValueError(f"unknown damage {damage!r}; choose 'object' or 'filter'")
    data = kerned_pdf(pages, seed)
    number = 4 + 2 * damaged if damage == "object" else 5 + 2 * damaged  # _raw_pdf's page / stream numbering
    start = data.index(b"\n%d 0 obj\n" % number) + len(b"\n%d 0 obj\n" % number)
    end = data.index(b"\nendobj\n", start)
    body = b"null" if damage == "object" else b"<< /Length 5 /Filter /NoSuchFilter >>\nstream\nhello\nendstream"
    return data[:start] + body.ljust(end - start) + data[end:]  # padded to the same length: the xref stays right


def truncated(pdf: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of a PDF, as a broken download leaves it."""
    return pdf[: int(len(pdf) * keep)]


def random_bytes(size: int, seed: int = 1) -> bytes:
    """``size`` random bytes (to be named .pdf)."""
    return random.Random(seed).randbytes(size)


def email_with(attachments: Sequence[tuple[str, bytes]], subject: str = "Quarterly reports",
               sender: str = "alice@example.com", message_id: str | None = "<fixture-1@example.com>",
               body: str = "Please find the documents attached.") -> bytes:
    """A MIME message from ``sender`` with the given (file name, bytes) attachments."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "digest@pipeline.local"
    msg["Subject"] = subject
    msg["Date"] = formatdate(EPOCH.timestamp())
    if message_id:
        msg["Message-ID"] = message_id
    msg.set_content(body)
    for name, data in attachments:
        maintype, subtype = ("application", "pdf") if data[:5] == b"%PDF-" or name.endswith(".pdf") else \
            ("application", "octet-stream")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    if msg.is_multipart():  # a fixed boundary keeps the bytes deterministic (the default one is random)
        seed = hashlib.sha256(f"{message_id}|{subject}|{len(attachments)}".encode()).hexdigest()[:20]
        msg.set_boundary(f"==fixture-{seed}==")
    return msg.as_bytes(policy=SMTP)


def text_pdf_of_size(megabytes: float, seed: int = 1) -> bytes:
    """A ``text_pdf`` of about ``megabytes`` MB (pages estimated from a 40-page sample)."""
    per_page = len(text_pdf(40, seed)) / 40
    return text_pdf(max(1, round(megabytes * 1024 * 1024 / per_page)), seed)


def kerned_pdf_of_size(megabytes: float, seed: int = 1) -> bytes:
    """A ``kerned_pdf`` of about ``megabytes`` MB."""
    per_page = len(kerned_pdf(20, seed)) / 20
    return kerned_pdf(max(1, round(megabytes * 1024 * 1024 / per_page)), seed)


def distinct(pdf: bytes, copy: int) -> bytes:
    """``pdf`` with a comment after its end naming ``copy``: the same document in other bytes, for a mail of many
    documents (the parse step digests a mail's copies of one file once)."""
    return pdf + b"%% copy %d\n" % copy


def yencoded(data: bytes, name: str, line: int = 128) -> bytes:
    """``data`` as yEnc writes a file into a text body: each byte plus 42, NUL, LF, CR and "=" escaped as "=" and
    the byte plus 64, between ``=ybegin`` and ``=yend`` lines."""
    out, column = bytearray(), 0
    for byte in data:
        byte = (byte + 42) % 256
        if byte in (0, 10, 13, 61):
            out += bytes((61, (byte + 64) % 256))
            column += 2
        else:
            out.append(byte)
            column += 1
        if column >= line:
            out += b"\r\n"
            column = 0
    return (b"=ybegin line=%d size=%d name=%s\r\n" % (line, len(data), name.encode()) + bytes(out)
            + b"\r\n=yend size=%d\r\n" % len(data))


def cached(directory: Path, name: str, params: dict[str, Any], make: Callable[[], bytes]) -> Path:
    """Return ``directory/<name>-<hash>.<ext>``, building it with ``make()`` only if absent."""
    key = hashlib.sha256(json.dumps({"name": name, **params}, sort_keys=True).encode()).hexdigest()[:12]
    stem, _, ext = name.rpartition(".")
    path = Path(directory) / f"{stem}-{key}.{ext}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(make())
        tmp.replace(path)
    return path


# name -> (kind, MB, maker). Sizes per profile: quick for CI, standard for `make audit`, full for limits.
PROFILES: dict[str, dict[str, tuple[str, float]]] = {
    "quick": {"text-tiny.pdf": ("text", 0.01), "text-0.5mb.pdf": ("text", 0.5), "text-1mb.pdf": ("text", 1),
              "mixed-1mb.pdf": ("mixed", 1),
              "scan-1mb.pdf": ("scan", 1), "kerned-0.3mb.pdf": ("kerned", 0.3)},
    "standard": {"text-tiny.pdf": ("text", 0.01), "text-1mb.pdf": ("text", 1), "text-5mb.pdf": ("text", 5),
                 "text-10mb.pdf": ("text", 10),
                 "text-25mb.pdf": ("text", 25), "mixed-5mb.pdf": ("mixed", 5), "scan-5mb.pdf": ("scan", 5),
                 "kerned-5mb.pdf": ("kerned", 5)},
}
PROFILES["full"] = {**PROFILES["standard"], "text-50mb.pdf": ("text", 50)}
_MAKERS: dict[str, Callable[[float], bytes]] = {
    "text": text_pdf_of_size,
    "mixed": lambda mb: image_pdf_of_size(mb, text_lines=20),
    "scan": image_pdf_of_size,
    "kerned": kerned_pdf_of_size,
}
HOSTILE: dict[str, Callable[[], bytes]] = {
    "encrypted-rc4-open.pdf": lambda: text_pdf(2, encrypt="rc4"),
    "encrypted-aes-open.pdf": lambda: text_pdf(2, encrypt="aes"),
    "encrypted-rc4-password.pdf": lambda: text_pdf(2, encrypt="rc4", user_password="secret"),
    "encrypted-aes-password.pdf": lambda: text_pdf(2, encrypt="aes", user_password="secret"),
    "truncated.pdf": lambda: truncated(text_pdf(20)),
    "random-bytes.pdf": lambda: random_bytes(64 * 1024),
    "flate-bomb-1gb.pdf": lambda: bomb_pdf(1024 * 1024 * 1024),
    "damaged-page.pdf": lambda: damaged_page_pdf(20, damaged=7),  # 19 of 20 pages read with the default engine
}


def build_fixtures(profile: str, directory: Path,
                   progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Make (or reuse) every fixture of ``profile`` under ``directory``; return ``{"name", "kind", "mb", "path"}``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    items = []
    for name, (kind, mb) in PROFILES[profile].items():
        if progress:
            progress(name)
        path = cached(directory, name, {"kind": kind, "mb": mb, "version": 1}, partial(_MAKERS[kind], mb))
        items.append({"name": name, "kind": kind, "mb": mb, "path": str(path)})
    for name, make in HOSTILE.items():
        if progress:
            progress(name)
        items.append({"name": name, "kind": "hostile", "mb": None,
                      "path": str(cached(directory, name, {"kind": "hostile", "version": 1}, make))})
    return items


def slow_pdf(pages: int, draws: int = 8000) -> bytes:
    """A small hostile PDF (a few KB) whose every page is slow to extract and yields much text (issue 11).

    Each page draws one form XObject (a line of text) ``draws`` times, and all pages share one content
    stream, so the file stays tiny whatever ``pages`` is. Measured (pypdfium2 5.15, idle core): with
    8,000 draws a page takes PDFium about 0.35 s and yields about 400,000 characters.
    """
    form = zlib.compress(b"BT /F1 6 Tf 0 0 Td (The quick brown fox jumps over the lazy dog again) Tj ET")
    content = zlib.compress(b"".join(b"q 1 0 0 1 %d %d cm /Fm1 Do Q\n" % (i % 50, i * 7 % 800)
                                     for i in range(draws)), 9)
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 3 0 R >>"
            b" /XObject << /Fm1 4 0 R >> >> /Contents 5 0 R >>")
    return _pdf_of_objects([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (6 + i) for i in range(pages)) + b"] /Count %d >>" % pages,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Type /XObject /Subtype /Form /BBox [0 0 400 20] /Resources << /Font << /F1 3 0 R >> >> /Length %d"
        b" /Filter /FlateDecode >>\nstream\n" % len(form) + form + b"\nendstream",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream",
        *[page] * pages])


def _pdf_of_objects(objects: list[bytes], info: int | None = None) -> bytes:
    """A PDF file of these object bodies (numbered from 1, the first the catalog) with a correct xref table;
    ``info`` is the number of the document information dictionary, if there is one."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % o for o in offsets))
    trailer = b"/Size %d /Root 1 0 R" % (len(objects) + 1) + (b" /Info %d 0 R" % info if info else b"")
    out.write(b"trailer\n<< " + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def typeset_pdf(lines: list[bytes], title: bytes | None = None) -> bytes:
    """One page of ``lines`` as a typesetter writes them: ligature glyphs (codes 1-3 are /fi /fl /ffi),
    soft hyphens (0xAD), words hyphenated across line ends; ``title`` goes in the information dictionary."""
    content = b"BT /F1 11 Tf 14 TL 40 800 Td\n" + b"\n".join(
        b"(" + line.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b") Tj T*"
        for line in lines) + b"\nET"
    stream = zlib.compress(content, 6)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding << /Type /Encoding "
               b"/BaseEncoding /WinAnsiEncoding /Differences [1 /fi /fl /ffi] >> >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 3 0 R >> >>"
               b" /Contents 5 0 R >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream"]
    if title is None:
        return _pdf_of_objects(objects)
    escaped = title.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
    return _pdf_of_objects([*objects, b"<< /Title (" + escaped + b") /Producer (audit fixtures) >>"], info=6)


def identity_font_pdf(codes: Sequence[int], to_unicode: dict[int, str] | None = None) -> bytes:
    """One line of two-byte ``codes`` in a Type0 (Identity-H) font without glyphs, mapped to text by
    ``to_unicode`` when given: how scripts the base fonts lack reach a page. Without a map pypdf takes the
    codes for the text itself, so codes in U+D800-U+DFFF come out as lone surrogates."""
    font = b"<< /Type /Font /Subtype /Type0 /BaseFont /Foo /Encoding /Identity-H /DescendantFonts [6 0 R]%s >>"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 5 0 R >> >>"
               b" /Contents 4 0 R >>", _stream(b"BT /F1 12 Tf 40 800 Td <%s> Tj ET" % bytes(
                   b"".join(code.to_bytes(2, "big") for code in codes)).hex().encode()),
               font % (b" /ToUnicode 7 0 R" if to_unicode else b""),
               b"<< /Type /Font /Subtype /CIDFontType2 /BaseFont /Foo /CIDToGIDMap /Identity /CIDSystemInfo"
               b" << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >> /FontDescriptor 8 0 R >>"]
    pairs = b"".join(b"<%04x> <%s>\n" % (code, text.encode("utf-16-be").hex().encode())
                     for code, text in (to_unicode or {}).items())
    objects.append(_stream(b"/CIDInit /ProcSet findresource begin 12 dict begin begincmap /CMapName /X def\n"
                           b"1 begincodespacerange <0000> <FFFF> endcodespacerange\n%d beginbfchar\n%sendbfchar\n"
                           b"endcmap CMapName currentdict /CMap defineresource pop end end"
                           % (len(to_unicode or {}), pairs)))
    objects.append(b"<< /Type /FontDescriptor /FontName /Foo /Flags 4 /FontBBox [0 0 1000 1000] /ItalicAngle 0"
                   b" /Ascent 800 /Descent -200 /CapHeight 700 /StemV 80 >>")
    return _pdf_of_objects(objects)


def _stream(data: bytes) -> bytes:
    packed = zlib.compress(data, 6)
    return b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed) + packed + b"\nendstream"
