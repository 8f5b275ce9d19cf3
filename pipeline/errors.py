"""Typed errors a user of the pipeline can see.

    PipelineError
    ├── ConfigurationError      bad settings, missing optional dependency
    ├── DAGError                invalid workflow graph (cycle, unknown dep, duplicate id)
    ├── UnknownWorkflowError    trigger() for a workflow nobody registered
    ├── StartupError            a service cannot start (port in use, data dir not writable)
    ├── StoreError              the run store cannot be opened or used
    │   ├── NotADatabaseError   the file is not SQLite
    │   ├── SchemaTooNewError   written by a newer version of the pipeline
    │   ├── UnknownRunError     no run with that id
    │   ├── StoreBusyError      locked by another writer past the busy timeout (retryable)
    │   │   └── StoreUnavailableError  the database server cannot be reached (retryable)
    │   ├── StoreCorruptError   pages of the database are damaged
    │   └── StoreIOError        the disk under the store failed (full, read-only, I/O error)
    ├── SpoolError              a message could not be stored durably (``disk_full`` set for ENOSPC)
    ├── UnavailableError        the service cannot take work now (unhealthy engine): SMTP 451
    ├── RejectedMessageError    the gateway refuses a message (size, recipient)
    ├── IngestError             one PDF cannot be read; ``reason`` is what the store records
    │   ├── EncryptedPdfError   reason "encrypted"
    │   ├── CorruptPdfError     reason "corrupt"
    │   ├── PdfTooLargeError    reason "too_large" (pages, bytes, decompressed size, time, memory cap)
    │   ├── NotReadError        reason "not_read": a wrapper whose files are not read (TNEF, S/MIME, tar...),
    │   │                       or a document past its mail's budget of worker time
    │   └── WorkerCrashedError  reason "worker_crashed": the extraction worker died for another cause
    ├── ParseError              an email is not usable MIME; reason "malformed_email"
    ├── DeliveryError           the digest could not be delivered
    ├── TaskIOError             a task's file or socket call failed (disk full, permissions, a file gone)
    │   ├── MachineShortError   ... because the machine ran short (space, quota, descriptors; read-only)
    │   ├── PermissionRefusedError  ... refused permission (a chmod in the data dir): retried about 30 s
    │   └── FileGoneError       ... a file not there (moved away, as in a restore): retried about 30 s
    ├── ClusterUnavailableError the Dask scheduler cannot be reached, or lost a task (retryable)
    └── StepError               a task failed; carries run_id, task_id and reason
    TaskTimeoutError(StepError) a task ran past its timeout

Every error carries a short machine-readable ``reason`` next to its message:
the run store records it as the task's error type. ``retryable`` tells the
runner whether another try could help (bad input never gets better).
"""

from __future__ import annotations

import errno
import re
from typing import Any

_UNSHOWABLE = re.compile("[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]")  # controls, bidi overrides


def showable(text: str) -> str:
    """``text`` on one line, without control characters or bidi overrides (each becomes a space): for text that
    comes from a file or a peer and is shown to a person, in a digest, a log line or a terminal."""
    return " ".join(_UNSHOWABLE.sub(" ", text).split())


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    reason = "error"
    retryable = True

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as args plus attributes, never through ``__init__``: errors cross from pool workers and Dask
        to the engine, and one whose ``__init__`` takes other arguments than its args (a file name, an exit
        code, a path and two versions) would fail to unpickle there, which breaks the whole process pool."""
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[PipelineError], args: tuple[Any, ...], state: dict[str, Any]) -> PipelineError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigurationError(PipelineError):
    """Settings are invalid or an optional dependency is missing."""

    reason = "configuration"
    retryable = False


class DAGError(PipelineError):
    """A workflow graph is invalid; ``culprit`` names the offending task(s)."""

    reason = "invalid_dag"
    retryable = False

    def __init__(self, message: str, culprit: object = None) -> None:
        super().__init__(message)
        self.culprit = culprit


class UnknownWorkflowError(PipelineError):
    """No workflow of that name is registered."""

    reason = "unknown_workflow"

    def __init__(self, workflow: str, known: list[str]) -> None:
        super().__init__(f"unknown workflow {workflow!r}; registered: {', '.join(sorted(known)) or 'none'}")
        self.workflow = workflow


class StoreError(PipelineError):
    """The run store cannot be opened or used."""

    reason = "store"


class NotADatabaseError(StoreError):
    """The store path exists but is not a SQLite database."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{path}: not a run store (file is not a SQLite database); refusing to touch it")
        self.path = path


