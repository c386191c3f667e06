"""Triton, session 36: a call in flight when the engine closes, metadata that is not an object,
and the test server's cleanup after a kill and its listening address.

The engine tests run tritonclient's real clients against small servers on loopback (a grpc.aio
server with Triton's own service stubs, an aiohttp KServe-v2 one) that hold a call until told;
the last tests start one real Triton server (PyTriton, CPU) and kill it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from aiohttp import web
from tritonclient.grpc import service_pb2, service_pb2_grpc

from meshinfer.errors import InferenceError, LocalProtocolError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.triton_engine import TritonEngine
from meshinfer.testing.triton_server import TritonServerProcess

REF = ModelRef("held", "1")


class HoldingGrpc(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A gRPC Triton whose ModelReady answers once :attr:`release` is set."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def ModelReady(self, request, context):
        self.entered.set()
        await self.release.wait()
        return service_pb2.ModelReadyResponse(ready=True)


class HoldingHttp:
    """A KServe-v2 HTTP server whose model-ready answers once :attr:`release` is set, and whose
    model metadata is :attr:`metadata` (any JSON)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.metadata: object = []

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response()

    async def ready(self, request: web.Request) -> web.Response:
        self.entered.set()
        await self.release.wait()
        return web.Response()

    async def describe(self, request: web.Request) -> web.Response:
        return web.json_response(self.metadata)

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response({"max_batch_size": 8})


async def start_grpc(servicer: HoldingGrpc) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def start_http(holder: HoldingHttp) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/v2/health/live", holder.ok)
    app.router.add_get("/v2/health/ready", holder.ok)
    app.router.add_get("/v2/models/{m}/versions/{v}/ready", holder.ready)
    app.router.add_get("/v2/models/{m}/versions/{v}", holder.describe)
    app.router.add_get("/v2/models/{m}/versions/{v}/config", holder.config)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"127.0.0.1:{runner.addresses[0][1]}"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_call_in_flight_at_close_fails_as_closed_not_cancelled(protocol) -> None:
    """grpc.aio cancels every call on the channel aclose closes: the call raised CancelledError
    into a caller nobody cancelled (a batcher's batch task, a TaskGroup), where HTTP says
    'closed'."""
    holder = HoldingGrpc() if protocol == "grpc" else HoldingHttp()
    server, url = await (start_grpc(holder) if protocol == "grpc" else start_http(holder))
    try:
        engine = TritonEngine(url, protocol=protocol, timeout_s=10, backoff_s=0.01)
        call = asyncio.create_task(engine.model_ready(REF))
        await holder.entered.wait()
        await engine.aclose()
        with pytest.raises(LocalProtocolError, match="is closed"):
            await call
        assert not call.cancelled()
    finally:
        holder.release.set()
        await (server.stop(None) if protocol == "grpc" else server.cleanup())


async def test_a_cancelled_caller_still_sees_its_cancel() -> None:
    holder = HoldingGrpc()
    server, url = await start_grpc(holder)
    try:
        async with TritonEngine(url, protocol="grpc", timeout_s=10) as engine:
            call = asyncio.create_task(engine.model_ready(REF))
            await holder.entered.wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert call.cancelled()
    finally:
        holder.release.set()
        await server.stop(None)


@pytest.mark.parametrize("metadata", [[], "text", None, {"inputs": 5, "outputs": []}])
async def test_metadata_that_is_not_an_object_is_an_inference_error(metadata) -> None:
    """A JSON list (or a number for the inputs) raised AttributeError/TypeError out of load."""
    holder = HoldingHttp()
    holder.metadata = metadata
    holder.release.set()
    runner, url = await start_http(holder)
    try:
        async with TritonEngine(url, retries=0) as engine:
            with pytest.raises(InferenceError, match=f"model {REF} on "):
                await engine.load(REF)
            assert engine.capacity().loaded_models == ()
    finally:
        await runner.cleanup()


# --- the test server (one real start) -----------------------------------------------------------


def group_segments(pid: int) -> set[Path]:
    """The Python backend's shared-memory region of the server whose child is ``pid``."""
    return set(Path("/dev/shm").glob(f"pytrtion{pid}-*"))


def listening_addresses(group: int, ports: set[int]) -> set[str]:
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != group:
                continue
            for conn in proc.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports:
                    found.add(conn.laddr.ip)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="PyTriton ships Triton for Linux x86_64 only",
)
def test_server_listens_on_loopback_and_a_kill_leaves_no_shared_memory() -> None:
    """The server listened on every interface (its ports were only checked free on loopback),
    and kill() left the Python backend's ~4 MiB /dev/shm region behind for good, one per kill
    (the restart tests kill a server every run)."""
    server = TritonServerProcess()
    server.start(timeout_s=120)
    try:
        assert server._process is not None
        pid = server._process.pid
        ports = {server.http_port, server.grpc_port, server.metrics_port}
        addresses = listening_addresses(pid, ports)
        assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}  # (gRPC: IPv6 socket)
        segments = group_segments(pid)
        assert segments  # (the name pattern still holds: else this test proves nothing)
        server.kill()
        assert not [s for s in segments if s.exists()]
    finally:
        server.kill()
