"""Aggregation of several outputs: the modes, their completion rules and their invariants."""

import collections
import itertools
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshinfer.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from meshinfer.proto.aggregation import AggregationConfig, Aggregator, Mode, majority_vote

SOURCES = [f"src-{i}" for i in range(6)]

scores = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4),
    elements=st.floats(-10, 10, width=32),
)


def feed(config, outputs, *, order=None, now=0.0) -> Aggregator:
    """An aggregator expecting ``outputs``' sources, fed in ``order`` (default: as given)."""
    agg = Aggregator(config, outputs, now=0.0)
    for source in order or list(outputs):
        agg.add(source, outputs[source], now)
    return agg


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(array=scores, count=st.integers(1, 5))
def test_majority_of_identical_votes_is_that_vote(array, count):
    agg = feed(AggregationConfig(Mode.MAJORITY), {SOURCES[i]: array for i in range(count)})
    assert agg.is_done(0.0)
    result = agg.result()
    np.testing.assert_array_equal(result.value, np.argmax(array, axis=-1))
    assert result.tied == () and not result.partial and not result.failed


@settings(max_examples=200, deadline=None)
@given(
    array=scores,
    weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=5),
)
def test_weighted_average_of_identical_arrays_is_the_array(array, weights):
    config = AggregationConfig(Mode.WEIGHTED, weights=dict(zip(SOURCES, weights, strict=False)))
    agg = feed(config, {SOURCES[i]: array for i in range(len(weights))})
    assert agg.is_done(0.0)
    np.testing.assert_allclose(agg.result().value, array, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", [Mode.ALL, Mode.MAJORITY, Mode.WEIGHTED, Mode.ENSEMBLE])
@settings(max_examples=100, deadline=None)
@given(data=st.data(), count=st.integers(1, 5))
def test_result_does_not_depend_on_arrival_order(mode, data, count):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3))
    outputs = {
        SOURCES[i]: data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-5, 5, width=32)))
        for i in range(count)
    }
    weights = {s: data.draw(st.floats(0.1, 10)) for s in outputs}
    config = AggregationConfig(mode, weights=weights)
    order = data.draw(st.permutations(list(outputs)))
    first, second = feed(config, outputs).result(), feed(config, outputs, order=order).result()
    if mode != Mode.MAJORITY:  # a vote may be decided before every source is in
        assert first.sources == second.sources == tuple(sorted(outputs))
    assert first.tied == second.tied
    for a, b in zip(_arrays(first.value), _arrays(second.value), strict=True):
        assert a.tobytes() == b.tobytes()  # bit for bit


def _arrays(value):
    return value if isinstance(value, tuple) else (value,)


@settings(max_examples=300, deadline=None)
@given(
    expected=st.integers(1, 6),
    quorum=st.integers(1, 6),
    timeout=st.floats(0.5, 5.0),
    events=st.lists(st.tuples(st.sampled_from(["out", "fail", "dup", "wait"]), st.integers(0, 5))),
)
def test_ensemble_never_completes_before_quorum_unless_timed_out(expected, quorum, timeout, events):
    quorum = min(quorum, expected)
    config = AggregationConfig(Mode.ENSEMBLE, quorum=quorum, timeout_s=timeout)
    agg = Aggregator(config, SOURCES[:expected], now=10.0)
    assert agg.deadline() == 10.0 + timeout
    now, outputs, failures = 10.0, set(), set()
    for kind, n in events:
        source = SOURCES[n % expected]
        fresh = source not in outputs and source not in failures
        if kind == "wait":
            now += 0.4 * n
        elif kind == "fail":
            taken = fresh and not agg.is_done(now)
            agg.add_failure(source, now)
            failures |= {source} if taken else set()
        else:
            taken = fresh and not agg.is_done(now)
            agg.add(source, np.ones(2, np.float32), now)
            outputs |= {source} if taken else set()
        if agg.is_done(now):
            reason = agg.result().reason
            assert reason in ("complete", "timeout", "exhausted")
            if reason == "complete":
                assert len(agg.result().sources) >= quorum
            if reason == "timeout":
                assert now >= 10.0 + timeout
            if reason == "exhausted":
                assert len(outputs) + len(failures) == expected and failures
        else:
            assert len(outputs) < quorum and now < 10.0 + timeout


@settings(max_examples=300, deadline=None)
@given(votes=hnp.arrays(np.int64, st.tuples(st.integers(1, 6), st.integers(1, 5)),
                        elements=st.integers(0, 3)))  # fmt: skip
def test_majority_vote_matches_counting_by_hand(votes):
    winner, tied = majority_vote(votes)
    for column in range(votes.shape[1]):
        tally = collections.Counter(votes[:, column].tolist())
        best = max(tally.values())
        leaders = sorted(label for label, count in tally.items() if count == best)
        assert winner[column] == leaders[0]
        assert tied[column] == (len(leaders) > 1)


