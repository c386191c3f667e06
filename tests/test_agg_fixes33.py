"""Aggregation under adversarial outputs (session 33): a majority vote over a float output with
no scores (an empty class axis) or over empty outputs raised numpy's ValueError instead of
refusing the output (RemoteProtocolError) or voting over no elements; ValueError escapes
``TaskRun.record_result``, the path both a node's answer and a journal replay take. A property
test: no mix of wire-typed outputs, of any shape, failures and a timeout, crashes an aggregator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.runs import TaskRun
from meshinfer.errors import RemoteProtocolError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.aggregation import AggregationConfig, Aggregator, Mode
from meshinfer.proto.tasks import Pattern, TaskSpec
from meshinfer.proto.tasks_wire import DTYPES, Tensor

A, B, C = ModelRef("a"), ModelRef("b"), ModelRef("c")


def test_a_float_output_with_no_scores_is_refused_not_a_numpy_error():
    agg = Aggregator(AggregationConfig(Mode.MAJORITY), ["s0", "s1"], now=0.0)
    with pytest.raises(RemoteProtocolError, match="class axis"):
        agg.add("s0", np.zeros((2, 0), np.float32), 0.0)  # argmax of no scores
    assert not agg.is_done(0.0)  # nothing recorded: the source may still answer
    agg.add("s0", np.array([[0.1, 0.9], [0.8, 0.2]], np.float32), 0.0)
    agg.add("s1", np.array([1, 0]), 0.0)
    np.testing.assert_array_equal(agg.result().value, [1, 0])


@pytest.mark.parametrize(
    "outputs",
    [
        [np.zeros((0,), np.int64)] * 3,  # labels of no element
        [np.zeros((0, 4), np.float32)] * 3,  # scores of no element
    ],
)
def test_a_majority_over_empty_outputs_waits_for_every_vote_and_is_empty(outputs):
    agg = Aggregator(AggregationConfig(Mode.MAJORITY), ["s0", "s1", "s2"], now=0.0)
    agg.add("s0", outputs[0], 0.0)
    assert not agg.is_done(0.0)  # nothing to decide early: no element has a winner yet
    agg.add("s1", outputs[1], 0.0)
    agg.add("s2", outputs[2], 0.0)
    result = agg.result()
    assert result.reason == "complete" and not result.failed
    assert result.sources == ("s0", "s1", "s2")
    assert result.value.shape == (0,) and result.tied == () and result.abstained == ()


def test_a_task_given_a_scoreless_vote_fails_naming_the_item_instead_of_raising():
    x = Tensor.from_array(np.ones((2, 3), np.float32))
    spec = TaskSpec("t", Pattern.PARALLEL, x, (A, B, C), aggregation="majority")
    run = TaskRun(spec, default_aggregation="all", now=0.0)
    run.record_result("t/0", Tensor.from_array(np.zeros((2, 4), np.float32)), "n0", 0.1)
    run.record_result("t/1", Tensor.from_array(np.zeros((2, 0), np.float32)), "n1", 0.2)
    assert run.done and not run.outcome.succeeded
    assert "t/1" in run.outcome.error and "class axis" in run.outcome.error
    assert "n1" in run.failed["t/1"]


# --- never a crash ----------------------------------------------------------------------------

_SOURCES = ("s0", "s1", "s2", "s3")
_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def _outputs(draw):
    """Arrays of wire dtypes; mostly of one shape (so that they combine), some of others."""
    base = draw(_shapes)
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    events = []
    for source in draw(st.permutations(_SOURCES)):
        kind = draw(st.sampled_from(["output", "output", "failure", "silent"]))
        if kind == "failure":
            events.append((source, None))
        elif kind == "output":
            shape = base if draw(st.booleans()) else draw(_shapes)
            dt = dtype if draw(st.booleans()) else draw(st.sampled_from(sorted(DTYPES)))
            if np.dtype(dt).kind == "f":
                values = st.sampled_from([0.0, -1.5, 2.0, 6e4, -6e4, np.nan, np.inf, -np.inf])
            elif dt == "bool":
                values = st.booleans()
            else:
                info = np.iinfo(dt)
                values = st.integers(int(info.min), int(info.max))
            flat = draw(
                st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
            )
            with np.errstate(over="ignore", invalid="ignore"):
                events.append((source, np.array(flat, dtype=dt).reshape(shape)))
    return events


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(list(Mode)),
    events=_outputs(),
    quorum=st.integers(1, 4),
    min_responses=st.integers(1, 4),
    weights=st.lists(st.floats(1e-300, 1e300), min_size=4, max_size=4),
)
def test_no_mix_of_outputs_crashes_an_aggregator(mode, events, quorum, min_responses, weights):
    cfg = AggregationConfig(
        mode,
        quorum=quorum if mode == Mode.ENSEMBLE else None,
        min_responses=min_responses,
        timeout_s=10.0,
        weights=dict(zip(_SOURCES, weights, strict=True))
        if mode in (Mode.WEIGHTED, Mode.ENSEMBLE)
        else {},
    )
    agg = Aggregator(cfg, _SOURCES, now=0.0)
    for at, (source, array) in enumerate(events):
        if array is None:
            agg.add_failure(source, float(at))
            continue
        try:
            agg.add(source, array, float(at))
        except RemoteProtocolError:
            agg.add_failure(source, float(at))  # as a node's failure: the others go on
    assert agg.is_done(20.0)  # past the timeout: done whatever came
    # no numpy warning is left unhandled either (an underflow is benign: a weight tinier than
    # the largest by over 1e308 counts for nothing, rightly to within rounding)
    with np.errstate(all="raise", under="ignore"):
        result = agg.result()
    assert result.failed == (result.value is None)
    assert set(result.sources) <= set(_SOURCES)
    if mode == Mode.MAJORITY and not result.failed:
        assert result.value.dtype == np.int64
