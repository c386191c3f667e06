"""The NumPy engine, the model registry, the weights format and the synthetic models."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.errors import InferenceError, LocalProtocolError, ModelNotFoundError
from meshinfer.inference.base import InferenceEngine, ModelRef
from meshinfer.inference.mlp import (
    BatchShapeError,
    MLPWeights,
    weights_from_bytes,
    weights_to_bytes,
)
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import (
    DIGITS_REF,
    ModelRegistry,
    default_registry,
    load_digits_holdout,
    synthetic_model,
)
from meshinfer.inference.synthetic import (
    SYNTHETIC_MODEL_ID,
    SyntheticSpec,
    make_weights,
    parse_version,
    sample_inputs,
)

SMALL = SyntheticSpec(64, 2)


def reference_forward(arrays: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """An independent float64 forward pass: ReLU hidden layers, softmax output."""
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(arrays):
        h = h @ w.astype(np.float64) + b.astype(np.float64)
        if i < len(arrays) - 1:
            h = np.where(h > 0, h, 0.0)
    e = np.exp(h - h.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def npz_layers(path) -> list[tuple[np.ndarray, np.ndarray]]:
    with np.load(path) as archive:
        return [(archive[f"W{i}"], archive[f"b{i}"]) for i in range(len(archive.files) // 2)]


@pytest.fixture
async def engine():
    async with NumpyEngine(max_workers=2, max_batch_size=512) as numpy_engine:
        yield numpy_engine


async def test_engine_satisfies_the_protocol(engine: NumpyEngine) -> None:
    assert isinstance(engine, InferenceEngine)
    assert engine.name == "numpy"


async def test_digits_probabilities_match_an_independent_forward_pass(engine) -> None:
    inputs, _ = load_digits_holdout()
    await engine.load(DIGITS_REF)
    probs = await engine.infer(DIGITS_REF, inputs[:100])
    assert probs.dtype == np.float32 and probs.shape == (100, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    expected = reference_forward(npz_layers(default_registry().get(DIGITS_REF).path), inputs[:100])
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


async def test_synthetic_model_matches_an_independent_forward_pass(engine) -> None:
    registry = ModelRegistry((synthetic_model(SMALL),))
    async with NumpyEngine(registry) as small_engine:
        await small_engine.load(SMALL.ref)
        batch = sample_inputs(SMALL, 33)
        probs = await small_engine.infer(SMALL.ref, batch)
    weights = make_weights(SMALL)
    expected = reference_forward([(lay.weight, lay.bias) for lay in weights.layers], batch)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


async def test_integer_batches_are_converted(engine) -> None:
    await engine.load(DIGITS_REF)
    pixels = np.arange(64, dtype=np.uint8).reshape(1, 64) % 2
    probs = await engine.infer(DIGITS_REF, pixels)
    same = await engine.infer(DIGITS_REF, pixels.astype(np.float32))
    np.testing.assert_array_equal(probs, same)


async def test_concurrent_batches_equal_sequential_ones(engine) -> None:
    inputs, _ = load_digits_holdout()
    await engine.load(DIGITS_REF)
    chunks = np.array_split(inputs, 9)
    together = await asyncio.gather(*(engine.infer(DIGITS_REF, c) for c in chunks))
    for chunk, probs in zip(chunks, together, strict=True):
        np.testing.assert_array_equal(probs, await engine.infer(DIGITS_REF, chunk))


def noting_the_thread(forward, threads: list[str]):
    """``forward`` that first appends the name of the thread running it to ``threads``."""

    def noted(*args):
        threads.append(threading.current_thread().name)
        return forward(*args)

    return noted


async def test_small_batches_run_on_the_loop_and_big_ones_in_a_worker_thread() -> None:
    x, _ = load_digits_holdout()
    macs = 64 * 128 + 128 * 64 + 64 * 10  # digits-mlp@1: 64 -> 128 -> 64 -> 10
    threads: list[str] = []
    async with (
        NumpyEngine(inline_max_macs=4 * macs) as inline,
        NumpyEngine(inline_max_macs=0) as threaded,
    ):
        for engine in (inline, threaded):
            await engine.load(DIGITS_REF)
            engine._forward = noting_the_thread(engine._forward, threads)
        for rows in (1, 4, 5, 40):
            a = await inline.infer(DIGITS_REF, x[:rows])
            b = await threaded.infer(DIGITS_REF, x[:rows])
            np.testing.assert_array_equal(a, b)
    on_loop = [name == threading.main_thread().name for name in threads]
    # per batch size: the inline engine first, then the threaded one (always a worker)
    assert on_loop == [True, False, True, False, False, False, False, False]
    with pytest.raises(ValueError, match="inline_max_macs"):
        NumpyEngine(inline_max_macs=-1)


async def test_load_is_idempotent_and_unload_forgets(engine) -> None:
    await engine.load(DIGITS_REF)
    await engine.load(DIGITS_REF)
    assert engine.capacity().loaded_models == (DIGITS_REF,)
    assert [info.ref for info in engine.loaded_models] == [DIGITS_REF]
    await engine.unload(DIGITS_REF)
    await engine.unload(DIGITS_REF)
    assert engine.capacity().loaded_models == ()
    with pytest.raises(ModelNotFoundError, match="not loaded"):
        await engine.infer(DIGITS_REF, np.zeros((1, 64), np.float32))


async def test_unknown_models_are_not_found(engine) -> None:
    with pytest.raises(ModelNotFoundError):
        await engine.load(ModelRef("digits-mlp", "99"))
    with pytest.raises(ModelNotFoundError):
        await engine.infer(ModelRef("no-such-model"), np.zeros((1, 64), np.float32))


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((2, 63), np.float32),
        np.zeros((64,), np.float32),
        np.zeros((0, 64), np.float32),
        np.zeros((513, 64), np.float32),
        np.zeros((1, 64), np.complex64),
        [[0.0] * 64],
    ],
    ids=["width", "rank", "empty", "too-big", "complex", "list"],
)
async def test_malformed_batches_are_refused(engine, batch) -> None:
    await engine.load(DIGITS_REF)
    with pytest.raises(BatchShapeError):
        await engine.infer(DIGITS_REF, batch)


async def test_capacity_and_close() -> None:
    engine = NumpyEngine(max_batch_size=16)
    await engine.load(DIGITS_REF)
    capacity = engine.capacity()
    assert capacity.device == "cpu" and capacity.max_batch_size == 16 and capacity.ready
    assert capacity.free_memory_bytes is not None and capacity.free_memory_bytes > 0
    await engine.aclose()
    await engine.aclose()
    assert not engine.capacity().ready and engine.capacity().loaded_models == ()
    with pytest.raises(LocalProtocolError):
        await engine.infer(DIGITS_REF, np.zeros((1, 64), np.float32))
    with pytest.raises(LocalProtocolError):
        await engine.load(DIGITS_REF)


def test_default_registry_lists_shipped_and_synthetic_models() -> None:
    registry = default_registry()
    assert DIGITS_REF in registry
    assert ModelRef(SYNTHETIC_MODEL_ID, "w4096-d8") in registry
    digits = registry.get(DIGITS_REF)
    assert len(digits.sha256) == 64 and digits.path is not None
    with pytest.raises(ModelNotFoundError):
        registry.get(ModelRef(SYNTHETIC_MODEL_ID, "w8-d1"))  # never registered on the fly
    assert len(registry) == len(registry.refs()) == len(list(registry))


def test_registering_a_ref_twice_with_another_hash_is_refused() -> None:
    registry = ModelRegistry((synthetic_model(SMALL),))
    registry.register(synthetic_model(SMALL))  # same hash: fine
    reseeded = synthetic_model(SyntheticSpec(64, 2, seed=5))
    assert reseeded.ref == SMALL.ref
    with pytest.raises(LocalProtocolError):
        registry.register(reseeded)


def test_synthetic_weights_follow_their_recipe() -> None:
    a, b = make_weights(SMALL), make_weights(SMALL)
    assert weights_to_bytes(a) == weights_to_bytes(b)
    other = SyntheticSpec(64, 2, seed=1)
    assert weights_to_bytes(make_weights(other)) != weights_to_bytes(a)
    assert other.recipe_sha256() != SMALL.recipe_sha256()
    assert [lay.weight.shape for lay in a.layers] == [(64, 64), (64, 64), (64, 10)]
    assert sum(lay.weight.size + lay.bias.size for lay in a.layers) == SMALL.parameter_count


@given(width=st.integers(1, 999_999), depth=st.integers(1, 999))
@settings(max_examples=200)
def test_synthetic_versions_round_trip(width: int, depth: int) -> None:
    try:
        spec = SyntheticSpec(width, depth)
    except ValueError as exc:  # weights over the limit: refused before anything is made
        assert "more than a model may" in str(exc)
        return
    assert parse_version(spec.version) == (width, depth)


@given(st.text(max_size=20))
@settings(max_examples=300)
def test_parse_version_only_raises_value_error(text: str) -> None:
    try:
        width, depth = parse_version(text)
    except ValueError:
        return
    assert text == f"w{width}-d{depth}"


def test_weights_round_trip_through_bytes() -> None:
    weights = make_weights(SMALL)
    again = weights_from_bytes(weights_to_bytes(weights))
    for mine, theirs in zip(weights.layers, again.layers, strict=True):
        np.testing.assert_array_equal(mine.weight, theirs.weight)
        np.testing.assert_array_equal(mine.bias, theirs.bias)


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_garbage_weights_raise_inference_error(data: bytes) -> None:
    with pytest.raises(InferenceError):
        weights_from_bytes(data)


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
@settings(max_examples=300)
def test_damaged_weights_files_raise_inference_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(weights_to_bytes(make_weights(SyntheticSpec(8, 2))))
    for position, value in edits:
        data[position % len(data)] = value
    try:
        weights = weights_from_bytes(bytes(data))
    except InferenceError:
        return
    assert weights.input_dim == 8  # a byte that changed only a weight's value


def test_layers_that_do_not_chain_are_refused() -> None:
    w = np.zeros((4, 3), np.float32)
    with pytest.raises(InferenceError):
        MLPWeights.from_arrays([(w, np.zeros(3)), (w, np.zeros(3))])
    with pytest.raises(InferenceError):
        MLPWeights.from_arrays([(w, np.zeros(4))])
    with pytest.raises(InferenceError):
        MLPWeights.from_arrays([])