def test_majority_vote_memory_is_linear_in_the_voters():
    # 64 voters: comparing every pair of voters per element took 64 x 64 bytes per element,
    # 8 times the votes themselves; counting runs of sorted labels takes a few times them.
    votes = np.random.default_rng(0).integers(0, 10, size=(64, 20_000))
    tracemalloc.start()
    try:
        majority_vote(votes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * votes.nbytes


# --- modes ---------------------------------------------------------------------------------------


def test_first_returns_the_first_arrival_and_counts_the_rest_as_late():
    agg = Aggregator(AggregationConfig(Mode.FIRST), SOURCES[:3], now=0.0)
    assert not agg.is_done(0.0)
    agg.add("src-2", np.array([2.0]), 1.0)
    agg.add("src-0", np.array([0.0]), 1.5)
    result = agg.result()
    assert result.value.tolist() == [2.0] and result.sources == ("src-2",)
    assert result.late == 1 and result.reason == "complete"


def test_all_waits_for_every_source_and_orders_by_source():
    agg = Aggregator(AggregationConfig(Mode.ALL), ["b", "a"], now=0.0)
    agg.add("b", np.array([1, 2], np.int32), 0.0)
    assert not agg.is_done(100.0)  # no timeout configured: waits
    with pytest.raises(LocalProtocolError):
        agg.result()
    agg.add("a", np.array([[3.0]], np.float32), 0.0)  # shapes may differ in "all"
    result = agg.result()
    assert [v.tolist() for v in result.value] == [[[3.0]], [1, 2]]
    assert result.sources == ("a", "b") and not result.partial


def test_duplicates_and_strangers_are_ignored_and_counted():
    agg = Aggregator(AggregationConfig(Mode.WEIGHTED), ["a", "b"], now=0.0)
    agg.add("a", np.array([1.0]), 0.0)
    agg.add("a", np.array([100.0]), 0.0)
    agg.add("zz", np.array([100.0]), 0.0)
    agg.add("b", np.array([3.0]), 0.0)
    result = agg.result()
    assert result.value.tolist() == [2.0]
    assert result.duplicates == 1 and agg.unexpected == 1


def test_weights_shift_the_average():
    config = AggregationConfig(Mode.WEIGHTED, weights={"a": 3.0})
    agg = feed(config, {"a": np.array([0.0, 4.0]), "b": np.array([4.0, 0.0])})
    assert agg.result().value.tolist() == [1.0, 3.0]


def test_majority_ties_go_to_the_smallest_label_and_are_reported():
    outputs = {"a": np.array([[0.9, 0.1], [0.2, 0.8]]), "b": np.array([[0.1, 0.9], [0.3, 0.7]])}
    result = feed(AggregationConfig(Mode.MAJORITY), outputs).result()
    assert result.value.tolist() == [0, 1] and result.tied == (0,)


def test_majority_decides_early_when_the_rest_cannot_change_it():
    agg = Aggregator(AggregationConfig(Mode.MAJORITY), SOURCES[:3], now=0.0)
    agg.add("src-0", np.array([5, 1]), 0.0)  # integer outputs are labels already
    assert not agg.is_done(0.0)
    agg.add("src-1", np.array([5, 1]), 0.0)
    assert agg.is_done(0.0)
    result = agg.result()
    assert result.value.tolist() == [5, 1] and result.reason == "complete"
    agg.add("src-2", np.array([0, 0]), 0.0)
    assert agg.result().late == 1


@pytest.mark.parametrize(
    ("arrivals", "min_responses", "partial", "failed"),
    [(2, 2, True, False), (1, 2, False, True), (3, 2, False, False)],
)
def test_ensemble_at_the_timeout(arrivals, min_responses, partial, failed):
    config = AggregationConfig(Mode.ENSEMBLE, quorum=3, min_responses=min_responses, timeout_s=2.0)
    agg = Aggregator(config, SOURCES[:5], now=0.0)
    for i in range(arrivals):
        agg.add(SOURCES[i], np.full(2, float(i)), 1.0)
    assert agg.is_done(1.0) == (arrivals >= 3)
    assert agg.is_done(2.0)
    result = agg.result()
    assert (result.partial, result.failed) == (partial, failed)
    if not failed:
        assert result.value.tolist() == [np.mean(range(arrivals))] * 2
    else:
        assert result.value is None and result.reason == "timeout"
    assert agg.deadline() is None


def test_failures_end_a_hopeless_aggregation_early():
    agg = Aggregator(AggregationConfig(Mode.ALL), ["a", "b", "c"], now=0.0)
    agg.add("a", np.array([1.0]), 0.0)
    agg.add_failure("b", 0.0)
    assert not agg.is_done(0.0)
    agg.add("c", np.array([2.0]), 0.0)
    result = agg.result()
    assert result.reason == "exhausted" and result.partial and result.sources == ("a", "c")
    lonely = Aggregator(AggregationConfig(Mode.FIRST), ["a"], now=0.0)
    lonely.add_failure("a", 0.0)
    assert lonely.is_done(0.0) and lonely.result().failed


@pytest.mark.parametrize("mode", [Mode.MAJORITY, Mode.WEIGHTED, Mode.ENSEMBLE])
def test_mismatched_outputs_are_refused_without_being_recorded(mode):
    agg = Aggregator(AggregationConfig(mode), ["a", "b"], now=0.0)
    agg.add("a", np.ones((2, 3), np.float32), 0.0)
    with pytest.raises(RemoteProtocolError, match="shape"):
        agg.add("b", np.ones((3, 3), np.float32), 0.0)
    with pytest.raises(RemoteProtocolError, match="numeric"):
        agg.add("b", np.array(["x", "y"]), 0.0)
    agg.add("b", np.ones((2, 3), np.float32), 0.0)  # b may still answer properly
    assert agg.is_done(0.0) and agg.result().sources == ("a", "b")


def test_majority_needs_a_class_axis_on_float_outputs():
    agg = Aggregator(AggregationConfig(Mode.MAJORITY), ["a"], now=0.0)
    with pytest.raises(RemoteProtocolError, match="class axis"):
        agg.add("a", np.float32(0.5), 0.0)


@pytest.mark.parametrize(
    ("config", "expected", "match"),
    [
        (AggregationConfig(Mode.ENSEMBLE, quorum=4), 3, "quorum"),
        (AggregationConfig(Mode.ENSEMBLE, quorum=0), 3, "quorum"),
        (AggregationConfig(Mode.ALL, min_responses=0), 3, "min_responses"),
        (AggregationConfig(Mode.ALL, timeout_s=-1.0), 3, "timeout_s"),
        (AggregationConfig(Mode.WEIGHTED, weights={"a": 0.0}), 3, "weights"),
        (AggregationConfig(Mode.ALL), 0, "at least one"),
    ],
)
def test_unusable_configs_are_refused(config, expected, match):
    with pytest.raises(ConfigError, match=match):
        Aggregator(config, SOURCES[:expected], now=0.0)


def test_every_mode_is_exercised():
    seen = set()
    for mode, count in itertools.product(Mode, [1, 3]):
        agg = feed(AggregationConfig(mode), {s: np.eye(3)[0] for s in SOURCES[:count]})
        assert agg.is_done(0.0) and not agg.result().failed
        seen.add(agg.result().mode)
    assert seen == set(Mode)


@pytest.mark.parametrize("mode", [Mode.WEIGHTED, Mode.ENSEMBLE])
@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    weights=st.lists(
        st.floats(1e-300, 1.7e308, allow_nan=False, allow_infinity=False), min_size=1, max_size=5
    ),
)
def test_a_weighted_average_stays_between_its_inputs_whatever_the_weights(mode, data, weights):
    """A convex combination, even of weights whose sum (or products) overflow a float."""
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3))
    element = st.floats(-1e6, 1e6, width=32)
    outputs = {
        SOURCES[i]: data.draw(hnp.arrays(np.float32, shape, elements=element))
        for i in range(len(weights))
    }
    config = AggregationConfig(mode, weights=dict(zip(SOURCES, weights, strict=False)))
    value = feed(config, outputs).result().value
    stacked = np.stack(list(outputs.values())).astype(np.float64)
    assert np.all(np.isfinite(value))
    slack = 1e-9 * np.abs(stacked).max(initial=1.0)
    assert np.all(value >= stacked.min(axis=0) - slack)
    assert np.all(value <= stacked.max(axis=0) + slack)


