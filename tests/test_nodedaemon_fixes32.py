"""Faults found in the node daemon's surface (session 32): ``POST /position`` with a body that
does not decode as its Content-Encoding, ``/readyz`` on an engine that lost a model or cannot say
its capacity, NVML bindings raising what is not an NVMLError, two daemons on one data_dir, a
runtime file that cannot be written, and ``meshinfer-node status`` against a daemon that never
finishes its answer.

Real daemons in this process (TCP, Noise on loopback, the NumPy engine) asked over real HTTP;
``status`` against a real socket server on loopback.
"""

from __future__ import annotations

import logging
import random
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import pytest

from meshinfer.errors import ConfigError
from meshinfer.runtime import telemetry
from meshinfer.runtime.data_dir import RUNTIME_FILE, DataDir, read_runtime
from meshinfer.testing.cluster import LocalCluster
from node import cli as node_cli
from node.config import load_config
from node.daemon import NodeDaemon
from tests.test_node_surface_hunt import node
from tests.test_telemetry import fake_nvml


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- POST /position: a body that does not decode ------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_a_400(
    tmp_path, caplog, encoding
):
    async with node(tmp_path) as daemon, aiohttp.ClientSession() as http:
        headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
        body = b'{"position": [1, 2]}'  # not compressed at all
        async with http.post(daemon.http.url + "/position", data=body, headers=headers) as r:
            assert r.status == 400  # was a 500
            assert "content-encoding" in (await r.json())["error"]
        assert daemon.mesh.membership.state.position is None
    assert errors(caplog) == []


# --- /readyz tells the truth ------------------------------------------------------------------


async def readyz(daemon: NodeDaemon) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(daemon.http.url + "/readyz") as response:
            return response.status, await response.json()


async def test_readyz_is_503_not_500_when_the_engine_cannot_tell_its_capacity(tmp_path, caplog):
    async with node(tmp_path) as daemon:
        assert (await readyz(daemon))[0] == 200

        def lost() -> int:  # as CuPy's memGetInfo on a GPU that fell off the bus
            raise RuntimeError("cudaErrorDevicesUnavailable")

        daemon.engine._free_memory = lost
        status, body = await readyz(daemon)
        assert status == 503  # was a 500, and an ERROR line
        assert body["problems"][0].startswith("engine not ready: RuntimeError(")
        async with aiohttp.ClientSession() as http:
            async with http.get(daemon.http.url + "/status") as response:
                assert response.status == 200
                assert (await response.json())["ready"] is False
    assert errors(caplog) == []


async def test_readyz_is_503_once_the_engine_no_longer_holds_a_model(tmp_path):
    async with node(tmp_path) as daemon:
        ref = daemon.models[1]
        await daemon.engine.unload(ref)
        status, body = await readyz(daemon)
        assert status == 503  # was 200: its batcher still stood
        assert body["problems"] == [f"models not loaded: {ref}"]
        await daemon.engine.load(ref)
        assert await readyz(daemon) == (200, {"ready": True, "problems": []})


# --- telemetry: NVML raising what is not an NVMLError -------------------------------------------


def test_an_nvml_binding_raising_anything_gives_no_gpu_figures_and_warns_once(monkeypatch, caplog):
    nvml = fake_nvml()

    def count() -> int:  # a binding that does not fit the driver
        raise TypeError("an integer is required")

    nvml.nvmlDeviceGetCount = count  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    collector = telemetry.TelemetryCollector()
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        first = collector.collect()  # raised: the node's telemetry loop logged an ERROR
        second = collector.collect()
    assert first.gpu_count == second.gpu_count == 0 and first.gpu_memory_used_bytes is None
    assert len([r for r in caplog.records if "NVML sample failed" in r.getMessage()]) == 1
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    assert collector.collect().gpu_count == 2  # it reads again
    collector.close()


# --- the data dir -----------------------------------------------------------------------------


async def test_a_second_daemon_on_the_same_data_dir_is_refused_and_the_first_stays_findable(
    tmp_path,
):
    cluster = LocalCluster(tmp_path, fleet_id="hunt")
    first = NodeDaemon(load_config(cluster.add_node("node-0")), rng=random.Random(0))
    text = cluster.add_node("node-1").read_text().replace("data/node-1", "data/node-0")
    (tmp_path / "second.toml").write_text(text)
    second = NodeDaemon(load_config(tmp_path / "second.toml"), rng=random.Random(1))
    assert second.data_dir == first.data_dir
    try:
        await first.start()
        with pytest.raises(ConfigError, match=r"^\[node\] data_dir .*: in use by another daemon"):
            await second.start()  # it started, and replaced the first's runtime file
        await second.aclose()
        assert read_runtime(first.data_dir)["node_id"] == "node-0"
    finally:
        await second.aclose()
        await first.aclose()
    assert not (first.data_dir / RUNTIME_FILE).exists()
    third = DataDir(str(first.data_dir), "[node] data_dir", "unused-", "node.lock")
    third.make()  # the lock went with the first
    third.close()


def test_a_runtime_file_that_cannot_be_written_is_an_error_naming_the_key(tmp_path):
    data = DataDir(str(tmp_path), "[node] data_dir", "unused-")
    data.make()
    (tmp_path / RUNTIME_FILE).mkdir()  # in the way, as a read-only mount or a full disk
    with pytest.raises(ConfigError, match=r"^\[node\] data_dir: cannot write .*runtime\.json"):
        data.write_runtime({"pid": 1})  # was a bare IsADirectoryError
    assert [p.name for p in tmp_path.iterdir()] == [RUNTIME_FILE]  # no partial file left
    data.close()


# --- `meshinfer-node status` against a daemon that never finishes ------------------------------


@contextmanager
def dribbling_server(chunks: Iterator[bytes]) -> Iterator[str]:
    """A loopback HTTP server answering one request with a 200 whose body is ``chunks``, sent
    until they run out or the client goes; its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
                for chunk in chunks:
                    conn.sendall(chunk)
            except OSError:  # the client gave up
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(timeout=30)
        listener.close()


def test_status_gives_up_on_a_daemon_that_sends_a_byte_now_and_then(monkeypatch, capsys):
    monkeypatch.setattr(node_cli, "STATUS_TIMEOUT_S", 0.5, raising=False)
    stop = threading.Event()

    def dribble() -> Iterator[bytes]:
        for _ in range(40):  # ~4 s of it; each read waited 5 s: it never ended
            if stop.wait(0.1):
                return
            yield b" "

    with dribbling_server(dribble()) as url:
        code = node_cli.main(["status", "--url", url])
        stop.set()
    err = capsys.readouterr().err
    assert code == 2 and f"cannot reach the daemon at {url}: no whole answer within" in err


def test_status_stops_reading_an_answer_no_node_would_give(monkeypatch, capsys):
    monkeypatch.setattr(node_cli, "STATUS_MAX_BYTES", 1 << 20, raising=False)
    with dribbling_server(iter([b" " * (1 << 16)] * 64)) as url:  # 4 MiB
        code = node_cli.main(["status", "--url", url])
    err = capsys.readouterr().err
    assert code == 2 and f"{url}: not a meshinfer node's /status (over " in err
