"""The peer engines' own virtualenvs: ``data/peers/<name>/venv``, one per peer, outside git.

Issue 16 compares this project with Prefect, Dagster and Airflow. Their dependency trees conflict with
each other and with ours (Airflow pins pydantic, SQLAlchemy and friends), so they cannot be one pip extra of
this package: each gets a virtualenv of its own, made by ``make peers`` (``install_peers``), and is driven
from here in a subprocess running that venv's interpreter. Nothing in this module imports a peer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

PEERS_DIR = Path("data") / "peers"
INSTALL_HINT = "run `make peers`"


@dataclass(frozen=True)
class Peer:
    """One engine users would pick instead of this project, and the pip requirement that installs it."""

    name: str
    requirement: str


# Pinned: the figures of issue 16 were measured on these minor releases; a new one is a new comparison.
PEERS = {
    "prefect": Peer("prefect", "prefect==3.9.1"),
    "dagster": Peer("dagster", "dagster==1.13.29"),
    "airflow": Peer("airflow", "apache-airflow==3.3.2"),
}


def venv_python(root: Path, name: str) -> Path:
    """The interpreter of peer ``name``'s venv under ``root`` (``data/peers`` by default)."""
    return root / name / "venv" / "bin" / "python"


def installed_version(root: Path, name: str) -> str | None:
    """The version ``install_peers`` recorded for ``name``, or None when its venv is absent or unfinished."""
    marker = root / name / "installed.json"
    if not marker.exists() or not venv_python(root, name).exists():
        return None
    return str(json.loads(marker.read_text())["version"])


def skip_reason(root: Path, name: str) -> str | None:
    """Why peer ``name`` cannot be measured (None when it can): the notebook shows this instead of figures."""
    if name not in PEERS:
        return f"skipped: unknown peer {name!r} (known: {', '.join(PEERS)})"
    if installed_version(root, name) is None:
        return f"skipped: not installed in {root / name / 'venv'} ({INSTALL_HINT})"
    return None


def install_peers(root: Path = PEERS_DIR, names: tuple[str, ...] = ("prefect", "dagster", "airflow")) -> dict[str, str]:
    """Create one venv per peer under ``root`` and pip-install its pinned release; return name → version.

    Slow (minutes: Airflow alone is ~200 packages) and needs the package index. pip's output goes to
    ``root/<name>/install.log``; a failed install raises ``RuntimeError`` naming that log, and leaves no
    ``installed.json``, so the peer stays "not installed" rather than half there.
    """
    done: dict[str, str] = {}
    for name in (bar := tqdm(names, desc="peers", unit="engine")):
        bar.set_postfix_str(name)
        peer = PEERS[name]
        home = root / name
        home.mkdir(parents=True, exist_ok=True)
        (home / "installed.json").unlink(missing_ok=True)
        log = home / "install.log"
        started = time.monotonic()
        with open(log, "w") as out:
            for command in ([sys.executable, "-m", "venv", "--clear", str(home / "venv")],
                            [str(venv_python(root, name)), "-m", "pip", "install", "--upgrade", "pip"],
                            [str(venv_python(root, name)), "-m", "pip", "install", peer.requirement]):
                out.write(f"$ {' '.join(command)}\n")
                out.flush()
                if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise RuntimeError(f"installing {peer.requirement} failed; see {log}")
        version = peer.requirement.split("==")[1]
        (home / "installed.json").write_text(json.dumps(
            {"version": version, "requirement": peer.requirement, "seconds": round(time.monotonic() - started, 1)}))
        done[name] = version
    return done


if __name__ == "__main__":  # `make peers`: python -m pipeline.audit.base.peerenv [name ...]
    print(install_peers(PEERS_DIR, tuple(sys.argv[1:]) or tuple(PEERS)))
