"""The coordinator's HTTP API, session 34: a body's Content-Encoding is one aiohttp decodes or a
JSON 415 naming those it does (never read as it came, compressed or not), HEAD on ``/wait``
answers at once, and a JSON body too deep or with too long a number gets a plain message.

A real coordinator (no nodes: accepted tasks wait) and API on loopback; requests go over real
TCP (aiohttp's client, or raw bytes for what no client would send).
"""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import compression_utils

from coordinator.api import CoordinatorApi
from coordinator.openapi import openapi_document
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_api_fixes27 import Lone, exchange, is_api_error

pytestmark = pytest.mark.asyncio(loop_scope="module")


#: What aiohttp decodes here: gzip and deflate always, br and zstd with their libraries.
DECODED = ", ".join(
    ["gzip", "deflate"]
    + ["br"] * getattr(compression_utils, "HAS_BROTLI", False)
    + ["zstd"] * getattr(compression_utils, "HAS_ZSTD", False)
)


def task(task_id: str) -> bytes:
    doc = {"task_id": task_id, "pattern": "single", "model": "digits-mlp",
           "inputs": {"values": [[0.5] * 64]}}  # fmt: skip
    return json.dumps(doc).encode()


class Served:
    def __init__(self, lone: Lone, api: CoordinatorApi, http: aiohttp.ClientSession) -> None:
        self.lone, self.api, self.http = lone, api, http
        self.token = lone.cluster.token
        self.port = int(api.url.rsplit(":", 1)[1])

    async def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send raw bytes, read the answer, and wait until the server let the connection go."""
        try:
            return await exchange(self.port, request)
        finally:
            await until(lambda: not self.api._runner.server.connections)

    def post(self, path: str, headers: list[str], body: bytes) -> bytes:
        lines = "".join(f"{h}\r\n" for h in headers)
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Length: {len(body)}\r\n{lines}\r\n"
        ).encode() + body


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("api34")) as lone:
        api = CoordinatorApi(lone.coordinator, Address("127.0.0.1", 0), lone.cluster.token)
        auth = {"Authorization": f"Bearer {lone.cluster.token}"}
        no_pool = aiohttp.TCPConnector(force_close=True)
        async with api, aiohttp.ClientSession(api.url, headers=auth, connector=no_pool) as http:
            yield Served(lone, api, http)


def unsupported_coding(status: int, headers: dict[str, str], body: bytes, named: str) -> None:
    assert status == 415, body
    doc = json.loads(body)
    is_api_error(doc, 415)
    assert doc["error"]["code"] == "unsupported_media_type"
    message = doc["error"]["message"]
    assert f"Content-Encoding {named!r} is not supported" in message, message
    assert "gzip" in message and "identity" in message
    assert headers["Accept-Encoding"] == DECODED


async def absent(served: Served, task_id: str) -> None:
    async with served.http.get(f"/v1/tasks/{task_id}") as response:
        assert response.status == 404, await response.text()


# --- Content-Encoding ------------------------------------------------------------------------

JSON = "Content-Type: application/json"
#: (id, Content-Encoding headers sent, how the body is encoded, the coding the message names)
NOT_DECODED = {
    "unknown": (["Content-Encoding: foo"], lambda b: b, "foo"),
    "compress": (["Content-Encoding: compress"], lambda b: b, "compress"),
    "x-gzip": (["Content-Encoding: x-gzip"], gzip.compress, "x-gzip"),
    "a list": (["Content-Encoding: gzip, identity"], gzip.compress, "gzip, identity"),
    "twice": (
        ["Content-Encoding: gzip", "Content-Encoding: gzip"],
        lambda b: gzip.compress(gzip.compress(b)),
        "gzip, gzip",
    ),
}


@pytest.mark.parametrize("sent, encode, named", NOT_DECODED.values(), ids=NOT_DECODED.keys())
async def test_a_submission_in_a_coding_not_decoded_is_415_and_not_taken(
    served, sent, encode, named
):
    # before: aiohttp read such a body as it came (a plain one in "foo" was accepted, 202; a
    # gzip one in "gzip, identity" got "the body is not UTF-8 text")
    task_id = "enc-" + named.replace(", ", "-")
    request = served.post("/v1/tasks", [JSON, *sent], encode(task(task_id)))
    unsupported_coding(*await served.exchange(request), named)
    await absent(served, task_id)


async def test_a_revocation_list_in_a_coding_not_decoded_is_415(served):
    sent = ["Content-Type: application/octet-stream", "Content-Encoding: foo"]
    request = served.post("/v1/revocations", sent, b"MIRL" + bytes(60))
    unsupported_coding(*await served.exchange(request), "foo")


@pytest.mark.parametrize("n, coding", enumerate(["identity", "", "GZIP", " gzip "]))
async def test_the_codings_decoded_still_pass(served, n, coding):
    task_id = f"enc-ok-{n}"
    body = task(task_id)
    if coding.strip().lower() == "gzip":
        body = gzip.compress(body)
    request = served.post("/v1/tasks", [JSON, f"Content-Encoding: {coding}"], body)
    status, _, answer = await served.exchange(request)
    assert status == 202, answer
    assert json.loads(answer)["task_id"] == task_id


@pytest.mark.skipif(
    getattr(compression_utils, "HAS_ZSTD", False), reason="aiohttp decodes zstd here"
)
async def test_zstd_without_its_library_is_a_plain_415_and_counted(served):
    # before: 400 "the body cannot be read as sent (Content-Encoding 'Can not decode
    # content-encoding: zstanda')", aiohttp's own message cut into the encoding's place
    request = served.post("/v1/tasks", [JSON, "Content-Encoding: zstd"], b"(\xb5/\xfd")
    status, headers, body = await served.exchange(request)
    unsupported_coding(status, headers, body, "zstd")
    async with served.http.get("/metrics") as response:
        text = await response.text()
    assert 'route="unparsed",status="415"} 1.0' in text


async def test_the_openapi_document_names_accept_encoding_on_a_415():
    doc = openapi_document()
    e415 = doc["components"]["responses"]["E415"]
    assert "Accept-Encoding" in e415["headers"] and "Content-Encoding" in e415["description"]


# --- HEAD on /wait ---------------------------------------------------------------------------


async def test_head_on_wait_answers_at_once_as_get_would_now(served):
    # No node: the task stays pending, so a wait lasts its whole timeout. Before: HEAD waited
    # it out (here 120 s: the deadline below fails first).
    async with served.http.post("/v1/tasks", data=task("head-wait"), headers={
        "Content-Type": "application/json"
    }) as response:  # fmt: skip
        assert response.status == 202
    path = "/v1/tasks/head-wait/wait"

    async def head() -> aiohttp.ClientResponse:
        async with served.http.head(path, params={"timeout": "120"}) as response:
            return response

    headed = await asyncio.wait_for(head(), 20)
    async with served.http.get(path, params={"timeout": "0"}) as response:
        body = await response.read()
        assert response.status == headed.status == 200
        assert headed.headers["Content-Type"] == response.headers["Content-Type"]
        assert int(headed.headers["Content-Length"]) == len(body)
    async with served.http.head("/v1/tasks/no-such/wait") as response:
        assert response.status == 404
    async with served.http.head(path, params={"timeout": "-1"}) as response:
        assert response.status == 400  # (the parameters are still checked)


# --- JSON bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, says",
    [
        (b'{"priority": ' + b"9" * 5000 + b"}", "a number with more than 4300 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["long number", "deep"],
)
async def test_a_json_body_python_cannot_read_gets_a_message_for_the_client(served, body, says):
    # before: Python's own words ("use sys.set_int_max_str_digits() to increase the limit",
    # "maximum recursion depth exceeded while decoding a JSON array from a unicode string")
    headers = {"Content-Type": "application/json"}
    async with served.http.post("/v1/tasks", data=body, headers=headers) as response:
        assert response.status == 400
        doc = await response.json()
    is_api_error(doc, 400)
    assert doc["error"]["code"] == "bad_json"
    message = doc["error"]["message"]
    assert says in message and "sys." not in message and "recursion" not in message
