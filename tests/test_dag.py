"""DAG validation: every invalid graph names its culprit."""

import pytest
from helpers import noop

from pipeline.dag import DAG, Task
from pipeline.errors import DAGError


def test_valid_dag_has_topological_order():
    dag = DAG("wf", [Task("c", noop, deps=("b",)), Task("b", noop, deps=("a",)), Task("a", noop)])
    assert dag.order == ("a", "b", "c")
    assert dag.dependents("a") == ("b",)


def test_cycle_is_printed():
    with pytest.raises(DAGError, match=r"dependency cycle (a -> c -> b -> a|c -> b -> a -> c|b -> a -> c -> b)") as err:
        DAG("wf", [Task("a", noop, deps=("c",)), Task("b", noop, deps=("a",)), Task("c", noop, deps=("b",))])
    assert set(err.value.culprit) == {"a", "b", "c"}


def test_self_dependency_is_a_cycle():
    with pytest.raises(DAGError, match="dependency cycle a -> a"):
        DAG("wf", [Task("a", noop, deps=("a",))])


def test_unknown_dependency_is_named():
    with pytest.raises(DAGError, match="task 'b'.*unknown dependency 'nope'"):
        DAG("wf", [Task("a", noop), Task("b", noop, deps=("nope",))])


def test_duplicate_task_id_is_named():
    with pytest.raises(DAGError, match="duplicate task id 'a'"):
        DAG("wf", [Task("a", noop), Task("a", noop)])


@pytest.mark.parametrize("task, message", [
    (Task("m", noop, map_over="a"), "map_over 'a' must also be listed in deps"),
    (Task("m", noop, deps=("a",), executor="gpu"), "executor must be one of"),
    (Task("m", noop, deps=("a",), allow_failed=("b",)), "allow_failed names tasks that are not deps"),
    (Task("m", noop, deps=("a",), map_items=list), "map_items needs map_over"),
    (Task("m", noop, deps=("a",), retries=-1), "retries must be >= 0"),
    (Task("m[1]", noop), "invalid task id"),
])
def test_bad_task_options_are_rejected(task, message):
    with pytest.raises(DAGError, match=message):
        DAG("wf", [Task("a", noop), task])


def test_bad_workflow_id_and_empty_dag():
    with pytest.raises(DAGError, match="workflow id"):
        DAG("no spaces", [Task("a", noop)])
    with pytest.raises(DAGError, match="has no tasks"):
        DAG("wf", [])


def test_one_parser_and_builder_of_task_instance_ids():
    from pipeline.dag import instance_id, parse_instance, task_of

    assert instance_id("ingest_pdf", 3) == "ingest_pdf[3]" and instance_id("deliver") == "deliver"
    assert parse_instance("ingest_pdf[3]") == ("ingest_pdf", 3) and parse_instance("deliver") == ("deliver", None)
    assert task_of("ingest_pdf[12]") == "ingest_pdf" and task_of("odd[x]") == "odd[x]"
    with pytest.raises(ValueError, match="not a task instance id"):
        parse_instance("odd[x]")
