"""TritonEngine against a real Triton Inference Server (PyTriton, CPU) serving the digits model.

One server per module (it takes a few seconds to start); the restart test crashes it and starts
it again on the same ports, leaving it running for whichever test comes next.
"""

from __future__ import annotations

import asyncio
import platform
import sys

import numpy as np
import pytest

from meshinfer.errors import InferenceError, LocalProtocolError, ModelNotFoundError
from meshinfer.inference.base import InferenceEngine, ModelRef
from meshinfer.inference.batching import BatcherConfig, DynamicBatcher
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import DIGITS_REF, load_digits_holdout
from meshinfer.inference.triton_engine import TritonEngine
from meshinfer.testing.triton_server import TritonServerProcess, free_port

if not (sys.platform == "linux" and platform.machine() == "x86_64"):
    pytest.skip("PyTriton ships Triton for Linux x86_64 only", allow_module_level=True)

PROTOCOLS = ("http", "grpc")


@pytest.fixture(scope="module")
def triton_server():
    server = TritonServerProcess()
    server.start(timeout_s=120)
    yield server
    server.stop()


def url_for(server: TritonServerProcess, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.fixture(params=PROTOCOLS)
async def engine(request, triton_server):
    async with TritonEngine(url_for(triton_server, request.param), protocol=request.param) as eng:
        yield eng


@pytest.fixture(scope="module")
def numpy_reference() -> tuple[np.ndarray, np.ndarray]:
    """(held-out inputs, NumPy engine outputs for them)."""
    pixels, _ = load_digits_holdout()

    async def reference() -> np.ndarray:
        async with NumpyEngine() as numpy_engine:
            await numpy_engine.load(DIGITS_REF)
            return await numpy_engine.infer(DIGITS_REF, pixels)

    return pixels, asyncio.run(reference())


async def test_triton_outputs_equal_numpy_engine_on_heldout(engine, numpy_reference) -> None:
    pixels, expected = numpy_reference
    await engine.load(DIGITS_REF)
    chunks = [await engine.infer(DIGITS_REF, pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
    outputs = np.concatenate(chunks)
    assert outputs.shape == expected.shape == (360, 10)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
    _, labels = load_digits_holdout()
    assert (outputs.argmax(axis=1) == labels).mean() > 0.98


async def test_engine_satisfies_protocol_and_reports_capacity(engine, triton_server) -> None:
    assert isinstance(engine, InferenceEngine)
    assert engine.capacity().ready is False  # nothing asked yet
    await engine.load(DIGITS_REF)
    await engine.load(DIGITS_REF)  # idempotent
    capacity = engine.capacity()
    assert capacity.ready is True
    assert capacity.device == f"triton:{url_for(triton_server, engine.protocol)}"
    assert capacity.max_batch_size == 256  # from the served model's config
    assert capacity.loaded_models == (DIGITS_REF,)
    await engine.unload(DIGITS_REF)
    with pytest.raises(ModelNotFoundError, match="not loaded"):
        await engine.infer(DIGITS_REF, np.zeros((1, 64), np.float32))


@pytest.mark.parametrize("ref", [ModelRef("no-such-model", "1"), ModelRef("digits-mlp", "7")])
async def test_missing_model_or_version_is_model_not_found(engine, ref) -> None:
    with pytest.raises(ModelNotFoundError, match=f"model {ref} is not ready on Triton"):
        await engine.load(ref)
    assert engine.capacity().loaded_models == ()


async def test_wrong_input_shape_is_an_inference_error_from_the_server(engine) -> None:
    await engine.load(DIGITS_REF)
    with pytest.raises(InferenceError, match="unexpected shape") as caught:
        await engine.infer(DIGITS_REF, np.zeros((2, 63), np.float32))
    assert not isinstance(caught.value, ModelNotFoundError)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_no_server_is_a_clear_error(protocol) -> None:
    url = f"127.0.0.1:{free_port()}"
    async with TritonEngine(url, protocol=protocol, retries=1, backoff_s=0.01) as eng:
        assert await eng.server_ready() is False
        with pytest.raises(InferenceError, match=f"Triton server {url} .*not ready"):
            await eng.load(DIGITS_REF)
        with pytest.raises(InferenceError, match="unreachable after 2 attempts"):
            await eng.model_ready(DIGITS_REF)
        assert eng.capacity().ready is False


async def test_silent_server_times_out() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection open until the client gives up
        writer.close()

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    async with silent, TritonEngine(f"127.0.0.1:{port}", timeout_s=0.3) as eng:
        with pytest.raises(InferenceError, match=r"timed out after 0\.3 s"):
            await eng.model_ready(DIGITS_REF)


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="without scheme"):
        TritonEngine("http://127.0.0.1:8000")
    with pytest.raises(LocalProtocolError, match="protocol"):
        TritonEngine("127.0.0.1:8000", protocol="carrier-pigeon")
    engine = TritonEngine("127.0.0.1:8000")
    await engine.aclose()
    await engine.aclose()  # idempotent
    with pytest.raises(LocalProtocolError, match="closed"):
        await engine.load(DIGITS_REF)


async def test_batcher_in_front_of_triton_maps_results_back(triton_server, numpy_reference) -> None:
    pixels, expected = numpy_reference
    async with TritonEngine(triton_server.grpc_url, protocol="grpc") as eng:
        await eng.load(DIGITS_REF)
        config = BatcherConfig(max_batch_size=32, max_queue_delay_s=0.005)
        async with DynamicBatcher(eng, DIGITS_REF, config) as batcher:
            results = await asyncio.gather(*(batcher.submit(pixels[i : i + 1]) for i in range(96)))
            stats = batcher.stats()
    np.testing.assert_allclose(np.concatenate(results), expected[:96], rtol=1e-5, atol=1e-6)
    assert stats.batches < 96  # requests really were grouped


async def test_server_restart_is_survived(triton_server, numpy_reference) -> None:
    pixels, expected = numpy_reference
    engines = [
        TritonEngine(url_for(triton_server, p), protocol=p, retries=2, backoff_s=0.05)
        for p in PROTOCOLS
    ]
    try:
        for eng in engines:
            await eng.load(DIGITS_REF)
            await eng.infer(DIGITS_REF, pixels[:8])
        triton_server.kill()  # a crash, not a graceful shutdown
        for eng in engines:
            with pytest.raises(InferenceError, match="unreachable"):
                await eng.infer(DIGITS_REF, pixels[:8])
            assert eng.capacity().ready is False
        await asyncio.to_thread(triton_server.start)
        for eng in engines:
            outputs = await eng.infer(DIGITS_REF, pixels[:8])
            np.testing.assert_allclose(outputs, expected[:8], rtol=1e-5, atol=1e-6)
            assert eng.capacity().ready is True
    finally:
        for eng in engines:
            await eng.aclose()
        if not triton_server.running:
            triton_server.start()
