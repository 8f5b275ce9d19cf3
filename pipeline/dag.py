"""Task and DAG: a workflow's shape, validated once when it is built.

A task may be *mapped* over the list an upstream task returns (fan-out): the
runner then creates one instance per item, ``ingest_pdf[0]``, ``ingest_pdf[1]``...
Dependents of a mapped task wait for all its instances. By default a task runs
only if every upstream instance succeeded; deps named in ``allow_failed`` may
have failed instances (their results are then ``None``, their errors in
``ctx.errors``), which is how one bad attachment does not stop a digest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import DAGError

EXECUTORS = ("thread", "io", "extract", "process", "dask")  # "io", "extract": threads of their own (Executors)
THREAD_EXECUTORS = ("thread", "io", "extract")


@dataclass(frozen=True)
class TaskContext:
    """What a task callable receives; picklable so process tasks get it too.

    ``upstream`` maps each dependency id to its result (a list for a mapped
    dependency, ``None`` where an instance failed); ``errors`` maps failed
    upstream instance ids to ``{"type", "message"}``; ``item`` is the element
    of the mapped-over list for a mapped instance.
    """

    run_id: int
    task_id: str
    payload: Mapping[str, Any]
    upstream: Mapping[str, Any]
    errors: Mapping[str, Mapping[str, str]]
    work_dir: str
    try_number: int = 1
    item: Any = None
    index: int | None = None


@dataclass(frozen=True)
class Task:
    """One step of a workflow.

    ``fn(ctx: TaskContext)`` returns a small JSON-serialisable value (large data:
    write a file under ``ctx.work_dir`` and return its path). ``executor`` picks
    threads (I/O-bound), processes (CPU-bound; ``fn`` must be importable) or the
    Dask cluster of ``[executor]`` (``fn`` importable on the workers, files on shared storage).
    """

    id: str
    fn: Callable[[TaskContext], Any]
    deps: tuple[str, ...] = ()
    retries: int | None = None  # None: the runner's default
    retry_max_delay_s: float | None = None  # the longest pause between tries; None: the runner's
    timeout_s: float | None = None
    executor: str = "thread"
    map_over: str | None = None
    map_items: Callable[[Any], Any] | None = None  # picks the list out of map_over's result (default: all of it)
    allow_failed: tuple[str, ...] = ()
    # at most this many instances of the task run (or wait for a retry) at once in one run; None: all at once.
    # A mapped task over a shared pool: one mail's hundred PDFs must not take every thread from other mails
    max_parallel: int | None = None


@dataclass(frozen=True)
class DAG:
    """A named, validated set of tasks."""

    workflow_id: str
    tasks: tuple[Task, ...]
    order: tuple[str, ...] = field(init=False)  # topological order, computed at validation
    _index: dict[str, Task] = field(init=False, repr=False, compare=False)
    _dependents: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __init__(self, workflow_id: str, tasks: Iterable[Task]) -> None:
        object.__setattr__(self, "workflow_id", workflow_id)
        object.__setattr__(self, "tasks", tuple(tasks))
        object.__setattr__(self, "order", validate_dag(workflow_id, self.tasks))
        object.__setattr__(self, "_index", {t.id: t for t in self.tasks})
        object.__setattr__(self, "_dependents", {
            t.id: tuple(d.id for d in self.tasks if t.id in d.deps) for t in self.tasks})

    def task(self, task_id: str) -> Task:
        """Return the task with this id (KeyError if none)."""
        return self._index[task_id]

    def dependents(self, task_id: str) -> tuple[str, ...]:
        """Ids of the tasks that depend directly on ``task_id``."""
        return self._dependents[task_id]

    def has_task(self, task_id: str) -> bool:
        """Whether the DAG has a task with this id."""
        return task_id in self._index


_INSTANCE = re.compile(r"^(?P<task>[^\[]+)(\[(?P<index>\d+)\])?$")


def instance_id(task_id: str, index: int | None = None) -> str:
    """The id of a task instance: ``ingest_pdf[3]`` for the fourth of a mapped task, else the task's id."""
    return task_id if index is None else f"{task_id}[{index}]"


