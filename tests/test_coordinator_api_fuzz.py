"""Fuzzing the coordinator's HTTP API: random JSON, bytes, headers, query strings and paths.

One real coordinator (no nodes: accepted tasks just wait) and one server for the whole module.
Every answer must be a 2xx or 4xx JSON document -- the error shape for a 4xx -- and the server
must still answer ``/healthz`` afterwards.
"""

from __future__ import annotations

import json
import string
import urllib.parse

import aiohttp
import jsonschema
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from coordinator.api import ApiError, CoordinatorApi, body_to_spec, parse_json
from coordinator.openapi import ERROR_CODES, openapi_document
from meshinfer.proto.tasks_codec import decode_spec, encode_spec
from meshinfer.transport.base import Address
from tests.test_coordinator_service import Mesh

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "fuzz-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOC = openapi_document()
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(tmp_path_factory):
    async with Mesh(tmp_path_factory.mktemp("fuzz"), n=0) as mesh:
        api = CoordinatorApi(mesh.coordinator, Address("127.0.0.1", 0), TOKEN)
        async with api, aiohttp.ClientSession(base_url=api.url, headers=AUTH) as session:
            yield session


def schema(name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    return jsonschema.Draft202012Validator(root)


ERROR, SUBMITTED, PAGE = schema("Error"), schema("Submitted"), schema("TaskPage")
ANSWERED = [0]  # requests answered so far in this module


async def check(response: aiohttp.ClientResponse, ok: jsonschema.Draft202012Validator) -> None:
    """A 2xx matching ``ok``, or a 4xx JSON error of the API's shape; never 5xx."""
    ANSWERED[0] += 1
    assert response.status < 500, await response.text()
    assert response.content_type == "application/json"
    doc = await response.json()
    event(f"{response.status} {doc['error']['code'] if response.status >= 400 else 'ok'}")
    if response.status >= 400:
        ERROR.validate(doc)
        assert doc["error"]["status"] == response.status
        assert doc["error"]["code"] in ERROR_CODES and doc["error"]["message"]
        assert "Traceback" not in doc["error"]["message"]
    else:
        ok.validate(doc)


# --- strategies ------------------------------------------------------------------------------

SCALARS = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False)
)  # fmt: skip
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = ["task_id", "pattern", "inputs", "models", "model", "stages", "params", "deadline_s",
        "priority", "policy", "aggregation", "shard_size", "quorum", "min_responses",
        "aggregation_timeout_s", "weights", "bogus"]  # fmt: skip
MODEL = st.sampled_from(["digits-mlp", "digits-mlp@1", "x@", "@", ""]) | JSON
TENSOR = st.fixed_dictionaries(
    {},
    optional={
        "values": st.lists(st.lists(st.floats(width=32, allow_nan=False), max_size=3), max_size=3)
        | JSON,
        "dtype": st.sampled_from(["float32", "int32", "uint8", "bool", "float64"]) | JSON,
        "shape": st.lists(st.integers(-2, 5), max_size=3) | JSON,
        "data_b64": st.sampled_from(["", "AAAAAA==", "AAAAAAAAAAA=", "!!"]) | JSON,
    },
)  # fmt: skip
VALUES = {
    "pattern": st.sampled_from(["single", "parallel", "batch", "pipeline", "x"]) | JSON,
    "inputs": TENSOR | JSON,
    "model": MODEL,
    "models": st.lists(MODEL, max_size=3) | JSON,
    "stages": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5), "model": MODEL},
                                             optional={"after": JSON, "params": JSON}),
                       max_size=3) | JSON,
    "task_id": st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=12) | JSON,
    "priority": st.integers() | JSON,
    "deadline_s": st.floats() | JSON,
    "shard_size": st.integers(-1, 3) | JSON,
    "policy": st.sampled_from(["round_robin", "latency", "fastest"]) | JSON,
    "aggregation": st.sampled_from(["first", "all", "ensemble", "mean"]) | JSON,
    "params": st.dictionaries(st.text(max_size=70), SCALARS, max_size=3) | JSON,
    "quorum": st.integers(-1, 4) | JSON,
    "min_responses": st.integers(-1, 4) | JSON,
    "aggregation_timeout_s": st.floats() | st.integers(-1, 10**400) | JSON,
    "weights": st.dictionaries(
        st.sampled_from(["a", "a@1", "b@2", "b", "", "@"]) | st.text(max_size=8),
        st.floats() | st.integers(-1, 10**400) | JSON, max_size=3,
    ) | JSON,
}  # fmt: skip
TASKISH = st.dictionaries(st.sampled_from(KEYS), JSON, max_size=6).flatmap(
    lambda d: st.fixed_dictionaries({k: VALUES.get(k, JSON) for k in d})
)
BASES = [
    {"pattern": "single", "model": "digits-mlp", "inputs": {"values": [[0.5, 1.0]]}},
    {"pattern": "batch", "models": ["digits-mlp@1"], "shard_size": 1,
     "inputs": {"dtype": "float32", "shape": [2, 1], "data_b64": "AAAAAAAAAAA="}},
    {"pattern": "parallel", "models": ["a", "b@2"], "aggregation": "majority",
     "inputs": {"values": [1, 2], "dtype": "int32"}},
    {"pattern": "parallel", "models": ["a", "b@2", "c"], "aggregation": "ensemble", "quorum": 2,
     "min_responses": 1, "aggregation_timeout_s": 5, "deadline_s": 10,
     "weights": {"a": 2, "b@2": 0.5}, "inputs": {"values": [[1.0, 2.0]]}},
    {"pattern": "pipeline", "inputs": {"values": [[1.0]]},
     "stages": [{"name": "s", "model": "m"}, {"name": "t", "model": "n", "after": ["s"]}]},
]  # fmt: skip


