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
9.3.2; HEAD on ``/wait`` answers at once, without waiting); the OpenAPI document lists the GET
operations only. A body in a Content-Encoding not decoded here is refused, 415.

Every request passes three middlewares, outermost first: ``_observe`` (counts and times it by
route and status), ``_errors`` (turns every exception into the JSON error
``{"error": {"status", "code", "message"}}``; an unexpected one is logged and answered 500,
never with its traceback) and ``_auth`` (``Authorization: Bearer <token>``, compared in constant
time; a request with more than one ``Authorization`` header is refused first, 400
``bad_request``, as a proxy might have read another one). A path no route serves reaches the
catch-all route :meth:`CoordinatorApi.no_route` (404, or 405 with ``Allow``) behind the same
middlewares, counted under route ``unmatched``. A request aiohttp rejects before any
middleware runs (one it cannot parse) gets the same JSON error, 400 ``bad_request``, from the
connection itself (:mod:`coordinator.api_errors`, which holds the errors and the aiohttp
internals this relies on), and is counted under route ``unparsed``.
Query parameters are read strictly (on every route but ``/metrics`` and ``/healthz``): an
unknown, repeated or malformed one is a 400 ``bad_parameter`` naming it. Large bodies are
parsed, and large results rendered, in a worker thread so the event loop keeps serving.

This module holds the server (:class:`CoordinatorApi`: the application, its middlewares, the
lifecycle) and the routes of the mesh; the rest lives beside it, and every public name is
importable from here too: :mod:`coordinator.api_tasks` (the task routes),
:mod:`coordinator.api_requests` (reading headers, query parameters and bodies),
:mod:`coordinator.api_documents` (the JSON documents and metric families answered),
:mod:`coordinator.api_errors` (the JSON errors) and :mod:`coordinator.openapi`.

Concurrency: every coroutine runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from coordinator.api_documents import (
    aggregation_doc,
    coordinator_families,
    item_doc,
    json_safe,
    revocations_doc,
    revocations_doc_bytes,
    summary_doc,
    task_doc,
    tensor_to_json,
)
from coordinator.api_errors import (
    ApiError,
    ApiRunner,
    body_response,
    from_http_exception,
    json_body,
)
from coordinator.api_errors import json_response as _json
from coordinator.api_requests import (
    DEFAULT_PAGE,
    body_to_spec,
    check_expect,
    defer_expect,
    parse_json,
    read_body,
    require_type,
    strict_query,
    tensor_from_json,
)
from coordinator.api_tasks import DEFAULT_WAIT_S, MAX_WAIT_S, TaskRoutes
from coordinator.journal import TaskConflictError, UnknownTaskError
from coordinator.openapi import openapi_document
from coordinator.service import Coordinator
from meshinfer.errors import ConfigError, RevocationError
from meshinfer.inference.executor import BoundedExecutor
from meshinfer.proto.identity import MAX_REVOCATION_LIST_BYTES, RevocationList
from meshinfer.runtime.http_log import LINGER_S, ClientErrorLog
from meshinfer.runtime.mesh_metrics import mesh_families
from meshinfer.runtime.metrics import MetricsRegistry
from meshinfer.runtime.revocations import RevocationSync
from meshinfer.transport.base import Address

__all__ = [
    "DEFAULT_PAGE",
    "DEFAULT_WAIT_S",
    "MAX_WAIT_S",
    "ApiError",
    "CoordinatorApi",
    "aggregation_doc",
    "body_to_spec",
    "coordinator_families",
    "item_doc",
    "json_safe",
    "parse_json",
    "revocations_doc",
    "summary_doc",
    "task_doc",
    "tensor_from_json",
    "tensor_to_json",
]

log = logging.getLogger(__name__)

#: Bodies and results larger than this are parsed or rendered in a worker thread.
_OFF_LOOP_BYTES = 256 * 1024
#: Requests still running this long after ``aclose`` began are cancelled.
_SHUTDOWN_GRACE_S = 5.0
#: The ``Retry-After`` (seconds) of a 503 ``shutting_down``: about a restart's time.
_SHUTDOWN_RETRY_AFTER = "5"
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
#: The name of the route of every path no other route serves (:meth:`CoordinatorApi.no_route`).
_NO_ROUTE = "unmatched"


