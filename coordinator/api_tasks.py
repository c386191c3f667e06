"""The task routes of the coordinator's HTTP API: submit, list, get, wait for and cancel tasks.

    POST /v1/tasks                 submit (202 new, 200 identical resubmit, 409 other spec)
    GET  /v1/tasks                 list: state, model, since, limit, cursor
    GET  /v1/tasks/{id}            the task, its items and result (?outputs=false: no tensors)
    GET  /v1/tasks/{id}/wait       the same, once finished or after ?timeout= seconds
    POST /v1/tasks/{id}/cancel     cancel

:class:`TaskRoutes` holds the handlers; :class:`~coordinator.api.CoordinatorApi` routes to them
behind its middlewares (auth, errors, metrics). Submissions share an upload budget: the bytes
of all the bodies being read and parsed at once (a submission that would go beyond it gets 503
``busy`` and a ``Retry-After``; one alone is always let in).

Concurrency: every coroutine runs on the coordinator's event loop; a large body is parsed, and
a large result rendered, in a worker thread (``off_loop``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from coordinator.api_documents import summary_doc, task_doc
from coordinator.api_errors import ApiError, body_response, json_body
from coordinator.api_errors import json_response as _json
from coordinator.api_requests import (
    body_to_spec,
    bool_param,
    list_filters,
    number_param,
    parse_json,
    read_body,
    require_type,
    require_utf8,
    strict_query,
    upload_size,
)
from coordinator.client import MAX_WAIT_S
from coordinator.journal import TaskConflictError, TaskRecord, UnknownTaskError
from coordinator.service import Coordinator
from meshinfer.errors import ConfigError
from meshinfer.proto.tasks import TaskSpec, new_task_id

__all__ = ["DEFAULT_WAIT_S", "MAX_WAIT_S", "TaskRoutes"]

#: ``/wait`` waits this long when no ``timeout`` is given, and at most :data:`MAX_WAIT_S` (the
#: API's contract, spelled once in :mod:`coordinator.client`, whose ``wait`` loops past it).
DEFAULT_WAIT_S = 30.0

#: About how many bytes of a task's document each of its items takes (its JSON is ~250).
_ITEM_DOC_BYTES = 300

#: How often an open ``/wait`` looks whether its client is still connected. aiohttp tells a
#: GET's handler nothing when the client goes (a body-less request has no payload to fail), so
#: a client that gave up held its handler, and a coordinator waiter, until the timeout.
CLIENT_CHECK_S = 1.0

#: ``off_loop(size, fn, *args)``: ``fn(*args)``, in a worker thread when ``size`` is large.
OffLoop = Callable[..., Awaitable[Any]]


class TaskRoutes:
    """The handlers of the task routes, over ``coordinator``.

    ``max_body_bytes`` caps a body; ``max_upload_bytes`` is the upload budget; ``rng`` draws
    the ids of tasks submitted without one; ``closing`` set ends every open ``/wait`` at once
    (with the task as it is); ``off_loop`` runs parsing and rendering.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        rng: random.Random,
        closing: asyncio.Event,
        off_loop: OffLoop,
    ) -> None:
        self.coordinator = coordinator
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.uploading = 0  # bytes of the submissions being read and parsed now
        self._rng = rng
        self._closing = closing
        self._off_loop = off_loop

    async def submit(self, request: web.Request) -> web.Response:
        """POST /v1/tasks."""
        strict_query(request, set())
        require_type(request, "application/json")
        require_utf8(request)
        size = upload_size(request, self.max_body_bytes)
        if self.uploading and self.uploading + size > self.max_upload_bytes:
            raise ApiError(
                503, "busy", "too many task submissions are being uploaded; retry shortly",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        self.uploading += size
        try:
            return await self._submit(request)
        finally:
            self.uploading -= size

    async def _submit(self, request: web.Request) -> web.Response:
        body = await read_body(request, self.max_body_bytes)
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
        query = strict_query(request, {"state", "model", "since", "limit", "cursor"})
        filters = list_filters(query)
        try:
            page = await self.coordinator.list_tasks(**filters)
        except ConfigError as exc:  # a cursor this journal never handed out
            raise ApiError(400, "bad_parameter", f"cursor: {exc}") from None
        doc = {"tasks": [summary_doc(s) for s in page.tasks], "next_cursor": page.next_cursor}
        return _json(doc)

    async def get_task(self, request: web.Request) -> web.Response:
        """GET /v1/tasks/{id}."""
        query = strict_query(request, {"outputs"})
        outputs = bool_param(query, "outputs", default=True)
        record = await self.coordinator.get(request.match_info["id"])
        return await self._task_response(record, outputs)

    async def wait_task(self, request: web.Request) -> web.Response:
        """GET /v1/tasks/{id}/wait. HEAD answers at once, as the task is now: a wait for
        headers alone would hold the connection for nothing."""
        query = strict_query(request, {"timeout", "outputs"})
        timeout = number_param(query, "timeout", DEFAULT_WAIT_S, 0.0, MAX_WAIT_S)
        outputs = bool_param(query, "outputs", default=True)
        task_id = request.match_info["id"]
        if request.method == "HEAD":
            record = await self.coordinator.get(task_id)
        else:
            record = await self._wait(task_id, timeout, request)
        return await self._task_response(record, outputs)

    async def _wait(self, task_id: str, timeout: float, request: web.Request) -> TaskRecord:
        """The task once it ended, the timeout passed, the server began to close or the
        client went away (then nobody reads the answer: it is the task as it is now)."""
        waiting = asyncio.ensure_future(self.coordinator.wait(task_id, timeout=timeout))
        closing = asyncio.ensure_future(self._closing.wait())
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({waiting, closing, gone}, return_when=asyncio.FIRST_COMPLETED)
            ended = waiting.done()
        finally:
            closing.cancel()
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
            elif not waiting.cancelled():
                waiting.exception()  # retrieved on every path, this handler cancelled included
        return waiting.result() if ended else await self.coordinator.get(task_id)

    async def _task_response(self, record: TaskRecord, outputs: bool) -> web.Response:
        # (a batch task's document lists up to 65536 items: large before any result is in)
        size = len(record.result_summary or b"") + _ITEM_DOC_BYTES * len(record.items)
        waiting = self.coordinator.waiting(record.task_id)  # on the loop: it reads membership
        body = await self._off_loop(size, self._task_body, record, outputs, waiting)
        return body_response(body)

    def _task_body(self, record: TaskRecord, outputs: bool, waiting: Mapping[str, str]) -> bytes:
        """The task's document, encoded (the JSON of a large one takes a while: off the loop)."""
        result = self.coordinator.result_of(record)
        default = self.coordinator.config.default_aggregation
        doc = task_doc(
            record, result, outputs=outputs, waiting=waiting, default_aggregation=default
        )
        return json_body(doc)

    async def cancel_task(self, request: web.Request) -> web.Response:
        """POST /v1/tasks/{id}/cancel (a body, if any, is ignored)."""
        strict_query(request, set())
        task_id = request.match_info["id"]
        cancelled = await self.coordinator.cancel(task_id)
        state = (await self.coordinator.get(task_id)).state.value
        return _json({"task_id": task_id, "cancelled": cancelled, "state": state})


async def _client_gone(request: web.Request) -> None:
    """Return once ``request``'s connection is closed or closing (polled: no event to await)."""
    while (transport := request.transport) is not None and not transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(CLIENT_CHECK_S)
