"""The OpenAPI 3.1 document of the coordinator's HTTP API v1 (served at ``/openapi.json``).

Built from the domain's own enumerations (patterns, states, policies, aggregation modes, wire
dtypes) and the limits the handlers enforce (page size, wait, revocation list size), so the
document cannot drift from what the server accepts. Schemas are JSON Schema
2020-12, as OpenAPI 3.1 has it; response schemas close their objects
(``additionalProperties: false``) so tests can hold the server to them.
"""

from __future__ import annotations

from typing import Any

from coordinator.api_requests import DEFAULT_PAGE
from coordinator.api_tasks import DEFAULT_WAIT_S, MAX_WAIT_S
from coordinator.journal import MAX_PAGE
from meshinfer.proto.aggregation import Mode
from meshinfer.proto.identity import MAX_REVOCATION_LIST_BYTES
from meshinfer.proto.membership_member import MemberStatus
from meshinfer.proto.scheduling import Policy
from meshinfer.proto.tasks import MAX_PRIORITY, MIN_PRIORITY, NAME_PATTERN, Pattern, TaskState
from meshinfer.proto.tasks_wire import DTYPES

__all__ = ["API_VERSION", "ERROR_CODES", "openapi_document"]

API_VERSION = "1.0.0"
#: Every error ``code`` the API answers with.
ERROR_CODES = (
    "bad_json", "invalid_task", "bad_parameter", "bad_request", "unauthorized", "not_found",
    "method_not_allowed", "conflict", "too_large", "unsupported_media_type", "busy", "internal",
    "invalid_revocations", "unavailable", "insufficient_storage", "expectation_failed",
    "shutting_down",
)  # fmt: skip

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], props: dict[str, Schema], *, closed: bool = True) -> Schema:
    schema: Schema = {"type": "object", "required": required, "properties": props}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _enum(values: Any, nullable: bool = False) -> Schema:
    names = [str(getattr(v, "value", v)) for v in values]
    return {"enum": [*names, None]} if nullable else {"type": "string", "enum": names}


_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_NUM: Schema = {"type": "number"}
_NULLABLE_STR: Schema = {"type": ["string", "null"]}
#: A task id or stage name, as :class:`~meshinfer.proto.tasks.TaskSpec` validates it.
_NAME: Schema = {"type": "string", "pattern": f"^{NAME_PATTERN}$"}
_PRIORITY: Schema = {"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY}


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


# --- schemas ---------------------------------------------------------------------------------


def _tensor_schemas() -> dict[str, Schema]:
    dtype = _enum(sorted(DTYPES))
    shape = _array({"type": "integer", "minimum": 0})
    b64 = {"type": "string", "contentEncoding": "base64"}
    return {
        "Tensor": _obj(["dtype", "shape", "data_b64"], {
            "dtype": {"type": "string", "description": "NumPy dtype name"},
            "shape": shape, "data_b64": {**b64, "description": "C-order little-endian bytes"},
        }),
        "TensorInput": {"oneOf": [
            _obj(["dtype", "shape", "data_b64"], {"dtype": dtype, "shape": shape, "data_b64": b64}),
            _obj(["values"], {"values": {"type": "array", "description": "nested numbers"},
                              "dtype": {**dtype, "default": "float32"}}),
        ]},
    }  # fmt: skip


def _submission_schemas() -> dict[str, Schema]:
    params = {"type": "object", "additionalProperties": {
        "type": ["string", "integer", "number", "boolean", "null"]}}  # fmt: skip
    return {
        "ModelRef": {"oneOf": [
            {"type": "string", "description": '"id@version"; "id" alone means version "1"',
             "minLength": 1},
            _obj(["model_id"], {"model_id": _STR, "version": {**_STR, "default": "1"}}),
        ]},
        "Stage": _obj(["name", "model"], {
            "name": _NAME, "model": _ref("ModelRef"), "after": _array(_STR), "params": params,
        }),
        "TaskSubmission": _obj(["pattern", "inputs"], {
            "task_id": {
                **_NAME,
                "description": "generated when absent (32 hex digits, ordered by creation"
                " time); reuse it to retry",
            },
            "pattern": _enum(Pattern), "inputs": _ref("TensorInput"),
            "models": _array(_ref("ModelRef")),
            "model": {**_ref("ModelRef"), "description": "shorthand for models: [model]"},
            "stages": _array(_ref("Stage")), "params": params,
            "deadline_s": {"type": ["number", "null"], "exclusiveMinimum": 0,
                           "description": "budget in seconds from acceptance; the task fails "
                           "when it runs out (a parallel task: its aggregation's timeout)"},
            "priority": {**_PRIORITY, "default": 0, "description": "larger runs first"},
            "policy": _enum(Policy, nullable=True),
            "aggregation": _enum(Mode, nullable=True),
            "shard_size": {"type": ["integer", "null"], "minimum": 1},
            **_aggregation_options(),
        }),
    }  # fmt: skip


def _aggregation_options() -> dict[str, Schema]:
    """A parallel task's aggregation options (TaskSpec; refused on other patterns)."""
    count = "1..the number of models"
    return {
        "quorum": {"type": ["integer", "null"], "minimum": 1, "description": "ensemble only:"
                   f" outputs that complete it, {count} (default: every model)"},
        "min_responses": {"type": ["integer", "null"], "minimum": 1, "description": "outputs"
                          " that still make a partial result when the aggregation times out or"
                          f" models fail, {count} (default 1)"},
        "aggregation_timeout_s": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                  "description": "seconds from acceptance the aggregation waits"
                                  " (default: deadline_s); at most deadline_s"},
        "weights": {"type": "object", "propertyNames": {"minLength": 1},
                    "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
                    "description": 'weighted and ensemble only: a weight per model, keyed'
                    ' "id@version" or "id" (version "1") as in models; a model not named'
                    " weighs 1"},
    }  # fmt: skip


