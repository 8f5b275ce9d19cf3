"""Email-triggered document pipeline: Email -> Ingestion -> Digest -> Delivery.

The public names are re-exported here; ``__all__`` lists them. They are
imported on first use (PEP 562 ``__getattr__``), so ``import pipeline`` costs
nothing: the CLI's read commands and the extraction workers start without the
engine, the gateway or a PDF library (issue 16).
"""

import importlib
import typing

if typing.TYPE_CHECKING:  # type checkers and IDEs see the names where they live
    from .config import (
        DeliveryConfig,
        EngineConfig,
        ExecutorConfig,
        GatewayConfig,
        IngestConfig,
        MetricsConfig,
        RunnerConfig,
        Settings,
        StoreConfig,
        load_settings,
    )
    from .dag import DAG, Task, TaskContext
    from .engine import WorkflowEngine
    from .errors import (
        ClusterUnavailableError,
        ConfigurationError,
        CorruptPdfError,
        DAGError,
        DeliveryError,
        EncryptedPdfError,
        IngestError,
        NotADatabaseError,
        ParseError,
        PdfTooLargeError,
        PipelineError,
        RejectedMessageError,
        SchemaTooNewError,
        SpoolError,
        StartupError,
        StepError,
        StoreBusyError,
        StoreCorruptError,
        StoreError,
        StoreIOError,
        StoreUnavailableError,
        TaskTimeoutError,
        UnavailableError,
        UnknownRunError,
        UnknownWorkflowError,
        WorkerCrashedError,
    )
    from .runner import DAGRunner
    from .sqlite_store import SqliteRunStore
    from .store import DAGRunStore, Run, TaskRun, Transition, open_store

# the module each public name lives in; a test checks it against __all__ and the imports above
_HOMES = {
    "config": ("DeliveryConfig", "EngineConfig", "ExecutorConfig", "GatewayConfig", "IngestConfig", "MetricsConfig",
               "RunnerConfig", "Settings", "StoreConfig", "load_settings"),
    "dag": ("DAG", "Task", "TaskContext"),
    "engine": ("WorkflowEngine",),
    "errors": ("ClusterUnavailableError", "ConfigurationError", "CorruptPdfError", "DAGError", "DeliveryError",
               "EncryptedPdfError", "IngestError", "NotADatabaseError", "ParseError", "PdfTooLargeError",
               "PipelineError", "RejectedMessageError", "SchemaTooNewError", "SpoolError", "StartupError",
               "StepError", "StoreBusyError", "StoreCorruptError", "StoreError", "StoreIOError",
               "StoreUnavailableError", "TaskTimeoutError", "UnavailableError", "UnknownRunError",
               "UnknownWorkflowError", "WorkerCrashedError"),
    "runner": ("DAGRunner",),
    "sqlite_store": ("SqliteRunStore",),
    "store": ("DAGRunStore", "Run", "TaskRun", "Transition", "open_store"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "DAG",
    "ClusterUnavailableError",
    "ConfigurationError",
    "CorruptPdfError",
    "DAGError",
    "DAGRunStore",
    "DAGRunner",
    "DeliveryConfig",
    "DeliveryError",
    "EncryptedPdfError",
    "EngineConfig",
    "ExecutorConfig",
    "GatewayConfig",
    "IngestConfig",
    "MetricsConfig",
    "IngestError",
    "NotADatabaseError",
    "ParseError",
    "PdfTooLargeError",
    "PipelineError",
    "RejectedMessageError",
    "Run",
    "RunnerConfig",
    "SchemaTooNewError",
    "Settings",
    "SpoolError",
    "SqliteRunStore",
    "StartupError",
    "StepError",
    "StoreBusyError",
    "StoreConfig",
    "StoreCorruptError",
    "StoreError",
    "StoreIOError",
    "StoreUnavailableError",
    "Task",
    "TaskContext",
    "TaskRun",
    "TaskTimeoutError",
    "Transition",
    "UnavailableError",
    "UnknownRunError",
    "UnknownWorkflowError",
    "WorkerCrashedError",
    "WorkflowEngine",
    "load_settings",
    "open_store",
]


def __getattr__(name: str) -> typing.Any:
    """Import a public name's module on first use and keep the name here (later lookups skip this)."""
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
