"""The coordinator's HTTP API, session 32: shutting down. A request that arrives while the API
closes, or that a close cuts short, gets the JSON 503 ``shutting_down`` (with ``Retry-After``)
and an INFO line at most, never a 500 or an ERROR line; an ``aclose`` cancelled mid-drain (a
daemon's second signal) leaves the rest to the next one, which never releases the JSON workers
under a running handler.

A real coordinator (no nodes) and API on loopback; requests go over real TCP as raw bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import pytest_asyncio

from coordinator.api import CoordinatorApi
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_api_fixes27 import Lone, is_api_error
from tests.test_api_fixes30 import answer

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Over the API's off-loop threshold (256 KiB): the body is parsed in its JSON workers.
BIG = b'{"pattern": "single", "model": "digits-mlp", "note": "' + b"x" * 300_000 + b'"}'


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lone(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("api32")) as lone:
        yield lone


def head(token: str, method: str, path: str, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n"
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra}\r\n".encode()


def submit_head(token: str, length: int) -> bytes:
    extra = f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
    return head(token, "POST", "/v1/tasks", extra)


async def started(coordinator, token: str) -> tuple[CoordinatorApi, int]:
    api = CoordinatorApi(coordinator, Address("127.0.0.1", 0), token)
    await api.start()
    return api, int(api.url.rsplit(":", 1)[1])


async def cut_close(api: CoordinatorApi) -> None:
    """An ``aclose`` cancelled once it has begun (as a daemon's second signal cuts its drain)."""
    first = asyncio.ensure_future(api.aclose())
    await asyncio.sleep(0)  # (it runs to its first wait: the server's own close)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def answer_or_closed(reader: asyncio.StreamReader) -> tuple[int, dict, bytes] | None:
    """The answer, or None if the server closed the connection without one."""
    try:
        return await answer(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def shutting_down(reply: tuple[int, dict, bytes]) -> dict:
    status, headers, body = reply
    assert status == 503, body
    doc = json.loads(body)
    is_api_error(doc, 503)
    assert doc["error"]["code"] == "shutting_down" and "shutting down" in doc["error"]["message"]
    assert int(headers["retry-after"]) > 0
    return doc


def no_error_lines(caplog) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_a_second_aclose_never_releases_the_json_workers_under_a_running_handler(
    lone, caplog
):
    caplog.set_level(logging.INFO)
    api, port = await started(lone.coordinator, lone.cluster.token)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(submit_head(lone.cluster.token, len(BIG)) + BIG[:1000])
        await until(lambda: api.tasks.uploading > 0)  # its handler reads the body
        await cut_close(api)
        await api.aclose()  # the second: at once, and the handler is not left running
        try:
            writer.write(BIG[1000:])  # the rest: parsing it would need the JSON workers
            await writer.drain()
        except ConnectionError:
            pass
        reply = await answer_or_closed(reader)
        if reply is not None:
            shutting_down(reply)
    finally:
        writer.transport.abort()
        await api.aclose()
    no_error_lines(caplog)


async def test_a_request_arriving_while_the_api_closes_is_refused_503_shutting_down(lone, caplog):
    caplog.set_level(logging.INFO)
    api, port = await started(lone.coordinator, lone.cluster.token)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head(lone.cluster.token, "GET", "/v1/stats"))
        assert (await answer(reader))[0] == 200  # a kept-alive connection
        await cut_close(api)  # closing, the connection not yet told
        writer.write(head(lone.cluster.token, "GET", "/v1/stats"))
        shutting_down(await answer(reader))
    finally:
        writer.transport.abort()
        await api.aclose()
    no_error_lines(caplog)


async def test_a_request_the_shutdown_cuts_short_gets_503_and_no_error_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with Lone(tmp_path) as own:  # a coordinator of its own, to close under the API
        token = own.cluster.token
        api, port = await started(own.coordinator, token)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"pattern": "single", "model": "digits-mlp", "task_id": "cut-1",
                           "inputs": {"values": [[0.5] * 64]}}).encode()  # fmt: skip
        try:
            writer.write(submit_head(token, len(body)) + body)
            assert (await answer(reader))[0] == 202  # accepted; no node: it stays pending
            writer.write(head(token, "GET", "/v1/tasks/cut-1/wait?timeout=60&outputs=false"))
            await until(lambda: "cut-1" in own.coordinator._waiters)
            await own.coordinator.aclose()  # what the open wait reads at the close goes away
            closing = asyncio.ensure_future(api.aclose())  # the wait answers at once
            doc = shutting_down(await answer(reader))
            assert "may have taken effect" in doc["error"]["message"]
            await closing
        finally:
            writer.transport.abort()
            await api.aclose()
    no_error_lines(caplog)
    assert any("cut short by the shutdown" in r.getMessage() for r in caplog.records)
