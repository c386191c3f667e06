"""The coordinator's HTTP API, session 30: ``Expect: 100-continue`` is answered only once a
request has passed the checks made before its body is read (token, size), an unknown
expectation gets the API's JSON error, and a compressed submission counts against the upload
budget as what it may inflate to.

A real coordinator (no nodes) and API on loopback; requests go over real TCP as raw bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest
import pytest_asyncio

from coordinator.api import CoordinatorApi
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_api_fixes27 import Lone, is_api_error

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: A small body cap, so "too large" is cheap; the upload budget holds one and a half bodies.
MAX_BODY = 1000
TASK = {"pattern": "single", "model": "digits-mlp", "inputs": {"values": [[0.5] * 64]}}


class Served:
    def __init__(self, lone: Lone, api: CoordinatorApi) -> None:
        self.lone, self.api = lone, api
        self.token = lone.cluster.token
        self.port = int(api.url.rsplit(":", 1)[1])

    def head(self, method: str, path: str, extra: str = "", *, token: bool = True) -> bytes:
        auth = f"Authorization: Bearer {self.token}\r\n" if token else ""
        return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra}\r\n".encode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("api30")) as lone:
        api = CoordinatorApi(
            lone.coordinator, Address("127.0.0.1", 0), lone.cluster.token,
            max_body_bytes=MAX_BODY, max_upload_bytes=MAX_BODY * 3 // 2,
        )  # fmt: skip
        async with api:
            yield Served(lone, api)


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: its status, headers and body (a 1xx has none)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    status = int(lines[0].split()[1])
    if status < 200:
        return status, headers, b""
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


async def first_answer(served: Served, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send the head of a request (no body: the client waits, as Expect has it) and read the
    first thing the server answers."""
    others = len(served.api._runner.server.connections)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(request)
        return await answer(reader)
    finally:
        await closed(served, writer, others)


async def closed(served: Served, writer: asyncio.StreamWriter, others: int = 0) -> None:
    """Close the connection and wait until the server has let it go (it may have been
    waiting for the body that never came), leaving ``others`` open."""
    writer.transport.abort()
    await until(lambda: len(served.api._runner.server.connections) <= others)


# --- Expect ----------------------------------------------------------------------------------


async def test_no_100_continue_for_a_request_without_the_token(served):
    request = served.head(
        "POST", "/v1/tasks", "Content-Type: application/json\r\nContent-Length: 900\r\n"
        "Expect: 100-continue\r\n", token=False,
    )  # fmt: skip
    status, headers, body = await first_answer(served, request)
    assert status == 401 and "www-authenticate" in headers
    is_api_error(json.loads(body), 401)


async def test_no_100_continue_for_a_body_over_the_limit(served):
    request = served.head(
        "POST", "/v1/tasks", f"Content-Type: application/json\r\nContent-Length: {MAX_BODY + 1}"
        "\r\nExpect: 100-continue\r\n",
    )  # fmt: skip
    status, _, body = await first_answer(served, request)
    assert status == 413
    is_api_error(json.loads(body), 413)


async def test_100_continue_once_the_checks_pass_and_the_task_is_accepted(served):
    body = json.dumps(TASK).encode()
    request = served.head(
        "POST", "/v1/tasks", f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n",
    )  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(request)
        assert (await answer(reader))[0] == 100
        writer.write(body)
        status, _, doc = await answer(reader)
    finally:
        await closed(served, writer)
    assert status == 202 and json.loads(doc)["state"] == "pending"


@pytest.mark.parametrize("path", ["/v1/nodes", "/healthz", "/v1/tasks"])
async def test_an_unknown_expectation_is_the_apis_json_417_and_counted(served, path):
    counter = served.api._requests.labels("GET", path, "417")
    before = counter.value
    request = served.head("GET", path, "Expect: something-else\r\nConnection: close\r\n")
    status, headers, body = await first_answer(served, request)
    assert status == 417 and headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    is_api_error(doc, 417)
    assert doc["error"]["code"] == "expectation_failed"
    assert "something-else" in doc["error"]["message"]
    assert counter.value == before + 1


# --- the upload budget -----------------------------------------------------------------------


async def test_a_compressed_submission_counts_as_what_it_may_inflate_to(served):
    api = served.api
    held_body = json.dumps(TASK).encode()
    held_head = served.head(
        "POST", "/v1/tasks", f"Content-Type: application/json\r\nContent-Length: {MAX_BODY}\r\n"
        "Connection: close\r\n",
    )  # fmt: skip
    _, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:  # one submission is being read: MAX_BODY of the budget (1.5 MAX_BODY) is taken
        writer.write(held_head + held_body[:10])
        await until(lambda: api.tasks.uploading == MAX_BODY)
        small = gzip.compress(json.dumps(TASK).encode())  # a few dozen bytes, inflating to more
        request = served.head(
            "POST", "/v1/tasks", "Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(small)}\r\nConnection: close\r\n",
        ) + small  # fmt: skip
        status, headers, body = await first_answer(served, request)
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "busy"
    finally:
        await closed(served, writer)
    assert api.tasks.uploading == 0
    # alone, the same compressed submission is let in and read
    status, _, body = await first_answer(served, request)
    assert status == 202, body
