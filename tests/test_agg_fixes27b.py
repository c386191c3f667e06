"""Session 27 (b): a majority vote in which a model's scores hold NaN (that source abstains on
the element), and what a coordinator says of items waiting for a retry or running at a task's
deadline.

Pure :class:`~meshinfer.proto.aggregation.Aggregator` checks first (Hypothesis), then a real
coordinator and node daemons (``tests.test_coordinator_service.Mesh``).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator.runs import ItemRun, TaskRun
from coordinator.service import CoordinatorConfig
from meshinfer.errors import OverloadedError
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.aggregation import AggregationConfig, Aggregator, Mode, majority_vote
from tests.helpers import until
from tests.test_coordinator_service import Mesh, spec

SOURCES = [f"src-{i}" for i in range(5)]
NAN = np.nan
MAJORITY = AggregationConfig(Mode.MAJORITY)


def feed(outputs: dict, order=None, expected=None) -> Aggregator:
    """A majority over ``expected`` (default: ``outputs``' sources), fed in ``order`` until
    it is done."""
    agg = Aggregator(MAJORITY, expected or list(outputs), now=0.0)
    for source in order or list(outputs):
        if agg.is_done(0.0):
            break
        agg.add(source, outputs[source], 0.0)
    return agg


def scores_with_nan(shape):
    """Float scores of ``shape`` (classes last), some of them NaN."""
    return hnp.arrays(
        np.float32, shape, elements=st.floats(-3, 3, width=32) | st.just(float("nan"))
    )


# --- the rule ----------------------------------------------------------------------------


def test_a_nan_row_abstains_instead_of_voting_for_its_argmax():
    outputs = {
        "a": np.array([[0.1, 0.9], [0.8, 0.2]]),
        "b": np.array([[NAN, 0.9], [0.8, 0.2]]),  # argmax of a NaN row is the NaN's index: 0
        "c": np.array([[NAN, 0.1], [NAN, NAN]]),
    }
    result = feed(outputs).result()
    # before: element 0 was 0, by the NaN "votes" of b and c (2 to 1)
    assert result.value.tolist() == [1, 0]
    assert result.tied == () and result.abstained == ()
    assert result.sources == ("a", "b", "c")  # an abstainer answered: it is no failure


def test_an_element_every_source_abstains_on_has_no_winner():
    outputs = {"a": np.array([[NAN, 1.0], [0.2, 0.8]]), "b": np.array([[0.5, NAN], [0.9, 0.1]])}
    result = feed(outputs).result()
    assert result.value.tolist() == [-1, 0] and result.value.dtype == np.int64
    assert result.abstained == (0,) and result.tied == (1,)  # element 1: 1 to 1, a real tie
    assert not result.failed and not result.partial


def test_an_abstention_is_no_vote_still_outstanding():
    agg = Aggregator(MAJORITY, SOURCES[:4], now=0.0)
    agg.add("src-0", np.array([[0.1, 0.9]]), 0.0)
    agg.add("src-1", np.array([[0.2, 0.8]]), 0.0)
    assert not agg.is_done(0.0)  # 2 to 0, two to come: they could tie it
    agg.add("src-2", np.array([[NAN, 0.5]]), 0.0)
    # 2 to 0 with one to come: decided (before: the NaN voted 0, 2 to 1, and it waited)
    assert agg.is_done(0.0)
    result = agg.result()
    assert result.value.tolist() == [1] and result.reason == "complete"


def test_all_sources_abstaining_so_far_decide_nothing_early():
    agg = Aggregator(MAJORITY, SOURCES[:3], now=0.0)
    agg.add("src-0", np.array([[NAN, NAN]]), 0.0)
    agg.add("src-1", np.array([[NAN, 0.0]]), 0.0)
    assert not agg.is_done(0.0)  # src-2 alone decides
    agg.add("src-2", np.array([[0.0, 1.0]]), 0.0)
    assert agg.result().value.tolist() == [1] and agg.result().abstained == ()


def test_majority_vote_takes_an_abstention_mask():
    votes = np.array([[0, 1, 2], [1, 1, 2], [0, 0, 2]])
    abstain = np.array([[False, True, True], [True, False, True], [True, False, True]])
    winner, tied = majority_vote(votes, abstain)
    assert winner.tolist() == [0, 0, -1] and tied.tolist() == [False, True, False]


# --- properties --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data(), count=st.integers(1, 5))
def test_a_vote_with_nan_rows_does_not_depend_on_arrival_order(data, count):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3))
    outputs = {SOURCES[i]: data.draw(scores_with_nan(shape)) for i in range(count)}
    order = data.draw(st.permutations(list(outputs)))
    first, second = feed(outputs).result(), feed(outputs, order=order).result()
    assert first.value.tobytes() == second.value.tobytes()
    assert (first.tied, first.abstained) == (second.tied, second.abstained)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), count=st.integers(1, 4))
def test_a_nan_row_never_changes_a_winner(data, count):
    """Where a source's scores hold a NaN, the vote is the vote of the others, as if that
    source had not been asked (value, tie and abstention alike), in any arrival order."""
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=3))
    others = {
        SOURCES[i]: data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-3, 3, width=32)))
        for i in range(count)
    }
    odd = data.draw(scores_with_nan(shape))
    everyone = {**others, "odd": odd}
    order = data.draw(st.permutations(list(everyone)))
    with_odd, without = feed(everyone, order=order).result(), feed(others).result()
    nan_rows = np.isnan(odd).any(axis=-1)
    np.testing.assert_array_equal(with_odd.value[nan_rows], without.value[nan_rows])
    flat = set(np.flatnonzero(nan_rows).tolist())
    assert {i for i in with_odd.tied if i in flat} == {i for i in without.tied if i in flat}
    assert with_odd.abstained == () == without.abstained  # the others never abstain
    if nan_rows.all():  # the odd source abstains everywhere: exactly the vote without it
        assert with_odd.value.tobytes() == without.value.tobytes()
        assert with_odd.tied == without.tied


# --- through a coordinator -----------------------------------------------------------------


async def test_an_item_in_its_retry_backoff_says_it_waits_for_its_retry(tmp_path):
    x, _ = load_digits_holdout()
    slow = CoordinatorConfig(item_timeout_s=5.0, retry_backoff_s=60.0, retry_backoff_max_s=60.0)
    async with Mesh(tmp_path, n=1, config=slow) as mesh:
        c = mesh.coordinator

        async def fail(ref, batch):
            raise OverloadedError("simulated overload")

        mesh.daemons["node-0"].engine.infer = fail
        await c.submit(spec("again", "single", x[:1]))
        await until(lambda: c.stats_.retries == 1)  # in its 60 s backoff from here
        why = c.waiting("again")
        # before: "waiting for its turn to be dispatched", though no turn came for a minute
        assert list(why) == ["again/0"]
        assert why["again/0"].startswith("retrying after node-0: ")
        assert "simulated overload" in why["again/0"] and why["again/0"].endswith("(attempt 2)")
        assert await c.cancel("again")


def _running(nodes: dict[str, int], total: int) -> TaskRun:
    """A batch of ``total`` one-row shards, none done, ``nodes[n]`` of them on node ``n``."""
    x, _ = load_digits_holdout()
    run = TaskRun(
        spec("b", "batch", x[:total], shard_size=1, deadline_s=2.0),
        default_aggregation="all",
        now=0.0,
    )
    on = [n for n, k in nodes.items() for _ in range(k)]
    for item, node in zip(run.ready(), on + [None] * total, strict=False):
        run.items[item.item_id] = ItemRun(item, node=node)
    return run


def test_the_deadline_error_says_how_many_items_were_running_and_where():
    start = "deadline of 2 s passed with 0 of 9 items done"
    assert _running({}, 9).deadline_error() == start
    assert _running({"node-0": 2}, 9).deadline_error() == f"{start}; 2 of them running on node-0"
    two = _running({"node-1": 1, "node-0": 3}, 9)
    assert two.deadline_error() == f"{start}; 4 of them running: 3 on node-0, 1 on node-1"
    many = _running({"a": 1, "b": 2, "c": 2, "d": 3, "e": 1}, 9)
    assert many.deadline_error() == (
        f"{start}; 9 of them running: 3 on d, 2 on b, 2 on c (and 2 on 2 more nodes)"
    )


def test_status_says_how_many_elements_were_tied_or_had_no_vote():
    from coordinator.task_views import result_lines as _result_lines

    aggregation = {"mode": "majority", "sources": ["a", "b"], "tied": 2, "abstained": 1}
    assert _result_lines({"aggregation": aggregation}, 20) == [
        "aggregation: majority of a, b, 2 tied, 1 with no vote"
    ]
    quiet = {**aggregation, "tied": 0, "abstained": 0}
    assert _result_lines({"aggregation": quiet}, 20) == ["aggregation: majority of a, b"]