def _summary_props() -> dict[str, Schema]:
    return {
        "task_id": _STR, "state": _ref("TaskState"), "pattern": _enum(Pattern),
        "priority": _INT, "policy": _NULLABLE_STR, "created_at": _NUM, "updated_at": _NUM,
        "error": _NULLABLE_STR, "items_total": _INT, "items_done": _INT,
    }  # fmt: skip


def _task_schemas() -> dict[str, Schema]:
    summary = _summary_props()
    result = _obj(["labels", "nodes", "aggregation"], {
        "labels": {"type": ["array", "null"], "items": _INT},
        "outputs": {**_array(_ref("Tensor")), "description": "left out with ?outputs=false"},
        "nodes": {"type": "object", "additionalProperties": _STR},
        "aggregation": {"type": ["object", "null"]},
    })  # fmt: skip
    aggregation = _obj(["mode", "quorum", "min_responses", "timeout_s", "weights"], {
        "mode": {**_enum(Mode), "description": "the task's, else the coordinator's"
                 " default_aggregation"},
        "quorum": {"type": ["integer", "null"], "description": "null: every model"},
        "min_responses": {"type": ["integer", "null"], "description": "null: 1"},
        "timeout_s": {"type": ["number", "null"], "description": "null: deadline_s"},
        "weights": {"type": "object", "additionalProperties": _NUM,
                    "description": "by model (id@version); a model not named weighs 1"},
    })  # fmt: skip
    item = _obj(["item_id", "state", "node", "attempt", "refused", "error", "model", "stage",
                 "position", "has_result", "waiting"], {
        "item_id": _STR, "state": _ref("TaskState"), "node": _NULLABLE_STR, "attempt": _INT,
        "refused": {**_INT, "description": "attempts its node refused or never got (not counted"
                    " against max_attempts)"},
        "error": _NULLABLE_STR, "model": _STR, "stage": _NULLABLE_STR, "position": _INT,
        "has_result": {"type": "boolean"},
        "waiting": {**_NULLABLE_STR, "description": "why a live item is on no node: no live"
                    " node serves its model, none meets its requirements, all are full..."},
    })  # fmt: skip
    return {
        "TaskState": _enum(TaskState),
        "TaskSummary": _obj(list(summary), summary),
        "WorkItem": item,
        "TaskResult": result,
        "Task": _obj([*summary, "deadline_s", "expires_at", "aggregation", "items", "result"], {
            **summary, "items": _array(_ref("WorkItem")),
            "aggregation": {"oneOf": [{"type": "null"}, aggregation], "description": "a"
                            " parallel task's aggregation as accepted (null: another pattern)"},
            "deadline_s": {"type": ["number", "null"], "description": "the task's time budget: its"
                           " own, else the coordinator's default_deadline_s when it was"
                           " accepted (null: none)"},
            "expires_at": {"type": ["number", "null"],
                           "description": "created_at + deadline_s (Unix seconds)"},
            "result": {"oneOf": [{"type": "null"}, _ref("TaskResult")]},
        }),
        "TaskPage": _obj(["tasks", "next_cursor"], {
            "tasks": _array(_ref("TaskSummary")), "next_cursor": _NULLABLE_STR,
        }),
        "Submitted": _obj(["task_id", "state", "items_total", "location"], {
            "task_id": _STR, "state": _ref("TaskState"), "items_total": _INT, "location": _STR,
        }),
        "Cancelled": _obj(["task_id", "cancelled", "state"], {
            "task_id": _STR, "cancelled": {"type": "boolean"}, "state": _ref("TaskState"),
        }),
    }  # fmt: skip


