"""What reaches the inference side from outside: task inputs, and model files on disk.

Inputs of every shape, dtype, rank, byte order and stride, NaN and infinity, go to the real
NumPy engine, alone and through a real DynamicBatcher alongside good requests: bad input gets a
BatchShapeError for that request only, never a NaN answer, never another request's failure.
Weights files are built byte by byte (missing and extra arrays, pickles, lying headers, empty
and inconsistent layers) and must be refused with an InferenceError before anything is
allocated or unpickled.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshinfer.errors import InferenceError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.batching import BatcherConfig, DynamicBatcher
from meshinfer.inference.mlp import (
    BatchShapeError,
    NonFiniteInputError,
    forward,
    npz_bytes,
    sha256_hex,
    weights_from_bytes,
    weights_to_bytes,
)
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import (
    ModelIntegrityError,
    ModelRegistry,
    file_model,
    synthetic_model,
)
from meshinfer.inference.synthetic import SyntheticSpec, make_weights

SPEC = SyntheticSpec(8, 2)  # 8 features in, 10 classes out: small and quick
REF = SPEC.ref


def small_engine(**kwargs: object) -> NumpyEngine:
    return NumpyEngine(ModelRegistry((synthetic_model(SPEC),)), **kwargs)  # type: ignore[arg-type]


def expected(batch: np.ndarray) -> np.ndarray:
    return forward(make_weights(SPEC), np.ascontiguousarray(batch, np.float32))


# --- the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("inline", [True, False], ids=["on-loop", "worker"])
@pytest.mark.parametrize(
    "batch",
    [
        np.array([[0.5] * 7 + [np.nan]], np.float32),
        np.array([[1.0] * 8, [np.inf] * 8], np.float32),
        np.array([[-np.inf] + [0.0] * 7], np.float64),
        np.array([[1e300] * 8]),  # finite as float64, infinite as float32
    ],
    ids=["nan", "inf", "-inf", "float32-overflow"],
)
async def test_non_finite_inputs_are_refused_not_answered_with_nan(
    batch: np.ndarray, inline: bool
) -> None:
    async with small_engine(inline_max_macs=1 << 30 if inline else 0) as engine:
        await engine.load(REF)
        with pytest.raises(NonFiniteInputError, match="NaN or infinity"):
            await engine.infer(REF, batch)
        assert isinstance(NonFiniteInputError("x"), BatchShapeError)  # bad input, for the node


finite_floats = st.floats(-6e4, 6e4, width=32)  # finite as float16 too
numeric_dtypes = st.sampled_from(["<f4", ">f4", "<f8", ">f8", "<f2", "<i4", ">i8", "u1", "?"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 6), st.just(16)), elements=finite_floats
    ),
    dtype=numeric_dtypes,
    stride=st.sampled_from([1, 2]),
    fortran=st.booleans(),
)
def test_any_byte_order_stride_and_numeric_dtype_gives_the_float32_answer(
    values: np.ndarray, dtype: str, stride: int, fortran: bool
) -> None:
    batch = values.astype(dtype)[:, ::stride][:, :8]
    batch = np.asfortranarray(batch) if fortran else batch

    async def run() -> np.ndarray:
        async with small_engine() as engine:
            await engine.load(REF)
            return await engine.infer(REF, batch)

    out = asyncio.run(run())
    np.testing.assert_allclose(out, expected(batch), rtol=1e-5, atol=1e-6)
    assert out.dtype == np.float32 and np.isfinite(out).all()


# --- the batcher in front of a real engine ------------------------------------------------------


GOOD = np.linspace(0, 1, 8, dtype=np.float32)[np.newaxis]
BAD_INPUTS = {
    "nan": np.full((1, 8), np.nan, np.float32),
    "inf-row-of-two": np.array([[1.0] * 8, [np.inf] * 8], np.float32),
    "zero-rows": np.zeros((0, 8), np.float32),
    "ragged-list": [[1.0] * 8, [1.0] * 7],
    "scalar": np.float32(3.0),
    "wrong-width": np.ones((1, 9), np.float32),
    "rank-3": np.ones((1, 2, 4), np.float32),
    "strings": np.array([["a"] * 8]),
    "too-many-rows": np.ones((9, 8), np.float32),
}


async def test_bad_requests_fail_alone_and_good_ones_in_the_same_batch_succeed() -> None:
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.01)
    async with small_engine() as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, config) as batcher:
            submissions = [batcher.submit(GOOD)]
            submissions += [batcher.submit(bad) for bad in BAD_INPUTS.values()]  # type: ignore[arg-type]
            submissions.append(batcher.submit(GOOD * 2))
            results = await asyncio.gather(*submissions, return_exceptions=True)
    first, *bad, last = results
    np.testing.assert_allclose(first, expected(GOOD), rtol=1e-6)
    np.testing.assert_allclose(last, expected(GOOD * 2), rtol=1e-6)
    for name, outcome in zip(BAD_INPUTS, bad, strict=True):
        assert isinstance(outcome, BatchShapeError), (name, outcome)  # the node: BAD_INPUT


async def test_refused_request_never_reaches_the_engine_or_the_counters() -> None:
    async with small_engine() as engine:
        await engine.load(REF)
        async with DynamicBatcher(engine, REF, BatcherConfig(max_batch_size=8)) as batcher:
            with pytest.raises(NonFiniteInputError):
                await batcher.submit(BAD_INPUTS["nan"])
            stats = batcher.stats()
    assert (stats.submitted, stats.batches, stats.queue_depth) == (0, 0, 0)


any_dtype = st.one_of(
    hnp.floating_dtypes(endianness="?"),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.boolean_dtypes(),
    hnp.datetime64_dtypes(),
    hnp.byte_string_dtypes(max_len=3),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        hnp.arrays(any_dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)),
        min_size=1,
        max_size=4,
    )
)
def test_arbitrary_requests_never_harm_a_good_one(requests: list[np.ndarray]) -> None:
    """Whatever else is queued with it, a good request gets its own exact answer, and every
    other request is answered: with rows of probabilities, or with an InferenceError."""

    async def run() -> list[object]:
        config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.001)
        async with small_engine() as engine:
            await engine.load(REF)
            async with DynamicBatcher(engine, REF, config) as batcher:
                calls = [batcher.submit(r) for r in requests] + [batcher.submit(GOOD)]
                async with asyncio.timeout(10):
                    return await asyncio.gather(*calls, return_exceptions=True)

    *others, good = asyncio.run(run())
    np.testing.assert_allclose(good, expected(GOOD), rtol=1e-6)  # type: ignore[arg-type]
    for request, outcome in zip(requests, others, strict=True):
        if isinstance(outcome, np.ndarray):
            assert outcome.shape == (len(request), SPEC.classes) and np.isfinite(outcome).all()
        else:
            assert isinstance(outcome, InferenceError), outcome


# --- weights files ------------------------------------------------------------------------------


def layers(*widths: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        arrays[f"W{i}"] = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
        arrays[f"b{i}"] = rng.standard_normal(fan_out).astype(np.float32)
    return arrays


def npy_member(header: dict[str, object], data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def with_member(arrays: dict[str, np.ndarray], name: str, data: bytes) -> bytes:
    members = {f"{k}.npy": _npy(v) for k, v in arrays.items()}
    members[f"{name}.npy"] = data
    return zip_of(members)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _pickled(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


HUGE = {"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 1 << 20)}
MALFORMED_WEIGHTS = {
    "missing-last-bias": npz_bytes({k: v for k, v in layers(4, 5, 3).items() if k != "b1"}),
    "missing-first-layer": npz_bytes({k: v for k, v in layers(4, 5, 3).items() if k[1] != "0"}),
    "extra-array": npz_bytes({**layers(4, 3), "extra": np.zeros(3, np.float32)}),
    "pickled-objects": with_member(layers(4, 3), "b0", _pickled(np.array([{}, {}, {}]))),
    "huge-header-tiny-data": with_member(layers(4, 3), "W0", npy_member(HUGE, b"\0" * 48)),
    "truncated-member": with_member(layers(4, 3), "W0", _npy(layers(4, 3)["W0"])[:-4]),
    "inconsistent-layers": npz_bytes({**layers(4, 5, 3), "W1": np.zeros((6, 3), np.float32)}),
    "nan-weights": npz_bytes({**layers(4, 3), "W0": np.full((4, 3), np.nan, np.float32)}),
    "complex-weights": npz_bytes({**layers(4, 3), "W0": np.ones((4, 3), np.complex64)}),
    "string-weights": npz_bytes({**layers(4, 3), "b0": np.array(["1", "2", "3"])}),
    "zero-width-layer": npz_bytes({"W0": np.zeros((4, 0), np.float32), "b0": np.zeros(0)}),
    "no-arrays": zip_of({}),
}


@pytest.mark.parametrize("data", MALFORMED_WEIGHTS.values(), ids=MALFORMED_WEIGHTS.keys())
def test_malformed_weights_files_are_refused(data: bytes) -> None:
    with pytest.raises(InferenceError, match=r"malformed weights file|empty|layer"):
        weights_from_bytes(data)


def test_weights_over_the_size_limit_are_refused_before_reading() -> None:
    data = npz_bytes(layers(64, 32, 10))
    assert weights_from_bytes(data, max_bytes=len(data)).input_dim == 64
    with pytest.raises(InferenceError, match="more than 1000"):
        weights_from_bytes(data, max_bytes=1000)


def test_foreign_byte_order_and_fortran_order_weights_load_as_written() -> None:
    arrays = layers(6, 5, 4)
    foreign = {
        "W0": np.asfortranarray(arrays["W0"]),
        "b0": arrays["b0"].astype(">f4"),
        "W1": arrays["W1"].astype(">f8"),
        "b1": arrays["b1"],
    }
    members = {f"{name}.npy": _npy(array) for name, array in foreign.items()}
    weights = weights_from_bytes(zip_of(members))
    for i, layer in enumerate(weights.layers):
        np.testing.assert_array_equal(layer.weight, arrays[f"W{i}"])
        np.testing.assert_array_equal(layer.bias, arrays[f"b{i}"])


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["W0", "b0", "W1", "b1", "W2", "x"]),
        hnp.arrays(
            st.sampled_from(["<f4", ">f8", "<i2", "<c8", "?"]),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
        ),
        max_size=6,
    )
)
def test_weights_decoder_fuzz_raises_only_inference_error(arrays: dict[str, np.ndarray]) -> None:
    try:
        weights = weights_from_bytes(npz_bytes(arrays))
    except InferenceError:
        return
    assert len(arrays) == 2 * len(weights.layers) and weights.input_dim >= 1
    assert all(np.isfinite(layer.weight).all() for layer in weights.layers)
    assert weights_from_bytes(weights_to_bytes(weights)).output_dim == weights.output_dim


# --- model files on disk ------------------------------------------------------------------------


def write_model(tmp_path: Path, data: bytes, **changes: object) -> Path:
    (tmp_path / "m.npz").write_bytes(data)
    doc: dict[str, object] = {
        "model_id": "m",
        "version": "1",
        "weights_file": "m.npz",
        "sha256": sha256_hex(data),
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
        "outputs": [{"name": "p", "dtype": "float32", "shape": [-1, 3]}],
    }
    doc.update(changes)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_file_model_with_matching_hash_but_missing_arrays_is_refused(tmp_path: Path) -> None:
    arrays = layers(4, 5, 3)
    del arrays["b1"]  # the hash covers the bytes as they are: only parsing can catch this
    info = file_model(write_model(tmp_path, npz_bytes(arrays)))
    with pytest.raises(ModelIntegrityError, match="b1"):
        info.load_weights()
    info = file_model(write_model(tmp_path, npz_bytes({})))
    with pytest.raises(ModelIntegrityError, match="at least one layer"):
        info.load_weights()


@pytest.mark.parametrize(
    "problem",
    ["not-json", "not-an-object", "missing-key", "bad-shape", "directory", "missing-file"],
)
def test_broken_model_metadata_is_refused_naming_the_file(tmp_path: Path, problem: str) -> None:
    path = write_model(tmp_path, npz_bytes(layers(4, 3)))
    if problem == "not-json":
        path.write_bytes(b"\xff{not json")
    elif problem == "not-an-object":
        path.write_text("[1, 2]")
    elif problem == "missing-key":
        path.write_text(json.dumps({"model_id": "m", "version": "1"}))
    elif problem == "bad-shape":
        path = write_model(tmp_path, b"", inputs=[{"name": "x", "dtype": "f", "shape": [4]}])
    elif problem == "directory":
        path = tmp_path / "a-directory.json"
        path.mkdir()
    else:
        path = tmp_path / "absent.json"
    with pytest.raises(ModelIntegrityError, match=str(path.name)):
        file_model(path)


def test_weights_path_that_is_a_directory_is_refused_on_load(tmp_path: Path) -> None:
    path = write_model(tmp_path, npz_bytes(layers(4, 3)), weights_file="weights.d")
    (tmp_path / "weights.d").mkdir()
    with pytest.raises(ModelIntegrityError, match="cannot read"):
        file_model(path).load_weights()


async def test_engine_refuses_to_load_a_malformed_file_model(tmp_path: Path) -> None:
    data = MALFORMED_WEIGHTS["huge-header-tiny-data"]
    info = file_model(write_model(tmp_path, data))
    async with NumpyEngine(ModelRegistry((info,))) as engine:
        with pytest.raises(ModelIntegrityError, match="header says"):
            await engine.load(ModelRef("m", "1"))
        assert not engine.is_loaded(ModelRef("m", "1"))


# --- the Triton engine (no server needed: bad input never reaches one) --------------------------


@pytest.mark.parametrize(
    "batch", [np.zeros((0, 8), np.float32), np.float32(1.0), [[1.0] * 8]], ids=str
)
async def test_triton_engine_refuses_batches_without_samples_before_any_call(batch) -> None:
    pytest.importorskip("tritonclient.http.aio")
    from meshinfer.inference.triton_engine import TritonEngine

    async with TritonEngine("127.0.0.1:9", retries=0, timeout_s=0.5) as engine:
        with pytest.raises(BatchShapeError, match=">= 1 samples"):  # not ModelNotFoundError
            await engine.infer(ModelRef("digits-mlp"), batch)
