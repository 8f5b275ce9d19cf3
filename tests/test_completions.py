"""A process-pool try's result reaches its run on a completion thread, not on the pool's one result thread."""

import multiprocessing
import os
import queue
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace

import pytest
from helpers import square_in_process

from pipeline.config import RunnerConfig
from pipeline.dag import DAG, Task
from pipeline.engine import WorkflowEngine
from pipeline.executors import Executors


@pytest.mark.parametrize("threads", [4, 0], ids=["completion-threads", "pool-result-thread-baseline"])
def test_a_process_try_result_reaches_its_callback_on_a_completion_thread(threads):
    context = multiprocessing.get_context("forkserver")
    executors = Executors(RunnerConfig(completion_threads=threads), ThreadPoolExecutor(1),
                          lambda: ProcessPoolExecutor(1, mp_context=context))
    try:
        seen: queue.Queue = queue.Queue()
        future = executors.submit_process(os.getpid)
        executors.on_done(future, lambda f: seen.put((threading.current_thread().name, f.result())))
        name, pid = seen.get(timeout=60)
    finally:
        executors.shutdown()
    assert pid != os.getpid()
    assert name.startswith("pipeline-completion") == (threads > 0), name


@pytest.mark.parametrize("threads", [4, 0], ids=["completion-threads", "pool-result-thread-baseline"])
def test_process_tasks_chain_to_success_both_ways(store, settings, threads):
    settings = replace(settings, runner=replace(settings.runner, completion_threads=threads))
    engine = WorkflowEngine(store, settings)
    engine.register(DAG("cpu", [Task("a", square_in_process, executor="process"),
                                Task("b", square_in_process, deps=("a",), executor="process")]))
    engine.start()
    try:
        runs = [engine.trigger("cpu", {"n": n}).run_id for n in range(6)]
        assert [engine.wait(r, timeout=60).state for r in runs] == ["success"] * 6
    finally:
        engine.shutdown(grace_s=5)
    outputs = {t.output["value"] for r in runs for t in store.get_tasks(r) if t.task_id == "b"}
    assert outputs == {n * n for n in range(6)}


def test_a_completion_callback_that_raises_is_logged_and_the_next_one_still_runs(caplog):
    context = multiprocessing.get_context("forkserver")
    executors = Executors(RunnerConfig(completion_threads=1), ThreadPoolExecutor(1),
                          lambda: ProcessPoolExecutor(1, mp_context=context))
    seen: queue.Queue = queue.Queue()

    def broken(future):
        raise RuntimeError("bookkeeping bug")

    try:
        executors.on_done(executors.submit_process(os.getpid), broken)
        executors.on_done(executors.submit_process(os.getpid), lambda f: seen.put(f.result()))
        assert seen.get(timeout=60) != os.getpid()  # the one completion thread went on
    finally:
        executors.shutdown()
    failures = [r for r in caplog.records if "completion callback" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[1].args == ("bookkeeping bug",)
