"""The OpenAPI document tells the truth about the served API, session 35: every status an
operation answers is one it lists, with the documented body, media type and required headers
(``/metrics`` and ``/healthz`` answer 400 and ``/healthz`` 417 too); query parameters are
refused by their schema where the server refuses them; response objects are closed and list
every key the server always sends; the document is sound (refs resolve, ids unique, required
properties exist, path parameters declared).

A real coordinator (no nodes: accepted tasks wait) and API on loopback; requests go over real
TCP (aiohttp's client, or raw bytes for what no client would send).
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import jsonschema
import pytest
import pytest_asyncio

from coordinator.api import CoordinatorApi
from coordinator.openapi import openapi_document
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_api_fixes27 import Lone, exchange

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOC = openapi_document()
MAX_BODY = 64 * 1024
TASK = {"pattern": "single", "model": "digits-mlp", "inputs": {"values": [[0.5] * 64]}}


class Served:
    def __init__(self, lone: Lone, api: CoordinatorApi, http: aiohttp.ClientSession) -> None:
        self.lone, self.api, self.http = lone, api, http
        self.token = lone.cluster.token
        self.port = int(api.url.rsplit(":", 1)[1])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("openapi35")) as lone:
        token = lone.cluster.token
        api = CoordinatorApi(
            lone.coordinator, Address("127.0.0.1", 0), token, max_body_bytes=MAX_BODY
        )
        auth = {"Authorization": f"Bearer {token}"}
        no_pool = aiohttp.TCPConnector(force_close=True)
        async with api, aiohttp.ClientSession(api.url, headers=auth, connector=no_pool) as http:
            for n in range(2):  # two tasks: a listing of one a page has a next_cursor
                body = {**TASK, "task_id": f"oa-{n}"}
                async with http.post("/v1/tasks", json=body) as response:
                    assert response.status == 202, await response.text()
            yield Served(lone, api, http)


# --- the document's own checker --------------------------------------------------------------


def resolve(node: dict) -> dict:
    """``node``, its ``$ref`` followed (within this document)."""
    while "$ref" in node:
        target: Any = DOC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def validate(instance: Any, schema: dict) -> None:
    jsonschema.Draft202012Validator({**schema, "components": DOC["components"]}).validate(instance)


def operation(method: str, template: str) -> dict:
    ops = DOC["paths"][template]
    return ops["get" if method == "HEAD" else method.lower()]


def conforms(method: str, template: str, status: int, headers, body: bytes) -> None:
    """The answer is one the operation lists: its status, media type, required headers (their
    schemas) and body (its schema)."""
    responses = operation(method, template)["responses"]
    assert str(status) in responses, (method, template, status, body[:300])
    response = resolve(responses[str(status)])
    for name, header in response.get("headers", {}).items():
        if header["required"]:
            assert name in headers, (method, template, status, name)
        if name in headers:
            value = headers[name]
            validate(int(value) if header["schema"].get("type") == "integer" else value,
                     header["schema"])  # fmt: skip
    if method == "HEAD":
        assert body == b""
        return
    media = headers["Content-Type"].split(";")[0].strip()
    assert media in response["content"], (method, template, status, media)
    schema = response["content"][media]["schema"]
    validate(json.loads(body) if media == "application/json" else body.decode(), schema)


async def answer(served: Served, method: str, path: str, **kw) -> tuple[int, Any, bytes]:
    async with served.http.request(method, path, **kw) as response:
        return response.status, response.headers, await response.read()


def raw(served: Served, method: str, path: str, *headers: str, auth: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"Authorization: Bearer {served.token}"] * auth + list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- every answer is one the document lists --------------------------------------------------

OCTET = {"Content-Type": "application/octet-stream"}
#: (id, method, path, template, request keyword arguments, the status it gets)
CASES = [
    ("submit new", "POST", "/v1/tasks", "/v1/tasks", {"json": {**TASK, "task_id": "oa-x"}}, 202),
    ("submit again", "POST", "/v1/tasks", "/v1/tasks", {"json": {**TASK, "task_id": "oa-x"}}, 200),
    ("submit conflict", "POST", "/v1/tasks", "/v1/tasks",
     {"json": {**TASK, "task_id": "oa-x", "priority": 3}}, 409),
    ("submit bad json", "POST", "/v1/tasks", "/v1/tasks",
     {"data": b"{", "headers": {"Content-Type": "application/json"}}, 400),
    ("submit invalid", "POST", "/v1/tasks", "/v1/tasks", {"json": {"pattern": "x"}}, 400),
    ("submit type", "POST", "/v1/tasks", "/v1/tasks", {"data": b"{}", "headers": OCTET}, 415),
    ("submit large", "POST", "/v1/tasks", "/v1/tasks",
     {"json": {**TASK, "params": {"x": "y" * MAX_BODY}}}, 413),
    ("submit expect", "POST", "/v1/tasks", "/v1/tasks",
     {"json": TASK, "headers": {"Expect": "coffee"}}, 417),
    ("list", "GET", "/v1/tasks?limit=1", "/v1/tasks", {}, 200),
    ("list bad", "GET", "/v1/tasks?limit=0", "/v1/tasks", {}, 400),
    ("get", "GET", "/v1/tasks/oa-0", "/v1/tasks/{id}", {}, 200),
    ("get no outputs", "GET", "/v1/tasks/oa-0?outputs=false", "/v1/tasks/{id}", {}, 200),
    ("get unknown", "GET", "/v1/tasks/nope", "/v1/tasks/{id}", {}, 404),
    ("get bad", "GET", "/v1/tasks/oa-0?outputs=no", "/v1/tasks/{id}", {}, 400),
    ("wait", "GET", "/v1/tasks/oa-0/wait?timeout=0", "/v1/tasks/{id}/wait", {}, 200),
    ("wait unknown", "GET", "/v1/tasks/nope/wait?timeout=0", "/v1/tasks/{id}/wait", {}, 404),
    ("wait bad", "GET", "/v1/tasks/oa-0/wait?timeout=-1", "/v1/tasks/{id}/wait", {}, 400),
    ("cancel", "POST", "/v1/tasks/oa-1/cancel", "/v1/tasks/{id}/cancel", {}, 200),
    ("cancel again", "POST", "/v1/tasks/oa-1/cancel", "/v1/tasks/{id}/cancel", {}, 200),
    ("cancel unknown", "POST", "/v1/tasks/nope/cancel", "/v1/tasks/{id}/cancel", {}, 404),
    ("cancel bad", "POST", "/v1/tasks/oa-1/cancel?x=1", "/v1/tasks/{id}/cancel", {}, 400),
    ("nodes", "GET", "/v1/nodes", "/v1/nodes", {}, 200),
    ("nodes bad", "GET", "/v1/nodes?x=1", "/v1/nodes", {}, 400),
    ("stats", "GET", "/v1/stats", "/v1/stats", {}, 200),
    ("stats bad", "GET", "/v1/stats?x=1", "/v1/stats", {}, 400),
    ("revocations", "GET", "/v1/revocations", "/v1/revocations", {}, 200),
    ("revocations bad", "GET", "/v1/revocations?x=1", "/v1/revocations", {}, 400),
    ("push garbage", "POST", "/v1/revocations", "/v1/revocations",
     {"data": b"MIRL" + bytes(60), "headers": OCTET}, 400),
    ("push type", "POST", "/v1/revocations", "/v1/revocations", {"json": {}}, 415),
    ("push large", "POST", "/v1/revocations", "/v1/revocations",
     {"data": bytes(MAX_BODY + 1), "headers": OCTET}, 413),
    ("metrics", "GET", "/metrics?anything=1", "/metrics", {}, 200),
    ("openapi", "GET", "/openapi.json", "/openapi.json", {}, 200),
    ("openapi bad", "GET", "/openapi.json?x=1", "/openapi.json", {}, 400),
    ("healthz", "GET", "/healthz?anything=1", "/healthz", {}, 200),
]  # fmt: skip


@pytest.mark.parametrize(
    "method, path, template, kw, status", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_every_answer_is_one_its_operation_documents(
    served, method, path, template, kw, status
):
    got, headers, body = await answer(served, method, path, **kw)
    assert got == status, body[:300]
    conforms(method, template, got, headers, body)


async def test_a_pushed_revocation_list_gets_the_documented_answer(served):
    served.lone.cluster.enroll("veh-9")
    fleet = served.lone.cluster.fleet
    fleet.revoke(now=time.time(), node_id="veh-9", reason="lost")
    body = fleet.revocations_bin.read_bytes()
    status, headers, answered = await answer(
        served, "POST", "/v1/revocations", data=body, headers=OCTET
    )
    assert status == 200, answered
    conforms("POST", "/v1/revocations", status, headers, answered)
    assert json.loads(answered)["merged"] is True


async def test_a_head_on_every_get_operation_answers_a_documented_status(served):
    for path, template in [
        ("/v1/tasks", "/v1/tasks"),
        ("/v1/tasks/oa-0", "/v1/tasks/{id}"),
        ("/v1/tasks/oa-0/wait", "/v1/tasks/{id}/wait"),
        ("/v1/nodes", "/v1/nodes"),
        ("/v1/stats", "/v1/stats"),
        ("/metrics", "/metrics"),
        ("/openapi.json", "/openapi.json"),
        ("/healthz", "/healthz"),
        ("/v1/revocations", "/v1/revocations"),
    ]:
        status, headers, body = await answer(served, "HEAD", path)
        assert status == 200, path
        conforms("HEAD", template, status, headers, body)  # fmt: skip


async def test_a_request_without_the_token_gets_the_documented_401(served):
    async with aiohttp.ClientSession(served.api.url) as anonymous:
        for path, ops in DOC["paths"].items():
            for method, op in ops.items():
                url = path.replace("{id}", "oa-0")
                async with anonymous.request(method, url) as response:
                    body = await response.read()
                    if op.get("security") == []:  # (only /healthz: stated per operation)
                        assert response.status == 200, path
                        continue
                    assert response.status == 401, (method, path)
                    conforms(method.upper(), path, 401, response.headers, body)


# before: /metrics and /healthz listed no 400 and /healthz no 417, though both answer them
ANSWERED_UNLISTED = {
    "metrics, two tokens": (
        "/metrics", ("GET", "/metrics", "Authorization: Bearer x"), 400, "bad_request"),
    "metrics, bad body": ("/metrics", ("GET", "/metrics", "Content-Encoding: deflate",
                                       "Content-Length: 4"), 400, "bad_request"),
    "healthz, bad body": ("/healthz", ("GET", "/healthz", "Content-Encoding: deflate",
                                       "Content-Length: 4"), 400, "bad_request"),
    "healthz, expect": ("/healthz", ("GET", "/healthz", "Expect: coffee"), 417,
                        "expectation_failed"),
}  # fmt: skip


@pytest.mark.parametrize(
    "template, request_line, status, code", ANSWERED_UNLISTED.values(), ids=ANSWERED_UNLISTED
)
async def test_metrics_and_healthz_list_the_errors_they_answer(
    served, template, request_line, status, code
):
    request = raw(served, *request_line, auth=template != "/healthz")
    if "Content-Length: 4" in request_line:
        request += b"abcd"  # (not deflate: aiohttp cannot read the body)
    try:
        got, headers, body = await exchange(served.port, request)
    finally:
        await until(lambda: not served.api._runner.server.connections)
    assert got == status and json.loads(body)["error"]["code"] == code, body
    conforms("GET", template, got, headers, body)


async def test_healthz_lists_no_401_and_every_other_operation_does():
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            public = op.get("security") == []
            assert public == ((method, path) == ("get", "/healthz"))
            assert ("401" in op["responses"]) is not public, (method, path)


# --- query parameters: the schema refuses what the server refuses ----------------------------

#: (template, parameter, a value the server refuses with 400 bad_parameter)
REFUSED_PARAMETERS = [
    ("/v1/tasks", "model", ""),
    ("/v1/tasks", "model", "digits-mlp@1"),
    ("/v1/tasks", "cursor", ""),
    ("/v1/tasks", "limit", "0"),
    ("/v1/tasks", "limit", "1001"),
    ("/v1/tasks", "state", "sleeping"),
    ("/v1/tasks/{id}/wait", "timeout", "-1"),
    ("/v1/tasks/{id}/wait", "timeout", "301"),
]


def parameter(template: str, name: str) -> dict:
    (found,) = [p for p in operation("GET", template)["parameters"] if p["name"] == name]
    return found


def typed(value: str, schema: dict) -> Any:
    """A query value as the JSON value its schema types (``"1"`` is 1 for an integer)."""
    kind = resolve(schema).get("type")
    if kind in ("integer", "number"):
        return json.loads(value)
    return value == "true" if kind == "boolean" else value


@pytest.mark.parametrize("template, name, value", REFUSED_PARAMETERS)
async def test_a_query_value_the_server_refuses_is_refused_by_its_schema(
    served, template, name, value
):
    path = template.replace("{id}", "oa-0")
    status, _, body = await answer(served, "GET", path, params={name: value})
    assert status == 400, body
    doc = json.loads(body)
    assert doc["error"]["code"] == "bad_parameter" and doc["error"]["message"].startswith(name)
    schema = parameter(template, name)["schema"]
    with pytest.raises(jsonschema.ValidationError):
        validate(typed(value, schema), schema)


async def test_every_documented_query_parameter_is_taken_at_its_bounds(served):
    async with served.http.get("/v1/tasks", params={"limit": "1"}) as response:
        cursor = (await response.json())["next_cursor"]
    assert cursor
    for template, ops in DOC["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                if p["in"] != "query":
                    continue
                schema = resolve(p["schema"])
                named = {"cursor": [cursor], "model": ["digits-mlp"], "since": ["0", "-1.5"],
                         "outputs": ["true", "false"]}  # fmt: skip
                values = named.get(p["name"]) or [
                    *(str(schema[k]) for k in ("minimum", "maximum", "default") if k in schema),
                    *schema.get("enum", []),
                ]
                for value in values:
                    validate(typed(value, schema), schema)
                    path = template.replace("{id}", "oa-0")
                    # (HEAD: the same checks, and /wait answers at once)
                    status, _, _ = await answer(served, "HEAD", path, params={p["name"]: value})
                    assert status == 200, (method, template, p["name"], value)


# --- response objects are closed and complete ------------------------------------------------


async def test_the_nodes_and_stats_schemas_are_closed_and_name_every_key(served):
    stats = DOC["components"]["schemas"]["Stats"]
    status, _, body = await answer(served, "GET", "/v1/stats")
    assert status == 200
    assert stats.get("additionalProperties") is False
    assert set(stats["required"]) == set(json.loads(body)) == set(stats["properties"])
    node = DOC["components"]["schemas"]["Node"]
    assert node.get("additionalProperties") is False
    assert set(node["required"]) == set(node["properties"])
    sample = {
        "node_id": "n",
        "status": "alive",
        "roles": [],
        "models": ["m@1"],
        "queue_depth": 0,
        "address": "127.0.0.1:1",
        "in_flight": 0,
        "done": 0,
        "rtt_ms": None,
        "contact_s": None,
    }  # fmt: skip (as Coordinator.nodes has them)
    validate(sample, node)
    for wrong in [{**sample, "status": "asleep"}, {**sample, "extra": 1}]:
        with pytest.raises(jsonschema.ValidationError):
            validate(wrong, node)


async def test_a_work_item_lists_every_key_as_required(served):
    status, _, body = await answer(served, "GET", "/v1/tasks/oa-0")
    assert status == 200
    (item,) = json.loads(body)["items"]
    schema = DOC["components"]["schemas"]["WorkItem"]
    assert set(schema["required"]) == set(item) == set(schema["properties"])


# --- the document is sound -------------------------------------------------------------------


def walk(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


async def test_the_document_is_sound():
    for node in walk(DOC):
        if isinstance(node.get("$ref"), str):
            resolve(node)  # (a KeyError: a dangling reference)
        if node.get("type") == "object" and isinstance(node.get("required"), list):
            assert set(node["required"]) <= set(node.get("properties", {})), node["required"]
    ids = [op["operationId"] for ops in DOC["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    for template, ops in DOC["paths"].items():
        named = {part[1:-1] for part in template.split("/") if part.startswith("{")}
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == named, template
            for name, response in op["responses"].items():
                assert name.isdigit() and len(name) == 3
                assert resolve(response)["description"]
    codes = DOC["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert "method_not_allowed" in codes["enum"] and "405" in DOC["info"]["description"]
