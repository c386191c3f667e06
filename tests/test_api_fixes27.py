"""The coordinator's HTTP API as its users meet it: every answer (aiohttp's own too) is the
API's JSON error or what the OpenAPI document promises, /metrics is strict Prometheus text,
tokens only a header can carry, and ``submit --wait`` losing its coordinator.

One real coordinator (no nodes: accepted tasks wait) and one server on loopback for the module;
requests go over real TCP (aiohttp's client, or raw bytes for what no client would send).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from pathlib import Path

import aiohttp
import jsonschema
import numpy as np
import pytest
import pytest_asyncio

from coordinator.api import CoordinatorApi
from coordinator.cli import main
from coordinator.client import CoordinatorClient, check_token
from coordinator.journal import UnknownTaskError
from coordinator.openapi import ERROR_CODES, openapi_document
from coordinator.service import Coordinator, CoordinatorConfig
from meshinfer.errors import ConfigError
from meshinfer.identity_files import NodeDirectory
from meshinfer.proto.membership import MembershipConfig
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster
from meshinfer.transport.base import Address
from tests.helpers import until

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOC = openapi_document()
TASK = {"pattern": "single", "model": "digits-mlp", "inputs": {"values": [[0.5] * 64]}}


class Lone:
    """A coordinator on a mesh node of its own: no nodes, no discovery (mDNS on loopback would
    find other test runs' nodes on this machine and dial them in the middle of a test)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cluster = LocalCluster(tmp, fleet_id="api27-test")
        coord_dir = self.cluster.enroll("coord", roles=("coordinator",))
        self.ident = NodeDirectory(coord_dir).load()
        self.revocations = NodeDirectory(coord_dir).revocations(self.ident.trust)

    async def __aenter__(self) -> Lone:
        opts = MeshNodeOptions(mdns=None, membership=MembershipConfig.test())
        self.mesh = MeshNode(self.ident, self.revocations, opts)
        await self.mesh.start()
        self.coordinator = Coordinator(self.mesh, self.tmp / "journal.db", CoordinatorConfig())
        await self.coordinator.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.coordinator.aclose()
        await self.mesh.aclose()


class Served:
    def __init__(self, lone: Lone, api: CoordinatorApi, http: aiohttp.ClientSession) -> None:
        self.mesh, self.api, self.http = lone, api, http
        self.port = int(api.url.rsplit(":", 1)[1])
        self.token = lone.cluster.token
        self.revocations = b""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("api27")) as lone:
        token = lone.cluster.token
        api = CoordinatorApi(lone.coordinator, Address("127.0.0.1", 0), token)
        auth = {"Authorization": f"Bearer {token}"}
        no_pool = aiohttp.TCPConnector(force_close=True)  # no keep-alive outliving a test
        async with api, aiohttp.ClientSession(api.url, headers=auth, connector=no_pool) as http:
            yield Served(lone, api, http)


def anonymous_session(served) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(served.api.url, connector=aiohttp.TCPConnector(force_close=True))


def validator(schema: dict) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "components": DOC["components"]})


def is_api_error(doc: object, status: int) -> None:
    validator({"$ref": "#/components/schemas/Error"}).validate(doc)
    assert doc["error"]["status"] == status and doc["error"]["code"] in ERROR_CODES


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; the status, headers and body of the answer (the server closes after)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 10)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


# --- aiohttp's own answers are the API's JSON errors -----------------------------------------

