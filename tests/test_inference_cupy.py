"""The CuPy engine on an NVIDIA GPU: same answers as NumPy, weights resident, device capacity."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from meshinfer.errors import LocalProtocolError, ModelNotFoundError
from meshinfer.inference.base import InferenceEngine
from meshinfer.inference.cupy_engine import cupy_unavailable_reason, graph_bucket
from meshinfer.inference.mlp import BatchShapeError
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import (
    DIGITS_REF,
    ModelRegistry,
    default_registry,
    file_model,
    load_digits_holdout,
    synthetic_model,
)
from meshinfer.inference.synthetic import SyntheticSpec, sample_inputs

_REASON = cupy_unavailable_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        _REASON is not None, reason=f"no NVIDIA GPU / CuPy not importable: {_REASON}"
    ),
]

MEDIUM = SyntheticSpec(1024, 4)
BIG = SyntheticSpec(2048, 6)
RTOL, ATOL = 1e-4, 1e-5


def registry() -> ModelRegistry:
    infos = [default_registry().get(DIGITS_REF)] + [
        synthetic_model(spec) for spec in (SyntheticSpec(64, 2), MEDIUM, BIG)
    ]
    return ModelRegistry(tuple(infos))


@pytest.fixture
async def engines():
    from meshinfer.inference.cupy_engine import CupyEngine

    reg = registry()
    async with CupyEngine(reg) as gpu, NumpyEngine(reg, max_workers=2) as cpu:
        yield gpu, cpu


async def both(engines, ref, batch) -> tuple[np.ndarray, np.ndarray]:
    gpu, cpu = engines
    await asyncio.gather(gpu.load(ref), cpu.load(ref))
    return await gpu.infer(ref, batch), await cpu.infer(ref, batch)


async def test_engine_satisfies_the_protocol(engines) -> None:
    assert isinstance(engines[0], InferenceEngine) and engines[0].name == "cupy"


async def test_digits_results_equal_numpy(engines) -> None:
    inputs, labels = load_digits_holdout()
    on_gpu, on_cpu = await both(engines, DIGITS_REF, inputs)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == (360, 10)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=RTOL, atol=ATOL)
    assert np.mean(on_gpu.argmax(axis=1) == labels) >= 0.95


@pytest.mark.parametrize("spec", [SyntheticSpec(64, 2), MEDIUM], ids=lambda s: s.version)
@pytest.mark.parametrize("rows", [1, 7, 257, 1024])
async def test_synthetic_results_equal_numpy(engines, spec: SyntheticSpec, rows: int) -> None:
    on_gpu, on_cpu = await both(engines, spec.ref, sample_inputs(spec, rows, seed=rows))
    assert on_gpu.shape == (rows, spec.classes)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=RTOL, atol=ATOL)
    graphed = engines[0].graph_buckets(spec.ref)
    assert (graph_bucket(rows) in graphed) == (rows <= engines[0].graph_max_rows)


@pytest.mark.parametrize("rows", [1, 5, 64, 200])
async def test_graph_replay_equals_eager_launches(rows: int) -> None:
    from meshinfer.inference.cupy_engine import CupyEngine

    reg = registry()
    inputs, _ = load_digits_holdout()
    batch = inputs[:rows]
    async with CupyEngine(reg) as graphed, CupyEngine(reg, graph_max_rows=0) as eager:
        await asyncio.gather(graphed.load(DIGITS_REF), eager.load(DIGITS_REF))
        first = await graphed.infer(DIGITS_REF, batch)
        again = await graphed.infer(DIGITS_REF, batch[::-1].copy())  # replay, other data
        plain = await eager.infer(DIGITS_REF, batch)
        assert graphed.graph_buckets(DIGITS_REF) == (graph_bucket(rows),)
        assert eager.graph_buckets(DIGITS_REF) == ()
    np.testing.assert_allclose(first, plain, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(again[::-1], plain, rtol=RTOL, atol=ATOL)


def test_graph_buckets_are_powers_of_two() -> None:
    assert [graph_bucket(n) for n in (1, 2, 3, 5, 8, 9, 255, 256)] == [1, 2, 4, 8, 8, 16, 256, 256]


async def test_integer_and_float64_batches_are_converted(engines) -> None:
    inputs, _ = load_digits_holdout()
    pixels = np.rint(inputs * 16).astype(np.uint8)
    on_gpu, on_cpu = await both(engines, DIGITS_REF, pixels)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=RTOL, atol=ATOL)
    wide, _ = await both(engines, DIGITS_REF, inputs.astype(np.float64))
    narrow, _ = await both(engines, DIGITS_REF, inputs)
    np.testing.assert_array_equal(wide, narrow)


async def test_weights_are_resident_on_the_device(engines) -> None:
    import cupy

    gpu, _ = engines
    await gpu.load(MEDIUM.ref)
    resident = gpu.device_weights(MEDIUM.ref)
    host = gpu.registry.get(MEDIUM.ref).load_weights()
    assert resident.nbytes == host.nbytes
    for (weight, bias), layer in zip(resident.layers, host.layers, strict=True):
        assert isinstance(weight, cupy.ndarray) and isinstance(bias, cupy.ndarray)
        assert weight.device.id == gpu.device_id
        np.testing.assert_array_equal(cupy.asnumpy(weight), layer.weight)


async def test_capacity_reports_device_memory(engines) -> None:
    import cupy

    gpu, _ = engines
    before = gpu.capacity()
    _free, total = cupy.cuda.runtime.memGetInfo()
    assert before.device == "cuda:0" and before.ready and before.max_batch_size == 1024
    assert 0 < before.free_memory_bytes <= total
    await gpu.load(BIG.ref)
    after = gpu.capacity()
    assert BIG.ref in after.loaded_models
    resident = gpu.device_weights(BIG.ref).nbytes
    assert before.free_memory_bytes - after.free_memory_bytes >= resident


async def test_concurrent_batches_equal_sequential_ones() -> None:
    from meshinfer.inference.cupy_engine import CupyEngine

    batch = sample_inputs(MEDIUM, 300)
    async with CupyEngine(registry(), max_workers=3) as gpu:
        await gpu.load(MEDIUM.ref)
        chunks = np.array_split(batch, 12)
        together = await asyncio.gather(*(gpu.infer(MEDIUM.ref, c) for c in chunks))
        alone = [await gpu.infer(MEDIUM.ref, c) for c in chunks]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a, b)


async def test_errors_and_lifecycle(tmp_path) -> None:
    from meshinfer.inference.cupy_engine import CupyEngine
    from meshinfer.inference.registry import MODELS_DIR, ModelIntegrityError

    for name in ("digits-mlp-1.json", "digits-mlp-1.npz"):
        (tmp_path / name).write_bytes((MODELS_DIR / name).read_bytes())
    (tmp_path / "digits-mlp-1.npz").write_bytes(b"PK not really")
    gpu = CupyEngine(
        ModelRegistry((file_model(tmp_path / "digits-mlp-1.json"), synthetic_model(MEDIUM)))
    )
    with pytest.raises(ModelIntegrityError):
        await gpu.load(DIGITS_REF)
    with pytest.raises(ModelNotFoundError):
        await gpu.infer(MEDIUM.ref, sample_inputs(MEDIUM, 1))
    await gpu.load(MEDIUM.ref)
    with pytest.raises(BatchShapeError):
        await gpu.infer(MEDIUM.ref, np.zeros((1025, MEDIUM.width), np.float32))
    await gpu.aclose()
    await gpu.aclose()
    assert not gpu.capacity().ready
    with pytest.raises(LocalProtocolError):
        await gpu.infer(MEDIUM.ref, sample_inputs(MEDIUM, 1))
