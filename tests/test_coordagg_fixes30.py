"""Majority aggregation counts each output's vote once, as it arrives (running counts), and
gives what a recount of every output held gives: winners, ties, abstentions, early decisions,
quorum, failures and timeouts alike."""

import collections

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.proto.aggregation import AggregationConfig, Aggregator, Mode

SOURCES = [f"src-{i}" for i in range(5)]


def recount(outputs) -> tuple[np.ndarray, list[int], list[int], int]:
    """By hand, over every output held: per element the winner (smallest label of the most
    votes; -1 where all abstained), the tied and the all-abstained flat indices, and the least
    lead of a winner over any other label."""
    labels, abstains = [], []
    for a in outputs:
        if np.issubdtype(a.dtype, np.floating):
            labels.append(np.argmax(a, axis=-1).reshape(-1))
            abstains.append(np.isnan(a).any(axis=-1).reshape(-1))
        else:
            labels.append(a.astype(np.int64).reshape(-1))
            abstains.append(np.zeros(a.size, bool))
    winners, tied, none, margin = [], [], [], None
    for e in range(labels[0].size):
        counts = collections.Counter(
            int(v[e]) for v, skip in zip(labels, abstains, strict=True) if not skip[e]
        )
        ranked = [*sorted(counts.values(), reverse=True), 0, 0]
        lead = ranked[0] - ranked[1]
        margin = lead if margin is None else min(margin, lead)
        if not counts:
            winners.append(-1)
            none.append(e)
            continue
        best = max(counts.values())
        top = sorted(label for label, c in counts.items() if c == best)
        winners.append(top[0])
        if len(top) > 1:
            tied.append(e)
    shape = _vote_shape(outputs[0])
    return np.array(winners, np.int64).reshape(shape), tied, none, margin


def _vote_shape(a: np.ndarray) -> tuple[int, ...]:
    return a.shape[:-1] if np.issubdtype(a.dtype, np.floating) else a.shape


class Recounting(Aggregator):
    """The straightforward aggregator: decides and votes by recounting every output held."""

    def _vote_decided(self) -> bool:
        if not self._outputs:
            return False
        return recount(list(self._outputs.values()))[3] > self._remaining()

    def _value(self, sources):
        if self.config.mode != Mode.MAJORITY:
            return super()._value(sources)
        winner, tied, none, _ = recount([self._outputs[s] for s in sources])
        return winner, tuple(tied), tuple(none)


def _output(draw, elements: int, classes: int, as_labels: bool) -> np.ndarray:
    """Float scores over few values (ties in a row give argmax's first), NaNs (abstain), or
    integer labels (few of them, negative ones too, so that votes tie often)."""
    if as_labels:
        values = draw(st.lists(st.integers(-1, 2), min_size=elements, max_size=elements))
        return np.array(values, np.int64)
    values = st.sampled_from([0.0, 1.0, 2.0, float("nan")])
    flat = draw(st.lists(values, min_size=elements * classes, max_size=elements * classes))
    return np.array(flat, np.float32).reshape(elements, classes)


@st.composite
def scenarios(draw):
    """A config, and a sequence of events: ("add", source, output, now), ("fail", source,
    now) or ("tick", now), at non-decreasing times (sources may repeat: duplicates)."""
    expected = draw(st.integers(1, 5))
    sources = SOURCES[:expected]
    elements, classes = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    timeout = draw(st.none() | st.sampled_from([1.0, 2.5]))
    min_responses = draw(st.integers(1, expected))
    config = AggregationConfig(Mode.MAJORITY, min_responses=min_responses, timeout_s=timeout)
    now, events = 0.0, []
    for _ in range(draw(st.integers(0, 8))):
        now += draw(st.sampled_from([0.0, 0.5, 1.0]))
        kind = draw(st.sampled_from(["add", "add", "add", "fail", "tick"]))
        source = draw(st.sampled_from([*sources, "stranger"]))
        if kind == "add":
            as_labels = draw(st.booleans())
            events.append(("add", source, _output(draw, elements, classes, as_labels), now))
        elif kind == "fail":
            events.append(("fail", source, now))
        else:
            events.append(("tick", now))
    return config, sources, events


