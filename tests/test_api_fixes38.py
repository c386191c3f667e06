"""The coordinator's HTTP API, session 38: a client that goes away during ``GET /wait`` no
longer holds its handler, and a waiter on the coordinator, until the wait's timeout (up to
300 s each: a client retrying short waits on a flaky link piled them up). aiohttp tells a GET's
handler nothing when its client goes; the handler now looks every ``CLIENT_CHECK_S``.

A real coordinator (no nodes: the task stays pending) and API on loopback, over real TCP.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from coordinator import api_tasks
from coordinator.api import CoordinatorApi
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_api_fixes27 import TASK, Lone


async def test_a_wait_whose_client_went_away_ends_and_leaves_no_waiter(tmp_path, monkeypatch):
    monkeypatch.setattr(api_tasks, "CLIENT_CHECK_S", 0.05)
    async with Lone(tmp_path) as lone:
        c = lone.coordinator
        api = CoordinatorApi(c, Address("127.0.0.1", 0), lone.cluster.token)
        auth = {"Authorization": f"Bearer {lone.cluster.token}"}
        async with api, aiohttp.ClientSession(api.url, headers=auth) as http:
            async with http.post("/v1/tasks", json={**TASK, "task_id": "stays"}) as response:
                assert response.status == 202, await response.text()
            port = int(api.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /v1/tasks/stays/wait?timeout=300 HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {lone.cluster.token}\r\n\r\n".encode()
            )
            await writer.drain()
            await until(lambda: len(c._waiters.get("stays", ())) == 1, timeout=10)
            writer.close()
            await writer.wait_closed()
            # before: the handler waited on for the whole 300 s, its waiter registered
            await until(lambda: "stays" not in c._waiters and not api._handling, timeout=10)
            assert await reader.read() == b""
            # the server still answers, and a wait whose client stays gets its answer
            async with http.get("/v1/tasks/stays/wait", params={"timeout": "0.2"}) as response:
                assert response.status == 200
                assert (await response.json())["state"] == "pending"


async def test_a_connected_client_still_waits_until_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(api_tasks, "CLIENT_CHECK_S", 0.01)
    async with Lone(tmp_path) as lone:
        api = CoordinatorApi(lone.coordinator, Address("127.0.0.1", 0), lone.cluster.token)
        auth = {"Authorization": f"Bearer {lone.cluster.token}"}
        async with api, aiohttp.ClientSession(api.url, headers=auth) as http:
            async with http.post("/v1/tasks", json={**TASK, "task_id": "q"}) as response:
                assert response.status == 202
            loop = asyncio.get_running_loop()
            start = loop.time()
            async with http.get("/v1/tasks/q/wait", params={"timeout": "0.5"}) as response:
                assert response.status == 200
                assert (await response.json())["state"] == "pending"
            # many looks at the connection did not end the wait early
            assert loop.time() - start >= 0.5


pytestmark = pytest.mark.asyncio
