"""A small synchronous client of the coordinator HTTP API v1 (standard library ``urllib`` only).

Used by the ``meshinfer-coord`` task commands (:mod:`coordinator.cli_tasks`) and by scripts::

    client = CoordinatorClient("http://127.0.0.1:7950", token)
    task = client.submit({"model": "digits-mlp@1", "pattern": "single",
                          "inputs": tensor_json(rows)})
    done = client.wait(task["task_id"], timeout=60)
    labels = done["result"]["labels"]

Every failure is an :class:`ApiError`: the coordinator's JSON error (status, code, message), an
answer that is not the JSON the API promises, or no answer at all. Without an answer, the code
says whether the request reached the coordinator: ``unreachable`` ("cannot reach the coordinator
at URL: ...": no connection, nothing was received), ``disconnected`` (the connection closed or
broke after it was made, before the whole answer came: the request may or may not have been
carried out) or ``timeout`` (no whole answer within the client's ``timeout``, a deadline for the
whole request, connecting and every read of the answer included: the same). A 502, 503 or 504
without the API's JSON error is a reverse proxy's, not the coordinator's: ``unavailable`` (the
proxy could not reach it: it may be restarting). An answer larger than ``max_response_bytes``
(:data:`MAX_RESPONSE_BYTES`, 1 GiB, by default) is ``bad_response``, read no further. A redirect
is not followed (it would carry the API token, and turn a POST into a GET): it is an ApiError
``redirect`` naming where it pointed. An answer with NaN or Infinity (no JSON the API sends) is
``bad_response``; an error message, whatever the server put in it, holds no control characters
(:func:`printable`).

:func:`resolve_endpoint` finds the URL and token the way the CLI does: explicit options, then
``<data_dir>/runtime.json`` (written by the coordinator daemon: ``{"api": url, "token_file":
path, ...}``), then the ``MESHINFER_COORD_URL`` / ``MESHINFER_COORD_TOKEN`` environment
variables.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from typing import Any

import numpy as np

from meshinfer.atomic_files import read_limited
from meshinfer.errors import ConfigError, MeshInferError, RemoteProtocolError
from meshinfer.http_client import read_body, read_capped, strict_opener
from meshinfer.http_url import check_http_url
from meshinfer.proto.tasks_wire import pack_array, unpack_array
from meshinfer.runtime.data_dir import RUNTIME_FILE, read_runtime
from meshinfer.runtime.log_lines import printable

__all__ = [
    "AWAY_CODES",
    "BUSY_PAUSE_S",
    "ENV_TOKEN",
    "ENV_URL",
    "MAX_REQUEST_TIMEOUT_S",
    "MAX_RESPONSE_BYTES",
    "MAX_WAIT_S",
    "MIN_RETRY_PAUSE_S",
    "RESTART_GRACE_S",
    "RESTART_POLL_S",
    "RUNTIME_FILE",
    "TERMINAL_STATES",
    "ApiError",
    "CoordinatorClient",
    "Endpoint",
    "array_from_json",
    "printable",
    "read_token_file",
    "resolve_endpoint",
    "tensor_json",
]

ENV_URL = "MESHINFER_COORD_URL"
ENV_TOKEN = "MESHINFER_COORD_TOKEN"
#: The longest ``timeout`` of a :class:`CoordinatorClient` (per request; ``wait`` adds what it
#: asks the server to wait): a day. A socket refuses timeouts past about 1e9 s.
MAX_REQUEST_TIMEOUT_S = 86400.0
#: The largest answer a :class:`CoordinatorClient` reads by default (its ``max_response_bytes``):
#: 1 GiB. The API bounds no answer: a finished task's document carries its outputs in base64 (4/3
#: of their bytes), and a batch task may take 256 MiB of input (``MAX_BATCH_INPUT_BYTES``), with
#: outputs as large again (embeddings, say). 1 GiB holds such a result, while a broken or hostile
#: server cannot make the client hold more than that (it is read in chunks, and refused at once
#: past a ``Content-Length`` over it). ``status`` without ``--outputs`` asks for no tensors.
MAX_RESPONSE_BYTES = 1 << 30
#: The error answers' bodies are read up to this (the API's JSON errors are well under 1 KiB).
_MAX_ERROR_BODY = 64 << 10
#: The longest single ``/wait`` the server grants; :meth:`CoordinatorClient.wait` loops past it.
MAX_WAIT_S = 300.0
#: The least pause before asking again after a ``/wait`` answered early (the server closing, or
#: capping its waits shorter) or a 503 ``busy``, whatever its ``Retry-After``: never a tight loop.
MIN_RETRY_PAUSE_S = 0.25
#: The pause after a 503 ``busy`` without a usable ``Retry-After`` (what the coordinator sends).
BUSY_PAUSE_S = 1.0
#: How long :meth:`CoordinatorClient.wait` keeps asking a coordinator it has reached before that
#: went away (503 ``shutting_down``, then connections refused or dropped while it restarts),
#: within its own timeout, before it gives up: the coordinator keeps its tasks across a restart.
RESTART_GRACE_S = 120.0
#: The pause between asks while the coordinator is away (no ``Retry-After`` to go by).
RESTART_POLL_S = 0.5
#: The errors of a coordinator stopping or restarting: a ``/wait`` (a GET) is asked again.
#: (``unavailable``: a reverse proxy's 502/503/504 while the coordinator behind it is down.)
AWAY_CODES = frozenset({"shutting_down", "busy", "unreachable", "disconnected", "unavailable"})
#: The statuses a reverse proxy answers for a backend it cannot reach (bad gateway, service
#: unavailable, gateway timeout): without the API's JSON error body, they are ``unavailable``.
_PROXY_STATUSES = frozenset({502, 503, 504})
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
_ERROR_BODY_PREVIEW = 200


class ApiError(MeshInferError):
    """A request to the coordinator failed.

    ``status`` is the HTTP status (None when no answer came), ``code`` the API's short error code
    (``not_found``, ``invalid_task``... or ``unreachable``/``disconnected``/``timeout``/
    ``bad_response`` from the client itself: see the module docstring) and ``message`` the
    explanation, made :func:`printable` (it may quote the server). ``retry_after``: the seconds
    the coordinator asked to wait before trying again (its ``Retry-After``), if it did.
    """

    def __init__(
        self, status: int | None, code: str, message: str, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.code = printable(code)
        self.message = message = printable(message)
        self.retry_after = retry_after
        suffix = f" (HTTP {status} {code})" if status is not None else ""
        super().__init__(message + suffix)


# --- tensors ---------------------------------------------------------------------------------


def tensor_json(array: np.ndarray) -> dict[str, Any]:
    """``array`` as the API's tensor JSON ``{"dtype", "shape", "data_b64"}`` (C order, LE).

    Raises LocalProtocolError for a dtype the mesh cannot carry (cast float64 to float32 first).
    """
    data, dtype, shape = pack_array(np.asarray(array))
    return {"dtype": dtype, "shape": list(shape), "data_b64": base64.b64encode(data).decode()}


def array_from_json(doc: Any) -> np.ndarray:
    """The array of a tensor JSON: ``{"dtype", "shape", "data_b64"}`` or ``{"values", "dtype"?}``.

    Raises RemoteProtocolError naming what is wrong (the document comes from the server or a
    file, never trusted).
    """
    if not isinstance(doc, Mapping):
        raise RemoteProtocolError(f"tensor: expected an object, got {type(doc).__name__}")
    if "values" in doc:
        return _array_from_values(doc["values"], doc.get("dtype", "float32"))
    dtype, shape, text = doc.get("dtype"), doc.get("shape"), doc.get("data_b64")
    if type(dtype) is not str or type(text) is not str or not isinstance(shape, list):
        raise RemoteProtocolError("tensor: needs dtype (string), shape (list), data_b64 (string)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError("tensor: data_b64 is not valid base64") from None
    return unpack_array(data, dtype, tuple(shape)).copy()


def _array_from_values(values: Any, dtype: Any) -> np.ndarray:
    if type(dtype) is not str or dtype not in {"float32", "float16", "int64", "int32", "uint8"}:
        raise RemoteProtocolError(f"tensor: dtype {dtype!r} is not a numeric wire dtype")
    if not _numeric_nested(values):
        raise RemoteProtocolError("tensor: values must be numbers or (nested) lists of numbers")
    target = np.dtype(dtype)
    try:
        array = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer beyond the float range
        raise RemoteProtocolError(f"tensor: values out of the {dtype} range") from None
    except ValueError:
        raise RemoteProtocolError("tensor: values rows have different lengths") from None
    if not np.isfinite(array).all():
        raise RemoteProtocolError("tensor: values must be finite numbers")
    if target.kind in "iu":
        return _integer_array(values, array.shape, target)
    with np.errstate(over="ignore"):
        cast = array.astype(target)
    if not np.isfinite(cast).all():
        raise RemoteProtocolError(f"tensor: values out of the {dtype} range")
    return cast


def _integer_array(values: Any, shape: tuple[int, ...], target: np.dtype) -> np.ndarray:
    """The exact integers of ``values`` (a rectangular nest of finite numbers) as ``target``:
    not through float64, which rounds past 2**53 and lets 2**63 wrap around in int64."""
    flat = np.array(values, dtype=object).reshape(-1).tolist()
    ints = [int(v) for v in flat]  # (finite: checked before)
    info = np.iinfo(target)
    if not all(i == v and info.min <= i <= info.max for i, v in zip(ints, flat, strict=True)):
        raise RemoteProtocolError(f"tensor: values must be whole numbers in the {target} range")
    return np.array(ints, dtype=target).reshape(shape)


def _numeric_nested(values: Any, depth: int = 0) -> bool:
    if type(values) in (int, float):
        return True
    if not isinstance(values, list) or depth >= 8:
        return False
    return all(_numeric_nested(v, depth + 1) for v in values)


# --- where the coordinator is ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the coordinator's API listens and the bearer token it wants."""

    url: str
    token: str


