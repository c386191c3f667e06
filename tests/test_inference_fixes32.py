"""Session 32 review of the inference layer: the batcher's argument edges and its counters, and
the Triton engine against a server whose answers it cannot use or that forgets a model.

The Triton tests run tritonclient's real HTTP client against a small KServe-v2 server on
loopback (aiohttp) that answers as each test tells it: a real Triton cannot be made to send a
short, non-numeric or malformed output, or to forget a model for one request.
"""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
from aiohttp import web

from meshinfer.errors import (
    DeadlineExceededError,
    InferenceError,
    LocalProtocolError,
    ModelNotFoundError,
)
from meshinfer.inference.base import EngineCapacity, ModelRef
from meshinfer.inference.batching import BatcherConfig, DynamicBatcher
from meshinfer.inference.triton_engine import TritonEngine

REF = ModelRef("fake", "1")


class DoubleEngine:
    """Returns ``2 * batch``; ``before_return`` (if set) is called just before it returns."""

    name = "double"

    def __init__(self) -> None:
        self.calls = 0
        self.before_return = None

    async def load(self, ref: ModelRef) -> None:
        pass

    async def unload(self, ref: ModelRef) -> None:
        pass

    async def infer(self, ref: ModelRef, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.before_return is not None:
            self.before_return()
        return batch * 2

    def capacity(self) -> EngineCapacity:
        return EngineCapacity("cpu", 64, None)

    async def aclose(self) -> None:
        pass


ONE = np.ones((1, 3), np.float32)


# --- batcher ---------------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", [math.nan, "soon"])
async def test_a_deadline_that_is_no_time_is_refused_and_never_queued(deadline) -> None:
    """NaN compared False with every time: it was taken as passed (a misleading 'deadline
    passed', counted expired) after a NaN timer joined the loop's heap; a str raised
    TypeError."""
    engine = DoubleEngine()
    async with DynamicBatcher(engine, REF, BatcherConfig(max_queue_delay_s=0.0)) as batcher:
        with pytest.raises(LocalProtocolError, match="is not a time"):
            await batcher.submit(ONE, deadline=deadline)
        np.testing.assert_array_equal(await batcher.submit(ONE, deadline=math.inf), ONE * 2)
        stats = batcher.stats()
    assert (stats.submitted, stats.expired, stats.completed, engine.calls) == (1, 0, 1, 1)


async def test_a_deadline_already_passed_is_still_deadline_exceeded() -> None:
    async with DynamicBatcher(DoubleEngine(), REF) as batcher:
        now = asyncio.get_running_loop().time()
        for passed in (now, -math.inf):
            with pytest.raises(DeadlineExceededError, match="before submit"):
                await batcher.submit(ONE, deadline=passed)
        assert batcher.stats().expired == 2


@pytest.mark.parametrize("priority", ["1", None, math.nan, -1, 4])
async def test_a_priority_that_is_no_level_is_a_local_protocol_error(priority) -> None:
    """A str or None raised a bare TypeError from the comparison."""
    async with DynamicBatcher(DoubleEngine(), REF) as batcher:
        with pytest.raises(LocalProtocolError, match="priority"):
            await batcher.submit(ONE, priority=priority)
        assert batcher.stats().submitted == 0


async def test_a_request_cancelled_after_its_answer_is_counted_once() -> None:
    """The caller's task cancelled after its future got its rows (before the task ran again):
    counted completed *and* cancelled, so the counters summed to more than was submitted."""
    engine = DoubleEngine()
    config = BatcherConfig(max_queue_delay_s=0.0, dispatch_when_idle=True)
    async with DynamicBatcher(engine, REF, config) as batcher:
        task = asyncio.ensure_future(batcher.submit(ONE))
        # The cancel is queued before the batch sets the result, and runs before the task wakes.
        engine.before_return = lambda: asyncio.get_running_loop().call_soon(task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = batcher.stats()
    assert (stats.submitted, stats.completed, stats.cancelled) == (1, 1, 0)


async def test_a_request_cancelled_in_its_running_batch_is_still_counted_cancelled() -> None:
    engine = DoubleEngine()
    config = BatcherConfig(max_queue_delay_s=0.0, dispatch_when_idle=True)
    async with DynamicBatcher(engine, REF, config) as batcher:
        task = asyncio.ensure_future(batcher.submit(ONE))
        engine.before_return = task.cancel  # the future is not answered yet
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = batcher.stats()
    assert (stats.submitted, stats.completed, stats.cancelled) == (1, 0, 1)


# --- Triton engine against a server answering as told -----------------------------------------


class FakeTriton:
    """A KServe-v2 HTTP server serving model ``fake`` (FP32 [-1, 3] -> FP32 ``y`` = 2x) on
    loopback; ``mode`` makes its inference answers go wrong, ``known`` forgets the model."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.known = True
        self.metadata = {
            "name": "fake",
            "versions": ["1"],
            "platform": "python",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
        }
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeTriton:
        app = web.Application()
        app.router.add_get("/v2/health/live", self._ok)
        app.router.add_get("/v2/health/ready", self._ok)
        app.router.add_get("/v2/models/{m}/versions/{v}/ready", self._ready)
        app.router.add_get("/v2/models/{m}/versions/{v}", self._metadata)
        app.router.add_get("/v2/models/{m}/versions/{v}/config", self._config)
        app.router.add_post("/v2/models/{m}/versions/{v}/infer", self._infer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response()

    def _unknown(self) -> web.Response:
        error = "Request for unknown model: 'fake' is not found"
        return web.json_response({"error": error}, status=400)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response() if self.known else self._unknown()

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.metadata) if self.known else self._unknown()

    async def _config(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "fake", "max_batch_size": 8})

    async def _infer(self, request: web.Request) -> web.Response:
        if not self.known:
            return self._unknown()
        body = await request.read()
        size = int(request.headers.get("Inference-Header-Content-Length", len(body)))
        rows = json.loads(body[:size])["inputs"][0]["shape"][0]
        out = np.frombuffer(body[size:], np.float32).reshape(rows, 3) * 2
        output = {"name": "y", "datatype": "FP32", "shape": [rows, 3], "data": out.ravel().tolist()}
        if self.mode == "short":
            output.update(shape=[rows - 1, 3], data=out[1:].ravel().tolist())
        elif self.mode == "bytes":
            output.update(datatype="BYTES", shape=[rows, 1], data=["x"] * rows)
        elif self.mode == "malformed":
            output.update(data=[1.0])  # fewer values than its shape holds
        return web.json_response({"model_name": "fake", "outputs": [output]})


BATCH = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("short", r"'y' as float32 \(1, 3\) for a batch of 2"),
        ("bytes", r"'y' as object \(2, 1\) for a batch of 2"),
        ("malformed", r"a malformed 'y'"),
    ],
)
async def test_an_output_the_engine_cannot_use_is_an_inference_error(mode, says) -> None:
    """A short output was returned as if it answered the batch, a BYTES one as an object
    array, and one whose data does not fill its shape raised tritonclient's ValueError."""
    async with FakeTriton() as server, TritonEngine(server.url, retries=0) as engine:
        await engine.load(REF)
        server.mode = mode
        with pytest.raises(InferenceError, match=f"{server.url} sent for fake@1 {says}"):
            await engine.infer(REF, BATCH)
        server.mode = "ok"
        np.testing.assert_array_equal(await engine.infer(REF, BATCH), BATCH * 2)


async def test_a_model_the_server_forgot_for_a_while_serves_again_without_a_new_load() -> None:
    """Once the server answered 'unknown model' (restarted, loading its models again), the
    engine dropped the model for good: every later batch failed with 'not loaded' although
    the server had it back, until someone called load() again (the node never does)."""
    async with FakeTriton() as server, TritonEngine(server.url, retries=0) as engine:
        await engine.load(REF)
        server.known = False
        with pytest.raises(ModelNotFoundError, match="unknown model"):
            await engine.infer(REF, BATCH)
        with pytest.raises(ModelNotFoundError, match="not ready on Triton"):
            await engine.infer(REF, BATCH)  # still gone: looked up again, still not found
        server.known = True
        np.testing.assert_array_equal(await engine.infer(REF, BATCH), BATCH * 2)
        assert engine.capacity().loaded_models == (REF,)
        await engine.unload(REF)  # forgotten on purpose: not looked up again
        with pytest.raises(ModelNotFoundError, match="not loaded on triton engine"):
            await engine.infer(REF, BATCH)


@pytest.mark.parametrize("field", ["name", "datatype"])
async def test_metadata_without_a_tensor_field_fails_load_with_inference_error(field) -> None:
    """A KeyError escaped load()."""
    async with FakeTriton() as server, TritonEngine(server.url, retries=0) as engine:
        del server.metadata["inputs"][0][field]
        with pytest.raises(InferenceError, match=f"metadata or config lacks KeyError.*{field}"):
            await engine.load(REF)
        assert engine.capacity().loaded_models == ()
