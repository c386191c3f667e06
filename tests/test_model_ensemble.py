"""Ensembles of the three shipped digits classifiers on their shared held-out set.

The models differ in architecture and seed and err on different samples, so aggregating their
outputs with the mesh's own aggregation core is a real ensemble, checked here on real outputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import DIGITS_REFS, load_digits_holdout
from meshinfer.proto.aggregation import AggregationConfig, Aggregator, Mode, majority_vote


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    return load_digits_holdout()


@pytest.fixture
async def outputs(heldout) -> dict[str, np.ndarray]:
    """Each shipped model's class probabilities on the held-out set, keyed by ``id@version``."""
    inputs, _ = heldout
    async with NumpyEngine() as engine:
        result = {}
        for ref in DIGITS_REFS:
            await engine.load(ref)
            result[str(ref)] = await engine.infer(ref, inputs)
    return result


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def aggregate(mode: Mode, outputs: dict[str, np.ndarray]):
    aggregator = Aggregator(AggregationConfig(mode=mode), outputs, now=0.0)
    for source, probs in outputs.items():
        aggregator.add(source, probs, now=1.0)
    assert aggregator.is_done(now=1.0)
    return aggregator.result()


def test_models_err_on_different_samples(outputs, heldout) -> None:
    """Otherwise a vote could never change anything and the ensemble tests would be vacuous."""
    votes = np.stack([p.argmax(axis=1) for p in outputs.values()])
    assert np.any(votes != votes[0])
    errors = [set(np.flatnonzero(v != heldout[1])) for v in votes]
    assert set.intersection(*errors) != set.union(*errors)


def test_majority_vote_is_at_least_as_accurate_as_the_worst_model(outputs, heldout) -> None:
    _, labels = heldout
    votes = np.stack([p.argmax(axis=1) for p in outputs.values()])
    winner, _ = majority_vote(votes)
    singles = [accuracy(v, labels) for v in votes]
    assert min(singles) >= 0.95
    assert accuracy(winner, labels) >= min(singles)


def test_aggregator_majority_equals_majority_vote(outputs, heldout) -> None:
    votes = np.stack([outputs[s].argmax(axis=1) for s in sorted(outputs)])
    winner, tied = majority_vote(votes)
    result = aggregate(Mode.MAJORITY, outputs)
    assert result.reason == "complete" and not result.partial and not result.failed
    assert result.sources == tuple(sorted(outputs))
    np.testing.assert_array_equal(result.value, winner)
    all_differ = (votes[0] != votes[1]) & (votes[1] != votes[2]) & (votes[0] != votes[2])
    assert result.tied == tuple(np.flatnonzero(all_differ)) == tuple(np.flatnonzero(tied))


def test_majority_decides_early_only_when_two_models_agree_everywhere(outputs) -> None:
    sources = list(outputs)
    aggregator = Aggregator(AggregationConfig(mode=Mode.MAJORITY), sources, now=0.0)
    for source in sources[:2]:
        aggregator.add(source, outputs[source], now=1.0)
    first, second = (outputs[s].argmax(axis=1) for s in sources[:2])
    assert aggregator.is_done(now=1.0) == bool(np.all(first == second))


@pytest.mark.parametrize("mode", [Mode.WEIGHTED, Mode.ENSEMBLE])
def test_averaged_probabilities_beat_the_worst_model(mode: Mode, outputs, heldout) -> None:
    _, labels = heldout
    result = aggregate(mode, outputs)
    expected = np.mean([outputs[s].astype(np.float64) for s in sorted(outputs)], axis=0)
    assert result.value.dtype == next(iter(outputs.values())).dtype  # the models' float32
    np.testing.assert_allclose(result.value, expected, rtol=np.finfo(result.value.dtype).eps)
    singles = [accuracy(p.argmax(axis=1), labels) for p in outputs.values()]
    assert accuracy(result.value.argmax(axis=1), labels) >= min(singles)
