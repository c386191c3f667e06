"""Session 34 fixes in result aggregation and the coordinator's handling of answers.

* A weighted average weighs each output by its weight's mantissa and a power of two relative
  to the largest weight: weights of any ratio a submission may carry (each positive and
  finite) count (divided by the largest, a weight 1e-30 beside 1e300 underflowed to 0 and its
  output was dropped; an infinite output of such a source gave NaN).
* The ``stats`` view calls the ``duplicates`` counter what it counts: every result the
  journal refused (a duplicate, a late one, one of an unknown item or of an attempt never sent).
* A pipeline stage whose inputs do not join names the stages that produced them and their
  nodes (it named the consuming stage only).
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.runs import TaskRun
from coordinator.task_views import render_stats
from meshinfer.inference.base import ModelRef
from meshinfer.proto.aggregation import AggregationConfig, Aggregator, Mode
from meshinfer.proto.tasks import Pattern, Stage, TaskSpec
from meshinfer.proto.tasks_codec import spec_from_dict
from meshinfer.proto.tasks_wire import Tensor

M1, M2, M3 = ModelRef("m1", "1"), ModelRef("m2", "1"), ModelRef("m3", "1")


def average(mode: Mode, weights: dict[str, float], outputs: dict[str, list[float]]) -> np.ndarray:
    agg = Aggregator(AggregationConfig(mode, weights=weights), list(outputs), now=0.0)
    for source, values in outputs.items():
        agg.add(source, np.array(values, np.float64), 0.0)
    assert agg.is_done(0.0)
    return agg.result().value


@pytest.mark.parametrize("mode", [Mode.WEIGHTED, Mode.ENSEMBLE])
def test_a_tiny_weight_beside_a_huge_one_still_counts(mode):
    """(1e300 * 0 + 1e-30 * 1e308) / (1e300 + 1e-30) = 1e-22; it was 0 (1e-30 / 1e300
    underflowed), and 1e-10 / 1e300 a subnormal weight with a few digits only."""
    value = average(mode, {"a": 1e300, "b": 1e-30}, {"a": [0.0, 1.0], "b": [1e308, 1.0]})
    np.testing.assert_allclose(value, [1e-22, 1.0], rtol=1e-15)
    value = average(mode, {"a": 1e300, "b": 3e-10}, {"a": [0.0], "b": [1e308]})
    np.testing.assert_allclose(value, [3e-2], rtol=1e-15)


def test_an_infinite_output_of_a_vanishing_weight_stays_infinite():
    """w * inf is inf for any positive w: the average is inf (it was 0 * inf: NaN)."""
    value = average(Mode.WEIGHTED, {"a": 1e300, "b": 1e-320}, {"a": [0.0], "b": [np.inf]})
    assert value.tolist() == [np.inf]


def test_weights_of_any_ratio_keep_the_average_between_its_inputs_and_exact_for_equal_ones():
    value = average(Mode.WEIGHTED, {"a": 5e-324, "b": 1.7e308}, {"a": [1e308], "b": [-1.0]})
    assert value.tolist() == [-1.0]  # (-1 + 3e-324 exactly: the nearest float is -1)
    equal = {"a": 3.0, "b": 3.0}  # equal weights: the plain mean, also near the float limit
    assert average(Mode.WEIGHTED, equal, {"a": [1.7e308], "b": [1.7e308]}).tolist() == [1.7e308]
    assert average(Mode.WEIGHTED, equal, {"a": [5e-324], "b": [5e-324]}).tolist() == [5e-324]
    assert average(Mode.WEIGHTED, {}, {"a": [1.0], "b": [2.0]}).tolist() == [1.5]


def _submitted_run(weights: dict[str, float]) -> TaskRun:
    """A parallel task as the API's codec reads it (it takes any positive, finite weight)."""
    x = np.ones((1, 1), np.float32)
    doc = {
        "task_id": "w",
        "pattern": "parallel",
        "models": [{"model_id": "m1"}, {"model_id": "m2"}],
        "inputs": {"data": x.tobytes(), "dtype": "float32", "shape": [1, 1]},
        "aggregation": "weighted",
        "weights": weights,
    }
    return TaskRun(spec_from_dict(doc), default_aggregation="all", now=0.0)


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_a_submitted_task_may_carry_such_weights_and_its_run_averages_them(dtype):
    """Outputs come as float32 or integers at most (the wire's dtypes). Integer labels average
    in float64: 1e-20 / 1e300 was a subnormal weight, a few digits only; a float32 inf of a
    weight 1e-30 beside 1e300 gave NaN."""
    run = _submitted_run({"m1@1": 1e300, "m2@1": 1e-30 if dtype == np.float32 else 1e-20})
    first, second = run.all_item_ids()
    big = np.array([9 * 10**18], np.int64) if dtype == np.int64 else np.array([np.inf], dtype)
    run.record_result(first, Tensor.from_array(np.array([0], dtype)), "n1", 0.0)
    run.record_result(second, Tensor.from_array(big), "n2", 0.0)
    assert run.outcome.succeeded
    expected = [9e-302] if dtype == np.int64 else [np.inf]
    np.testing.assert_allclose(run.outcome.outputs[0], expected, rtol=1e-15)


def test_the_stats_view_says_the_duplicates_counter_is_every_refused_result():
    """The counter bumps for every result the journal refused (duplicate, late, unknown,
    unexpected: ``_judge_result``); the view called them all "duplicate results"."""
    stats = {"tasks": {}, "items": {}, "live_tasks": 0, "parked_items": 0, "dispatched": 0,
             "retries": 0, "redispatched_after_death": 0, "duplicates": 3,
             "completed_by_node": {}, "journal_counters": {"late_results": 3}}  # fmt: skip
    text = render_stats(stats)
    assert "duplicate results" not in text
    assert "refused results    3 (duplicate, late or unknown: see the journal counters)" in text


def _fork_and_join() -> TaskRun:
    stages = (
        Stage("left", M1),
        Stage("right", M2),
        Stage("join", M3, after=("left", "right")),
    )
    x = Tensor.from_array(np.ones((4, 3), np.float32))
    run = TaskRun(TaskSpec("p", Pattern.PIPELINE, x, stages=stages), default_aggregation="all",
                  now=0.0)  # fmt: skip
    run.ready()
    return run


@pytest.mark.parametrize("odd", ["rows", "dtype"])
def test_a_join_error_names_the_upstream_stages_and_their_nodes(odd):
    run = _fork_and_join()
    right = np.ones((3, 2), np.float32) if odd == "rows" else np.ones((4, 2), np.int32)
    run.record_result("p/left", Tensor.from_array(np.ones((4, 1), np.float32)), "node-a", 1.0)
    run.record_result("p/right", Tensor.from_array(right), "node-b", 1.0)
    assert run.ready() == []
    error = run.outcome.error
    assert error.startswith("pipeline: stage 'join'")
    assert "'left'" in error and "'right'" in error
    assert "node-a" in error and "node-b" in error
