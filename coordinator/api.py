"""The coordinator's HTTP API v1 (aiohttp): submit, watch and cancel tasks; see the mesh.

Routes (the OpenAPI document in :mod:`coordinator.openapi` describes each one)::

    POST /v1/tasks                 submit (202 new, 200 identical resubmit, 409 other spec)
    GET  /v1/tasks                 list: state, model, since, limit, cursor
    GET  /v1/tasks/{id}            the task, its items and result (?outputs=false: no tensors)
    GET  /v1/tasks/{id}/wait       the same, once finished or after ?timeout= seconds
    POST /v1/tasks/{id}/cancel     cancel
    GET  /v1/nodes, /v1/stats      the mesh as the coordinator sees it; its counters
    GET  /v1/revocations           the certificate revocation list in force here
    POST /v1/revocations           merge a signed list (the fleet's revocations.bin as the body,
                                   application/octet-stream); gossip spreads it to the fleet
    GET  /metrics                  Prometheus text (meshinfer_coord_*, the mesh's meshinfer_*)
    GET  /openapi.json             the OpenAPI 3.1 document
    GET  /healthz                  liveness; the only route without the bearer token

Every GET route answers HEAD too (its status and headers, no body), as HTTP has it (RFC 9110
9.3.2); the OpenAPI document lists the GET operations only.

Every request passes three middlewares, outermost first: ``_observe`` (counts and times it by
route and status), ``_errors`` (turns every exception into the JSON error
``{"error": {"status", "code", "message"}}``; an unexpected one is logged and answered 500,
never with its traceback) and ``_auth`` (``Authorization: Bearer <token>``, compared in constant
time). A request aiohttp rejects before any middleware runs (one it cannot parse) gets the same
JSON error, 400 ``bad_request``, from the connection itself (:mod:`coordinator.api_errors`,
which holds the errors and the aiohttp internals this relies on), and is counted under route
``unparsed``.
Query parameters are read strictly (on every route but ``/metrics`` and ``/healthz``): an
unknown, repeated or malformed one is a 400 ``bad_parameter`` naming it. Large bodies are
parsed, and large results rendered, in a worker thread so the event loop keeps serving.

Concurrency: every coroutine runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import errno
import hmac
import json
import logging
import math
import random
import re
import sqlite3
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from aiohttp import web

from coordinator.api_errors import ApiError, ApiRunner, from_http_exception
from coordinator.api_errors import json_response as _json
from coordinator.journal import (
    MAX_PAGE,
    ItemRecord,
    TaskConflictError,
    TaskRecord,
    TaskSummary,
    UnknownTaskError,
)
from coordinator.openapi import openapi_document
from coordinator.service import Coordinator
from meshinfer.errors import ConfigError, RevocationError
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.proto.identity import MAX_REVOCATION_LIST_BYTES, RevocationList
from meshinfer.proto.tasks import Pattern, TaskSpec, TaskState, new_task_id
from meshinfer.proto.tasks_codec import spec_from_dict
from meshinfer.proto.tasks_wire import DTYPES, MAX_NDIM
from meshinfer.runtime.http_log import LINGER_S, ClientErrorLog
from meshinfer.runtime.mesh_metrics import mesh_families
from meshinfer.runtime.metrics import MetricFamily, MetricsRegistry, family, render_family
from meshinfer.runtime.revocations import RevocationSync
from meshinfer.transport.base import Address

__all__ = [
    "DEFAULT_PAGE",
    "DEFAULT_WAIT_S",
    "MAX_WAIT_S",
    "ApiError",
    "CoordinatorApi",
    "body_to_spec",
    "coordinator_families",
    "item_doc",
    "json_safe",
    "parse_json",
    "summary_doc",
    "task_doc",
    "tensor_from_json",
    "tensor_to_json",
]

log = logging.getLogger(__name__)

#: ``/wait`` waits this long when no ``timeout`` is given, and at most :data:`MAX_WAIT_S`.
DEFAULT_WAIT_S = 30.0
MAX_WAIT_S = 300.0
#: A listing page holds this many tasks when no ``limit`` is given (at most MAX_PAGE, 1000).
DEFAULT_PAGE = 100
#: Bodies and results larger than this are parsed or rendered in a worker thread.
_OFF_LOOP_BYTES = 256 * 1024
#: Requests still running this long after ``aclose`` began are cancelled.
_SHUTDOWN_GRACE_S = 5.0
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_STATES = tuple(s.value for s in TaskState)


def _out_of_space(exc: BaseException) -> bool:
    """True for a journal write (SQLite's SQLITE_FULL) or a file write that found the disk full."""
    if isinstance(exc, sqlite3.OperationalError):
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        return full or str(exc) == "database or disk is full"
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def revocations_doc(listed: RevocationList) -> dict[str, Any]:
    """``{"version", "entries": [...]}`` of a revocation list, oldest entry first."""
    return {"version": listed.version, "entries": listed.records()}


def _doc_bytes(listed: RevocationList) -> int:
    """About how large ``listed``'s JSON document is (a long list is built off the loop)."""
    return 300 * len(listed.entries)


# --- the server ------------------------------------------------------------------------------


class CoordinatorApi:
    """Serves :class:`~coordinator.service.Coordinator` over HTTP at ``listen``.

    ``start`` binds (port 0 picks a free port; :attr:`url` then names it) and ``aclose`` stops
    it (idempotent); also an async context manager. ``token`` is the fleet's API token;
    ``max_body_bytes`` caps a request body (413 beyond); ``max_upload_bytes`` caps the bytes
    of all the task submissions being read and parsed at once (a submission that would go
    beyond waits for none: it gets 503 ``busy`` and a ``Retry-After``; one submission alone is
    always let in); ``rng`` draws the ids of tasks submitted without one.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        listen: Address,
        token: str,
        *,
        max_body_bytes: int = 64 << 20,
        max_upload_bytes: int = 256 << 20,
        rng: random.Random | None = None,
    ) -> None:
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            # (an HTTP header carries ASCII: a client cannot send other text the same way)
            raise ConfigError("api token must be non-empty printable ASCII without spaces")
        if max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes {max_body_bytes} must be positive")
        if max_upload_bytes < max_body_bytes:
            raise ConfigError(f"max_upload_bytes {max_upload_bytes} is below max_body_bytes")
        self.coordinator = coordinator
        self.listen = listen
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self._uploading = 0  # bytes of the submissions being read and parsed now
        self._token = token.encode()
        self._rng = rng or random.SystemRandom()
        self._json_work = BoundedExecutor(2, name="coord-api-json")
        self._openapi = openapi_document()
        self.registry = MetricsRegistry()
        self._requests = self.registry.counter(
            "meshinfer_coord_api_requests_total",
            "API requests by method, route and status.",
            ("method", "route", "status"),
        )
        self._latency = self.registry.histogram(
            "meshinfer_coord_api_request_seconds", "API request duration by route.", ("route",)
        )
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._url = ""

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._observe, self._errors, self._auth],
            client_max_size=self.max_body_bytes,
        )
        app.add_routes([  # (web.get's routes answer HEAD too: allow_head)
            web.post("/v1/tasks", self.submit),
            web.get("/v1/tasks", self.list_tasks),
            web.get("/v1/tasks/{id}", self.get_task),
            web.get("/v1/tasks/{id}/wait", self.wait_task),
            web.post("/v1/tasks/{id}/cancel", self.cancel_task),
            web.get("/v1/nodes", self.nodes),
            web.get("/v1/stats", self.stats),
            web.get("/v1/revocations", self.revocations),
            web.post("/v1/revocations", self.push_revocations),
            web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi),
            web.get("/healthz", self.healthz),
        ])  # fmt: skip
        return app

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` once started (empty before)."""
        return self._url

    async def start(self) -> None:
        """Bind and start serving; readiness is when this returns."""
        # a body answered before it was read whole (an error: too large, unauthorized...) is
        # read on and dropped for LINGER_S at most, not aiohttp's 10 s: long enough for the
        # client to read the answer before the close (closing on unread bytes resets the
        # connection), short enough not to hold a handler for a client that keeps sending
        runner = ApiRunner(
            self.app, self._count_unparsed, access_log=None, handle_signals=False,
            logger=ClientErrorLog(log), shutdown_timeout=_SHUTDOWN_GRACE_S,
            lingering_time=LINGER_S,
        )  # fmt: skip
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.listen.host, self.listen.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def aclose(self) -> None:
        """Stop serving and release the JSON workers. Idempotent.

        Open ``/wait`` calls answer at once with the task as it is; other requests get
        :data:`_SHUTDOWN_GRACE_S` seconds to finish.
        """
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._json_work.aclose()

    async def __aenter__(self) -> CoordinatorApi:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- middlewares -----------------------------------------------------------------------

    @web.middleware
    async def _observe(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        clock = asyncio.get_running_loop().time
        started = clock()
        response = await handler(request)
        route = _route_label(request)
        method = request.method if request.method in _METHODS else "other"
        self._requests.labels(method, route, str(response.status)).inc()
        self._latency.labels(route).observe(clock() - started)
        return response

    def _count_unparsed(self, method: str, status: int) -> None:
        """Count a request the connection answered itself (one aiohttp could not parse)."""
        method = method if method in _METHODS else "other"
        self._requests.labels(method, "unparsed", str(status)).inc()

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            return from_http_exception(exc, request, self.max_body_bytes).response()
        except UnknownTaskError as exc:
            return ApiError(404, "not_found", str(exc)).response()
        except TaskConflictError as exc:
            return ApiError(409, "conflict", str(exc)).response()
        except Exception as exc:
            if _out_of_space(exc):  # an operator's problem, not a bug: one line, no traceback
                log.error(
                    "API %s %s: out of disk space: %s", request.method, request.path[:200], exc
                )
                message = (
                    "the coordinator is out of disk space: its journal could not record this"
                    " request, which changed nothing; retry once space is freed"
                )
                return ApiError(507, "insufficient_storage", message).response()
            log.exception("API %s %s failed", request.method, request.path[:200])
            message = "the coordinator failed to handle this request; the error is logged"
            return ApiError(500, "internal", message).response()

    @web.middleware
    async def _auth(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        public = request.method in ("GET", "HEAD") and request.path == "/healthz"
        if not public and not self._authorized(request.headers.get("Authorization", "")):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong bearer token: send 'Authorization: Bearer <api token>'",
                {"WWW-Authenticate": 'Bearer realm="meshinfer-coordinator"'},
            )
        return await handler(request)

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "backslashreplace"), self._token)

    # --- tasks -----------------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.Response:
        """POST /v1/tasks."""
        _query(request, set())
        _require_type(request, "application/json")
        _require_utf8(request)
        size = request.content_length
        if size is None or size > self.max_body_bytes:  # chunked: it may be as large as allowed
            size = self.max_body_bytes
        if self._uploading and self._uploading + size > self.max_upload_bytes:
            raise ApiError(
                503, "busy", "too many task submissions are being uploaded; retry shortly",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        self._uploading += size
        try:
            return await self._submit(request)
        finally:
            self._uploading -= size

    async def _submit(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        spec = await self._off_loop(len(body), self._spec_from_body, body)
        existed = await self._exists(spec.task_id)
        try:
            task_id = await self.coordinator.submit(spec, will_wait=False)
        except TaskConflictError:
            raise ApiError(
                409, "conflict", f"task_id {spec.task_id!r} is already used by a different task"
            ) from None
        except ConfigError as exc:  # e.g. an aggregation the task's models cannot satisfy
            raise ApiError(400, "invalid_task", str(exc)) from None
        summary = (await self.coordinator.get(task_id)).summary
        location = f"/v1/tasks/{task_id}"
        doc = {"task_id": task_id, "state": summary.state.value,
               "items_total": summary.items_total, "location": location}  # fmt: skip
        return _json(doc, status=200 if existed else 202, headers={"Location": location})

    async def _read_body(self, request: web.Request, cap: int | None = None) -> bytes:
        """The request's body, 413 past ``cap`` (at most, and by default, ``max_body_bytes``):
        a chunked body is read no further than that."""
        cap = self.max_body_bytes if cap is None else min(cap, self.max_body_bytes)
        length = request.content_length
        if length is not None and length > cap:
            raise _too_large(cap)
        try:
            if cap == self.max_body_bytes:
                return await request.read()  # HTTPRequestEntityTooLarge past client_max_size
            body = bytearray()
            async for chunk in request.content.iter_any():
                body += chunk
                if len(body) > cap:
                    raise _too_large(cap)
            return bytes(body)
        except web.RequestPayloadError:  # e.g. bytes that do not decode as their encoding
            encoding = request.headers.get("Content-Encoding", "identity")[:40]
            message = f"the body cannot be read as sent (Content-Encoding {encoding!r})"
            raise ApiError(400, "bad_request", message) from None
        except ConnectionResetError:  # the client went away mid-body: its fault, not a bug
            message = "the connection closed before the whole body arrived"
            raise ApiError(400, "bad_request", message) from None

    def _spec_from_body(self, body: bytes) -> TaskSpec:
        return body_to_spec(parse_json(body), lambda: new_task_id(self._rng, time.time()))

    async def _exists(self, task_id: str) -> bool:
        try:
            await self.coordinator.get(task_id)
        except UnknownTaskError:
            return False
        return True

    async def list_tasks(self, request: web.Request) -> web.Response:
        """GET /v1/tasks."""
        query = _query(request, {"state", "model", "since", "limit", "cursor"})
        filters = _list_filters(query)
        try:
            page = await self.coordinator.list_tasks(**filters)
        except ConfigError as exc:  # a cursor this journal never handed out
            raise ApiError(400, "bad_parameter", f"cursor: {exc}") from None
        doc = {"tasks": [summary_doc(s) for s in page.tasks], "next_cursor": page.next_cursor}
        return _json(doc)

    async def get_task(self, request: web.Request) -> web.Response:
        """GET /v1/tasks/{id}."""
        query = _query(request, {"outputs"})
        outputs = _bool_param(query, "outputs", default=True)
        record = await self.coordinator.get(request.match_info["id"])
        return await self._task_response(record, outputs)

    async def wait_task(self, request: web.Request) -> web.Response:
        """GET /v1/tasks/{id}/wait."""
        query = _query(request, {"timeout", "outputs"})
        timeout = _number_param(query, "timeout", DEFAULT_WAIT_S, 0.0, MAX_WAIT_S)
        outputs = _bool_param(query, "outputs", default=True)
        record = await self._wait(request.match_info["id"], timeout)
        return await self._task_response(record, outputs)

    async def _wait(self, task_id: str, timeout: float) -> TaskRecord:
        """The task once it ended, the timeout passed or the server began to close."""
        waiting = asyncio.ensure_future(self.coordinator.wait(task_id, timeout=timeout))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({waiting, closing}, return_when=asyncio.FIRST_COMPLETED)
            ended = waiting.done()
        finally:
            closing.cancel()
            if not waiting.done():
                waiting.cancel()
        return waiting.result() if ended else await self.coordinator.get(task_id)

    async def _task_response(self, record: TaskRecord, outputs: bool) -> web.Response:
        size = len(record.result_summary or b"")
        waiting = self.coordinator.waiting(record.task_id)  # on the loop: it reads membership
        doc = await self._off_loop(size, self._task_doc, record, outputs, waiting)
        return _json(doc)

    def _task_doc(self, record: TaskRecord, outputs: bool, waiting: Mapping[str, str]) -> dict:
        result = self.coordinator.result_of(record)
        default = self.coordinator.config.default_aggregation
        return task_doc(
            record, result, outputs=outputs, waiting=waiting, default_aggregation=default
        )

    async def cancel_task(self, request: web.Request) -> web.Response:
        """POST /v1/tasks/{id}/cancel (a body, if any, is ignored)."""
        _query(request, set())
        task_id = request.match_info["id"]
        cancelled = await self.coordinator.cancel(task_id)
        state = (await self.coordinator.get(task_id)).state.value
        return _json({"task_id": task_id, "cancelled": cancelled, "state": state})

    # --- the mesh, metrics, health, the document -------------------------------------------

    async def nodes(self, request: web.Request) -> web.Response:
        """GET /v1/nodes."""
        _query(request, set())
        return _json({"nodes": json_safe(self.coordinator.nodes())})

    async def stats(self, request: web.Request) -> web.Response:
        """GET /v1/stats."""
        _query(request, set())
        return _json(json_safe(await self.coordinator.stats()))

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: the API's own metrics, the coordinator's, then its mesh's (handshakes,
        sessions, membership, revocations: as a node daemon names them)."""
        stats = await self.coordinator.stats()
        families = coordinator_families(stats, self.coordinator.nodes())
        families += mesh_families(self.coordinator.mesh)
        text = self.registry.render() + "".join(render_family(f) for f in families)
        return web.Response(
            body=text.encode(), headers={"Content-Type": self.registry.content_type}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        """GET /openapi.json."""
        _query(request, set())
        return _json(self._openapi)

    # --- certificate revocations ----------------------------------------------------------

    async def revocations(self, request: web.Request) -> web.Response:
        """GET /v1/revocations."""
        _query(request, set())
        listed = self._revocation_sync().revocations
        return _json(await self._off_loop(_doc_bytes(listed), revocations_doc, listed))

    async def push_revocations(self, request: web.Request) -> web.Response:
        """POST /v1/revocations: the body is a revocation list file as ``meshinfer fleet
        revoke`` writes it; every entry is verified against the fleet's authority, then merged
        (a set union: pushing an older or the same list changes nothing) and gossiped."""
        _query(request, set())
        _require_type(request, "application/octet-stream", " (the revocations.bin file)")
        sync = self._revocation_sync()
        body = await self._read_body(request, MAX_REVOCATION_LIST_BYTES)
        try:  # (an Ed25519 check per entry: off the loop)
            listed = await asyncio.to_thread(RevocationList.from_bytes, body, sync.trust)
            merged = await sync.merge_list(listed, "the HTTP API")
        except RevocationError as exc:
            raise ApiError(400, "invalid_revocations", str(exc)) from None
        listed = sync.revocations
        doc = await self._off_loop(_doc_bytes(listed), revocations_doc, listed)
        return _json({**doc, "merged": merged})

    def _revocation_sync(self) -> RevocationSync:
        sync = self.coordinator.mesh.revocation_sync
        if sync is None:
            raise ApiError(503, "unavailable", "this coordinator runs no revocation sync")
        return sync

    async def healthz(self, request: web.Request) -> web.Response:
        """GET /healthz (no token needed)."""
        return _json({"status": "ok"})

    async def _off_loop(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` here when ``size`` is small, else in a worker thread."""
        if size < _OFF_LOOP_BYTES:
            return fn(*args)
        return await self._json_work.run(fn, *args)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_label(request: web.Request) -> str:
    """The route template (``/v1/tasks/{id}``), or ``unmatched``: bounded label values."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _too_large(cap: int) -> ApiError:
    return ApiError(413, "too_large", f"request body over the limit of {cap} bytes")


def _require_type(request: web.Request, media_type: str, what: str = "") -> None:
    """415 unless the body is ``media_type`` (``what``: how the message names that body)."""
    if request.content_type == media_type:  # (none sent reads as application/octet-stream)
        return
    sent = request.headers.get("Content-Type")
    problem = "the request has none" if sent is None else f"not {request.content_type!r}"
    raise ApiError(
        415, "unsupported_media_type", f"Content-Type must be {media_type}{what}, {problem}"
    )


def _require_utf8(request: web.Request) -> None:
    """415 for a JSON body declared in another charset than UTF-8: JSON exchanged between
    systems is UTF-8 (RFC 8259 8.1), and the body is read as such, never as declared."""
    charset = request.charset  # (the Content-Type's charset parameter; None: not given)
    if charset is None or _codec_name(charset) == "utf-8":
        return
    raise ApiError(
        415, "unsupported_media_type",
        f"the JSON body must be UTF-8 (RFC 8259), not charset={charset[:40]!r}: send it"
        " encoded as UTF-8 with Content-Type application/json (or charset=utf-8)",
    )  # fmt: skip


def _codec_name(charset: str) -> str | None:
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None


# --- query parameters ------------------------------------------------------------------------


def _query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    """The query as a dict; 400 for a parameter that is unknown or given twice."""
    out: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise _bad_parameter(name, f"unknown query parameter (known: {known})")
        if name in out:
            raise _bad_parameter(name, "given more than once")
        out[name] = value
    return out


def _bad_parameter(name: str, problem: str) -> ApiError:
    return ApiError(400, "bad_parameter", f"{name[:64]}: {problem}")


def _number_param(
    query: dict[str, str], name: str, default: float | None, lo: float, hi: float
) -> float | None:
    raw = query.get(name)
    if raw is None:
        return default
    value = float(raw) if _NUMBER.fullmatch(raw) else math.nan
    if not (math.isfinite(value) and lo <= value <= hi):
        raise _bad_parameter(name, f"{raw[:40]!r} is not a number in {lo:g}..{hi:g}")
    return value


def _int_param(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not lo <= int(raw) <= hi:
        raise _bad_parameter(name, f"{raw[:40]!r} is not an integer in {lo}..{hi}")
    return int(raw)


def _bool_param(query: dict[str, str], name: str, *, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise _bad_parameter(name, f"{raw[:40]!r} is not true or false")
    return raw == "true"


def _list_filters(query: dict[str, str]) -> dict[str, Any]:
    state = query.get("state")
    if state is not None and state not in _STATES:
        raise _bad_parameter("state", f"{state[:40]!r} is not one of {list(_STATES)}")
    model = query.get("model")
    if model is not None and (not model or "@" in model):
        raise _bad_parameter("model", "give a model id, without @version")
    cursor = query.get("cursor")
    if cursor is not None and not cursor:
        raise _bad_parameter("cursor", "must not be empty")
    return {
        "state": state,
        "model": model,
        "since": _number_param(query, "since", None, -math.inf, math.inf),
        "limit": _int_param(query, "limit", DEFAULT_PAGE, 1, MAX_PAGE),
        "cursor": cursor,
    }


# --- request bodies --------------------------------------------------------------------------


def parse_json(body: bytes) -> Any:
    """The JSON value of a body: UTF-8, no NaN/Infinity, no key twice; 400 bad_json if not."""
    if not body.strip():
        raise ApiError(400, "bad_json", "the request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
        doc = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not UTF-8 text: {exc.reason}") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text) is not None:  # rare: check the strings only then
        _no_lone_surrogates(doc)
    return doc


#: A ``\uD800``..``\uDFFF`` escape: half of a pair, or a lone surrogate (which is not text).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_lone_surrogates(doc: Any) -> None:
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        message = "a string holds a lone surrogate escape (\\ud800..\\udfff), which is not text"
        raise ApiError(400, "bad_json", message) from None


def _no_constant(name: str) -> Any:
    raise ApiError(400, "bad_json", f"the body holds {name}, which is not JSON; send numbers")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ApiError(400, "bad_json", f"key {twice[:64]!r} appears twice in one object")
    return doc


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_task", message)


def body_to_spec(body: Any, new_id: Callable[[], str]) -> TaskSpec:
    """A validated spec from a submitted JSON document (ApiError 400 naming the bad key).

    Translates the JSON conveniences (``model``, string model refs, ``values`` and
    ``data_b64`` tensors, a missing ``task_id``) into the layout of
    :func:`~meshinfer.proto.tasks_codec.spec_from_dict`, which checks every key.
    """
    if not isinstance(body, dict):
        raise _invalid(f"the body must be a JSON object (a task), not {_kind(body)}")
    raw = dict(body)
    if "model" in raw:
        if "models" in raw:
            raise _invalid("model: give either model or models, not both")
        raw["models"] = [raw.pop("model")]
    if "models" in raw and isinstance(raw["models"], list):
        raw["models"] = [_model_ref(m, f"models[{i}]") for i, m in enumerate(raw["models"])]
    if "stages" in raw and isinstance(raw["stages"], list):
        raw["stages"] = [_stage(s, i) for i, s in enumerate(raw["stages"])]
    if "inputs" in raw:
        raw["inputs"] = tensor_from_json(raw["inputs"])
    raw.setdefault("task_id", new_id())
    try:
        return spec_from_dict(raw)
    except ConfigError as exc:  # InvalidTaskError
        raise _invalid(str(exc)) from None


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _model_ref(raw: Any, path: str) -> Any:
    """``"id@version"`` / ``"id"`` as a model map; a map passes on (spec_from_dict checks it)."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        wanted = '"id@version" or {"model_id", "version"}'
        raise _invalid(f"{path}: expected {wanted}, not {_kind(raw)}")
    model_id, at, version = raw.partition("@")
    return {"model_id": model_id, "version": version if at else "1"}


def _stage(raw: Any, index: int) -> Any:
    if isinstance(raw, dict) and "model" in raw:
        return {**raw, "model": _model_ref(raw["model"], f"stages[{index}].model")}
    return raw


_B64_KEYS = frozenset({"dtype", "shape", "data_b64"})
_VALUES_KEYS = frozenset({"dtype", "values"})


def tensor_from_json(raw: Any) -> dict[str, Any]:
    """``{"dtype", "shape", "data_b64"}`` or ``{"values", "dtype"?}`` as spec_from_dict's
    ``{"data", "dtype", "shape"}`` (ApiError 400 naming the key)."""
    if not isinstance(raw, dict):
        raise _invalid(f"inputs: expected a tensor object, not {_kind(raw)}")
    keys = _VALUES_KEYS if "values" in raw else _B64_KEYS
    unknown = sorted(set(raw) - keys)
    if unknown:
        form = "values" if "values" in raw else "data_b64"
        raise _invalid(f"inputs: unknown key {unknown[0][:64]!r} in a {form} tensor")
    if "values" in raw:
        return _values_tensor(raw["values"], raw.get("dtype", "float32"))
    text = raw.get("data_b64")
    if not isinstance(text, str):
        raise _invalid(f"inputs.data_b64: expected a base64 string, not {_kind(text)}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("inputs.data_b64: not valid base64") from None
    _check_finite_b64(data, raw.get("dtype"))
    return {**{k: v for k, v in raw.items() if k != "data_b64"}, "data": data}


def _check_finite_b64(data: bytes, dtype: Any) -> None:
    """Floats sent as base64 must be finite, as ``values`` must be: NaN or infinity would fail
    on the node after the task was journaled, or poison an average. (A dtype or length that
    does not fit is refused by the spec's own check.)"""
    if dtype not in ("float16", "float32") or len(data) % np.dtype(dtype).itemsize:
        return
    if not np.isfinite(np.frombuffer(data, np.dtype(dtype).newbyteorder("<"))).all():
        raise _invalid(f"inputs.data_b64: holds NaN or infinity ({dtype})")


def _values_tensor(values: Any, dtype: Any) -> dict[str, Any]:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _invalid(f"inputs.dtype: {str(dtype)[:40]!r} is not one of {sorted(DTYPES)}")
    leaf = bool if dtype == "bool" else (int, float)
    if not isinstance(values, list) or not _nested(values, leaf, 0):
        kind = "booleans" if dtype == "bool" else "numbers"
        raise _invalid(f"inputs.values: expected an array of {kind} or nested arrays (<= 8 deep)")
    try:
        with np.errstate(over="raise", invalid="raise"), warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # NumPy 1.x: int out of range
            array = np.array(values, dtype=dtype)
    except (ValueError, OverflowError, TypeError, FloatingPointError, DeprecationWarning) as exc:
        raise _invalid(f"inputs.values: cannot be a {dtype} tensor ({exc})") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _invalid(f"inputs.values: out of range for {dtype}")
    if array.dtype.kind in "iu" and not np.array_equal(array, np.array(values, dtype=object)):
        raise _invalid(f"inputs.values: not whole numbers within the range of {dtype}")
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"data": wire.tobytes(), "dtype": dtype, "shape": list(array.shape)}


def _nested(value: Any, leaf: type | tuple[type, ...], depth: int) -> bool:
    """A rectangular-or-not nest of lists, at most MAX_NDIM deep, of ``leaf`` values."""
    if isinstance(value, list):
        return depth < MAX_NDIM and all(_nested(v, leaf, depth + 1) for v in value)
    if leaf is bool:
        return type(value) is bool
    return type(value) in leaf


# --- response documents ----------------------------------------------------------------------


def summary_doc(summary: TaskSummary) -> dict[str, Any]:
    """A task as listed."""
    return {
        "task_id": summary.task_id, "state": summary.state.value, "pattern": summary.pattern,
        "priority": summary.priority, "policy": summary.policy,
        "created_at": summary.created_at, "updated_at": summary.updated_at,
        "error": summary.error, "items_total": summary.items_total,
        "items_done": summary.items_done,
    }  # fmt: skip


def item_doc(item: ItemRecord, waiting: str | None = None) -> dict[str, Any]:
    """One work item of a task document; ``waiting``: why it is on no node (live items)."""
    return {
        "item_id": item.item_id, "state": item.state.value, "node": item.node,
        "attempt": item.attempt, "refused": item.refused, "error": item.error,
        "model": str(item.model),
        "stage": item.stage or None, "position": item.position,
        "has_result": item.result is not None, "waiting": waiting,
    }  # fmt: skip


def tensor_to_json(array: np.ndarray) -> dict[str, Any]:
    """An output array as ``{"dtype", "shape", "data_b64"}`` (C order, little-endian)."""
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    data = base64.b64encode(wire.tobytes()).decode("ascii")
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data_b64": data}


def task_doc(
    record: TaskRecord,
    result: dict[str, Any] | None,
    *,
    outputs: bool,
    waiting: Mapping[str, str] | None = None,
    default_aggregation: str | None = None,
) -> dict:
    """The document of GET /v1/tasks/{id}: summary, deadline, aggregation (a parallel task's:
    ``default_aggregation`` stands for a mode the task left to the coordinator), items (with
    why those on no node wait, from ``waiting``) and result (outputs optional)."""
    doc = summary_doc(record.summary)
    deadline = record.spec.deadline_s
    doc["deadline_s"] = deadline
    doc["expires_at"] = None if deadline is None else record.summary.created_at + deadline
    doc["aggregation"] = aggregation_doc(record.spec, default_aggregation)
    waiting = waiting or {}
    doc["items"] = [item_doc(i, waiting.get(i.item_id)) for i in record.items]
    doc["result"] = None
    if result is not None:
        doc["result"] = {
            "labels": result.get("labels"),
            "nodes": json_safe(result.get("nodes") or {}),
            "aggregation": json_safe(result.get("aggregation")),
        }
        if outputs:
            doc["result"]["outputs"] = [tensor_to_json(a) for a in result.get("outputs", [])]
    return doc


def aggregation_doc(spec: TaskSpec, default_mode: str | None) -> dict[str, Any] | None:
    """How a parallel task aggregates, as accepted (None for the other patterns): the mode
    (``default_mode`` when it named none), its options (null: the default) and weights."""
    if spec.pattern != Pattern.PARALLEL:
        return None
    return {
        "mode": spec.aggregation or default_mode, "quorum": spec.quorum,
        "min_responses": spec.min_responses, "timeout_s": spec.aggregation_timeout_s,
        "weights": {str(ref): weight for ref, weight in spec.weights.items()},
    }  # fmt: skip


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, bytes as base64, NumPy scalars as numbers, keys as str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- metrics ---------------------------------------------------------------------------------


def coordinator_families(stats: Mapping[str, Any], nodes: list[dict]) -> list[MetricFamily]:
    """``meshinfer_coord_*`` families from :meth:`Coordinator.stats` and :meth:`.nodes`."""
    tasks, items = stats.get("tasks", {}), stats.get("items", {})
    by_status: dict[str, int] = {}
    for node in nodes:
        by_status[node["status"]] = by_status.get(node["status"], 0) + 1
    counters = [
        ("dispatched", "Work items sent to nodes."),
        ("retries", "Work item attempts retried."),
        ("refusals", "Retried attempts a node refused, handed back or never got (uncounted)."),
        ("duplicates", "Duplicate or late results refused."),
        ("foreign_results", "Results refused: their attempt went to another node."),
        ("redispatched_after_death", "Items re-sent after their node died or left."),
        ("redispatched_after_disconnect", "Items re-sent after their node's session was lost."),
        ("sessions_lost", "Node sessions that ended lost (no Close frame, or silent)."),
        ("redials_ok", "Lost node sessions whose node then answered a ping."),
        ("resent_after_redial", "Items sent again to a node reachable after a lost session."),
        ("inputs_by_reference", "Items sent naming their input by sha256, not its bytes."),
        ("input_bytes_saved", "Input bytes not sent because the node kept them."),
        ("input_cache_misses", "Inputs named by reference that the node no longer held."),
        ("stale_tells", "Dispatch or running marks of items that had ended (a race; no loss)."),
    ]
    return [
        family("meshinfer_coord_tasks", "gauge", "Journaled tasks by state.",
               [({"state": s}, tasks.get(s, 0)) for s in _STATES]),
        family("meshinfer_coord_items", "gauge", "Journaled work items by state.",
               [({"state": s}, items.get(s, 0)) for s in _STATES]),
        *(family(f"meshinfer_coord_{name}_total", "counter", text, [({}, stats.get(name, 0))])
          for name, text in counters),
        family("meshinfer_coord_journal_events_total", "counter",
               "Journal counters (refused results, ignored failures) by name.",
               [({"name": k}, v) for k, v in sorted(stats.get("journal_counters", {}).items())]),
        family("meshinfer_coord_completed_total", "counter", "Work items completed by node"
               " (nodes long gone are folded into the node (gone)).",
               [({"node": k}, v) for k, v in sorted(stats.get("completed_by_node", {}).items())]),
        family("meshinfer_coord_live_tasks", "gauge", "Tasks in flight.",
               [({}, stats.get("live_tasks", 0))]),
        family("meshinfer_coord_parked_items", "gauge", "Items waiting for a capable node.",
               [({}, stats.get("parked_items", 0))]),
        family("meshinfer_coord_nodes_alive", "gauge", "Members the coordinator sees alive.",
               [({}, by_status.get("alive", 0))]),
        family("meshinfer_coord_nodes", "gauge", "Members by status.",
               [({"status": s}, n) for s, n in sorted(by_status.items())]),
    ]  # fmt: skip