def _out_of_space(exc: BaseException) -> bool:
    """True for a journal write (SQLite's SQLITE_FULL) or a file write that found the disk full."""
    if isinstance(exc, sqlite3.OperationalError):
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        return full or str(exc) == "database or disk is full"
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


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
        self._token = token.encode()
        self._json_work = BoundedExecutor(2, name="coord-api-json")
        self._closing = asyncio.Event()
        self._close_lock = asyncio.Lock()
        self._drain_cut = False  # an aclose was cancelled mid-drain: the next one is abrupt
        self._handling: set[asyncio.Task[Any]] = set()  # the tasks of requests in handlers
        self.tasks = TaskRoutes(
            coordinator, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes,
            rng=rng or random.SystemRandom(), closing=self._closing, off_loop=self._off_loop,
        )  # fmt: skip
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
        self._url = ""

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._observe, self._errors, self._auth],
            client_max_size=self.max_body_bytes,
        )
        x = {"expect_handler": defer_expect}  # (Expect is answered after the checks)
        app.add_routes([  # (web.get's routes answer HEAD too: allow_head)
            web.post("/v1/tasks", self.tasks.submit, **x),
            web.get("/v1/tasks", self.tasks.list_tasks, **x),
            web.get("/v1/tasks/{id}", self.tasks.get_task, **x),
            web.get("/v1/tasks/{id}/wait", self.tasks.wait_task, **x),
            web.post("/v1/tasks/{id}/cancel", self.tasks.cancel_task, **x),
            web.get("/v1/nodes", self.nodes, **x),
            web.get("/v1/stats", self.stats, **x),
            web.get("/v1/revocations", self.revocations, **x),
            web.post("/v1/revocations", self.push_revocations, **x),
            web.get("/metrics", self.metrics, **x),
            web.get("/openapi.json", self.openapi, **x),
            web.get("/healthz", self.healthz, **x),
        ])  # fmt: skip
        # last, what no route above took: aiohttp's own 404/405 would answer an Expect itself
        app.router.add_route("*", "/{path:.*}", self.no_route, name=_NO_ROUTE, **x)
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
        """Stop serving and release the JSON workers. Idempotent; a second call waits for
        the first.

        Open ``/wait`` calls answer at once with the task as it is; other requests get
        :data:`_SHUTDOWN_GRACE_S` seconds to finish, and a request that arrives meanwhile gets
        503 ``shutting_down``. A call cancelled while it drains leaves the rest of the close to
        the next call, which cancels the requests still running at once. The JSON workers are
        released only once no handler runs, so none meets them closed.
        """
        self._closing.set()
        async with self._close_lock:
            if self._runner is not None:
                if self._drain_cut:
                    await self._cancel_handlers()
                self._drain_cut = True
                await self._runner.cleanup()  # (cancelled: the runner stays, for the next call)
                self._runner = None
            await self._json_work.aclose()

    async def _cancel_handlers(self) -> None:
        """Cancel the requests being handled and wait until each has ended."""
        handling = list(self._handling)
        for task in handling:
            task.cancel()
        await asyncio.gather(*handling, return_exceptions=True)

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
        task = asyncio.current_task()
        assert task is not None  # (aiohttp runs each request in a task of its own)
        self._handling.add(task)
        try:
            response = await handler(request)
        finally:
            self._handling.discard(task)
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
        if self._closing.is_set():  # (arrived as the server began to close: nothing was done)
            return _shutting_down().response()
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
            # the JSON workers, the coordinator or its journal closed under it, or the journal's
            # sync failed (the coordinator acknowledges nothing more; its daemon is to stop)
            c = self.coordinator
            if self._closing.is_set() or c.closed or c.failure is not None:
                log.info(
                    "API %s %s: cut short by the shutdown: %r",
                    request.method, request.path[:200], exc,
                )  # fmt: skip
                return _shutting_down(begun=True).response()
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
        check_expect(request)
        public = request.method in ("GET", "HEAD") and request.path == "/healthz"
        if public:
            return await handler(request)
        given = request.headers.getall("Authorization", [""])
        if len(given) > 1:  # (which one counts? a proxy may read another than we would)
            message = "the request has more than one Authorization header; send one"
            raise ApiError(400, "bad_request", message)
        if not self._authorized(given[0]):
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

    # --- the mesh, metrics, health, the document -------------------------------------------

    async def nodes(self, request: web.Request) -> web.Response:
        """GET /v1/nodes."""
        strict_query(request, set())
        return _json({"nodes": json_safe(self.coordinator.nodes())})

    async def stats(self, request: web.Request) -> web.Response:
        """GET /v1/stats."""
        strict_query(request, set())
        return _json(json_safe(await self.coordinator.stats()))

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: the API's own metrics, the coordinator's, then its mesh's (handshakes,
        sessions, membership, revocations: as a node daemon names them)."""
        stats = await self.coordinator.stats()
        families = coordinator_families(stats, self.coordinator.nodes())
        families += mesh_families(self.coordinator.mesh)
        text = self.registry.render(families)  # (checked: a bad family is left out, logged)
        return web.Response(
            body=text.encode(), headers={"Content-Type": self.registry.content_type}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        """GET /openapi.json."""
        strict_query(request, set())
        return _json(self._openapi)

    # --- certificate revocations ----------------------------------------------------------

    async def revocations(self, request: web.Request) -> web.Response:
        """GET /v1/revocations."""
        strict_query(request, set())
        listed = self._revocation_sync().revocations
        return await self._revocations_response(listed)

    async def push_revocations(self, request: web.Request) -> web.Response:
        """POST /v1/revocations: the body is a revocation list file as ``meshinfer fleet
        revoke`` writes it; every entry is verified against the fleet's authority, then merged
        (a set union: pushing an older or the same list changes nothing) and gossiped."""
        strict_query(request, set())
        require_type(request, "application/octet-stream", " (the revocations.bin file)")
        sync = self._revocation_sync()
        body = await read_body(request, self.max_body_bytes, MAX_REVOCATION_LIST_BYTES)
        try:  # (an Ed25519 check per entry not held already: off the loop, bounded workers)
            held = sync.revocations
            listed = await self._json_work.run(RevocationList.from_bytes, body, sync.trust, held)
            merged = await sync.merge_list(listed, "the HTTP API")
        except RevocationError as exc:
            raise ApiError(400, "invalid_revocations", str(exc)) from None
        return await self._revocations_response(sync.revocations, merged=merged)

    async def _revocations_response(self, listed: RevocationList, **extra: bool) -> web.Response:
        """The list's document (``extra`` keys after its own), built and encoded off the loop
        when long (a list of 8 MiB holds tens of thousands of entries)."""
        size = revocations_doc_bytes(listed)
        return body_response(await self._off_loop(size, _revocations_body, listed, extra))

    def _revocation_sync(self) -> RevocationSync:
        sync = self.coordinator.mesh.revocation_sync
        if sync is None:
            raise ApiError(503, "unavailable", "this coordinator runs no revocation sync")
        return sync

    async def no_route(self, request: web.Request) -> web.Response:
        """A path no route serves: 404 ``not_found``, or 405 ``method_not_allowed`` (with
        ``Allow``) where another method is served. A route of the API's own (aiohttp's answers
        ``Expect`` before any middleware: ``100 Continue`` for a path that does not exist), so
        the expectation and the token are checked first, and no body is ever asked for."""
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource.name != _NO_ROUTE:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    async def healthz(self, request: web.Request) -> web.Response:
        """GET /healthz (no token needed)."""
        return _json({"status": "ok"})

    async def _off_loop(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` here when ``size`` is small, else in a worker thread."""
        if size < _OFF_LOOP_BYTES:
            return fn(*args)
        return await self._json_work.run(fn, *args)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _revocations_body(listed: RevocationList, extra: dict[str, Any]) -> bytes:
    """The list's document with ``extra``'s keys after its own, encoded."""
    return json_body({**revocations_doc(listed), **extra})


def _shutting_down(*, begun: bool = False) -> ApiError:
    """503 ``shutting_down`` for a request the closing API does not serve (``begun``: it was
    being served; what it asked may have been done, a submitted task kept in the journal)."""
    if begun:
        message = (
            "the coordinator is shutting down and cut this request short; it may have taken"
            " effect (a submitted task is kept: ask for it by its task_id once it is back)"
        )
    else:
        message = "the coordinator is shutting down: this request was not served; retry later"
    return ApiError(503, "shutting_down", message, {"Retry-After": _SHUTDOWN_RETRY_AFTER})


def _route_label(request: web.Request) -> str:
    """The route template (``/v1/tasks/{id}``), or ``unmatched``: bounded label values."""
    resource = request.match_info.route.resource
    if resource is None or resource.name == _NO_ROUTE:
        return "unmatched"
    return resource.canonical
