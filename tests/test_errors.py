"""The typed error tree crosses processes intact: pool workers and Dask send errors back pickled."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest

from pipeline import errors
from pipeline.errors import PipelineError

# errors whose __init__ takes more, or other, arguments than a message
SAMPLES = {errors.DAGError: ("cycle", ["a", "b"]), errors.UnknownWorkflowError: ("wf", ["digest"]),
           errors.NotADatabaseError: ("/data/runs.sqlite3",), errors.SchemaTooNewError: ("/data/runs.sqlite3", 9, 5),
           errors.UnknownRunError: (7,), errors.SpoolError: ("disk full", True),
           errors.RejectedMessageError: ("too big", 552), errors.IngestError: ("bad", "000-a.pdf"),
           errors.WorkerCrashedError: ("died", "001-b.pdf", -9), errors.DeliveryError: ("refused", False),
           errors.TaskIOError: ("digest damaged", False), errors.StepError: ("failed", 3, "deliver", "delivery"),
           errors.TaskTimeoutError: ("ran 5 s", 3, "deliver")}


def every_error() -> list[type[PipelineError]]:
    found, todo = [], [PipelineError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [cls for cls in found if cls.__module__ == errors.__name__]


def sample(cls: type[PipelineError]) -> PipelineError:
    return cls(*SAMPLES.get(cls, ("something went wrong",)))


def same(a: BaseException, b: BaseException) -> bool:
    return (type(a), a.args, str(a), vars(a)) == (type(b), b.args, str(b), vars(b))


@pytest.mark.parametrize("cls", every_error(), ids=lambda cls: cls.__name__)
def test_every_error_pickles_with_its_message_and_attributes(cls):
    error = sample(cls)
    back = pickle.loads(pickle.dumps(error))
    assert same(back, error)
    assert (back.reason, back.retryable) == (error.reason, error.retryable)


def raise_in_worker(cls: type[PipelineError]) -> None:
    raise sample(cls)


def test_an_error_with_its_own_arguments_raised_in_a_pool_worker_arrives_whole_and_the_pool_lives():
    """SchemaTooNewError (a path and two versions) used to fail to unpickle in the parent, which breaks the
    whole pool: every try in flight then looked like a crashed worker."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        for cls in (errors.SchemaTooNewError, errors.UnknownWorkflowError, errors.WorkerCrashedError,
                    errors.TaskIOError):
            with pytest.raises(cls) as caught:
                pool.submit(raise_in_worker, cls).result(timeout=60)
            assert same(caught.value, sample(cls))
        assert pool.submit(pow, 2, 10).result(timeout=60) == 1024  # not broken
