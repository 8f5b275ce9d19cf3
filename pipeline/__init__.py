"""Email-triggered document pipeline: Email -> Ingestion -> Digest -> Delivery.

The public names are re-exported here; ``__all__`` lists them.
"""

from .config import (
    DeliveryConfig,
    EngineConfig,
    GatewayConfig,
    IngestConfig,
    RunnerConfig,
    Settings,
    StoreConfig,
    load_settings,
)
from .dag import DAG, Task, TaskContext
from .engine import WorkflowEngine
from .errors import (
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
    StepError,
    StoreError,
    TaskTimeoutError,
    UnknownRunError,
    UnknownWorkflowError,
)
from .runner import DAGRunner
from .sqlite_store import SqliteRunStore
from .store import DAGRunStore, Run, TaskRun, Transition

__all__ = [
    "DAG",
    "ConfigurationError",
    "CorruptPdfError",
    "DAGError",
    "DAGRunStore",
    "DAGRunner",
    "DeliveryConfig",
    "DeliveryError",
    "EncryptedPdfError",
    "EngineConfig",
    "GatewayConfig",
    "IngestConfig",
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
    "SqliteRunStore",
    "StepError",
    "StoreConfig",
    "StoreError",
    "Task",
    "TaskContext",
    "TaskRun",
    "TaskTimeoutError",
    "Transition",
    "UnknownRunError",
    "UnknownWorkflowError",
    "WorkflowEngine",
    "load_settings",
]
