"""The coordinator's HTTP API against a real coordinator and real node daemons (in this process:
real TCP, Noise, mDNS, SQLite), driven over real HTTP with aiohttp.ClientSession.

One mesh and one server serve the whole module (they take about a second to start); tests that
change how the nodes behave put it back before they end. Every JSON answer is checked against
the OpenAPI document's schema for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace

import aiohttp
import jsonschema
import numpy as np
import pytest
import pytest_asyncio
from openapi_spec_validator import validate as validate_openapi
from prometheus_client.parser import text_string_to_metric_families

from coordinator.api import CoordinatorApi, body_to_spec, parse_json
from coordinator.client import ApiError, CoordinatorClient
from coordinator.openapi import ERROR_CODES, openapi_document
from meshinfer.errors import ConfigError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_coordinator_service import DIGITS, Mesh, hold_inference
from tests.test_journal_files import FullDisk

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "api-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WIDE = ModelRef("digits-mlp-wide", "1")
WIDE_NAME = "digits-mlp-wide@1"
MODELS = (
    '[inference]\nmodels = ["digits-mlp@1", "digits-mlp-wide@1", "digits-mlp-deep@1", '
    '"synthetic-mlp@w10-d1", "synthetic-mlp@w20-d1"]\n'
)
DOC = openapi_document()


@dataclass
class Served:
    mesh: Mesh
    api: CoordinatorApi
    http: aiohttp.ClientSession


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory):
    async with Mesh(tmp_path_factory.mktemp("api"), n=2, extra=MODELS) as mesh:
        api = CoordinatorApi(mesh.coordinator, Address("127.0.0.1", 0), TOKEN)
        async with api, aiohttp.ClientSession(base_url=api.url, headers=AUTH) as http:
            yield Served(mesh, api, http)


# --- helpers ---------------------------------------------------------------------------------


def conforms(doc, schema_name: str) -> None:
    """``doc`` matches components/schemas/<schema_name> of the OpenAPI document."""
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": DOC["components"]}
    jsonschema.Draft202012Validator(root).validate(doc)


async def call(http, method, path, *, status=200, schema=None, **kw):
    """One request; asserts the status and JSON answer (the error shape for errors)."""
    async with http.request(method, path, **kw) as response:
        body = await response.read()
        assert response.status == status, (response.status, body[:500])
        assert response.content_type == "application/json"
        doc = await response.json()
    if status >= 400:
        conforms(doc, "Error")
        assert doc["error"]["status"] == status
    elif schema is not None:
        conforms(doc, schema)
    return doc


def b64_tensor(array: np.ndarray) -> dict:
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data_b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


def array_of(tensor: dict) -> np.ndarray:
    data = base64.b64decode(tensor["data_b64"])
    return np.frombuffer(data, dtype=tensor["dtype"]).reshape(tensor["shape"])


async def submit(http, body, status=202) -> dict:
    return await call(http, "POST", "/v1/tasks", json=body, status=status, schema="Submitted")


async def finished(http, task_id, timeout=20, **query) -> dict:
    params = {"timeout": str(timeout), **query}
    doc = await call(http, "GET", f"/v1/tasks/{task_id}/wait", params=params, schema="Task")
    assert doc["state"] == "succeeded", (doc["error"], [i["error"] for i in doc["items"]])
    return doc


@contextlib.contextmanager
def held_engines(mesh: Mesh, only: str | None = None):
    """Every node's engine waits for the returned event before it infers (model id ``only``,
    if given)."""
    originals = {name: daemon.engine.infer for name, daemon in mesh.daemons.items()}
    gate = asyncio.Event()
    for daemon in mesh.daemons.values():
        hold_inference(daemon, gate, only=only)
    try:
        yield gate
    finally:
        gate.set()
        for name, daemon in mesh.daemons.items():
            daemon.engine.infer = originals[name]


# --- the four patterns -----------------------------------------------------------------------


async def test_single_task_with_values_gives_the_models_labels(served):
    x, _ = load_digits_holdout()
    body = {"model": "digits-mlp@1", "pattern": "single", "inputs": {"values": x[:5].tolist()}}
    async with served.http.post("/v1/tasks", json=body) as response:
        assert response.status == 202
        accepted = await response.json()
        assert response.headers["Location"] == accepted["location"]
    conforms(accepted, "Submitted")
    task_id = accepted["task_id"]
    assert len(task_id) == 32 and int(task_id, 16) >= 0  # generated: 128 random bits
    assert accepted["location"] == f"/v1/tasks/{task_id}" and accepted["items_total"] == 1
    doc = await finished(served.http, task_id)
    expected = await served.mesh.daemons["node-0"].engine.infer(DIGITS, x[:5])
    assert doc["result"]["labels"] == np.argmax(expected, axis=1).tolist()
    np.testing.assert_allclose(array_of(doc["result"]["outputs"][0]), expected, rtol=1e-5)
    assert list(doc["result"]["nodes"]) == [f"{task_id}/0"]
    assert doc["items"][0]["node"] in served.mesh.names and doc["items_done"] == 1


async def test_batch_with_base64_input_is_sharded_and_accurate(served):
    x, y = load_digits_holdout()
    body = {"task_id": "api-batch", "pattern": "batch", "models": [{"model_id": "digits-mlp"}],
            "inputs": b64_tensor(x), "shard_size": 300, "policy": "round_robin"}  # fmt: skip
    accepted = await submit(served.http, body)
    assert accepted["items_total"] == math.ceil(len(x) / 300)
    doc = await finished(served.http, "api-batch", outputs="false")
    assert "outputs" not in doc["result"] and doc["aggregation"] is None  # not parallel
    labels = np.array(doc["result"]["labels"])
    assert labels.shape == y.shape and (labels == y).mean() >= 0.95
    assert {i["node"] for i in doc["items"]} == set(served.mesh.names)


async def test_parallel_ensemble_votes_by_majority(served):
    x, y = load_digits_holdout()
    models = ["digits-mlp", {"model_id": "digits-mlp-wide", "version": "1"}, "digits-mlp-deep@1"]
    body = {"task_id": "api-vote", "pattern": "parallel", "models": models,
            "inputs": b64_tensor(x[:200]), "aggregation": "majority"}  # fmt: skip
    await submit(served.http, body)
    doc = await finished(served.http, "api-vote")
    result = doc["result"]
    assert doc["aggregation"] == {"mode": "majority", "quorum": None, "min_responses": None,
                                  "timeout_s": None, "weights": {}}  # fmt: skip
    assert result["aggregation"]["mode"] == "majority"
    assert len(result["aggregation"]["sources"]) >= 2
    labels = array_of(result["outputs"][0])
    assert result["labels"] == labels.tolist()
    assert (labels == y[:200]).mean() >= 0.95
    assert sorted(i["model"] for i in doc["items"]) == [
        "digits-mlp-deep@1", "digits-mlp-wide@1", "digits-mlp@1"]  # fmt: skip


async def test_an_ensemble_with_a_quorum_ends_without_the_model_held_back(served):
    x, _ = load_digits_holdout()
    http, mesh = served.http, served.mesh
    models = ["digits-mlp", "digits-mlp-wide@1", "digits-mlp-deep"]
    body = {"task_id": "api-quorum", "pattern": "parallel", "models": models,
            "inputs": b64_tensor(x[:20]), "aggregation": "ensemble", "quorum": 2,
            "deadline_s": 120}  # fmt: skip
    with held_engines(mesh, only="digits-mlp-deep"):  # its item runs until the gate opens
        await submit(http, body)
        started = time.monotonic()
        doc = await finished(http, "api-quorum", timeout=30)
        assert time.monotonic() - started < 120  # by the quorum, not the deadline
        assert doc["aggregation"] == {
            "mode": "ensemble",
            "quorum": 2,
            "min_responses": None,
            "timeout_s": None,
            "weights": {},
        }  # as accepted
        agg = doc["result"]["aggregation"]
        assert agg["mode"] == "ensemble" and agg["reason"] == "complete" and not agg["partial"]
        assert agg["sources"] == ["api-quorum/0", "api-quorum/1"]  # not the deep model's item
        engine = mesh.daemons["node-0"].engine
        mean = (await engine.infer(DIGITS, x[:20]) + await engine.infer(WIDE, x[:20])) / 2
        np.testing.assert_allclose(array_of(doc["result"]["outputs"][0]), mean, rtol=1e-5)
        deep = next(i for i in doc["items"] if i["model"] == "digits-mlp-deep@1")
        assert not deep["has_result"]
    await until(lambda: idle(mesh))  # the held batch finishes once the gate opened


def idle(mesh: Mesh) -> bool:
    """No node runs an item or a batch."""
    return all(
        daemon.executor.running == 0
        and all(b.stats().in_flight_batches == 0 for b in daemon.executor.batchers.values())
        for daemon in mesh.daemons.values()
    )


async def test_the_aggregation_timeout_ends_a_task_with_a_partial_result_before_its_deadline(
    served,
):
    x, _ = load_digits_holdout()
    http, mesh = served.http, served.mesh
    body = {"task_id": "api-agg-timeout", "pattern": "parallel", "inputs": b64_tensor(x[:5]),
            "models": ["digits-mlp", WIDE_NAME, "digits-mlp-deep"], "aggregation": "ensemble",
            "aggregation_timeout_s": 2, "min_responses": 2, "deadline_s": 120}  # fmt: skip
    with held_engines(mesh, only="digits-mlp-deep"):
        await submit(http, body)
        doc = await finished(http, "api-agg-timeout", timeout=30)
        agg = doc["result"]["aggregation"]
        assert agg["reason"] == "timeout" and agg["partial"]  # 2 of 3: at least min_responses
        assert agg["sources"] == ["api-agg-timeout/0", "api-agg-timeout/1"]
        assert doc["updated_at"] - doc["created_at"] < 60  # the timeout, not the deadline
    await until(lambda: idle(mesh))


async def test_weights_move_a_weighted_average_toward_the_heavier_model(served):
    x, _ = load_digits_holdout()
    engine = served.mesh.daemons["node-0"].engine
    a, b = await engine.infer(DIGITS, x[:10]), await engine.infer(WIDE, x[:10])
    for task_id, weights, expected in [
        ("api-weighed-a", {"digits-mlp": 3}, (3 * a + b) / 4),
        ("api-weighed-b", {"digits-mlp-wide@1": 3, "digits-mlp@1": 1}, (a + 3 * b) / 4),
        ("api-weighed-not", {}, (a + b) / 2),
    ]:
        body = {"task_id": task_id, "pattern": "parallel", "models": ["digits-mlp", WIDE_NAME],
                "inputs": b64_tensor(x[:10]), "aggregation": "weighted",
                "weights": weights}  # fmt: skip
        await submit(served.http, body)
        doc = await finished(served.http, task_id)
        output = array_of(doc["result"]["outputs"][0])
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose((3 * a + b) / 4, (a + b) / 2)  # the weights did move it


async def test_pipeline_stages_feed_each_other(served):
    x, _ = load_digits_holdout()
    stages = [
        {"name": "a", "model": "digits-mlp"},
        {"name": "b", "model": {"model_id": "digits-mlp-wide", "version": "1"}},
        {"name": "head", "model": "synthetic-mlp@w20-d1", "after": ["a", "b"]},
        {"name": "tail", "model": "synthetic-mlp@w10-d1", "after": ["head"]},
    ]
    body = {"task_id": "api-dag", "pattern": "pipeline", "stages": stages,
            "inputs": {"values": x[:8].tolist(), "dtype": "float32"}}  # fmt: skip
    assert (await submit(served.http, body))["items_total"] == 4
    doc = await finished(served.http, "api-dag")
    engine = served.mesh.daemons["node-0"].engine
    a, b = await engine.infer(DIGITS, x[:8]), await engine.infer(WIDE, x[:8])
    head = await engine.infer(ModelRef("synthetic-mlp", "w20-d1"), np.concatenate([a, b], 1))
    tail = await engine.infer(ModelRef("synthetic-mlp", "w10-d1"), head)
    np.testing.assert_allclose(array_of(doc["result"]["outputs"][0]), tail, rtol=1e-5, atol=1e-6)
    assert {i["stage"] for i in doc["items"]} == {"a", "b", "head", "tail"}


# --- idempotency and bad bodies --------------------------------------------------------------


async def test_resubmitting_the_same_task_is_idempotent_and_another_spec_conflicts(served):
    x, _ = load_digits_holdout()
    body = {"task_id": "api-again", "pattern": "single", "model": "digits-mlp",
            "inputs": b64_tensor(x[:2])}  # fmt: skip
    first = await submit(served.http, body)
    second = await submit(served.http, body, status=200)  # a client's retry
    assert second["task_id"] == first["task_id"] == "api-again"
    # The same spec written the other way round (values, models list, explicit version).
    same = {"task_id": "api-again", "pattern": "single",
            "models": [{"model_id": "digits-mlp", "version": "1"}],
            "inputs": {"values": x[:2].tolist()}}  # fmt: skip
    await submit(served.http, same, status=200)
    other = await call(served.http, "POST", "/v1/tasks", json={**body, "priority": 5},
                       status=409)  # fmt: skip
    assert other["error"]["code"] == "conflict" and "api-again" in other["error"]["message"]
    await finished(served.http, "api-again")


X1 = {"values": [[0.0] * 64]}
PAIR = {"models": ["d", "e@1"], "pattern": "parallel", "inputs": X1}
BAD_BODIES = [
    ({"modle": "digits-mlp", "pattern": "single", "inputs": X1}, "invalid_task", "'modle'"),
    ({"model": "digits-mlp", "pattern": "single"}, "invalid_task", "inputs"),
    ({"model": "digits-mlp", "pattern": "sideways", "inputs": X1}, "invalid_task", "pattern"),
    ({"model": "d", "models": ["d"], "pattern": "single", "inputs": X1}, "invalid_task", "model"),
    ({"model": 7, "pattern": "single", "inputs": X1}, "invalid_task", "models[0]"),
    ({"model": {"model_id": "d", "v": "1"}, "pattern": "single", "inputs": X1},
     "invalid_task", "'v'"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [[1, 2], [3]]}},
     "invalid_task", "inputs.values"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [["1"]]}},
     "invalid_task", "inputs.values"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [1e39]}},
     "invalid_task", "inputs.values"),
    ({"model": "d", "pattern": "single", "inputs": {"values": []}}, "invalid_task", "inputs"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [[]]}}, "invalid_task", "inputs"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [[300]], "dtype": "uint8"}},
     "invalid_task", "inputs.values"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [[-1]], "dtype": "uint8"}},
     "invalid_task", "inputs.values"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [[1.7]], "dtype": "int32"}},
     "invalid_task", "inputs.values"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [1], "dtype": "float64"}},
     "invalid_task", "inputs.dtype"),
    ({"model": "d", "pattern": "single", "inputs": {"values": [1], "shape": [1]}},
     "invalid_task", "'shape'"),
    ({"model": "d", "pattern": "single",
      "inputs": {"dtype": "float32", "shape": [1], "data_b64": "!!"}},
     "invalid_task", "inputs.data_b64"),
    ({"model": "d", "pattern": "single",
      "inputs": {"dtype": "float32", "shape": [2], "data_b64": "AAAAAA=="}},
     "invalid_task", "inputs"),
    ({"model": "d", "pattern": "single", "inputs": b64_tensor(np.array([[1.0, np.nan]], "<f4"))},
     "invalid_task", "inputs.data_b64: holds NaN or infinity"),
    ({"model": "d", "pattern": "batch", "inputs": b64_tensor(np.array([[1.0], [-np.inf]], "<f2"))},
     "invalid_task", "inputs.data_b64: holds NaN or infinity"),
    ({"model": "d", "pattern": "single", "inputs": X1, "priority": "high"},
     "invalid_task", "priority"),
    ({"model": "d", "pattern": "single", "inputs": X1, "task_id": "no spaces"},
     "invalid_task", "task_id"),
    ({"models": ["d"], "pattern": "parallel", "inputs": X1, "aggregation": "mean"},
     "invalid_task", "aggregation"),
    ({"model": "d", "pattern": "single", "inputs": X1, "deadline_s": 10**400},
     "invalid_task", "deadline_s"),
    ([1, 2], "invalid_task", "object"),
    # aggregation options: a parallel task's, each in its range, with a mode that takes it
    ({"model": "d", "pattern": "single", "inputs": X1, "quorum": 1},
     "invalid_task", "quorum: only a parallel task"),
    ({"model": "d", "pattern": "single", "inputs": X1, "weights": {"d": 2}},
     "invalid_task", "weights: only a parallel task"),
    ({**PAIR, "aggregation": "majority", "quorum": 1}, "invalid_task", "quorum: only an ensemble"),
    ({**PAIR, "quorum": 1}, "invalid_task", "quorum: only an ensemble"),  # default mode: all
    ({**PAIR, "weights": {"d": 2}}, "invalid_task", "weights: only weighted"),  # default: all
    ({**PAIR, "aggregation": "first", "weights": {"d": 2}}, "invalid_task", "weights: only"),
    ({**PAIR, "aggregation": "ensemble", "quorum": 3}, "invalid_task", "quorum 3"),
    ({**PAIR, "aggregation": "ensemble", "quorum": True},
     "invalid_task", "quorum: expected int or NoneType, got bool"),
    ({**PAIR, "min_responses": 0}, "invalid_task", "min_responses 0"),
    ({**PAIR, "min_responses": 3}, "invalid_task", "min_responses 3"),
    ({**PAIR, "aggregation_timeout_s": 0}, "invalid_task", "aggregation_timeout_s 0"),
    ({**PAIR, "aggregation_timeout_s": "soon"},
     "invalid_task", "aggregation_timeout_s: expected int or float"),
    ({**PAIR, "aggregation_timeout_s": 10**400},
     "invalid_task", "aggregation_timeout_s: too large"),
    ({**PAIR, "aggregation_timeout_s": 5, "deadline_s": 2},
     "invalid_task", "aggregation_timeout_s 5 exceeds deadline_s 2"),
    ({**PAIR, "aggregation": "weighted", "weights": {"z": 2}},
     "invalid_task", "weights: z@1 is not one of the task's models"),
    ({**PAIR, "aggregation": "weighted", "weights": {"d@2": 2}}, "invalid_task", "weights: d@2"),
    ({**PAIR, "aggregation": "weighted", "weights": {"d": 0}}, "invalid_task", "weights: d@1"),
    ({**PAIR, "aggregation": "weighted", "weights": {"d": "2"}}, "invalid_task", "weights['d']"),
    ({**PAIR, "aggregation": "weighted", "weights": [2]},
     "invalid_task", "weights: expected Mapping, got list"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "code", "named"), BAD_BODIES)
async def test_an_invalid_task_is_refused_naming_the_key(served, body, code, named):
    doc = await call(served.http, "POST", "/v1/tasks", json=body, status=400)
    assert doc["error"]["code"] == code
    assert named in doc["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (b"", "empty"),
        (b"{", "JSON"),
        (b'{"pattern": NaN}', "NaN"),
        (b'{"pattern": "single", "pattern": "batch"}', "'pattern'"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[" * 100_000, "JSON"),
        # a lone surrogate escape: valid JSON syntax, but not text (no UTF-8 for it)
        (b'{"pattern": "single", "model": "\\ud800", "inputs": {"values": [1]}}', "surrogate"),
        (
            b'{"pattern": "single", "model": "m", "params": {"\\udfff": 1}, "inputs": '
            b'{"values": [1]}}',
            "surrogate",
        ),
        (
            b'{"pattern": "parallel", "models": ["m", "a\\ud83d"], "inputs": {"values": [1]}}',
            "surrogate",
        ),
    ],
)
async def test_a_body_that_is_not_json_is_a_bad_json_error(served, raw, named):
    headers = {"Content-Type": "application/json"}
    doc = await call(served.http, "POST", "/v1/tasks", data=raw, headers=headers, status=400)
    assert doc["error"]["code"] == "bad_json" and named in doc["error"]["message"]


async def test_escaped_surrogate_pairs_and_backslashes_are_still_json():
    assert parse_json(b'{"k": "\\ud83d\\ude00"}') == {"k": "\U0001f600"}  # ensure_ascii clients
    assert parse_json(b'{"k": "\\\\ud800"}') == {"k": "\\ud800"}  # a backslash, then text


@pytest.mark.parametrize("encoding", ["gzip", "br"])  # (bad deflate: aiohttp's own 400)
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_400(served, encoding, caplog):
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    doc = await call(served.http, "POST", "/v1/tasks", data=b"{}", headers=headers, status=400)
    assert doc["error"]["code"] == "bad_request" and encoding in doc["error"]["message"]
    assert await call(served.http, "GET", "/healthz") == {"status": "ok"}
    # the client's fault: no ERROR with a traceback in the coordinator's log (aiohttp's own)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_request_aiohttp_cannot_parse_is_400_and_logged_as_the_clients_fault(
    served, caplog
):
    port = int(served.api.url.rsplit(":", 1)[1])
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /healthz?a=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Encoding: deflate\r\n"
        b"Content-Length: 4\r\n\r\nabcd",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        assert (await reader.readline()).split()[1] in (b"400", b"401")
        writer.close()
        await writer.wait_closed()
    assert await call(served.http, "GET", "/healthz") == {"status": "ok"}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# --- listing ---------------------------------------------------------------------------------


async def test_listing_filters_and_a_cursor_walk_returns_every_task_once(served):
    x, _ = load_digits_holdout()
    http = served.http
    before = time.time() - 1
    mine = [f"api-list-{i}" for i in range(7)]
    for task_id in mine:
        model = "digits-mlp-wide" if task_id != mine[0] else "digits-mlp"
        body = {"task_id": task_id, "pattern": "single", "model": model,
                "inputs": b64_tensor(x[:1])}  # fmt: skip
        await submit(http, body)
    for task_id in mine:
        await finished(http, task_id)
    everything = await call(http, "GET", "/v1/tasks", params={"limit": "1000"}, schema="TaskPage")
    assert everything["next_cursor"] is None
    all_ids = [t["task_id"] for t in everything["tasks"]]
    assert set(mine) <= set(all_ids) and len(all_ids) == len(set(all_ids))

    walked, cursor, pages = [], None, 0
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = await call(http, "GET", "/v1/tasks", params=params, schema="TaskPage")
        assert len(page["tasks"]) <= 3
        walked += [t["task_id"] for t in page["tasks"]]
        cursor, pages = page["next_cursor"], pages + 1
        if cursor is None:
            break
    assert walked == all_ids  # every task exactly once, in the same (newest first) order
    assert pages == math.ceil(len(all_ids) / 3)
    created = [t["created_at"] for t in everything["tasks"]]
    assert created == sorted(created, reverse=True)

    wide = await call(http, "GET", "/v1/tasks", params={"model": "digits-mlp-wide"})
    wide_ids = {t["task_id"] for t in wide["tasks"]}
    assert set(mine[1:]) <= wide_ids and mine[0] not in wide_ids
    done = await call(http, "GET", "/v1/tasks", params={"state": "succeeded", "limit": "1000"})
    assert set(mine) <= {t["task_id"] for t in done["tasks"]}
    assert all(t["state"] == "succeeded" for t in done["tasks"])
    recent = await call(http, "GET", "/v1/tasks", params={"since": repr(before)})
    assert set(mine) <= {t["task_id"] for t in recent["tasks"]}
    future = await call(http, "GET", "/v1/tasks", params={"since": str(time.time() + 3600)})
    assert future == {"tasks": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=1.5", "limit"),
        ("limit=-3", "limit"),
        ("since=yesterday", "since"),
        ("since=nan", "since"),
        ("since=1e999", "since"),
        ("since=", "since"),
        ("state=sleeping", "state"),
        ("model=digits-mlp@1", "model"),
        ("cursor=abc", "cursor"),
        ("cursor=", "cursor"),
        ("limit=5&limit=6", "limit"),
        ("since=%EF%BC%91", "since"),  # a fullwidth digit one
        ("colour=blue", "colour"),
    ],
)
async def test_a_bad_query_parameter_is_named(served, query, named):
    doc = await call(served.http, "GET", f"/v1/tasks?{query}", status=400)
    assert doc["error"]["code"] == "bad_parameter"
    assert doc["error"]["message"].startswith(named)


# --- wait and cancel -------------------------------------------------------------------------


async def test_wait_times_out_then_cancel_ends_the_running_task(served):
    x, _ = load_digits_holdout()
    http, mesh = served.http, served.mesh
    with held_engines(mesh):
        body = {"task_id": "api-long", "pattern": "batch", "model": "digits-mlp",
                "inputs": b64_tensor(x), "shard_size": 50}  # fmt: skip
        await submit(http, body)
        await until(lambda: sum(d.executor.running for d in mesh.daemons.values()) >= 1)
        started = time.monotonic()
        doc = await call(http, "GET", "/v1/tasks/api-long/wait", params={"timeout": "0.3"},
                         schema="Task")  # fmt: skip
        assert time.monotonic() - started >= 0.3
        assert doc["state"] in ("dispatched", "running") and doc["result"] is None
        cancelled_before = sum(d.executor.stats.cancelled for d in mesh.daemons.values())

        answer = await call(http, "POST", "/v1/tasks/api-long/cancel", schema="Cancelled")
        assert answer == {"task_id": "api-long", "cancelled": True, "state": "cancelled"}
        doc = await call(http, "GET", "/v1/tasks/api-long", schema="Task")
        assert doc["state"] == "cancelled"
        assert {i["state"] for i in doc["items"]} == {"cancelled"}
        await until(
            lambda: (
                sum(d.executor.stats.cancelled for d in mesh.daemons.values()) > cancelled_before
            )
        )
        again = await call(http, "POST", "/v1/tasks/api-long/cancel", schema="Cancelled")
        assert again == {"task_id": "api-long", "cancelled": False, "state": "cancelled"}
    waited = await call(http, "GET", "/v1/tasks/api-long/wait", params={"timeout": "5"})
    assert waited["state"] == "cancelled"  # an ended task answers at once


async def test_a_task_shows_its_deadline_and_why_its_items_wait(served):
    x, _ = load_digits_holdout()
    http = served.http
    body = {"task_id": "api-nowhere", "pattern": "batch", "model": "no-such-model@2",
            "inputs": b64_tensor(x[:2]), "shard_size": 1, "deadline_s": 120}  # fmt: skip
    await submit(http, body)
    doc = await call(http, "GET", "/v1/tasks/api-nowhere", schema="Task")
    assert doc["deadline_s"] == 120 and doc["expires_at"] == doc["created_at"] + 120
    assert [i["waiting"] for i in doc["items"]] == [
        "no live, reachable node serves model no-such-model@2"
    ] * 2
    await call(http, "POST", "/v1/tasks/api-nowhere/cancel", schema="Cancelled")
    doc = await call(http, "GET", "/v1/tasks/api-nowhere", schema="Task")
    assert [i["waiting"] for i in doc["items"]] == [None, None]  # over: nothing waits
    plain = {"pattern": "single", "model": "digits-mlp", "inputs": b64_tensor(x[:1])}
    served_doc = await finished(http, (await submit(http, plain))["task_id"])
    assert served_doc["deadline_s"] is None and served_doc["expires_at"] is None
    coordinator = served.mesh.coordinator  # a task naming none gets the default in force
    kept = coordinator.config
    coordinator.config = replace(kept, default_deadline_s=30.0)
    try:
        defaulted = (await submit(http, plain))["task_id"]
    finally:
        coordinator.config = kept
    doc = await finished(http, defaulted)
    assert doc["deadline_s"] == 30.0 and doc["expires_at"] == doc["created_at"] + 30.0
    doc = await call(http, "GET", f"/v1/tasks/{served_doc['task_id']}", schema="Task")
    assert doc["deadline_s"] is None  # accepted before: no deadline, whatever the config says


@pytest.mark.parametrize("timeout", ["-1", "301", "soon", "inf", "1e400", "", "%EF%BC%91"])
async def test_a_bad_wait_timeout_is_refused(served, timeout):
    doc = await call(served.http, "GET", f"/v1/tasks/any/wait?timeout={timeout}", status=400)
    assert doc["error"]["code"] == "bad_parameter" and "timeout" in doc["error"]["message"]


# --- auth and HTTP errors --------------------------------------------------------------------

ROUTES = [
    ("POST", "/v1/tasks"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/x"),
    ("GET", "/v1/tasks/x/wait"),
    ("POST", "/v1/tasks/x/cancel"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/stats"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("header", [None, f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer", TOKEN])
async def test_every_route_but_healthz_needs_the_token(served, method, path, header):
    headers = {} if header is None else {"Authorization": header}
    async with aiohttp.ClientSession(base_url=served.api.url, headers=headers) as anonymous:
        async with anonymous.request(method, path, json={}) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            doc = await response.json()
    conforms(doc, "Error")
    assert doc["error"]["code"] == "unauthorized"


async def test_healthz_answers_without_a_token(served):
    async with aiohttp.ClientSession(base_url=served.api.url) as anonymous:
        assert await call(anonymous, "GET", "/healthz", schema="Health") == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nope", 404, "not_found"),
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/tasks/no-such-task", 404, "not_found"),
        ("GET", "/v1/tasks/no-such-task/wait?timeout=0", 404, "not_found"),
        ("POST", "/v1/tasks/no-such-task/cancel", 404, "not_found"),
        ("DELETE", "/v1/tasks", 405, "method_not_allowed"),
        ("PUT", "/v1/tasks/x", 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
        ("PATCH", "/v1/nodes", 405, "method_not_allowed"),
    ],
)
async def test_unknown_routes_tasks_and_methods(served, method, path, status, code):
    doc = await call(served.http, method, path, status=status)
    assert doc["error"]["code"] == code


# every route but /metrics and /healthz (for scrapers and probes) reads its query strictly
STRICT_ROUTES = [
    ("POST", "/v1/tasks", "/v1/tasks"),
    ("GET", "/v1/tasks", "/v1/tasks"),
    ("GET", "/v1/tasks/x", "/v1/tasks/{id}"),
    ("GET", "/v1/tasks/x/wait", "/v1/tasks/{id}/wait"),
    ("POST", "/v1/tasks/x/cancel", "/v1/tasks/{id}/cancel"),
    ("GET", "/v1/nodes", "/v1/nodes"),
    ("GET", "/v1/stats", "/v1/stats"),
    ("GET", "/v1/revocations", "/v1/revocations"),
    ("POST", "/v1/revocations", "/v1/revocations"),
    ("GET", "/openapi.json", "/openapi.json"),
]


@pytest.mark.parametrize(("method", "path", "template"), STRICT_ROUTES)
async def test_an_unknown_query_parameter_is_a_documented_400_on_every_route(
    served, method, path, template
):
    doc = await call(served.http, method, f"{path}?colour=blue", json={}, status=400)
    assert doc["error"]["code"] == "bad_parameter"
    assert doc["error"]["message"].startswith("colour: unknown query parameter")
    assert "400" in DOC["paths"][template][method.lower()]["responses"]


SUBMISSION = {"pattern": "single", "model": "digits-mlp", "inputs": X1}
ENSEMBLE = {"pattern": "parallel", "models": ["digits-mlp", "digits-mlp-wide@1"],
            "aggregation": "ensemble", "inputs": X1}  # fmt: skip
SCHEMA_AND_SERVER_REFUSE = [
    {**SUBMISSION, "task_id": "no spaces"},
    {**SUBMISSION, "task_id": "-starts-with-a-dash"},
    {**SUBMISSION, "task_id": "x" * 65},
    {**SUBMISSION, "task_id": ""},
    {**SUBMISSION, "priority": 2**31},
    {**SUBMISSION, "priority": -(2**31) - 1},
    {"pattern": "pipeline", "inputs": X1, "stages": [{"name": "a b", "model": "digits-mlp"}]},
    {**ENSEMBLE, "quorum": 0},
    {**ENSEMBLE, "quorum": "2"},
    {**ENSEMBLE, "quorum": True},
    {**ENSEMBLE, "min_responses": 0},
    {**ENSEMBLE, "min_responses": -1},
    {**ENSEMBLE, "aggregation_timeout_s": 0},
    {**ENSEMBLE, "aggregation_timeout_s": -1.5},
    {**ENSEMBLE, "aggregation_timeout_s": "1"},
    {**ENSEMBLE, "weights": {"digits-mlp": 0}},
    {**ENSEMBLE, "weights": {"digits-mlp": -2}},
    {**ENSEMBLE, "weights": {"digits-mlp": "2"}},
    {**ENSEMBLE, "weights": {"": 2}},
    {**ENSEMBLE, "weights": [["digits-mlp", 2]]},
    {**ENSEMBLE, "weights": None},
]


@pytest.mark.parametrize("body", SCHEMA_AND_SERVER_REFUSE)
async def test_the_submission_schema_refuses_what_the_server_refuses(served, body):
    doc = await call(served.http, "POST", "/v1/tasks", json=body, status=400)
    assert doc["error"]["code"] == "invalid_task"
    assert "unknown key" not in doc["error"]["message"]  # refused for its value
    with pytest.raises(jsonschema.ValidationError):
        conforms(body, "TaskSubmission")


async def test_the_submission_schema_takes_the_extremes_the_server_takes():
    for body in [{**SUBMISSION, "task_id": "x" * 64, "priority": 2**31 - 1},
                 {**SUBMISSION, "task_id": "A0_.:-", "priority": -(2**31)},
                 {**ENSEMBLE, "quorum": 1, "min_responses": 2, "aggregation_timeout_s": 1e-300,
                  "weights": {"digits-mlp": 1e-300, "digits-mlp-wide@1": 1e300}},
                 {**ENSEMBLE, "quorum": 2, "min_responses": 1, "aggregation_timeout_s": 5,
                  "deadline_s": 5, "weights": {"digits-mlp@1": 7}},
                 {**ENSEMBLE, "quorum": None, "min_responses": None,
                  "aggregation_timeout_s": None, "weights": {}}]:  # fmt: skip
        conforms(body, "TaskSubmission")
        assert body_to_spec(body, lambda: "unused").validate() is None


async def test_uploads_beyond_the_upload_budget_get_503_busy_and_then_go_through(served):
    small = CoordinatorApi(
        served.mesh.coordinator, Address("127.0.0.1", 0), TOKEN,
        max_body_bytes=1024, max_upload_bytes=2048,
    )  # fmt: skip
    x, _ = load_digits_holdout()
    body = json.dumps({"model": "digits-mlp", "pattern": "single",
                       "inputs": {"values": np.round(x[:1], 1).tolist()}}).encode()  # fmt: skip
    assert len(body) <= 1024
    gate = asyncio.Event()

    async def slow_body():  # chunked: counted as the largest body allowed (1024)
        yield body[:10]
        await gate.wait()
        yield body[10:]

    headers = {"Content-Type": "application/json"}
    async with small, aiohttp.ClientSession(base_url=small.url, headers=AUTH) as http:
        slow = [
            asyncio.create_task(
                call(http, "POST", "/v1/tasks", data=slow_body(), headers=headers, status=202)
            )
            for _ in range(2)
        ]
        await until(lambda: small.tasks.uploading == 2048)  # both are being read
        async with http.post("/v1/tasks", data=body, headers=headers) as response:
            assert response.status == 503 and response.headers["Retry-After"] == "1"
            doc = await response.json()
        conforms(doc, "Error")
        assert doc["error"]["code"] == "busy"
        busy = small._requests.labels("POST", "/v1/tasks", "503")
        client = CoordinatorClient(small.url, TOKEN)  # the CLI's client asks again later
        by_client = asyncio.create_task(asyncio.to_thread(client.submit, json.loads(body)))
        await until(lambda: busy.value == 2)
        gate.set()
        accepted = [await task for task in slow]
        accepted.append(await by_client)
        assert [doc["items_total"] for doc in accepted] == [1, 1, 1] and busy.value == 2
        assert small.tasks.uploading == 0
        accepted.append(
            await call(http, "POST", "/v1/tasks", data=body, headers=headers, status=202)
        )
        held = asyncio.create_task(call(http, "POST", "/v1/tasks", data=slow_body(),
                                        headers=headers, status=202))  # fmt: skip
        gate.clear()
        await until(lambda: small.tasks.uploading == 1024)
        small.tasks.uploading += 1024  # as if another upload were being read
        try:
            with pytest.raises(ApiError) as refused:  # what it gets when it will not wait
                await asyncio.to_thread(client.submit, json.loads(body), busy_s=0)
        finally:
            small.tasks.uploading -= 1024
            gate.set()
            accepted.append(await held)
        assert refused.value.code == "busy" and refused.value.retry_after == 1.0
        for doc in accepted:  # none of its results is still being taken in when the test ends
            await finished(http, doc["task_id"])
    coordinator, anywhere = served.mesh.coordinator, Address("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="below max_body_bytes"):
        CoordinatorApi(coordinator, anywhere, TOKEN, max_body_bytes=1024, max_upload_bytes=1000)


async def test_a_full_disk_is_507_insufficient_storage_and_the_task_is_not_taken(served, caplog):
    journal = served.mesh.coordinator.journal
    body = {"task_id": "api-full-disk", "pattern": "single", "model": "digits-mlp@1",
            "inputs": {"values": [[0.0] * 64]}}  # fmt: skip
    db, journal._db = journal._db, FullDisk(journal._db)  # every COMMIT fails as on a full disk
    try:
        doc = await call(served.http, "POST", "/v1/tasks", json=body, status=507)
    finally:
        journal._db = db
    assert doc["error"]["code"] == "insufficient_storage"
    assert "out of disk space" in doc["error"]["message"]
    assert "Traceback" not in caplog.text and "out of disk space" in caplog.text
    await call(served.http, "GET", "/v1/tasks/api-full-disk", status=404)  # nothing was taken
    await submit(served.http, body)  # space again: the same task goes through
    await finished(served.http, "api-full-disk")


async def test_a_body_over_the_cap_is_413_and_not_json_is_415(served):
    small = CoordinatorApi(
        served.mesh.coordinator, Address("127.0.0.1", 0), TOKEN, max_body_bytes=1024
    )
    async with small, aiohttp.ClientSession(base_url=small.url, headers=AUTH) as http:
        big = {"model": "digits-mlp", "pattern": "single", "inputs": {"values": [0.5] * 600}}
        doc = await call(http, "POST", "/v1/tasks", json=big, status=413)
        assert doc["error"]["code"] == "too_large" and "1024" in doc["error"]["message"]

        async def chunks():  # no Content-Length: the cap holds while reading
            for _ in range(8):
                yield b" " * 512

        headers = {"Content-Type": "application/json"}
        doc = await call(http, "POST", "/v1/tasks", data=chunks(), headers=headers, status=413)
        assert doc["error"]["code"] == "too_large"
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            doc = await call(http, "POST", "/v1/tasks", data=b"{}", status=415,
                             headers={"Content-Type": content_type})  # fmt: skip
            assert doc["error"]["code"] == "unsupported_media_type"
            assert content_type in doc["error"]["message"]
        assert await call(http, "GET", "/healthz") == {"status": "ok"}


async def test_an_unexpected_error_is_a_logged_500_without_traceback(served, monkeypatch, caplog):
    def broken():
        raise RuntimeError("secret internals")

    monkeypatch.setattr(served.mesh.coordinator, "nodes", broken)
    with caplog.at_level(logging.ERROR, logger="coordinator.api"):
        doc = await call(served.http, "GET", "/v1/nodes", status=500)
    assert doc["error"]["code"] == "internal"
    assert "secret" not in doc["error"]["message"] and "Traceback" not in doc["error"]["message"]
    assert any("secret internals" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    monkeypatch.undo()
    await call(served.http, "GET", "/v1/nodes", schema="Nodes")


# --- the mesh, metrics, the document ---------------------------------------------------------


async def test_nodes_and_stats(served):
    nodes = await call(served.http, "GET", "/v1/nodes", schema="Nodes")
    mine = {n["node_id"]: n for n in nodes["nodes"] if n["node_id"] in served.mesh.names}
    assert set(mine) == set(served.mesh.names)
    assert all(n["status"] == "alive" and "digits-mlp@1" in n["models"] for n in mine.values())
    stats = await call(served.http, "GET", "/v1/stats", schema="Stats")
    assert stats == await _stats_now(served)


async def _stats_now(served):
    import json

    return json.loads(json.dumps(await served.mesh.coordinator.stats()))


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _metrics(http) -> dict:
    async with http.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return _samples(await response.text())


async def test_metrics_parse_and_count_requests(served):
    http = served.http
    key = ("meshinfer_coord_api_requests_total",
           (("method", "GET"), ("route", "/v1/nodes"), ("status", "200")))  # fmt: skip
    before = (await _metrics(http)).get(key, 0.0)
    for _ in range(3):
        await call(http, "GET", "/v1/nodes")
    await call(http, "GET", "/v1/nope", status=404)
    after = await _metrics(http)
    assert after[key] == before + 3
    assert after[("meshinfer_coord_api_requests_total",
                  (("method", "GET"), ("route", "unmatched"), ("status", "404")))] >= 1  # fmt: skip
    assert after[("meshinfer_coord_nodes_alive", ())] >= 2
    stats = await _stats_now(served)
    for state, count in stats["tasks"].items():
        assert after[("meshinfer_coord_tasks", (("state", state),))] == count
    assert after[("meshinfer_coord_dispatched_total", ())] == stats["dispatched"]
    assert after[("meshinfer_coord_inputs_by_reference_total", ())] == stats["inputs_by_reference"]
    assert after[("meshinfer_coord_live_tasks", ())] == stats["live_tasks"]
    latency = ("meshinfer_coord_api_request_seconds_count", (("route", "/v1/nodes"),))
    assert after[latency] >= 3


async def test_metrics_show_the_coordinators_mesh_as_a_node_names_it(served):
    mesh = served.mesh.mesh
    m = mesh.metrics
    before = m.handshakes_ok, m.messages_sent  # gossip goes on while /metrics is read
    after = await _metrics(served.http)
    connected = len(mesh.peers.connected)
    assert connected >= 2  # a session with each node
    assert after[("meshinfer_sessions_open", ())] == connected
    handshakes = after[("meshinfer_handshakes_total", ())]
    assert before[0] <= handshakes <= m.handshakes_ok and handshakes >= connected
    sent = after[("meshinfer_session_messages_total", (("direction", "sent"),))]
    assert before[1] <= sent <= m.messages_sent
    assert sent >= after[("meshinfer_session_records_total", (("direction", "sent"),))] > 0
    checked = mesh.peers.stats
    assert after[("meshinfer_older_sessions_checked_total", (("outcome", "silent"),))] == (
        checked.abandoned
    )
    alive = sum(m.status.value == "alive" for m in mesh.membership.core.members())
    assert after[("meshinfer_members", (("status", "alive"),))] == alive >= 2
    version = after[("meshinfer_revocation_list_version", ())]
    assert version == mesh.revocation_sync.version


async def test_the_openapi_document_is_valid_and_covers_every_route(served):
    doc = await call(served.http, "GET", "/openapi.json")
    assert doc == DOC
    await asyncio.to_thread(validate_openapi, doc)  # ~0.15 s of CPU: not on the served loop
    served_routes = {  # HEAD beside every GET is HTTP's, not an operation of its own
        (route.method.lower(), route.resource.canonical)
        for route in served.api.app.router.routes()
        if route.method not in ("HEAD", "*")  # ("*": the catch-all of paths no route serves)
    }
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert served_routes == documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            public = op.get("security") == []
            assert public == ((method, path) == ("get", "/healthz"))
            if not public:
                assert "401" in op["responses"]
    codes = set(DOC["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
                ["code"]["enum"])  # fmt: skip
    assert codes == set(ERROR_CODES)


async def test_closing_answers_open_waits_at_once_and_twice_is_harmless(served, monkeypatch):
    # No node has this model: the task waits for one forever.
    body = {"task_id": "api-orphan", "pattern": "single", "model": "nobody-has-this@1",
            "inputs": {"values": [1.0]}}  # fmt: skip
    await submit(served.http, body)
    coordinator = served.mesh.coordinator
    entered, original = asyncio.Event(), coordinator.wait

    async def spied(*args, **kw):
        entered.set()
        return await original(*args, **kw)

    monkeypatch.setattr(coordinator, "wait", spied)
    api = CoordinatorApi(coordinator, Address("127.0.0.1", 0), TOKEN)
    await api.start()
    url = api.url
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        waiting = asyncio.create_task(
            call(http, "GET", "/v1/tasks/api-orphan/wait", params={"timeout": "300"})
        )
        await entered.wait()
        started = time.monotonic()
        await api.aclose()
        assert time.monotonic() - started < 2.0
        doc = await waiting
        assert doc["state"] == "pending" and doc["result"] is None
        await api.aclose()
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(url + "/healthz")
    cancelled = await call(served.http, "POST", "/v1/tasks/api-orphan/cancel")
    assert cancelled["cancelled"] is True
