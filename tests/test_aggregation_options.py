"""A parallel task's aggregation options (quorum, min_responses, aggregation_timeout_s, weights)
as the coordinator applies them: mapped onto the task's aggregator (``runs.TaskRun``, on a
clock passed in), and checked against the effective mode at submit, before anything is
journaled (a real coordinator with no nodes: accepted tasks just wait)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.journal import UnknownTaskError
from coordinator.runs import TaskRun, aggregation_config
from coordinator.service import CoordinatorConfig
from meshinfer.inference.base import ModelRef
from meshinfer.proto.aggregation import Mode
from meshinfer.proto.tasks import InvalidTaskError, Pattern, TaskSpec, plan
from meshinfer.proto.tasks_wire import Tensor
from tests.test_coordinator_service import Mesh

A, B, C = ModelRef("a"), ModelRef("b", "2"), ModelRef("c")
X = Tensor.from_array(np.ones((2, 3), np.float32))


def parallel(aggregation="ensemble", **options) -> TaskSpec:
    return TaskSpec("t", Pattern.PARALLEL, X, (A, B, C), aggregation=aggregation, **options)


def out(value: float) -> Tensor:
    return Tensor.from_array(np.full((2, 3), value, np.float32))


# --- TaskRun ---------------------------------------------------------------------------------


def test_the_options_become_the_aggregators_config_keyed_by_item():
    spec = parallel(quorum=2, min_responses=2, aggregation_timeout_s=1.5, deadline_s=4.0,
                    weights={A: 2.0, C: 0.25})  # fmt: skip
    cfg = aggregation_config(spec, plan(spec), "all")
    assert (cfg.mode, cfg.quorum, cfg.min_responses, cfg.timeout_s) == (Mode.ENSEMBLE, 2, 2, 1.5)
    assert cfg.weights == {"t/0": 2.0, "t/2": 0.25}  # b (t/1) weighs 1
    default = aggregation_config(parallel("majority", deadline_s=4.0), plan(spec), "all")
    assert (default.quorum, default.min_responses, default.timeout_s) == (None, 1, 4.0)


def test_an_ensemble_with_a_quorum_ends_once_that_many_models_answered():
    run = TaskRun(parallel(quorum=2, deadline_s=10.0), default_aggregation="all", now=0.0)
    run.record_result("t/0", out(1.0), "n0", 0.1)
    assert not run.done
    run.record_result("t/2", out(3.0), "n1", 0.2)  # t/1 never answers
    assert run.done and run.outcome.succeeded
    agg = run.outcome.aggregation
    assert agg.sources == ("t/0", "t/2") and agg.reason == "complete" and not agg.partial
    np.testing.assert_allclose(run.outcome.outputs[0], 2.0)


def test_weights_move_a_weighted_average_toward_the_heavier_model():
    run = TaskRun(parallel("weighted", weights={C: 3.0}), default_aggregation="all", now=0.0)
    for item, value in (("t/0", 0.0), ("t/1", 0.0), ("t/2", 5.0)):
        run.record_result(item, out(value), "n", 0.1)
    np.testing.assert_allclose(run.outcome.outputs[0], 3.0)  # (0 + 0 + 3 * 5) / 5, not 5 / 3


def test_the_aggregation_timeout_ends_the_task_before_its_deadline():
    spec = parallel("all", aggregation_timeout_s=1.0, deadline_s=10.0, min_responses=2)
    run = TaskRun(spec, default_aggregation="all", now=100.0)
    assert run.deadline() == 101.0  # the task's timer: not the deadline at 110
    run.record_result("t/0", out(1.0), "n", 100.5)
    run.record_result("t/1", out(2.0), "n", 100.6)
    run.check_timeout(100.99)
    assert not run.done
    run.check_timeout(101.0)
    assert run.outcome.succeeded and run.outcome.aggregation.partial
    assert run.outcome.aggregation.reason == "timeout"


def test_fewer_outputs_than_min_responses_at_the_timeout_fail_naming_the_timeout():
    spec = parallel("all", aggregation_timeout_s=1.0, deadline_s=10.0, min_responses=2)
    run = TaskRun(spec, default_aggregation="all", now=0.0)
    run.record_result("t/0", out(1.0), "n", 0.5)
    run.check_timeout(1.0)
    assert not run.outcome.succeeded
    assert "1 of 3 outputs in by the aggregation timeout of 1 s" in run.outcome.error


def test_a_run_refuses_options_its_mode_does_not_take():
    with pytest.raises(InvalidTaskError, match="quorum: only an ensemble"):
        TaskRun(parallel(None, quorum=2), default_aggregation="all", now=0.0)
    run = TaskRun(parallel(None, quorum=2), default_aggregation="ensemble", now=0.0)
    assert run.aggregator.config.quorum == 2


# --- submit ----------------------------------------------------------------------------------


async def test_options_the_default_mode_does_not_take_are_refused_before_the_journal(tmp_path):
    async with Mesh(tmp_path, n=0, config=CoordinatorConfig(default_aggregation="all")) as mesh:
        c = mesh.coordinator
        for spec in (
            TaskSpec("q", Pattern.PARALLEL, X, (A, B, C), quorum=2),
            TaskSpec("w", Pattern.PARALLEL, X, (A, B, C), weights={A: 2.0}),
        ):
            with pytest.raises(InvalidTaskError, match="only"):
                await c.submit(spec)
            with pytest.raises(UnknownTaskError):
                await c.get(spec.task_id)
        # options every mode takes need no mode written in
        ok = TaskSpec("m", Pattern.PARALLEL, X, (A, B), min_responses=2, deadline_s=30.0)
        await c.submit(ok, will_wait=False)
        assert (await c.get("m")).spec == ok


async def test_the_default_mode_is_journaled_with_a_quorum_it_takes(tmp_path):
    config = CoordinatorConfig(default_aggregation="ensemble", default_deadline_s=30.0)
    async with Mesh(tmp_path, n=0, config=config) as mesh:
        c = mesh.coordinator
        spec = TaskSpec("q", Pattern.PARALLEL, X, (A, B, C), quorum=2, weights={B: 2.0})
        await c.submit(spec, will_wait=False)
        journaled = (await c.get("q")).spec
        assert journaled.aggregation == "ensemble" and journaled.quorum == 2
        assert journaled.weights == {B: 2.0} and journaled.deadline_s == 30.0
        await c.submit(spec, will_wait=False)  # a retry of the same spec is no conflict
        late = TaskSpec("late", Pattern.PARALLEL, X, (A, B), aggregation_timeout_s=31.0)
        with pytest.raises(InvalidTaskError, match="aggregation_timeout_s 31 exceeds"):
            await c.submit(late)  # over the default deadline it would run under