def parse_instance(instance: str) -> tuple[str, int | None]:
    """``ingest_pdf[3]`` -> ("ingest_pdf", 3); ``deliver`` -> ("deliver", None); ValueError for anything else."""
    match = _INSTANCE.match(instance)
    if match is None:
        raise ValueError(f"not a task instance id: {instance!r}")
    return match["task"], int(match["index"]) if match["index"] is not None else None


def task_of(instance: str) -> str:
    """The task of an instance id (``ingest_pdf[3]`` -> ``ingest_pdf``), or the id itself when it is not one."""
    try:
        return parse_instance(instance)[0]
    except ValueError:
        return instance


def validate_dag(workflow_id: str, tasks: tuple[Task, ...]) -> tuple[str, ...]:
    """Check ids, dependencies, options and acyclicity; return a topological order."""
    if not workflow_id or not workflow_id.replace("_", "").replace("-", "").isalnum():
        raise DAGError(f"workflow id {workflow_id!r} must be letters, digits, '-' or '_'", workflow_id)
    if not tasks:
        raise DAGError(f"workflow {workflow_id!r} has no tasks", workflow_id)
    seen: set[str] = set()
    for task in tasks:
        if task.id in seen:
            raise DAGError(f"workflow {workflow_id!r}: duplicate task id {task.id!r}", task.id)
        if not task.id or "[" in task.id:
            raise DAGError(f"workflow {workflow_id!r}: invalid task id {task.id!r}", task.id)
        seen.add(task.id)
    for task in tasks:
        _check_task(workflow_id, task, seen)
    return _topological_order(workflow_id, tasks)


def _check_task(workflow_id: str, task: Task, ids: set[str]) -> None:
    where = f"workflow {workflow_id!r}, task {task.id!r}"
    for dep in task.deps:
        if dep not in ids:
            raise DAGError(f"{where}: unknown dependency {dep!r}", dep)
    if task.map_over is not None and task.map_over not in task.deps:
        raise DAGError(f"{where}: map_over {task.map_over!r} must also be listed in deps", task.id)
    if task.executor not in EXECUTORS:
        raise DAGError(f"{where}: executor must be one of {EXECUTORS}, not {task.executor!r}", task.id)
    if not set(task.allow_failed) <= set(task.deps):
        raise DAGError(f"{where}: allow_failed names tasks that are not deps", task.id)
    if task.map_items is not None and task.map_over is None:
        raise DAGError(f"{where}: map_items needs map_over", task.id)
    if (task.retries is not None and task.retries < 0) or (task.timeout_s is not None and task.timeout_s <= 0):
        raise DAGError(f"{where}: retries must be >= 0 and timeout_s > 0", task.id)
    if task.max_parallel is not None and task.max_parallel < 1:
        raise DAGError(f"{where}: max_parallel must be >= 1 (or None: no limit), not {task.max_parallel}", task.id)


def _topological_order(workflow_id: str, tasks: tuple[Task, ...]) -> tuple[str, ...]:
    deps = {t.id: t.deps for t in tasks}
    order: list[str] = []
    state: dict[str, str] = {}  # "visiting" or "done"
    for root in deps:
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        while stack:
            node, i = stack.pop()
            if i == 0:
                if state.get(node) == "done":
                    continue
                if state.get(node) == "visiting":
                    cycle = path[path.index(node):] + [node]
                    raise DAGError(f"workflow {workflow_id!r}: dependency cycle {' -> '.join(cycle)} "
                                   "(each needs the next)", cycle)
                state[node] = "visiting"
                path.append(node)
            if i < len(deps[node]):
                stack.append((node, i + 1))
                stack.append((deps[node][i], 0))
            else:
                state[node] = "done"
                path.pop()
                order.append(node)
    return tuple(order)