def _mesh_schemas() -> dict[str, Schema]:
    node_props: dict[str, Schema] = {
        "node_id": _STR, "status": _enum(MemberStatus), "roles": _array(_STR),
        "models": _array(_STR),
        "queue_depth": {"type": ["integer", "null"], "description": "the node's gossiped queue;"
                        " null for a node that died or left (its last one is stale)"},
        "address": _STR, "in_flight": _INT, "done": _INT,
        "rtt_ms": {"type": ["number", "null"], "description": "smoothed round trip of the"
                   " coordinator's membership probes to the node (what the latency policy ranks"
                   " by); null until one was answered, and for a node that died or left"},
        "contact_s": {"type": ["number", "null"], "description": "seconds until the node is"
                      " expected to leave the radio range of the roadside infrastructure, as"
                      " the contact_aware policy estimates it from its gossiped position and"
                      " velocity; null: unknown (an infrastructure node, one not moving or"
                      " without a position, none known of the infrastructure), which counts as"
                      " long enough; null too for a node that died or left"},
    }  # fmt: skip
    node = _obj(list(node_props), node_props)
    counts = {"type": "object", "additionalProperties": _INT}
    stats_props: dict[str, Schema] = {
        "tasks": counts, "items": counts, "journal_counters": counts, "dispatched": _INT,
        "retries": _INT, "refusals": _INT, "redispatched_after_death": _INT, "duplicates": _INT,
        "foreign_results": {**_INT, "description": "results refused because their attempt"
                            " went to another node (forged or misrouted)"},
        "redispatched_after_disconnect": _INT, "sessions_lost": _INT, "redials_ok": _INT,
        "resent_after_redial": _INT, "completed_by_node": counts, "live_tasks": _INT,
        "parked_items": _INT,
        "inputs_by_reference": _INT, "input_bytes_saved": _INT, "input_cache_misses": _INT,
        "stale_tells": _INT,
    }  # fmt: skip
    stats = _obj(list(stats_props), stats_props)
    error = _obj(["status", "code", "message"], {
        "status": _INT, "code": _enum(ERROR_CODES), "message": _STR,
    })  # fmt: skip
    revocation = _obj(["sequence", "serial", "node_id", "revoked_at", "reason"], {
        "sequence": _INT,
        "serial": {"type": ["integer", "null"], "description": "the certificate revoked"},
        "node_id": {"type": ["string", "null"], "description": "every certificate of the node"
                    " issued before revoked_at"},
        "revoked_at": _NUM, "reason": _STR,
    })  # fmt: skip
    revocations = {"version": _INT, "entries": _array(_ref("Revocation"))}
    return {
        "Revocation": revocation,
        "Revocations": _obj(["version", "entries"], revocations),
        "RevocationsMerged": _obj(
            ["version", "entries", "merged"], {**revocations, "merged": {"type": "boolean"}}
        ),
        "Node": node,
        "Nodes": _obj(["nodes"], {"nodes": _array(_ref("Node"))}),
        "Stats": stats,
        "Health": _obj(["status"], {"status": {"const": "ok"}}),
        "Error": _obj(["error"], {"error": error}),
    }


# --- paths -----------------------------------------------------------------------------------

