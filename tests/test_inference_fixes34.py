"""Local inference, session 34: the Triton engine's timeout and shared client, the registry's
model names, the CuPy engine's graph capture (read only: no GPU here)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiohttp import web

from meshinfer.errors import InferenceError, LocalProtocolError
from meshinfer.inference.base import ModelRef, TensorSpec
from meshinfer.inference.cache import ContentCache, OrderedInputs, content_digest
from meshinfer.inference.registry import (
    DIGITS_REF,
    ModelInfo,
    ModelIntegrityError,
    ModelRegistry,
    digits_metadata_path,
    file_model,
)
from meshinfer.inference.triton_engine import TritonEngine
from meshinfer.testing.virtual_clock import VirtualClockLoop

REF = ModelRef("fake", "1")
BATCH = np.arange(6, dtype=np.float32).reshape(2, 3)


class HoldingTriton:
    """A KServe-v2 HTTP server for model ``fake`` (FP32 [-1, 3] -> ``y`` = 2x) on loopback.
    Its first inference is held until :attr:`release` is set; the second has its connection
    cut (a connection error at the client); later ones are answered at once."""

    def __init__(self) -> None:
        self.inferences = 0
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> HoldingTriton:
        app = web.Application()
        app.router.add_get("/v2/health/live", self._ok)
        app.router.add_get("/v2/health/ready", self._ok)
        app.router.add_get("/v2/models/{m}/versions/{v}/ready", self._ok)
        app.router.add_get("/v2/models/{m}/versions/{v}", self._metadata)
        app.router.add_get("/v2/models/{m}/versions/{v}/config", self._config)
        app.router.add_post("/v2/models/{m}/versions/{v}/infer", self._infer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "fake",
                "versions": ["1"],
                "platform": "python",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
            }
        )

    async def _config(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "fake", "max_batch_size": 8})

    async def _infer(self, request: web.Request) -> web.Response:
        self.inferences += 1
        body = await request.read()
        if self.inferences == 1:
            self.holding.set()
            await self.release.wait()
        elif self.inferences == 2:
            assert request.transport is not None
            request.transport.abort()  # the client sees the connection drop
            return web.Response()
        size = int(request.headers.get("Inference-Header-Content-Length", len(body)))
        rows = json.loads(body[:size])["inputs"][0]["shape"][0]
        out = np.frombuffer(body[size:], np.float32).reshape(rows, 3) * 2
        output = {"name": "y", "datatype": "FP32", "shape": [rows, 3], "data": out.ravel().tolist()}
        return web.json_response({"model_name": "fake", "outputs": [output]})


async def test_a_connection_error_does_not_cut_off_other_calls_on_the_shared_client() -> None:
    """One call's connection error closed the client every call shares: another call's request,
    in flight on it, was cut off and failed (retries=0), or spent a retry, for nothing."""
    async with HoldingTriton() as server, TritonEngine(server.url, retries=0) as engine:
        await engine.load(REF)
        held = asyncio.create_task(engine.infer(REF, BATCH))
        await server.holding.wait()
        with pytest.raises(InferenceError, match="unreachable after 1 attempts"):
            await engine.infer(REF, BATCH)  # its connection is cut
        server.release.set()
        np.testing.assert_array_equal(await held, BATCH * 2)
        np.testing.assert_array_equal(await engine.infer(REF, BATCH), BATCH * 2)  # a new client
        assert engine.capacity().ready is True


def test_a_call_waiting_for_a_request_slot_fails_within_its_timeout() -> None:
    """The wait for one of the ``max_in_flight`` slots was outside ``timeout_s``: behind a call
    that hung until its own timeout, a call failed only after twice its timeout."""

    async def scenario() -> None:
        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        loop = asyncio.get_running_loop()
        silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        async with silent, TritonEngine(f"127.0.0.1:{port}", timeout_s=5, max_in_flight=1) as eng:
            start = loop.time()
            first = asyncio.create_task(eng.model_ready(REF))
            await asyncio.sleep(0)  # it holds the one slot
            with pytest.raises(InferenceError, match=r"after 5 s waiting for one of its 1 request"):
                await eng.model_ready(REF)
            assert loop.time() == start + 5  # (a virtual clock: exact)
            with pytest.raises(InferenceError, match=r"timed out after 5 s$"):
                await first

    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        runner.run(scenario())


# --- registry ------------------------------------------------------------------------------


def _info(model_id: str, version: str) -> ModelInfo:
    spec = (TensorSpec("x", "float32", (-1, 3)),)
    return ModelInfo(ModelRef(model_id, version), "0" * 64, spec, spec, loader=lambda: None)


@pytest.mark.parametrize(("model_id", "version"), [("a@b", "1"), ("a", "1@2")])
def test_the_registry_refuses_a_model_name_holding_the_separator(model_id, version) -> None:
    """A model ``a@b`` version 1 was registered (and advertised) although ``"a@b@1"`` names
    ``a@b`` version 1 and ``a`` version ``b@1`` alike: no submission could name it for sure."""
    with pytest.raises(LocalProtocolError, match='holds "@"'):
        ModelRegistry((_info(model_id, version),))


def test_a_registry_json_naming_a_model_with_the_separator_is_refused(tmp_path) -> None:
    doc = json.loads(digits_metadata_path(DIGITS_REF).read_text())
    doc["model_id"] = "digits@mlp"
    path = tmp_path / "model.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelIntegrityError, match=f'{path}.*holds "@"'):
        file_model(path)


# --- input cache ---------------------------------------------------------------------------


async def test_a_fetch_after_aclose_is_called_back_at_once() -> None:
    """Pinned (the docstring said such a fetch was dropped): after aclose nothing waits, so the
    callback comes at once, and the stopping node answers the item as any other."""

    inputs = OrderedInputs(ContentCache(1 << 20))
    inputs.keep(b"kept")
    await inputs.aclose()
    got: list[bytes | None] = []
    inputs.fetch(content_digest(b"kept"), got.append)
    inputs.fetch(content_digest(b"other"), got.append)
    assert got == [b"kept", None]
    assert not inputs.busy


# --- CuPy (no GPU here: the capture's error path, with a stand-in for a CUDA stream) ---------


class _InvalidatedCapture:
    """A stream whose capture ends in an error (a capture invalidated meanwhile)."""

    def begin_capture(self) -> None:
        pass

    def end_capture(self) -> object:
        raise RuntimeError("cudaErrorStreamCaptureInvalidated")


def test_a_capture_that_fails_to_end_falls_back_to_eager_runs() -> None:
    """An error from end_capture escaped _capture: the bucket's graph was never recorded as
    unavailable, so every batch of that size tried again, and failed."""
    from meshinfer.inference.cupy_engine import _capture_graph

    assert _capture_graph(_InvalidatedCapture(), lambda: None) is None
