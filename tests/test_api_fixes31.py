"""The coordinator's HTTP API, session 31: a request with two ``Authorization`` headers is
refused; a path no route serves answers ``Expect`` with the API's JSON 404/405 (no ``100
Continue`` for a path that does not exist); a pushed revocation list is verified in the API's
bounded workers; the OpenAPI document takes its limits from the handlers' constants.

A real coordinator (no nodes) and API on loopback; requests go over real TCP as raw bytes.
"""

from __future__ import annotations

import json
import threading
import time

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import make_mocked_request

from coordinator.api import CoordinatorApi
from coordinator.api_errors import ApiError
from coordinator.api_requests import DEFAULT_PAGE, check_expect, expects_continue
from coordinator.api_tasks import DEFAULT_WAIT_S, MAX_WAIT_S
from coordinator.journal import MAX_PAGE
from coordinator.openapi import openapi_document
from meshinfer.proto.identity import MAX_REVOCATION_LIST_BYTES, RevocationList
from meshinfer.transport.base import Address
from tests.test_api_fixes27 import Lone, is_api_error
from tests.test_api_fixes30 import Served, first_answer

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("api31")) as lone:
        api = CoordinatorApi(lone.coordinator, Address("127.0.0.1", 0), lone.cluster.token)
        async with api:
            yield Served(lone, api)


def json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    is_api_error(doc, expected)
    return doc


# --- Expect, parsed in one place ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "expect", "wants"),
    [
        (aiohttp.HttpVersion11, None, False),
        (aiohttp.HttpVersion11, "100-continue", True),
        (aiohttp.HttpVersion11, "100-Continue", True),
        (aiohttp.HttpVersion10, "100-continue", False),  # HTTP/1.0: Expect is ignored
        (aiohttp.HttpVersion10, "something-else", False),
        (aiohttp.HttpVersion11, "something-else", 417),
        (aiohttp.HttpVersion11, "", 417),
    ],
)
async def test_the_expect_header_is_read_by_one_rule(version, expect, wants):
    headers = {} if expect is None else {"Expect": expect}
    request = make_mocked_request("POST", "/v1/tasks", headers=headers, version=version)
    if wants == 417:
        for check in (check_expect, expects_continue):
            with pytest.raises(ApiError) as refused:
                check(request)
            assert (refused.value.status, refused.value.code) == (417, "expectation_failed")
    else:
        check_expect(request)
        assert expects_continue(request) is wants


# --- the document's limits ---------------------------------------------------------------------


async def test_the_documents_limits_are_the_ones_the_handlers_enforce(served):
    doc = openapi_document()
    listing = {p["name"]: p["schema"] for p in doc["paths"]["/v1/tasks"]["get"]["parameters"]}
    assert listing["limit"]["maximum"] == MAX_PAGE and listing["limit"]["default"] == DEFAULT_PAGE
    wait = doc["paths"]["/v1/tasks/{id}/wait"]["get"]["parameters"]
    timeout = next(p["schema"] for p in wait if p["name"] == "timeout")
    assert timeout["maximum"] == MAX_WAIT_S and timeout["default"] == DEFAULT_WAIT_S
    push = doc["paths"]["/v1/revocations"]["post"]["requestBody"]
    assert f"at most {MAX_REVOCATION_LIST_BYTES} bytes" in push["description"]
    # and the server holds to them
    top = listing["limit"]["maximum"]
    status, _, _ = await first_answer(served, served.head("GET", f"/v1/tasks?limit={top}"))
    assert status == 200
    answer = await first_answer(served, served.head("GET", f"/v1/tasks?limit={top + 1}"))
    assert json_error(*answer, 400)["error"]["code"] == "bad_parameter"
    too_long = timeout["maximum"] + 1
    answer = await first_answer(served, served.head("GET", f"/v1/tasks/x/wait?timeout={too_long}"))
    assert json_error(*answer, 400)["error"]["code"] == "bad_parameter"


# --- revocation pushes -------------------------------------------------------------------------


