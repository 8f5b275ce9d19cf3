"""Real published PDFs from a package registry, kept out of the repository (issue 16).

Generated fixtures do not show what real documents cost: fonts, ligatures,
tables and thousands of pages typeset by a real tool. Debian's documentation
packages ship such PDFs; ``fetch`` downloads one package with ``apt-get
download`` (no root needed, nothing installed), unpacks it with ``dpkg-deb``
and keeps the PDFs under a cache directory (``data/real-pdfs/`` by default,
ignored by git), so a second call reads them from disk.

``R_MANUAL`` is the R reference manual from ``r-doc-pdf``: 2,415 dense pages,
6.5 MB in R 4.2.2 (Debian 12), the size of manual the issue names; another
release ships another edition.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigurationError


@dataclass(frozen=True)
class RealPdf:
    """A PDF inside a Debian package."""

    package: str
    member: str  # its path inside the package


R_MANUAL = RealPdf("r-doc-pdf", "usr/share/R/doc/manual/fullrefman.pdf")
DEFAULT_CACHE = Path(__file__).resolve().parents[3] / "data" / "real-pdfs"  # the checkout's data/, git-ignored


class NotAvailable(ConfigurationError):
    """The package cannot be fetched here (no apt-get or dpkg-deb, no network, no such package)."""


def fetch(pdf: RealPdf = R_MANUAL, cache: Path = DEFAULT_CACHE, timeout_s: float = 300.0) -> Path:
    """The local path of ``pdf``, downloading and unpacking its package into ``cache`` the first time."""
    target = Path(cache) / pdf.package / pdf.member
    if target.is_file():
        return target
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise NotAvailable(f"fetching {pdf.package} needs {tool} (Debian or Ubuntu)")
    with tempfile.TemporaryDirectory(prefix="real-pdf-") as tmp:
        try:
            got = subprocess.run(["apt-get", "download", pdf.package], cwd=tmp, capture_output=True, text=True,
                                 timeout=timeout_s, check=False)
            debs = sorted(Path(tmp).glob(f"{pdf.package}_*.deb"))
            if got.returncode != 0 or not debs:
                last = (got.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
                raise NotAvailable(f"apt-get download {pdf.package} failed: {last}")
            unpacked = Path(tmp) / "unpacked"
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=timeout_s,
                           capture_output=True)
        except (subprocess.SubprocessError, OSError) as exc:  # a timeout, dpkg-deb failing, a full disk
            raise NotAvailable(f"fetching {pdf.package} failed: {type(exc).__name__}: {exc}") from exc
        source = unpacked / pdf.member
        if not source.is_file():
            raise NotAvailable(f"{pdf.package} has no {pdf.member}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        shutil.copyfile(source, partial)
        partial.replace(target)  # whole or absent: an interrupted copy is never taken for the PDF
    return target