_ERROR_RESPONSES = {
    "400": "A malformed body or query parameter, or an unknown one (code bad_json, invalid_task,"
    " bad_parameter, invalid_revocations; bad_request: a body that does not decode as its"
    " Content-Encoding, ends before its length, a request with more than one Authorization"
    " header where the token is asked for, or one that is not valid HTTP/1.1, on any path).",
    #: the 400 of the routes that read no query and no body (their query is not checked)
    "400Request": "A request that is not valid HTTP/1.1 (a body that does not decode as its"
    " Content-Encoding included), or one with more than one Authorization header where the"
    " token is asked for (code bad_request); query parameters are not checked here.",
    "401": "No or a wrong bearer token (code unauthorized).",
    "404": "No such task, or one deleted by retention (code not_found).",
    "409": "The task_id is used by a different task (code conflict).",
    "413": "The body is over the size limit (code too_large).",
    "415": "The body is not of the route's media type, or a JSON body declares a charset other"
    " than UTF-8, or the body's Content-Encoding is not one decoded here: identity or one"
    " Accept-Encoding names (code unsupported_media_type).",
    "503": "Too many submissions are being uploaded; retry after Retry-After (code busy); or"
    " this coordinator runs no revocation sync (code unavailable); or the coordinator is"
    " shutting down, on any path: a request that arrives then is not served, one it was"
    " serving may have taken effect (code shutting_down, with Retry-After).",
    "417": "An Expect header other than 100-continue (code expectation_failed). A body sent"
    " with Expect: 100-continue is asked for only once the request has passed every check"
    " made before reading it (token, size, media type).",
    "500": "The coordinator failed; the error is logged (code internal).",
    "507": "The coordinator is out of disk space: the request changed nothing (code"
    " insufficient_storage).",
}


def _json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ok(description: str, schema: Schema, headers: dict | None = None) -> dict[str, Any]:
    response = {"description": description, "content": _json_content(schema)}
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: Schema, *, required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema}


#: The headers an answer carries besides its body, by status.
_HEADERS = {
    "401": {"WWW-Authenticate": _header('Bearer realm="meshinfer-coordinator"', _STR)},
    "503": {"Retry-After": _header("codes busy and shutting_down: seconds to wait before"
                                   " sending it again",
                                   {"type": "integer", "minimum": 0}, required=False)},
    "415": {"Accept-Encoding": _header("with a Content-Encoding not decoded here: the codings"
                                       " that are", _STR, required=False)},
}  # fmt: skip
_LOCATION = {"Location": _header("the task's path, /v1/tasks/{id}", _STR)}


def _operation(
    op_id: str,
    summary: str,
    ok: dict[str, dict],
    errors: str = "",
    *,
    public: bool = False,
    **extra: Any,
) -> dict:
    """An operation answering ``ok``, the errors every one may answer and ``errors`` (names of
    :data:`_ERROR_RESPONSES`, whose first three characters are the status); ``public``: no
    token asked for (no 401)."""
    responses = dict(ok)
    for name in [*([] if public else ["401"]), "417", "500", "503", *errors.split()]:
        responses[name[:3]] = {"$ref": f"#/components/responses/E{name}"}
    op = {"operationId": op_id, "summary": summary, "tags": ["coordinator"],
          "responses": dict(sorted(responses.items())), **extra}  # fmt: skip
    if public:
        op["security"] = []
    return op


def _query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}  # fmt: skip


_TASK_ID = {"name": "id", "in": "path", "required": True, "schema": _STR,
            "description": "The task id."}  # fmt: skip
_OUTPUTS = _query("outputs", {"type": "boolean", "default": True},
                  "false leaves result.outputs out (labels and the rest stay).")  # fmt: skip