def _mutate(base: dict, key: str, value, how: str) -> dict:
    doc = dict(base)
    if how == "delete":
        doc.pop(key, None)
    elif how == "set":
        doc[key] = value
    return doc


# A valid task with one key set to something random (or removed): reaches deep validation,
# acceptance (202), idempotent retries (200) and conflicts (409) through the small id pool.
NEAR_VALID = st.builds(
    _mutate,
    st.sampled_from(BASES).flatmap(
        lambda b: st.just(b) | st.builds(lambda i: {**b, "task_id": i}, st.sampled_from("pqr"))
    ),
    st.sampled_from(KEYS),
    st.one_of(JSON, *VALUES.values()),
    st.sampled_from(["keep", "set", "delete"]),
)
HEADER_TEXT = st.text(string.printable.strip() + " ", max_size=30)
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "text/plain", "", "application/x"]
) | HEADER_TEXT  # fmt: skip
PARAMS = ["state", "model", "since", "limit", "cursor", "other"]
QUERY_VALUE = st.sampled_from(
    ["1", "0", "3", "1000", "1001", "-1", "1e3", "nan", "inf", "1.5", "digits-mlp", "a@1",
     "succeeded", "pending", "cancelled", "1700000000", "99999999999"]
) | st.text(max_size=12)  # fmt: skip
QUERY = st.lists(
    st.tuples(st.sampled_from(PARAMS) | st.text(max_size=5), QUERY_VALUE), max_size=4
) | st.dictionaries(st.sampled_from(PARAMS[:-1]), QUERY_VALUE).map(lambda d: list(d.items()))


# --- the fuzz tests --------------------------------------------------------------------------


ANY_TEXT = st.text(st.characters(categories=["Cs", "L", "N", "P", "Z"]), max_size=6)
STRING_SLOTS = {
    "model": lambda t: {"model": t},
    "model@": lambda t: {"model": f"m@{t}"},
    "models": lambda t: {"pattern": "parallel", "models": ["m", t]},
    "param key": lambda t: {"params": {t or "k": 1}},
    "param value": lambda t: {"params": {"k": t}},
    "stage": lambda t: {"pattern": "pipeline", "model": None,
                        "stages": [{"name": "s", "model": t, "params": {"k": t}}]},
    "weighed model": lambda t: {"pattern": "parallel", "model": None, "models": ["m", t],
                                "aggregation": "weighted", "weights": {t: 2}},
    "weights key": lambda t: {"pattern": "parallel", "model": None, "models": ["m", "n@2"],
                              "aggregation": "ensemble", "weights": {t: 2, "m": 1}},
}  # fmt: skip


@FUZZ
@given(slot=st.sampled_from(sorted(STRING_SLOTS)), text=ANY_TEXT)
async def test_what_the_parser_accepts_the_journal_can_store(slot, text):
    body = {**BASES[0], **STRING_SLOTS[slot](text)}
    body = {k: v for k, v in body.items() if v is not None}
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as \ud800
    try:
        spec = body_to_spec(parse_json(raw), lambda: "fuzz")
    except ApiError as exc:
        assert exc.status == 400 and exc.code in ERROR_CODES
        return
    assert decode_spec(encode_spec(spec)) == spec  # what is accepted is journaled as is


@FUZZ
@given(body=st.one_of(NEAR_VALID, NEAR_VALID, TASKISH, JSON))
async def test_any_json_body_gets_json_back(http, body):
    async with http.post("/v1/tasks", json=body) as response:
        await check(response, SUBMITTED)


@FUZZ
@given(
    raw=st.binary(max_size=300) | (NEAR_VALID | JSON).map(lambda v: json.dumps(v).encode()),
    content_type=CONTENT_TYPES,
    extra=st.dictionaries(st.sampled_from(["X-Fuzz", "Accept", "Accept-Encoding"]), HEADER_TEXT,
                          max_size=2),
)  # fmt: skip
async def test_any_bytes_and_headers_get_json_back(http, raw, content_type, extra):
    headers = {**extra, "Content-Type": content_type}
    async with http.post("/v1/tasks", data=raw, headers=headers) as response:
        await check(response, SUBMITTED)


@FUZZ
@given(query=QUERY | st.text(max_size=40))
async def test_any_query_string_gets_json_back(http, query):
    if isinstance(query, str):  # a raw query string, percent-encoded by the client as needed
        request = http.get("/v1/tasks?" + query.replace("#", "%23"))
    else:
        request = http.get("/v1/tasks", params=query)
    async with request as response:
        await check(response, PAGE)


ANY_DOC = jsonschema.Draft202012Validator({})


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.lists(st.sampled_from(["v1", "tasks", "wait", "cancel", "nodes", "healthz", "metrics",
                                   "openapi.json", ".."])
                  | st.text(min_size=1, max_size=8), max_size=4),
)  # fmt: skip
async def test_any_method_and_path_gets_json_back(http, method, path):
    url = "/" + "/".join(urllib.parse.quote(part, safe="") for part in path)
    async with http.request(method, url, json={}) as response:
        if (method, response.url.path) == ("GET", "/metrics"):  # the one answer not in JSON
            ANSWERED[0] += 1
            assert response.status == 200
        else:
            await check(response, ANY_DOC)


async def test_the_server_still_answers_after_the_fuzz(http):
    async with http.get("/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    async with http.get("/metrics") as response:  # every fuzzed request was counted
        assert response.status == 200
        text = await response.text()
    counted = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "meshinfer_coord_api_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    )
    assert counted >= ANSWERED[0] + 1  # + the /healthz above