MALFORMED = {
    "bad content-length": b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "request line over 8 KiB": b"GET /healthz?a=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header over 8 KiB": b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 9000 + b"\r\n\r\n",
    "not http": b"GARBAGE\r\n\r\n",
    "unknown method": b"BREW /v1/tasks HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad chunk": b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "bad deflate body": b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Encoding: deflate\r\nContent-Length: 4\r\n\r\nabcd",
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_request_aiohttp_cannot_parse_gets_the_apis_json_error(served, request_bytes):
    if b"Content-Encoding" in request_bytes:  # past the token check: the body is what fails
        auth = f"Authorization: Bearer {served.token}\r\n".encode()
        request_bytes = request_bytes.replace(b"Host: x\r\n", b"Host: x\r\n" + auth)
    status, headers, body = await exchange(served.port, request_bytes)
    assert status == 400 and headers["Content-Type"].startswith("application/json"), body
    doc = json.loads(body)
    is_api_error(doc, 400)
    assert doc["error"]["code"] == "bad_request"
    message = doc["error"]["message"]
    assert "\n" not in message and "xxxx" not in message and "yyyy" not in message
    if b"deflate" in request_bytes:
        assert message == "the body cannot be read as sent (Content-Encoding 'deflate')"
    else:
        assert message.startswith("the request is not valid HTTP/1.1: ")
    async with served.http.get("/healthz") as response:
        assert response.status == 200


async def test_a_client_gone_mid_body_is_its_fault_not_a_logged_server_error(served, caplog):
    counter = served.api._requests
    before = {key: child.value for key, child in counter._children.items()}

    def answered(status: str) -> float:
        key = ("POST", "/v1/tasks", status)
        return counter.labels(*key).value - before.get(key, 0.0)

    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {served.token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with caplog.at_level(logging.DEBUG, logger="coordinator.api"):
        _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(head.encode() + b'{"pattern": "si')
        await writer.drain()
        await until(lambda: served.api.tasks.uploading > 0)  # the server is reading the body
        writer.transport.abort()
        await until(lambda: served.api.tasks.uploading == 0)
    assert answered("400") == 1 and answered("500") == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_json_body_sent_without_content_type_is_told_so(served):
    request = (  # (aiohttp's client would add an application/octet-stream)
        f"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {served.token}\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    _, _, body = await exchange(served.port, request.encode())
    doc = json.loads(body)
    is_api_error(doc, 415)
    assert doc["error"]["message"] == (
        "Content-Type must be application/json, the request has none"
    )


# --- tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["tøken-0123456789abcdef", "token-€-0123456789abcdef"])
async def test_a_token_no_http_header_can_carry_is_refused_where_it_is_set(served, token):
    with pytest.raises(ConfigError, match="printable ASCII"):
        CoordinatorApi(served.mesh.coordinator, Address("127.0.0.1", 0), token)
    with pytest.raises(ConfigError, match="all ASCII"):
        check_token(token)
    with pytest.raises(ConfigError, match="all ASCII"):
        CoordinatorClient(served.api.url, token)


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"Bearer",
        b"Bearer ",
        b"Basic TOKEN",
        b"Bearer TOKENx",
        b"Bearer TOKEN,",
        b"Bearer\tTOKEN",
        b"Bearer \xc3\xa9TOKEN",
        b"Bearer TOKEN\xff",
        b"Token TOKEN",
    ],
)
async def test_every_wrong_authorization_is_a_json_401(served, header):
    auth = b"" if header is None else b"Authorization: " + header + b"\r\n"
    auth = auth.replace(b"TOKEN", served.token.encode())
    request = b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\n" + auth + b"Connection: close\r\n\r\n"
    status, headers, body = await exchange(served.port, request)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    is_api_error(json.loads(body), 401)


@pytest.mark.parametrize("header", ["Bearer TOKEN", "bearer TOKEN", "BEARER  TOKEN "])
async def test_the_bearer_scheme_is_case_insensitive(served, header):
    request = (
        f"GET /v1/nodes HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\nConnection: close\r\n\r\n"
    ).replace("TOKEN", served.token)
    status, _, body = await exchange(served.port, request.encode())
    assert status == 200, body


# --- /metrics is strict Prometheus text ------------------------------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def strict_exposition(text: str) -> dict[tuple[str, tuple], float]:
    """The samples of Prometheus text format 0.0.4, read strictly: each family's HELP then TYPE
    once, before its samples and with them together; no sample name claimed by two families;
    no series twice; labels and values well formed. AssertionError naming the line if not."""
    assert text.endswith("\n")
    kinds: dict[str, str] = {}
    owners: dict[str, str] = {}  # sample name -> its family
    helped: str | None = None
    family: str | None = None
    series: dict[tuple[str, tuple], float] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in kinds and name != helped, f"second HELP: {line}"
            helped, family = name, None
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == helped and name not in kinds, f"TYPE without its HELP: {line}"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            kinds[name], family = kind, name
            for suffix in _SUFFIXES.get(kind, ("",)):
                assert name + suffix not in owners, f"{name + suffix} claimed twice"
                owners[name + suffix] = name
        else:
            assert not line.startswith("#") and line, f"stray line: {line!r}"
            match = _SAMPLE.fullmatch(line)
            assert match and family is not None, f"malformed sample: {line}"
            name, labels, value = match.groups()
            assert owners.get(name) == family, f"sample outside its family: {line}"
            pairs = _labels(labels or "", line)
            key = (name, tuple(sorted(pairs)))
            assert key not in series, f"series twice: {line}"
            number = float(value)  # (+Inf, -Inf, NaN too)
            assert value in ("+Inf", "-Inf", "NaN") or math.isfinite(number), line
            series[key] = number
    return series


def _labels(text: str, line: str) -> list[tuple[str, str]]:
    pairs, at = [], 0
    while at < len(text):
        match = _LABEL.match(text, at)
        assert match, f"malformed labels: {line}"
        pairs.append(match.groups()[:2])
        at = match.end()
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)) and "" not in names, f"label twice: {line}"
    return pairs