def resolve_endpoint(
    url: str | None = None,
    token_file: Path | None = None,
    data_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Endpoint:
    """URL and token from (in order) the arguments, ``data_dir/runtime.json``, the environment.

    ConfigError naming what to pass when either cannot be found.
    """
    environ = os.environ if environ is None else environ
    runtime = _runtime_facts(data_dir) if data_dir is not None else {}
    if url is None and data_dir is not None:
        url = runtime.get("api")
        if not url:
            where = Path(data_dir) / RUNTIME_FILE
            raise ConfigError(f"{where}: the coordinator runs without its HTTP API ([api] enabled)")
    url = url or environ.get(ENV_URL)
    if not url:
        raise ConfigError(
            f"no coordinator given: pass --url URL or --data-dir DIR (the coordinator's data_dir)"
            f", or set {ENV_URL}"
        )
    if token_file is None and runtime.get("token_file"):
        token_file = Path(runtime["token_file"])
    token = read_token_file(token_file) if token_file is not None else environ.get(ENV_TOKEN)
    if not token:
        raise ConfigError(
            f"no API token given: pass --token-file FILE (the fleet's api-token) or --data-dir"
            f" DIR, or set {ENV_TOKEN}"
        )
    return Endpoint(check_http_url(url, "coordinator URL"), check_token(token))


def _runtime_facts(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / RUNTIME_FILE
    facts = read_runtime(data_dir, "coordinator")
    for key in ("api", "token_file"):
        if not isinstance(facts.get(key), str | None):
            raise ConfigError(f"{path}: {key!r} must be a string or null")
    token_file = facts.get("token_file")
    if token_file and not Path(token_file).is_absolute():
        facts["token_file"] = str(Path(data_dir) / token_file)
    return facts


def read_token_file(path: Path | str, what: str = "the API token file") -> str:
    """The stripped text of the token file ``path``; ConfigError naming ``what`` if it cannot
    be read, is not a regular file (a FIFO there blocked the read for good) or is over
    :data:`MAX_TOKEN_FILE_BYTES`. The token itself is checked by the caller."""
    raw = read_limited(Path(path), what, limit=MAX_TOKEN_FILE_BYTES, error=ConfigError)
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


MAX_TOKEN_FILE_BYTES = 4096
"""The largest API token file read (``fleet init`` writes a 43-character token)."""


def check_token(token: str) -> str:
    """``token`` stripped; ConfigError if it is empty or holds spaces, control characters or
    anything but ASCII (an HTTP header carries no other text the same way on every client)."""
    token = token.strip()
    if not token or not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(
            "the API token must be one line of printable characters without spaces, all ASCII"
        )
    return token


# --- the client ------------------------------------------------------------------------------


class CoordinatorClient:
    """Blocking calls to one coordinator; each returns the decoded JSON answer (a dict).

    ``timeout`` bounds every request as a whole, from connecting to the answer's last byte
    (``wait`` adds the time it asks the server to wait): positive
    seconds, at most :data:`MAX_REQUEST_TIMEOUT_S` (a day, as the CLI's ``--timeout``; a socket
    refuses far longer ones), else ConfigError naming the limit: a longer one is refused, not
    cut short, as a caller who asked for it expects it to hold. ``max_response_bytes``: the
    largest answer read (:data:`MAX_RESPONSE_BYTES`); a larger one is ``bad_response``.
    Thread-safe: it holds no connection between calls.
    """

    def __init__(
        self,
        url: str,
        token: str,
        timeout: float = 30.0,
        *,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        if not 0 < timeout <= MAX_REQUEST_TIMEOUT_S:
            raise ConfigError(
                f"timeout: {timeout!r} is not a positive number of seconds of at most"
                f" {MAX_REQUEST_TIMEOUT_S:g} (a day)"
            )
        if max_response_bytes < 1:
            raise ConfigError(f"max_response_bytes: {max_response_bytes!r} is not positive")
        self.url = check_http_url(url, "coordinator URL")
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._token = check_token(token)
        self._opener = strict_opener(self.url)
        self._answered = False  # (any HTTP answer came: a later outage is a restart, not a typo)

    def submit(self, doc: Mapping[str, Any], *, busy_s: float = 30.0) -> dict[str, Any]:
        """POST /v1/tasks: ``{"task_id", "state", "items_total", "location"}``.

        A coordinator busy with other uploads (503 ``busy``: it read nothing of this one) is
        asked again after its ``Retry-After`` (at least :data:`MIN_RETRY_PAUSE_S`; without a
        usable one, :data:`BUSY_PAUSE_S`), for up to ``busy_s`` seconds in all.
        """
        deadline = time.monotonic() + busy_s
        request = self._build("POST", "/v1/tasks", None, doc)  # encoded once, sent again
        while True:
            try:
                return self._send(request)
            except ApiError as exc:
                if exc.code != "busy":
                    raise
                asked = BUSY_PAUSE_S if exc.retry_after is None else exc.retry_after
                pause = max(MIN_RETRY_PAUSE_S, asked)
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)

    def get(self, task_id: str, outputs: bool = True) -> dict[str, Any]:
        """GET /v1/tasks/{id}: the task, its items and (once finished) its result."""
        query = None if outputs else {"outputs": "false"}
        return self._request("GET", _task_path(task_id), query=query)

    def wait(
        self, task_id: str, timeout: float | None = 30.0, outputs: bool = True
    ) -> dict[str, Any]:
        """The task document once it finished, or as it is after ``timeout`` s (None: forever).

        Asks the server to wait at most :data:`MAX_WAIT_S` per request and asks again until
        ``timeout`` is spent: a server may answer sooner (closing, or capping its waits shorter),
        and is then asked again after a pause of up to :data:`MIN_RETRY_PAUSE_S`.

        A coordinator that answered (in this call or an earlier one of this client) and then
        goes away, restarting (503 ``shutting_down`` or ``busy``, then connections refused or
        dropped), is asked again, after its ``Retry-After`` or :data:`RESTART_POLL_S`, until
        ``timeout`` is spent or it stayed away :data:`RESTART_GRACE_S`: it recovers its tasks
        from its journal. Then the last error is raised, saying how long it was waited for. A
        coordinator never reached is an error at once (a wrong URL, or none running).
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        path = _task_path(task_id, "/wait")
        away_since: float | None = None
        while True:
            asked = time.monotonic()
            left = MAX_WAIT_S if deadline is None else max(0.0, deadline - asked)
            step = min(left, MAX_WAIT_S)
            query = {"timeout": f"{step:.3f}", "outputs": None if outputs else "false"}
            try:
                doc = self._request("GET", path, query=query, timeout=self.timeout + step)
            except ApiError as exc:
                if exc.code not in AWAY_CODES or not self._answered:
                    raise
                away_since = asked if away_since is None else away_since
                pause = RESTART_POLL_S if exc.retry_after is None else exc.retry_after
                pause = max(MIN_RETRY_PAUSE_S, pause)
                now = time.monotonic()
                ends = away_since + RESTART_GRACE_S
                ends = ends if deadline is None else min(ends, deadline)
                if now >= ends:
                    raise _still_away(exc, now - away_since) from None
                time.sleep(min(pause, ends - now))
                continue
            away_since = None
            if not isinstance(doc.get("state"), str):  # (a list: TypeError; none: asked again)
                message = f"the coordinator's answer to GET {path} names no task state"
                raise ApiError(None, "bad_response", message)
            now = time.monotonic()
            if doc.get("state") in TERMINAL_STATES or (deadline is not None and now >= deadline):
                return doc
            if now < asked + step:  # answered early: not asked again in a tight loop
                time.sleep(min(MIN_RETRY_PAUSE_S, asked + step - now))

    def list(
        self,
        state: str | None = None,
        model: str | None = None,
        since: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """GET /v1/tasks: one page ``{"tasks": [summary...], "next_cursor": str | None}`` (an
        answer of another shape is an ApiError ``bad_response``)."""
        query = {"state": state, "model": model, "since": since, "limit": limit, "cursor": cursor}
        page = self._request("GET", "/v1/tasks", query=query)
        tasks, following = page.get("tasks"), page.get("next_cursor")
        if not isinstance(tasks, list) or not isinstance(following, str | None):
            message = 'the coordinator\'s page of tasks is not {"tasks": [...], "next_cursor"}'
            raise ApiError(None, "bad_response", message)
        return page

    def iter_tasks(
        self,
        state: str | None = None,
        model: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """Every matching task summary, newest first, fetching pages of ``limit`` as needed."""
        cursor, seen = None, set()
        while True:
            page = self.list(state, model, since, limit, cursor)
            yield from page["tasks"]
            cursor = page.get("next_cursor")
            if not cursor:
                return
            if cursor in seen:  # (a page already read: following it would never end)
                message = f"the coordinator handed out the cursor {cursor!r} twice: its pages loop"
                raise ApiError(None, "bad_response", message)
            if not page["tasks"]:  # (a page with a next one is full: new cursors without end)
                message = f"the coordinator named a next page ({cursor!r}) after an empty one"
                raise ApiError(None, "bad_response", message)
            seen.add(cursor)

    def cancel(self, task_id: str) -> dict[str, Any]:
        """POST /v1/tasks/{id}/cancel: ``{"task_id", "cancelled", "state"}``."""
        return self._request("POST", _task_path(task_id, "/cancel"), body={})

    def nodes(self) -> dict[str, Any]:
        """GET /v1/nodes: ``{"nodes": [...]}`` as the coordinator sees the mesh."""
        return self._request("GET", "/v1/nodes")

    def stats(self) -> dict[str, Any]:
        """GET /v1/stats: task/item counts by state and the coordinator's counters."""
        return self._request("GET", "/v1/stats")

    def revocations(self) -> dict[str, Any]:
        """GET /v1/revocations: ``{"version", "entries"}``, the list in force."""
        return self._request("GET", "/v1/revocations")

    def push_revocations(self, data: bytes) -> dict[str, Any]:
        """POST /v1/revocations with a revocation list file's bytes: ``{"version", "entries",
        "merged"}``."""
        request = self._build("POST", "/v1/revocations", None, None)
        request.data = data
        request.add_header("Content-Type", "application/octet-stream")
        return self._send(request)

    def health(self) -> dict[str, Any]:
        """GET /healthz: ``{"status": "ok"}`` (needs no token)."""
        return self._request("GET", "/healthz")

    # --- plumbing --------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        return self._send(self._build(method, path, query, body), timeout)

    def _send(self, request: urllib.request.Request, timeout: float | None = None) -> dict:
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                status, raw = response.status, read_capped(response, self.max_response_bytes)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                self._answered = True
                _read_quietly(exc)
                raise self._redirected(exc, request) from None
            error = _error_from_response(exc.code, _read_quietly(exc))
            error.retry_after = _seconds(exc.headers.get("Retry-After"))
            # (a proxy's answer is not the coordinator's: one never reached is not waited for)
            self._answered = self._answered or error.code != "unavailable"
            raise error from None
        except urllib.error.URLError as exc:  # connecting, or sending the request
            reason = exc.reason if isinstance(exc.reason, BaseException) else exc
            raise self._no_answer(reason, request, sent=isinstance(reason, _DROPPED)) from None
        except (HTTPException, OSError) as exc:  # the request was sent: reading the answer
            raise self._no_answer(exc, request, sent=True) from None
        self._answered = True
        if raw is None:
            message = (
                f"the coordinator's answer to {request.get_method()} is larger than"
                f" {_size_text(self.max_response_bytes)} (the client's max_response_bytes):"
                " not read further"
            )
            raise ApiError(status, "bad_response", message)
        return _json_object(status, raw)

    def _build(self, method, path, query, body) -> urllib.request.Request:
        url = self.url + path
        pairs = {k: _query_value(v) for k, v in (query or {}).items() if v is not None}
        if pairs:
            url += "?" + urllib.parse.urlencode(pairs)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(url, data=data, headers=headers, method=method)

    def _redirected(self, exc: urllib.error.HTTPError, request: urllib.request.Request) -> ApiError:
        where = exc.headers.get("Location") or "(no Location)"
        what = f"{request.get_method()} {urllib.parse.urlsplit(request.full_url).path}"
        message = (
            f"the server at {self.url} redirected {what} to {where}: not followed (it would carry"
            " the API token there); give the coordinator's own API URL"
        )
        return ApiError(exc.code, "redirect", message)

    def _no_answer(
        self, exc: BaseException, request: urllib.request.Request, *, sent: bool
    ) -> ApiError:
        """The error for a request that got no whole answer: ``sent`` when the connection was
        made and the request (or part of it) went over it, so the coordinator may have acted."""
        detail = str(exc) or type(exc).__name__
        what = f"{request.get_method()} {urllib.parse.urlsplit(request.full_url).path}"
        unsure = (
            f"it may or may not have carried out {what}"
            if request.get_method() not in ("GET", "HEAD")
            else f"asking again is safe ({what} changes nothing)"
        )
        if isinstance(exc, TimeoutError):  # (connecting or sending, as well: sent or not)
            message = f"no answer from the coordinator at {self.url} in time: {unsure}"
            return ApiError(None, "timeout", message)
        if not sent:
            return ApiError(
                None, "unreachable", f"cannot reach the coordinator at {self.url}: {detail}"
            )
        if isinstance(exc, HTTPException) and not isinstance(exc, _DROPPED):
            message = f"the coordinator at {self.url} did not answer in HTTP ({detail}): {unsure}"
            return ApiError(None, "bad_response", message)
        message = (
            f"the connection to the coordinator at {self.url} closed before its answer came"
            f" ({detail}): {unsure}"
        )
        return ApiError(None, "disconnected", message)


def _size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} bytes"


#: A connection that was made and then closed or broke: what was sent may have been received.
_DROPPED = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, IncompleteRead)


