"""Source locations without this machine's paths: what the report prints for a file a profiler names.

A report read on another machine (or in a review) must not show ``/root/.pyenv/...`` or the
checkout's absolute path: those say nothing about the code and leak the host's layout.
"""

from __future__ import annotations

import site
import sysconfig
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the directory that holds pipeline/


def _prefixes() -> list[tuple[str, str]]:
    """(absolute directory, label) pairs, the most specific first."""
    pairs = [(str(PACKAGE_ROOT), "")]
    for path in {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
                 sysconfig.get_paths()["platlib"]}:
        pairs.append((str(Path(path).resolve()), "site-packages:"))
    for key in ("stdlib", "platstdlib"):
        pairs.append((str(Path(sysconfig.get_paths()[key]).resolve()), "stdlib:"))
    return sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)


_PREFIXES = _prefixes()


def short_path(filename: str) -> str:
    """``stdlib:re/_compiler.py``, ``site-packages:pypdf/_page.py``, ``pipeline/gateway.py``; else the file name.

    Anything outside the known roots (another venv, a temp dir) is reduced to its last component,
    so no absolute path survives.
    """
    if not filename or filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return filename
    for marker in ("site-packages/", "dist-packages/"):  # also another interpreter's (a worker in another venv)
        if marker in filename:
            return "site-packages:" + filename.rsplit(marker, 1)[1]
    path = str(Path(filename).resolve()) if filename.startswith("/") else filename
    for prefix, label in _PREFIXES:
        if path.startswith(prefix + "/"):
            return label + path[len(prefix) + 1:]
    return Path(filename).name if filename.startswith("/") else filename


def short_site(filename: str, lineno: int | None = None) -> str:
    """``short_path(filename):lineno`` (no ``:lineno`` when it is unknown)."""
    return short_path(filename) + (f":{lineno}" if lineno is not None else "")