def _task_paths() -> dict[str, Any]:
    listing = [
        _query("state", _ref("TaskState"), "Only tasks in this state."),
        _query("model", {"type": "string", "minLength": 1, "pattern": "^[^@]*$"},
               "Only tasks with an item of this model id (no @version)."),
        _query("since", _NUM, "Only tasks created at or after this Unix time."),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE,
                         "default": DEFAULT_PAGE}, "Tasks per page."),
        _query("cursor", {"type": "string", "minLength": 1},
               "next_cursor of the previous page (opaque; one not handed out is a 400)."),
    ]  # fmt: skip
    submit_body = {"required": True, "content": _json_content(_ref("TaskSubmission"))}
    task = _ok("The task, its items and result.", _ref("Task"))
    return {
        "/v1/tasks": {
            "post": _operation("submitTask", "Submit a task (journaled before the answer).", {
                "200": _ok("The same task was already submitted with this spec.",
                           _ref("Submitted"), _LOCATION),
                "202": _ok("Accepted and journaled.", _ref("Submitted"), _LOCATION),
            }, "400 409 413 415 503 507", requestBody=submit_body),
            "get": _operation("listTasks", "List tasks, newest first, a page at a time.", {
                "200": _ok("One page.", _ref("TaskPage"))}, "400", parameters=listing),
        },
        "/v1/tasks/{id}": {"get": _operation("getTask", "A task with its items and result.",
            {"200": task}, "400 404", parameters=[_TASK_ID, _OUTPUTS])},
        "/v1/tasks/{id}/wait": {"get": _operation(
            "waitTask", "The task once it finished, or as it is when the timeout passed.",
            {"200": task}, "400 404", parameters=[_TASK_ID, _OUTPUTS, _query(
                "timeout", {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S,
                            "default": DEFAULT_WAIT_S}, "Seconds to wait at most.")])},
        "/v1/tasks/{id}/cancel": {"post": _operation(
            "cancelTask", "Cancel a task; the nodes running its items are told.",
            {"200": _ok("cancelled is false when the task had already finished.",
                        _ref("Cancelled"))}, "400 404 507", parameters=[_TASK_ID])},
    }  # fmt: skip


def _other_paths() -> dict[str, Any]:
    metrics = {"description": "Prometheus text exposition 0.0.4 (meshinfer_coord_*).",
               "content": {"text/plain": {"schema": _STR}}}  # fmt: skip
    health = _ok("The coordinator answers.", _ref("Health"))
    return {
        "/v1/nodes": {"get": _operation("listNodes", "The mesh as the coordinator sees it.",
                                        {"200": _ok("Every member.", _ref("Nodes"))}, "400")},
        "/v1/stats": {"get": _operation("getStats", "Task and item counts and counters.",
                                        {"200": _ok("The counters.", _ref("Stats"))}, "400")},
        "/v1/revocations": {
            "get": _operation("getRevocations", "The certificate revocation list in force.",
                              {"200": _ok("The list.", _ref("Revocations"))}, "400 503"),
            "post": _operation(
                "pushRevocations",
                "Merge a signed revocation list (what meshinfer fleet revoke writes); gossip"
                " spreads it to the fleet and revoked nodes' sessions are closed.",
                {"200": _ok("The list in force now; merged is false if nothing was new.",
                            _ref("RevocationsMerged"))}, "400 413 415 503 507",
                requestBody={"required": True, "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}},
                    "description": "The revocations.bin file: at most"
                    f" {MAX_REVOCATION_LIST_BYTES} bytes, and no more than the body limit"
                    " (over it: 413)."}),
        },
        "/metrics": {"get": _operation("getMetrics", "Prometheus metrics (any query is"
                                       " ignored).", {"200": metrics}, "400Request")},
        "/openapi.json": {"get": _operation("getOpenApi", "This document.", {
            "200": _ok("The OpenAPI document.", {"type": "object"})}, "400")},
        "/healthz": {"get": _operation("getHealth", "Liveness (no token; any query is"
                                       " ignored).", {"200": health}, "400Request",
                                       public=True)},
    }  # fmt: skip


def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (a fresh dict each call)."""
    schemas = {**_tensor_schemas(), **_submission_schemas(), **_task_schemas(),
               **_mesh_schemas()}  # fmt: skip
    responses = {
        f"E{status}": _ok(text, _ref("Error"), _HEADERS.get(status))
        for status, text in _ERROR_RESPONSES.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "meshinfer coordinator API", "version": API_VERSION,
                 "description": "Submit, watch and cancel inference tasks on a vehicle mesh."
                 " Every GET operation answers HEAD too: its status and headers, no body"
                 " (HEAD on /wait answers at once). A path no operation serves is answered"
                 " 404 not_found, and a method not served on a path 405 method_not_allowed"
                 " with Allow (the token is asked for first)."},
        "security": [{"bearerAuth": []}],
        "paths": {**_task_paths(), **_other_paths()},
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "The fleet's api-token file (meshinfer-coord fleet init)."}},
        },
    }  # fmt: skip