@pytest.mark.parametrize("mode", [Mode.WEIGHTED, Mode.ENSEMBLE])
def test_an_average_keeps_the_outputs_float_dtype(mode):
    """Summed in float64 (the value is the float64 average, rounded once), returned in the
    models' own dtype: float32 outputs give float32, mixed floats the wider, integers float64."""
    a, b = np.array([0.1, 1.0], np.float32), np.array([0.2, 3.0], np.float32)
    config = AggregationConfig(mode, weights={"a": 1.0, "b": 2.0})
    value = feed(config, {"a": a, "b": b}).result().value
    exact = (a.astype(np.float64) + 2 * b.astype(np.float64)) / 3
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, exact.astype(np.float32))
    mixed = feed(config, {"a": a, "b": b.astype(np.float64)}).result().value
    assert mixed.dtype == np.float64
    labels = feed(config, {"a": np.array([1, 2]), "b": np.array([4, 2])}).result().value
    assert labels.dtype == np.float64 and labels.tolist() == [3.0, 2.0]


def test_huge_weights_average_as_their_ratios_say():
    config = AggregationConfig(Mode.WEIGHTED, weights={"a": 1.5e308, "b": 0.5e308})
    agg = feed(config, {"a": np.array([4.0, 0.0]), "b": np.array([0.0, 4.0])})
    np.testing.assert_allclose(agg.result().value, [3.0, 1.0])


def test_weights_for_a_source_that_is_not_expected_are_refused():
    config = AggregationConfig(Mode.WEIGHTED, weights={"src-0": 2.0, "src-9": 5.0})
    with pytest.raises(ConfigError, match="weights names 'src-9'"):
        Aggregator(config, SOURCES[:2], now=0.0)
