"""Task semantics, session 27: weighted averages of outputs near the float64 limit, vote labels
past int64, exactly-once aggregation decisions (Hypothesis), and a parallel task that runs out of
time saying what its items waited for.

Pure :class:`~meshinfer.proto.aggregation.Aggregator` checks first, then a real coordinator and
node daemons (``tests.test_coordinator_service.Mesh``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshinfer.errors import RemoteProtocolError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.aggregation import AggregationConfig, Aggregator, Mode, majority_vote
from meshinfer.proto.tasks import Pattern, Stage, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from tests.test_coordinator_service import DIGITS, Mesh, spec

SOURCES = [f"src-{i}" for i in range(5)]
BIG = float(np.finfo(np.float64).max)
AVERAGES = [Mode.WEIGHTED, Mode.ENSEMBLE]


def feed(config: AggregationConfig, outputs: dict, order=None) -> Aggregator:
    agg = Aggregator(config, outputs, now=0.0)
    for source in order or list(outputs):
        agg.add(source, outputs[source], 0.0)
    return agg


# --- weighted averages near the float64 limit ----------------------------------------------


@pytest.mark.parametrize("mode", AVERAGES)
def test_an_average_of_outputs_near_the_float64_limit_is_not_infinite(mode):
    outputs = {
        "a": np.array([BIG, 1.0, -BIG, BIG]),
        "b": np.array([BIG, 3.0, -BIG, BIG]),
        "c": np.array([BIG, 2.0, -BIG, -BIG]),
    }
    value = feed(AggregationConfig(mode), outputs).result().value
    # before: [inf, 2, -inf, inf] (the sums overflowed)
    assert value[:3].tolist() == [BIG, 2.0, -BIG]
    np.testing.assert_allclose(value[3], BIG / 3, rtol=1e-12)


@pytest.mark.parametrize("mode", AVERAGES)
@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    weights=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=5),
)
def test_a_float64_average_stays_between_its_inputs_over_the_whole_range(mode, data, weights):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3))
    element = st.floats(allow_nan=False, allow_infinity=False)
    outputs = {
        SOURCES[i]: data.draw(hnp.arrays(np.float64, shape, elements=element))
        for i in range(len(weights))
    }
    config = AggregationConfig(mode, weights=dict(zip(SOURCES, weights, strict=False)))
    value = feed(config, outputs).result().value
    stacked = np.stack(list(outputs.values()))
    assert np.all(np.isfinite(value))
    slack = 1e-9 * np.abs(stacked).max(axis=0)
    with np.errstate(over="ignore"):  # (the bounds of outputs at the limit overflow: fine)
        assert np.all(value >= stacked.min(axis=0) - slack)
        assert np.all(value <= stacked.max(axis=0) + slack)


@pytest.mark.parametrize("mode", AVERAGES)
def test_non_finite_outputs_average_as_ieee_sums_do(mode):
    """Documented, unchanged: a NaN output makes the element NaN, one infinity stays."""
    outputs = {"a": np.array([np.nan, np.inf, 1.0]), "b": np.array([1.0, 1.0, 3.0])}
    value = feed(AggregationConfig(mode), outputs).result().value
    assert np.isnan(value[0]) and value[1] == np.inf and value[2] == 2.0


# --- vote labels ---------------------------------------------------------------------------


def test_a_vote_on_uint64_labels_past_int64_is_refused_not_wrapped():
    label = np.array([2**63 + 5], np.uint64)
    agg = Aggregator(AggregationConfig(Mode.MAJORITY), ["a", "b"], now=0.0)
    with pytest.raises(RemoteProtocolError, match="does not fit int64"):
        agg.add("a", label, 0.0)  # before: taken, and the vote's winner was -9223372036854775803
    agg.add("a", np.array([2**63 - 1], np.uint64), 0.0)  # the largest label that fits
    agg.add("b", np.array([2**63 - 1], np.uint64), 0.0)
    assert agg.result().value.tolist() == [2**63 - 1]


# --- exactly-once decisions (properties) ----------------------------------------------------

events = st.lists(
    st.tuples(st.sampled_from(["out", "odd", "fail", "wait"]), st.integers(0, 4)), max_size=30
)


def _snapshot(agg: Aggregator):
    result = agg.result()
    value = result.value if isinstance(result.value, tuple) else (result.value,)
    arrays = tuple(None if v is None else np.asarray(v).tobytes() for v in value)
    return (result.mode, result.sources, result.partial, result.failed, result.reason, arrays)


@pytest.mark.parametrize("mode", list(Mode))
@settings(max_examples=150, deadline=None)
@given(data=st.data(), expected=st.integers(1, 5), sequence=events)
def test_an_aggregation_is_decided_once_and_never_changes_after(mode, data, expected, sequence):
    """Whatever comes after the decision (outputs, duplicates, failures, unusable outputs,
    time passing the timeout), ``is_done`` stays True and ``result()`` stays what it was."""
    quorum = data.draw(st.integers(1, expected)) if mode == Mode.ENSEMBLE else None
    timeout = data.draw(st.one_of(st.none(), st.floats(0.5, 3.0)))
    config = AggregationConfig(mode, quorum=quorum, timeout_s=timeout)
    agg = Aggregator(config, SOURCES[:expected], now=0.0)
    now, decided = 0.0, None
    for kind, n in sequence:
        source = SOURCES[n % expected]
        if kind == "wait":
            now += 0.3 * n
        elif kind == "fail":
            agg.add_failure(source, now)
        else:
            output = np.full((2, 3), float(n), np.float32)
            try:
                agg.add(source, output if kind == "out" else output[:1], now)
            except RemoteProtocolError:  # a shape that does not fit: nothing recorded
                assert decided is None
        if decided is None and agg.is_done(now):
            decided = _snapshot(agg)
            assert agg.deadline() is None
        elif decided is not None:
            assert agg.is_done(now) and _snapshot(agg) == decided
    if timeout is not None and decided is None:  # undecided: its timeout still decides it
        assert now < timeout and agg.is_done(timeout) and agg.result().reason == "timeout"


@settings(max_examples=200, deadline=None)
@given(
    votes=hnp.arrays(
        np.int64, st.tuples(st.integers(1, 5), st.integers(1, 4)), elements=st.integers(0, 2)
    ),
    data=st.data(),
)
def test_a_vote_decided_early_has_the_winner_of_the_whole_vote(votes, data):
    """In any arrival order, a majority that ends early (the rest could not change it) names
    the winners every vote together names, with no ties."""
    outputs = {SOURCES[i]: votes[i] for i in range(len(votes))}
    order = data.draw(st.permutations(list(outputs)))
    agg = Aggregator(AggregationConfig(Mode.MAJORITY), outputs, now=0.0)
    for source in order:
        if agg.is_done(0.0):
            break
        agg.add(source, outputs[source], 0.0)
    result = agg.result()
    winner, tied = majority_vote(votes)
    if len(result.sources) < len(votes):  # decided early
        assert result.tied == () and not tied.any()
    np.testing.assert_array_equal(result.value, winner)
    assert result.tied == tuple(int(i) for i in np.flatnonzero(tied))


# --- through a coordinator -----------------------------------------------------------------


async def test_a_parallel_task_at_its_deadline_says_what_its_models_waited_for(tmp_path):
    x, _ = load_digits_holdout()
    nowhere = (ModelRef("no-such-model", "1"), ModelRef("nor-this", "1"))
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        lone = spec("lone", "parallel", x[:2], models=nowhere, aggregation="majority",
                    deadline_s=0.3)  # fmt: skip
        half = spec("half", "parallel", x[:2], models=(DIGITS, nowhere[0]), aggregation="all",
                    min_responses=2, deadline_s=0.3)  # fmt: skip
        for task in (lone, half):
            await c.submit(task)
        unserved = "no live, reachable node serves model"
        expected = {
            "lone": "aggregation majority failed (timeout): 0 of 2 outputs in by the deadline of"
            f" 0.3 s; 1 of them waiting: {unserved} no-such-model@1 (1 more waiting for other"
            " reasons)",
            "half": "aggregation all failed (timeout): 1 of 2 outputs in by the deadline of 0.3 s;"
            f" 1 of them waiting: {unserved} no-such-model@1",
        }
        for task_id, error in expected.items():
            record = await c.wait(task_id, timeout=10)
            assert record.state.value == "failed"
            # before: the error ended at "by the deadline of 0.3 s", saying nothing of why
            assert record.summary.error == error


async def test_pipeline_stages_never_run_after_a_failed_stage_say_why(tmp_path):
    x, _ = load_digits_holdout()
    stages = (
        Stage("a", DIGITS),
        Stage("b", DIGITS, after=("a",)),
        Stage("c", DIGITS, after=("b",)),
    )
    async with Mesh(tmp_path, n=1) as mesh:
        c = mesh.coordinator
        task = TaskSpec("misfit", Pattern.PIPELINE, Tensor.from_array(x[:4]), stages=stages)
        record = await c.wait(await c.submit(task), timeout=10)
        assert record.state.value == "failed"
        assert "does not fit" in record.summary.error  # b got a's 10 scores, not 64 pixels
        items = {item.stage: item for item in record.items}
        assert items["c"].state.value == "cancelled"
        assert items["c"].error  # e.g. "not run: the task failed (stage b)"