def _still_away(exc: ApiError, waited: float) -> ApiError:
    """``exc``, the last error of a coordinator that went away during a wait, saying so."""
    message = f"{exc.message} (the coordinator went away; waited {waited:.1f} s for it to return)"
    return ApiError(exc.status, exc.code, message, exc.retry_after)


def _task_path(task_id: str, suffix: str = "") -> str:
    if not isinstance(task_id, str) or not task_id:
        raise ConfigError("a task id must be a non-empty string")
    return f"/v1/tasks/{urllib.parse.quote(task_id, safe='')}{suffix}"


def _query_value(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{value!r} is not a finite number")
    return repr(value) if isinstance(value, float) else str(value)


def _read_quietly(exc: urllib.error.HTTPError) -> bytes:
    try:
        return read_body(exc, _MAX_ERROR_BODY)  # (the API's errors are small; no more is read)
    except (OSError, HTTPException):
        return b""
    finally:
        exc.close()


def _seconds(header: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (0..300), else None (absent, a date, nonsense)."""
    if header is None:
        return None
    try:
        value = float(header)
    except ValueError:
        return None
    return value if 0 <= value <= MAX_WAIT_S else None


def _error_from_response(status: int, raw: bytes) -> ApiError:
    """The API's ``{"error": {...}}`` as an ApiError; something sensible for any other body."""
    try:
        error = json.loads(raw)["error"]
        code, message = error["code"], error["message"]
        if type(code) is str and type(message) is str:
            return ApiError(status, code, message)
    except (ValueError, KeyError, TypeError, RecursionError):  # (nested past the parser's limit)
        pass
    preview = raw[:_ERROR_BODY_PREVIEW].decode("utf-8", "replace").strip() or "no details"
    if status in _PROXY_STATUSES:  # (the coordinator's own 503s are JSON errors)
        message = (
            f"the server in front of the coordinator answered HTTP {status}, not the coordinator"
            f" (a proxy that cannot reach it: down or restarting?): {preview}"
        )
        return ApiError(status, "unavailable", message)
    return ApiError(status, "http_error", f"the coordinator refused the request: {preview}")


def _json_object(status: int, raw: bytes) -> dict[str, Any]:
    """The answer's JSON object; no NaN or Infinity (nor a number past the float range), which
    the API never sends and ``--json`` could not print back as JSON."""
    try:
        doc = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):  # (nested past the parser's limit)
        doc = None
    if not isinstance(doc, dict):
        message = "the coordinator's answer is not a JSON object (of finite numbers)"
        raise ApiError(status, "bad_response", message)
    return doc


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the float range")
    return value
