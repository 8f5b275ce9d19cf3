"""A run's work dir (``data/work/<run id>``): what it holds, and shedding its bulk once the run has ended.

The bulk (attachments, extracted text) is of no use once the run has ended: a rerun starts from the spool file.
A try abandoned at a timeout or a stop may still finish afterwards and write its text again; the ``ended``
marker, written before the bulk is deleted, lets it delete what it wrote (it used to stay until ``purge``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_BULK = ("attachments", "text")  # what a run's work dir holds that its spool file can make again
ENDED = "ended"  # marker: the run has ended and its bulk was shed


def shed_run_files(work_dir: Path) -> None:
    """Delete an ended run's attachments and extracted text, keeping its digest and delivery marker for purge.

    They can be hundreds of times the mail's size (a 4.3 MB mail of dense PDFs left 483 MB of text): kept
    until ``purge``, a few such mails filled the disk. Best effort: what cannot be deleted now, purge deletes
    later."""
    try:
        (work_dir / ENDED).touch()  # first: a late try that writes after the deletion below then sees it
    except OSError:
        pass  # no work dir (a run that never got one), or no room: the deletion below still frees the disk
    _delete_bulk(work_dir)


def shed_if_ended(work_dir: Path) -> bool:
    """For a try that wrote into ``work_dir``: delete the bulk again when the run ended meanwhile (its files
    were written after the run's own shedding). True when it did."""
    if not (work_dir / ENDED).exists():
        return False
    _delete_bulk(work_dir)
    return True


def clear_ended(work_dir: Path) -> None:
    """A run starts in ``work_dir``: an ``ended`` marker there is an earlier run's under the same id (SQLite
    hands out a purged highest id again; a restored backup reuses ids), and must not make its tries delete
    their own text."""
    (work_dir / ENDED).unlink(missing_ok=True)


def _delete_bulk(work_dir: Path) -> None:
    for name in RUN_BULK:
        shutil.rmtree(work_dir / name, ignore_errors=True)  # symlinks inside are unlinked, never followed