class SchemaTooNewError(StoreError):
    """The store was written by a newer pipeline; opening it could damage it."""

    def __init__(self, path: object, found: int, supported: int) -> None:
        super().__init__(
            f"{path}: run store schema version {found} is newer than this pipeline supports ({supported}); "
            "upgrade the pipeline"
        )
        self.path, self.found, self.supported = path, found, supported


class UnknownRunError(StoreError):
    """No run has that id."""

    def __init__(self, run_id: object) -> None:
        super().__init__(f"no run with id {run_id!r}")
        self.run_id = run_id


class StoreBusyError(StoreError):
    """Another process held the store's write lock past the busy timeout; trying later can work."""

    reason = "store_busy"


class StoreUnavailableError(StoreBusyError):
    """The database server cannot be reached: refused, gone, shutting down, or no pooled connection in time.

    A StoreBusyError because the caller's answer is the same: try later (the
    gateway answers 451, the engine requeues and backs off); the store object
    reconnects by itself once the server is back.
    """

    reason = "store_unavailable"


class StoreCorruptError(StoreError):
    """SQLite reports damaged pages ("database disk image is malformed"); restore or rebuild the file."""

    reason = "store_corrupt"
    retryable = False


class StoreIOError(StoreError):
    """The disk under the store failed: full, read-only or an I/O error."""

    reason = "store_io"


class StartupError(PipelineError):
    """A service cannot start: the port is taken, the data dir is not writable, ..."""

    reason = "startup"
    retryable = False


class RunNotFinishedError(PipelineError):
    """A run ``ingest`` made did not end while it waited (its time ran out, or the engine stayed unhealthy). The run
    stays in the store, and a serve on the same data dir finishes it."""

    reason = "not_finished"
    retryable = False