async def test_a_pushed_list_is_verified_in_the_apis_bounded_workers(served, monkeypatch):
    fleet = served.lone.cluster.fleet
    served.lone.cluster.enroll("ghost-31")
    fleet.revoke(now=time.time(), node_id="ghost-31", reason="test")
    body = fleet.revocations_bin.read_bytes()
    verified_in: list[str] = []
    real = RevocationList.from_bytes

    def spy(data: bytes, trust, held=None):  # the real verification, noting its thread
        verified_in.append(threading.current_thread().name)
        return real(data, trust, held)

    monkeypatch.setattr(RevocationList, "from_bytes", staticmethod(spy))
    request = served.head(
        "POST", "/v1/revocations", "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n",
    ) + body  # fmt: skip
    status, _, answer = await first_answer(served, request)
    assert status == 200, answer
    assert any(e["node_id"] == "ghost-31" for e in json.loads(answer)["entries"])
    assert verified_in and all(name.startswith("coord-api-json") for name in verified_in)


# --- two Authorization headers -----------------------------------------------------------------


@pytest.mark.parametrize("second", ["right", "wrong"])
async def test_two_authorization_headers_are_refused_before_the_token_is_compared(served, second):
    token = served.token if second == "right" else "not-the-token"
    counter = served.api._requests.labels("GET", "/v1/nodes", "400")
    before = counter.value
    request = served.head("GET", "/v1/nodes", f"Authorization: Bearer {token}\r\n")
    doc = json_error(*await first_answer(served, request), 400)
    assert doc["error"]["code"] == "bad_request" and "Authorization" in doc["error"]["message"]
    assert counter.value == before + 1
    # two wrong tokens: 400 too, not 401 (no token was compared)
    request = served.head(
        "GET", "/v1/nodes", "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n", token=False
    )
    json_error(*await first_answer(served, request), 400)


async def test_two_authorization_headers_get_no_100_continue(served):
    request = served.head(
        "POST", "/v1/tasks", f"Authorization: Bearer {served.token}\r\nContent-Type:"
        " application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n",
    )  # fmt: skip
    json_error(*await first_answer(served, request), 400)


async def test_one_authorization_header_still_passes_and_healthz_needs_none(served):
    assert (await first_answer(served, served.head("GET", "/v1/nodes")))[0] == 200
    twice = "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"
    request = served.head("GET", "/healthz", twice, token=False)
    assert (await first_answer(served, request))[0] == 200  # (no token is read there)


# --- paths no route serves ---------------------------------------------------------------------

_CONTINUE = "Content-Type: application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n"


async def test_an_unknown_path_gets_the_json_404_not_100_continue(served):
    counter = served.api._requests.labels("POST", "unmatched", "404")
    before = counter.value
    answer = await first_answer(served, served.head("POST", "/v1/nope", _CONTINUE))
    assert "/v1/nope" in json_error(*answer, 404)["error"]["message"]
    assert counter.value == before + 1


async def test_a_method_no_route_serves_gets_the_json_405_not_100_continue(served):
    counter = served.api._requests.labels("PUT", "unmatched", "405")
    before = counter.value
    status, headers, body = await first_answer(served, served.head("PUT", "/v1/tasks", _CONTINUE))
    doc = json_error(status, headers, body, 405)
    assert doc["error"]["code"] == "method_not_allowed"
    assert headers["allow"] == "GET,HEAD,POST"
    assert counter.value == before + 1
    answer = await first_answer(served, served.head("GET", "/v1/tasks/x/cancel"))
    assert answer[0] == 405 and answer[1]["allow"] == "POST"


async def test_an_unknown_path_without_the_token_gets_401_not_100_continue(served):
    answer = await first_answer(served, served.head("POST", "/nope", _CONTINUE, token=False))
    json_error(*answer, 401)


async def test_an_unknown_expectation_on_an_unknown_path_is_the_json_417_and_counted(served):
    counter = served.api._requests.labels("GET", "unmatched", "417")
    before = counter.value
    answer = await first_answer(served, served.head("GET", "/nope", "Expect: other\r\n"))
    assert json_error(*answer, 417)["error"]["code"] == "expectation_failed"
    assert counter.value == before + 1


async def test_unknown_paths_without_expect_answer_as_before(served):
    for path in ("/", "/v1/tasks/", "/v1/tasks/a/b/c", "/%2e%2e/x"):
        answer = await first_answer(served, served.head("GET", path))
        assert json_error(*answer, 404)["error"]["code"] == "not_found"


# --- the upload budget -------------------------------------------------------------------------


async def test_the_upload_budget_lives_on_the_task_routes_only():
    assert not hasattr(CoordinatorApi, "_uploading")  # (a shim kept for tests, removed)