async def test_the_strict_reader_refuses_what_a_scraper_would():
    good = "# HELP a A.\n# TYPE a counter\na_total 1\n"
    with pytest.raises(AssertionError, match="sample outside"):
        strict_exposition(good)
    ok = '# HELP a A.\n# TYPE a gauge\na 1\na{x="1"} 2\n'
    assert strict_exposition(ok) == {("a", ()): 1.0, ("a", (("x", "1"),)): 2.0}
    for bad, why in [
        (ok + ok, "second HELP"),
        (ok + "a 3\n", "series twice"),
        ("# HELP h H.\n# TYPE h histogram\n# HELP h_count C.\n# TYPE h_count gauge\n", "twice"),
        ("# TYPE a gauge\na 1\n", "TYPE without"),
        (ok.replace('x="1"', 'x="1",x="2"'), "label twice"),
        (ok.replace('"1"', '"\n"'), "malformed"),
    ]:
        with pytest.raises(AssertionError, match=why):
            strict_exposition(bad)


async def test_metrics_are_strict_prometheus_text(served):
    http = served.http
    for method, path in [("GET", "/v1/nodes"), ("GET", "/nope"), ("GET", "/v1/tasks?limit=0")]:
        async with http.request(method, path) as response:
            await response.read()
    async with anonymous_session(served) as anonymous:
        async with anonymous.get("/v1/stats") as response:
            assert response.status == 401
    async with http.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    series = strict_exposition(text)
    refused = (("method", "GET"), ("route", "/v1/stats"), ("status", "401"))
    assert series[("meshinfer_coord_api_requests_total", refused)] >= 1
    assert ("meshinfer_sessions_open", ()) in series  # the mesh's families are there too
    assert ("meshinfer_coord_live_tasks", ()) in series


# --- every documented operation answers as documented ----------------------------------------