class SpoolError(PipelineError):
    """A message could not be written durably to the spool; ``disk_full`` is set when the disk is full."""

    reason = "spool"

    def __init__(self, message: str, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class UnavailableError(PipelineError):
    """The service cannot take work now (its engine is unhealthy); senders should retry later."""

    reason = "unavailable"


class AcceptStalledError(UnavailableError):
    """Storing and queueing a message took longer than ``[gateway] accept_timeout_s``: the store or the disk does
    not answer. The accept goes on; the sender is told to retry."""

    reason = "accept_stalled"


class RejectedMessageError(PipelineError):
    """The gateway refuses a message; ``smtp_code`` is the reply it sends."""

    reason = "rejected"

    def __init__(self, message: str, smtp_code: int = 550) -> None:
        super().__init__(message)
        self.smtp_code = smtp_code


class IngestError(PipelineError):
    """One PDF cannot be turned into text. Its message is made ``showable``: much of it comes from the file
    (a filter name carried terminal escapes and a CR/LF into digests, logs and ``show``)."""

    reason = "ingest"
    retryable = False

    def __init__(self, message: str, filename: str = "") -> None:
        super().__init__(showable(message))
        self.filename = filename


class EncryptedPdfError(IngestError):
    """The PDF is encrypted and the empty password does not open it."""

    reason = "encrypted"


class CorruptPdfError(IngestError):
    """The PDF is damaged, truncated or not a PDF at all."""

    reason = "corrupt"


class PdfTooLargeError(IngestError):
    """The PDF exceeds a page, size, decompression, memory or time limit."""

    reason = "too_large"


class NotReadError(IngestError):
    """An attachment whose files the pipeline lists but does not read (``stages.wrappers``): Outlook's
    winmail.dat, an S/MIME or OpenPGP wrapper, an archive other than ZIP, a split or encrypted message, a damaged
    ZIP archive or a member encrypted or past its budget. Its PDFs, if any, are not digested, so the run is
    partial, as with a PDF that cannot be read."""

    reason = "not_read"


class WorkerCrashedError(IngestError):
    """The extraction worker died for a cause other than the memory cap; another try may work."""

    reason = "worker_crashed"
    retryable = True

    def __init__(self, message: str, filename: str = "", exit_code: int | None = None) -> None:
        super().__init__(message, filename)
        self.exit_code = exit_code


class ClusterUnavailableError(PipelineError):
    """The Dask scheduler cannot be reached, or lost a task's result; trying later can work."""

    reason = "cluster_unavailable"


class ParseError(PipelineError):
    """An email is not usable MIME."""

    reason = "malformed_email"
    retryable = False


class DeliveryError(PipelineError):
    """The digest could not be handed to the relay or the outbox."""

    reason = "delivery"

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class TaskIOError(PipelineError):
    """An OS error a task body let through (disk full, permissions, a file gone), typed at the task's edge
    (``executors.call_task``); retryable: the disk may have room by the next try. A task's own file found
    damaged is not: ``retryable=False``."""

    reason = "task_io"

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class MachineShortError(TaskIOError):
    """A task's file call failed because the machine is short of something (disk space, quota, file descriptors)
    or its file system turned read-only: not the document's fault, nor the task's. Once the task's own retries
    are used up, its run is not failed but requeued to wait for the machine (``runner``), and the engine reports
    unhealthy meanwhile, so the gateway answers 451: a full disk under the work dir lost every mail acked."""


class PermissionRefusedError(TaskIOError):
    """A task's file call was refused permission (EACCES, EPERM). Tasks touch only the data dir's own files, so
    that is someone's chmod or chown there, most often undone soon: 15 s of `chmod -R a-w` failed 4 of 40 acked
    mails for good (one retry, 0.5 s later; a prober's find). So the task is tried at least ``min_retries`` times,
    backing off (about 30 s with the default delays), then fails ``task_io``. Not the machine's (the run does not
    wait, nor make serve unhealthy): one file made unreadable then stopped all mail (a re-probe's find)."""

    min_retries = 6


class FileGoneError(TaskIOError):
    """A file of the data dir a task needs is not there (ENOENT), most often moved away and soon put back: a
    restore, or a spool directory moved aside by mistake and put back 10 s later (the audit's spool_replaced,
    whose mails acked meanwhile once failed for good when a parse fell in those seconds: one retry, 0.5 s
    later). Tried at least ``min_retries`` times, backing off (about 30 s with the default delays), then it
    fails ``task_io``; the file's alone, not the machine's."""

    min_retries = 6


class WorkLostError(TaskIOError):
    """A task's tries failed for a file an earlier task of its run made (an attachment, a text), and that file is
    gone: the run's work dir was deleted or emptied under it (a probe's ``rm -rf data/work`` failed 5 of 6 acked
    mails for good). Retrying the task cannot bring the file back, so the run is rebuilt: every task queued
    again, the run requeued, and its parse reads the spool file anew (``DAGRunStore.rebuild_run``)."""


# the errnos of a machine short of something; a file gone (ENOENT) is that file's alone
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EROFS})
PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


def task_io_class(exc: OSError) -> type[TaskIOError]:
    """The typed error class for an OS error ``exc`` a task let through: MachineShortError for a machine short
    of something (MACHINE_ERRNOS), PermissionRefusedError for a permission refused, FileGoneError for a file
    not there, TaskIOError for any other."""
    if exc.errno in MACHINE_ERRNOS:
        return MachineShortError
    if exc.errno == errno.ENOENT:
        return FileGoneError
    return PermissionRefusedError if exc.errno in PERMISSION_ERRNOS else TaskIOError


def task_io_error(message: str, exc: OSError) -> TaskIOError:
    """``task_io_class(exc)`` with ``message``."""
    return task_io_class(exc)(message)


class StepError(PipelineError):
    """A task of a run failed."""

    reason = "step_failed"

    def __init__(self, message: str, run_id: object = None, task_id: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        self.run_id, self.task_id = run_id, task_id
        if reason:
            self.reason = reason


class TaskTimeoutError(StepError):
    """A task ran past its timeout."""

    reason = "timeout"
