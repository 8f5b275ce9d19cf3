"""How a worker's failure becomes a typed error: by its reply, or by how it died.

A worker that replies with an error names the exception class it caught
(``typed_error`` rebuilds it here). A worker that dies mid-request leaves only
its exit status and the tail of its stderr, and those tell a worker killed by
its memory cap (``too_large``) from any other death (``worker_crashed``,
retryable): ``death_error``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from ..errors import (
    CorruptPdfError,
    EncryptedPdfError,
    FileGoneError,
    IngestError,
    MachineShortError,
    ParseError,
    PdfTooLargeError,
    PermissionRefusedError,
    PipelineError,
    TaskIOError,
    WorkerCrashedError,
)

# What a worker that hit its RLIMIT_AS cap leaves behind. Measured (pypdfium2 5.15, PDFium under a 300 MB cap
# on a 600 MB Flate bomb): the process dies of SIGABRT with faulthandler's "Fatal Python error: Aborted" and a
# stack inside pypdfium2; C++ code that lets std::bad_alloc escape aborts the same way.
MEMORY_EVIDENCE = ("MemoryError", "bad_alloc", "Out of memory", "out of memory", "Cannot allocate memory")
_ERRORS = {cls.__name__: cls for cls in (CorruptPdfError, EncryptedPdfError, PdfTooLargeError, IngestError)}
# errors made from a message alone: a malformed mail, and a file call of the worker's the OS failed (a permission
# refused or a file moved away is retried for a while, a machine short of room makes the run wait)
_MESSAGE_ONLY: dict[str, Callable[[str], PipelineError]] = {cls.__name__: cls for cls in (
    ParseError, PipelineError, TaskIOError, MachineShortError, PermissionRefusedError, FileGoneError)}


def death_error(returncode: int | None, stderr: list[str], memory_limit: int, name: str,
                what: str = "document") -> IngestError:
    """The typed error for a worker that died mid-request, judged by its exit status and its last stderr lines.

    SIGABRT or an out-of-memory message means the document (or email, ``what``) needed more than the cap
    (PdfTooLargeError); any other death (SIGKILL from outside, a segfault, an exit) is a WorkerCrashedError
    another try may cure.
    """
    code = returncode if returncode is not None else 0
    how = f"exit code {code}" + (f", {signal_name(-code)}" if code < 0 else "")
    if code == -signal.SIGABRT or any(mark in line for line in stderr for mark in MEMORY_EVIDENCE):
        return PdfTooLargeError(f"the {what} needed memory over the {memory_limit:,}-byte memory cap: the "
                                f"extraction worker aborted ({how})", name)
    last = next((line.strip() for line in reversed(stderr) if line.strip()), "")
    return WorkerCrashedError(f"the extraction worker died ({how}) while reading the {what}"
                              + (f"; its last words: {last[:200]}" if last else ""), name, exit_code=code)


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; ``signal 35`` for a number Python names no signal for (most real-time signals)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def typed_error(cls: str, message: str, name: str) -> PipelineError:
    """The error a worker's error reply names (its class name and message), about document ``name``."""
    if cls in _MESSAGE_ONLY:
        return _MESSAGE_ONLY[cls](message)
    return _ERRORS.get(cls, IngestError)(message, name)