def documented(method: str, path: str, status: int) -> dict:
    """The response the document gives for ``status`` (its $ref followed)."""
    responses = DOC["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, not documented"
    response = responses[str(status)]
    if "$ref" in response:
        response = DOC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response


async def check_answer(response: aiohttp.ClientResponse, method: str, path: str) -> object:
    """The answer is documented for its operation: status, media type and schema."""
    body = await response.read()
    spec = documented(method, path, response.status)
    for name, header in spec.get("headers", {}).items():
        assert not header["required"] or name in response.headers, (method, path, name)
    if (method, path) == ("POST", "/v1/tasks") and response.status < 300:
        assert "Location" in spec["headers"]
    ((media_type, content),) = spec["content"].items()
    assert response.content_type == media_type, (method, path, response.status, body[:200])
    if media_type != "application/json":
        return body
    doc = json.loads(body)
    validator(content["schema"]).validate(doc)
    if response.status >= 400:
        is_api_error(doc, response.status)
        assert doc["error"]["code"] in spec["description"], (spec["description"], doc)
    return doc


def operations(served) -> dict[tuple[str, str], tuple[list[dict], list[dict]]]:
    """Per documented operation: valid requests, then invalid ones (aiohttp request kwargs
    plus ``at``, the concrete path, and ``status``, the answer expected)."""
    octets = {"Content-Type": "application/octet-stream"}
    # fmt: off
    return {
        ("POST", "/v1/tasks"): (
            [dict(json={**TASK, "task_id": "walk-1"}, status=202),
             dict(json={**TASK, "task_id": "walk-1"}, status=200),
             dict(json={**TASK, "task_id": "walk-2"}, status=202)],
            [dict(data=b"{", headers={"Content-Type": "application/json"}, status=400),
             dict(json={**TASK, "pattern": "sideways"}, status=400),
             dict(json={**TASK, "task_id": "walk-1", "priority": 3}, status=409),
             dict(data=b"{}", headers={"Content-Type": "text/plain"}, status=415),
             dict(at="/v1/tasks?x=1", json=TASK, status=400)],
        ),
        ("GET", "/v1/tasks"): (
            [dict(status=200), dict(at="/v1/tasks?limit=1&state=pending&model=digits-mlp",
                                    status=200), dict(at="/v1/tasks?limit=1000", status=200)],
            [dict(at=f"/v1/tasks?{q}", status=400) for q in (
                "limit=0", "limit=1001", "limit=-1", "limit=1e2", "limit=", "cursor=", "cursor=x",
                "cursor=-5", "state=done", "model=a@1", "since=nan", "since=", "limit=1&limit=2",
            )],
        ),
        ("GET", "/v1/tasks/{id}"): (
            [dict(at="/v1/tasks/walk-1", status=200),
             dict(at="/v1/tasks/walk-1?outputs=false", status=200)],
            [dict(at="/v1/tasks/nope", status=404),
             dict(at="/v1/tasks/walk-1?outputs=no", status=400)],
        ),
        ("GET", "/v1/tasks/{id}/wait"): (
            [dict(at="/v1/tasks/walk-1/wait?timeout=0", status=200)],
            [dict(at="/v1/tasks/nope/wait?timeout=0", status=404),
             dict(at="/v1/tasks/walk-1/wait?timeout=-1", status=400),
             dict(at="/v1/tasks/walk-1/wait?timeout=301", status=400)],
        ),
        ("POST", "/v1/tasks/{id}/cancel"): (
            [dict(at="/v1/tasks/walk-2/cancel", status=200)],
            [dict(at="/v1/tasks/nope/cancel", status=404),
             dict(at="/v1/tasks/walk-2/cancel?now=1", status=400)],
        ),
        ("GET", "/v1/nodes"): ([dict(status=200)], [dict(at="/v1/nodes?x=1", status=400)]),
        ("GET", "/v1/stats"): ([dict(status=200)], [dict(at="/v1/stats?x=1", status=400)]),
        ("GET", "/v1/revocations"): (
            [dict(status=200)], [dict(at="/v1/revocations?x=1", status=400)]
        ),
        ("POST", "/v1/revocations"): (
            [dict(data=served.revocations, headers=octets, status=200)],
            [dict(data=b"junk", headers=octets, status=400),
             dict(data=b"junk", headers={"Content-Type": "text/plain"}, status=415)],
        ),
        ("GET", "/metrics"): ([dict(status=200)], []),
        ("GET", "/openapi.json"): ([dict(status=200)], [dict(at="/openapi.json?x=1", status=400)]),
        ("GET", "/healthz"): ([dict(status=200)], []),
    }
    # fmt: on


async def test_every_documented_operation_answers_as_documented(served):
    fleet = served.mesh.cluster.fleet
    served.mesh.cluster.enroll("walk-ghost")
    fleet.revoke(now=time.time(), node_id="walk-ghost", reason="walk")
    served.revocations = fleet.revocations_bin.read_bytes()
    cases = operations(served)
    ops = {(m.upper(), p) for p, methods in DOC["paths"].items() for m in methods}
    assert set(cases) == ops  # a new operation needs its cases here
    async with anonymous_session(served) as anonymous:
        for (method, path), (valid, invalid) in cases.items():
            for case in [*valid, *invalid]:
                case = dict(case)
                at, status = case.pop("at", path), case.pop("status")
                async with served.http.request(method, at, **case) as response:
                    assert response.status == status, (method, at, await response.text())
                    await check_answer(response, method, path)
            if DOC["paths"][path][method.lower()].get("security") != []:
                async with anonymous.request(method, path.replace("{id}", "walk-1")) as answer:
                    assert answer.status == 401
                    await check_answer(answer, method, path)
    async with served.http.get("/v1/tasks/walk-2") as response:
        assert (await response.json())["state"] == "cancelled"
    async with served.http.post("/v1/tasks/walk-2/cancel") as response:  # a finished task
        assert await check_answer(response, "POST", "/v1/tasks/{id}/cancel") == {
            "task_id": "walk-2",
            "cancelled": False,
            "state": "cancelled",
        }


async def test_a_cursor_walk_with_limit_one_returns_each_task_once(served):
    mine = {f"page-{i}" for i in range(4)}
    for task_id in sorted(mine):
        async with served.http.post("/v1/tasks", json={**TASK, "task_id": task_id}) as response:
            assert response.status == 202
    seen, cursor = [], None
    while True:
        query = {"limit": "1", "model": "digits-mlp", **({"cursor": cursor} if cursor else {})}
        async with served.http.get("/v1/tasks", params=query) as response:
            page = await check_answer(response, "GET", "/v1/tasks")
        assert len(page["tasks"]) <= 1
        seen += [t["task_id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and mine <= set(seen)


@pytest.mark.parametrize("cursor", ["9223372036854775808", "9999999999999999999"])
async def test_a_cursor_past_what_sqlite_holds_is_a_bad_parameter(served, cursor):
    async with served.http.get("/v1/tasks", params={"cursor": cursor}) as response:
        doc = await check_answer(response, "GET", "/v1/tasks")
        assert response.status == 400 and doc["error"]["code"] == "bad_parameter"


# --- submit --wait losing the coordinator ----------------------------------------------------


async def known(coordinator, task_id: str) -> bool:
    try:
        await coordinator.get(task_id)
    except UnknownTaskError:
        return False
    return True


async def test_submit_wait_that_loses_its_coordinator_is_one_line_naming_the_task(
    served, tmp_path, capsys
):
    np.save(tmp_path / "x.npy", np.zeros((1, 64), np.float32))
    closing = CoordinatorApi(served.mesh.coordinator, Address("127.0.0.1", 0), served.token)
    token_file = str(served.mesh.cluster.fleet.api_token_file)
    await closing.start()
    argv = [
        "submit", "--url", closing.url, "--token-file", token_file,
        "--model", "digits-mlp", "--input", str(tmp_path / "x.npy"), "--task-id", "lost-1",
        "--wait", "--wait-timeout", "5", "--no-progress",  # (rides over the loss: 5 s)
    ]  # fmt: skip
    cli = asyncio.ensure_future(asyncio.to_thread(main, argv))
    try:
        async with asyncio.timeout(20):  # accepted (journaled before its answer)
            while not await known(served.mesh.coordinator, "lost-1"):
                await asyncio.sleep(0.01)
    finally:
        await closing.aclose()  # open waits answer at once, then nothing listens
    assert await cli == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("meshinfer-coord: error: task lost-1 was accepted"), err
    assert "cannot reach the coordinator" in err and "meshinfer-coord status lost-1" in err
    async with served.http.get("/v1/tasks/lost-1") as response:  # the coordinator kept it
        assert (await response.json())["state"] == "pending"