def _same_result(a, b) -> None:
    assert (a.mode, a.sources, a.partial, a.failed, a.reason) == (
        b.mode, b.sources, b.partial, b.failed, b.reason,
    )  # fmt: skip
    assert (a.tied, a.abstained, a.duplicates, a.late) == (
        b.tied,
        b.abstained,
        b.duplicates,
        b.late,
    )
    if b.value is None:
        assert a.value is None
    else:
        assert a.value.dtype == b.value.dtype and a.value.shape == b.value.shape
        np.testing.assert_array_equal(a.value, b.value)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_running_vote_matches_a_recount_over_random_arrivals(scenario):
    config, sources, events = scenario
    running, recounting = (cls(config, sources, now=0.0) for cls in (Aggregator, Recounting))
    for event in events:
        for agg in (running, recounting):
            if event[0] == "add":
                agg.add(event[1], event[2], event[3])
            elif event[0] == "fail":
                agg.add_failure(event[1], event[2])
        now = event[-1]
        assert running.is_done(now) == recounting.is_done(now)
        assert running.deadline() == recounting.deadline()
    if running.is_done(events[-1][-1] if events else 0.0):
        _same_result(running.result(), recounting.result())
    for agg in (running, recounting):  # the end of every source, or the timeout, decides it
        for source in sources:
            agg.add_failure(source, 10.0)
    assert running.is_done(10.0) and recounting.is_done(10.0)
    _same_result(running.result(), recounting.result())


def test_each_output_is_voted_once_as_it_arrives(monkeypatch):
    """k outputs, k argmaxes in all (a recount on each arrival took ~k^2)."""
    rng = np.random.default_rng(7)
    outputs = {s: rng.normal(size=(3, 4)).astype(np.float32) for s in SOURCES}
    outputs[SOURCES[-1]][0] = np.nan  # an abstention, on the last arrival
    calls = []
    argmax = np.argmax

    def counted(a, *args, **kwargs):
        calls.append(np.shape(a))
        return argmax(a, *args, **kwargs)

    monkeypatch.setattr(np, "argmax", counted)
    agg = Aggregator(AggregationConfig(Mode.MAJORITY), SOURCES, now=0.0)
    added = 0
    for source, output in outputs.items():
        if agg.is_done(0.0):
            break
        agg.add(source, output, 0.0)
        added += 1
    assert agg.is_done(0.0)
    result = agg.result()
    monkeypatch.setattr(np, "argmax", argmax)
    assert len(calls) == added == len(result.sources)
    assert np.array_equal(result.value, recount([outputs[s] for s in result.sources])[0])


def test_a_vote_decided_early_ignores_the_votes_after_it():
    """Three of five agree everywhere: decided on the third; later outputs are late."""
    agg = Aggregator(AggregationConfig(Mode.MAJORITY), SOURCES, now=0.0)
    for source in SOURCES[:3]:
        agg.add(source, np.array([1, 2, 3]), 0.0)
    assert agg.is_done(0.0)
    agg.add(SOURCES[3], np.array([0, 0, 0]), 0.0)
    result = agg.result()
    assert result.reason == "complete" and result.late == 1 and not result.partial
    assert result.value.tolist() == [1, 2, 3] and result.sources == tuple(SOURCES[:3])


def test_a_tie_at_the_timeout_goes_to_the_smallest_label_and_is_reported():
    agg = Aggregator(AggregationConfig(Mode.MAJORITY, timeout_s=1.0), SOURCES[:4], now=0.0)
    agg.add(SOURCES[0], np.array([5, -1, 7]), 0.1)
    agg.add(SOURCES[1], np.array([2, 9, 7]), 0.2)
    assert not agg.is_done(0.5)
    assert agg.is_done(1.0)
    result = agg.result()
    assert result.reason == "timeout" and result.partial
    assert result.value.tolist() == [2, -1, 7] and result.tied == (0, 1)
