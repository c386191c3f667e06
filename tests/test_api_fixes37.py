"""The coordinator's HTTP API, session 37: a JSON body nested to the parser's limit with a
surrogate escape is a 400 (it was a logged 500), a number past the float range is refused as
NaN and Infinity are (it was read as infinity and journaled), and a large task document or
revocation list is encoded to JSON in the API's workers, not on the event loop.

A real coordinator (no nodes: accepted tasks wait) and API on loopback; requests go over real
TCP with aiohttp's client.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import types

import aiohttp
import pytest
import pytest_asyncio

from coordinator import api as api_module
from coordinator import api_errors
from coordinator.api import CoordinatorApi
from coordinator.api_errors import ApiError
from coordinator.api_requests import parse_json
from meshinfer.transport.base import Address
from tests.test_api_fixes27 import Lone, is_api_error, validator

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Served:
    def __init__(self, lone: Lone, api: CoordinatorApi, http: aiohttp.ClientSession) -> None:
        self.lone, self.api, self.http = lone, api, http


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("api37")) as lone:
        api = CoordinatorApi(lone.coordinator, Address("127.0.0.1", 0), lone.cluster.token)
        auth = {"Authorization": f"Bearer {lone.cluster.token}"}
        no_pool = aiohttp.TCPConnector(force_close=True)
        async with api, aiohttp.ClientSession(api.url, headers=auth, connector=no_pool) as http:
            yield Served(lone, api, http)


async def post_json(served: Served, body: bytes) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    async with served.http.post("/v1/tasks", data=body, headers=headers) as response:
        return response.status, json.loads(await response.read())


def bad_json(status: int, doc: dict) -> str:
    assert status == 400, doc
    is_api_error(doc, 400)
    assert doc["error"]["code"] == "bad_json", doc
    return doc["error"]["message"]


# --- a surrogate escape nested deep ----------------------------------------------------------


#: Depths where json.loads still reads a nest from a stack a few hundred frames deep.
NEAR_THE_LIMIT = range(sys.getrecursionlimit() - 250, sys.getrecursionlimit() + 10)


def nested_surrogate(depth: int) -> bytes:
    """A string with a surrogate pair (an emoji, valid) nested ``depth`` arrays deep."""
    return ("[" * depth + '"\\ud83d\\ude00"' + "]" * depth).encode()


async def test_parse_json_never_lets_a_recursion_error_out():
    # before: json.loads read it, then the lone-surrogate check (json.dumps, recursive) ran
    # out of stack a few frames deeper: RecursionError at one depth here
    for depth in NEAR_THE_LIMIT:
        try:
            parse_json(nested_surrogate(depth))
        except ApiError as exc:
            assert exc.code == "bad_json", exc.message


async def test_a_surrogate_escape_nested_to_the_limit_is_a_400_and_no_error_line(served, caplog):
    # before: one depth in this range (976 or 936 on a handler's stack) answered 500 internal and
    # logged the RecursionError's traceback (an ERROR line: CI's process tests fail on it)
    caplog.set_level(logging.ERROR, logger="coordinator")
    statuses = set()
    for depth in NEAR_THE_LIMIT:
        status, doc = await post_json(served, nested_surrogate(depth))
        statuses.add(status)
        assert status == 400, (depth, doc)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert statuses == {400}


async def test_a_lone_surrogate_is_still_refused_in_keys_and_values():
    for body in (b'{"a": "\\ud800"}', b'{"\\udc00": 1}', b'[[{"a": ["x", "\\udfff"]}]]'):
        with pytest.raises(ApiError, match="lone surrogate"):
            parse_json(body)
    assert parse_json(b'{"\\ud83d\\ude00": ["\\ud83d\\ude00"]}') == {"😀": ["😀"]}


# --- numbers past the float range -------------------------------------------------------------

PAST_THE_RANGE = {
    "exponent": "1e400",
    "negative": "-1e400",
    "digits": "1" + "0" * 400 + ".0",
    "digits and exponent": "1" * 250 + "e99",
    "capital E": "1E+309",
}


@pytest.mark.parametrize("number", PAST_THE_RANGE.values(), ids=PAST_THE_RANGE.keys())
async def test_a_number_past_the_float_range_is_bad_json_and_not_taken(served, number):
    # before: it read as infinity; in params it was accepted (202), journaled and sent to the
    # nodes, while the literal Infinity was refused
    task_id = f"big-{abs(hash(number)) % 10**8}"
    body = (
        f'{{"task_id":"{task_id}","pattern":"single","model":"digits-mlp",'
        f'"inputs":{{"values":[[0.5]]}},"params":{{"scale":{number}}}}}'
    ).encode()
    message = bad_json(*await post_json(served, body))
    assert "out of the range of a float64" in message and number[:40] in message
    async with served.http.get(f"/v1/tasks/{task_id}") as response:
        assert response.status == 404


async def test_numbers_within_the_float_range_still_pass(served):
    body = (
        b'{"pattern":"single","model":"digits-mlp","inputs":{"values":[[0.5]]},'
        b'"params":{"big":1e308,"tiny":1e-400,"neg":-1.5e300}}'
    )
    status, doc = await post_json(served, body)
    assert status == 202, doc
    assert parse_json(b"[1e-400, 1.7976931348623157e308]") == [0.0, 1.7976931348623157e308]


# --- large documents are encoded off the loop -------------------------------------------------


class DumpsSpy:
    """``json`` for :mod:`coordinator.api_errors`: the real ``dumps``, noting the thread of
    each call whose document ``matches``."""

    def __init__(self, matches) -> None:
        self.matches, self.threads = matches, []

    def dumps(self, doc, **kwargs):
        if self.matches(doc):
            self.threads.append(threading.current_thread().name)
        return json.dumps(doc, **kwargs)


async def test_a_task_with_many_items_is_encoded_in_the_apis_workers(served, monkeypatch):
    # a batch task of 2000 items: its document is ~500 KB of JSON before any result is in
    # before: the off-loop choice counted the result's bytes only (none yet), and every
    # document was encoded on the loop (json.dumps after the worker built the dict)
    body = json.dumps({"task_id": "many-items-37", "pattern": "batch", "model": "digits-mlp",
                       "shard_size": 1, "inputs": {"values": [[0.5]] * 2000}})  # fmt: skip
    status, doc = await post_json(served, body.encode())
    assert status == 202 and doc["items_total"] == 2000, doc
    spy = DumpsSpy(lambda d: isinstance(d, dict) and len(d.get("items", ())) == 2000)
    monkeypatch.setattr(api_errors, "json", types.SimpleNamespace(dumps=spy.dumps))
    for path in ("/v1/tasks/many-items-37", "/v1/tasks/many-items-37/wait?timeout=0"):
        async with served.http.get(path) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json; charset=utf-8"
            task = json.loads(await response.read())
        validator({"$ref": "#/components/schemas/Task"}).validate(task)
        assert len(task["items"]) == 2000
    assert len(spy.threads) == 2
    assert all(name.startswith("coord-api-json") for name in spy.threads), spy.threads


async def test_a_small_task_is_still_answered_as_before(served):
    body = (
        b'{"task_id":"small-37","pattern":"single","model":"digits-mlp","inputs":{"values":[[1]]}}'
    )
    status, doc = await post_json(served, body)
    assert status == 202, doc
    async with served.http.get("/v1/tasks/small-37?outputs=false") as response:
        assert response.status == 200
        task = json.loads(await response.read())
    validator({"$ref": "#/components/schemas/Task"}).validate(task)
    assert task["task_id"] == "small-37" and len(task["items"]) == 1


async def test_a_long_revocation_list_is_encoded_in_the_apis_workers(served, monkeypatch):
    # a list as long as 8 MiB allows has tens of thousands of entries; this one is reported
    # as long (the threshold is on the estimate): its document was built in a worker before,
    # but encoded on the loop
    monkeypatch.setattr(api_module, "revocations_doc_bytes", lambda listed: 1 << 20)
    spy = DumpsSpy(lambda d: isinstance(d, dict) and "entries" in d)
    monkeypatch.setattr(api_errors, "json", types.SimpleNamespace(dumps=spy.dumps))
    async with served.http.get("/v1/revocations") as response:
        assert response.status == 200
        doc = json.loads(await response.read())
    validator({"$ref": "#/components/schemas/Revocations"}).validate(doc)
    assert spy.threads and all(n.startswith("coord-api-json") for n in spy.threads), spy.threads
