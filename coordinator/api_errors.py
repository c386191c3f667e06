"""The HTTP API's errors: :class:`ApiError`, its JSON document, and the connection that gives a
request aiohttp rejects before any middleware runs the same JSON error.

Every error the API answers is ``{"error": {"status", "code", "message"}}``
(:func:`error_body`, :meth:`ApiError.response`). A handler's error becomes one in the API's
``_errors`` middleware (:func:`from_http_exception` for aiohttp's own ``HTTPException``\\ s).
A request aiohttp cannot parse (a malformed request line, header or chunk; a line over 8 KiB;
a method llhttp does not know; a body that does not decode as its Content-Encoding) never
reaches a middleware: aiohttp's connection answers it in plain text. :class:`ApiRunner` makes
the connections answer it with the JSON error instead, and report it to a counter.

That relies on aiohttp internals, none of them public API (written against aiohttp 3.9-3.14):

* ``web.RequestHandler.handle_error(request, status, exc, message)`` is what the connection
  calls to build its answer to a request it could not parse (and logs, and raises if answering
  had begun); :class:`_JsonErrorConnection` overrides it.
* ``web.AppRunner._make_server()`` builds the ``web.Server`` (the application makes it: there
  is no other way in); :class:`ApiRunner` overrides it to swap in :class:`_JsonErrorServer`.
* The connections are made by ``web.Server.__call__``; :class:`_JsonErrorServer` swaps each
  one's ``__class__`` to :class:`_JsonErrorConnection`, and the server's own ``__class__`` is
  swapped the same way. That works only while the subclasses add no slots or state of their
  own to ``RequestHandler`` (``__slots__ = ()``) and ``Server``: same-layout classes.
* The ``RequestHandler._manager`` attribute is the server that made the connection (``None``
  once the connection is lost); the counter is reached through it.
* ``aiohttp.compression_utils.HAS_BROTLI``/``HAS_ZSTD`` say which codings it decodes
  (:data:`meshinfer.runtime.http_log.BODY_CODINGS`, shared with the node's server), and the
  ``ContentEncodingError`` of one it has no library for reads
  "... (zstd). Please install ..." (``tests/test_api_fixes34.py`` pins the 415 it becomes).

An aiohttp upgrade that breaks any of these is caught by the pinned tests
``tests/test_api_fixes27.py::test_a_request_aiohttp_cannot_parse_gets_the_apis_json_error``
(one case per entry of its ``MALFORMED`` requests: each must get the JSON 400 ``bad_request``)
and ``tests/test_cli_fixes27b.py::test_a_request_aiohttp_cannot_parse_is_counted`` (each must
be counted under route ``unparsed``).

Concurrency: every coroutine and callback runs on the coordinator's event loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError

from meshinfer.runtime import http_log

__all__ = [
    "ApiError",
    "ApiRunner",
    "body_response",
    "error_body",
    "from_http_exception",
    "json_body",
    "json_response",
    "unsupported_coding",
]

#: Error messages are cut to this many characters (they may quote what the client sent).
_MAX_MESSAGE = 500
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a short ``code`` and a clear ``message``."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """The JSON error response."""
        body = error_body(self.status, self.code, self.message)
        return json_response(body, status=self.status, headers=self.headers)


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """The API's error document (the message is cut to a sane length)."""
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return {"error": {"status": status, "code": code, "message": message}}


def json_response(doc: Any, *, status: int = 200, headers: Mapping[str, str] | None = None):
    """``doc`` as a compact JSON response (NaN and infinities refused: strict JSON)."""
    return body_response(json_body(doc), status=status, headers=headers)


def json_body(doc: Any) -> bytes:
    """``doc`` as compact JSON in UTF-8 (NaN and infinities refused: strict JSON). Pure: a
    large document is encoded in a worker thread, then answered with :func:`body_response`."""
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


def body_response(
    body: bytes, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response of ``body``, a document :func:`json_body` encoded."""
    return web.Response(
        body=body, status=status, headers=headers, content_type="application/json", charset="utf-8"
    )


def unsupported_coding(coding: str) -> ApiError:
    """415 for a body in a Content-Encoding not decoded here, with ``Accept-Encoding`` naming
    those that are (RFC 9110 15.5.16)."""
    message, headers = http_log.unsupported_coding(coding)
    return ApiError(415, "unsupported_media_type", message, headers)


def from_http_exception(exc: web.HTTPException, request: web.Request, cap: int) -> ApiError:
    """The API's error for an ``HTTPException`` aiohttp raised (``cap``: the body limit)."""
    status = exc.status
    code = _HTTP_CODES.get(status) or re.sub(r"\W+", "_", exc.reason.lower()).strip("_")
    path = request.path[:200]
    message = {
        404: f"no route {request.method} {path}",
        405: f"{request.method} is not allowed on {path}"
        + (f"; allowed: {exc.headers['Allow']}" if "Allow" in exc.headers else ""),
        413: f"request body over the limit of {cap} bytes",
    }.get(status, exc.text or exc.reason)
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return ApiError(status, code or "http_error", message, headers)


# --- what aiohttp answers itself ---------------------------------------------------------------


class _JsonErrorConnection(web.RequestHandler):
    """aiohttp's HTTP/1.1 connection, answering a request it rejects before any middleware runs
    (a malformed request line, header or chunk; a line over 8 KiB; a method llhttp does not
    know; a body that does not decode as its Content-Encoding) with the API's JSON error, not
    aiohttp's plain text. The connection closes after it, as aiohttp's own answer does."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if answering began
        coding = _missing_coding(exc)
        if status >= 500:  # (unreached: the _errors middleware answers every handler's error)
            error = ApiError(status, "internal", "the coordinator failed to handle this request")
        elif coding is not None:  # (aiohttp's 400: a coding it has no library for here)
            error, status = unsupported_coding(coding), 415
        else:
            code = _HTTP_CODES.get(status, "bad_request")
            error = ApiError(status, code, _unparsed(exc, message))
        response = error.response()
        response.force_close()
        server = self._manager  # (None once the connection is lost)
        if isinstance(server, _JsonErrorServer):
            server.count_unparsed(request.method, status)
        return response


def _missing_coding(exc: BaseException | None) -> str | None:
    """The Content-Encoding aiohttp refused for want of its library (``br`` without Brotli,
    ``zstd`` without backports.zstd), or None for any other error. Its message then reads
    "Can not decode content-encoding: zstandard (zstd). Please install ..."."""
    if not isinstance(exc, ContentEncodingError):
        return None
    named = _INSTALL_CODING.search(str(exc.message))
    return None if named is None or named[1] in http_log.BODY_CODINGS else named[1]


_INSTALL_CODING = re.compile(r"\((\w+)\)\.\s*Please install")


def _unparsed(exc: BaseException | None, message: str | None) -> str:
    """What was wrong with a request aiohttp could not parse, in one line."""
    if isinstance(exc, ContentEncodingError):  # ("deflate", or "Can not decode ...: gzip")
        encoding = str(exc.message).rpartition(": ")[2][:40]
        return f"the body cannot be read as sent (Content-Encoding {encoding!r})"
    lines = (message or str(exc or "")).strip().splitlines()
    detail = _QUOTED_BYTES.split(lines[0])[0].rstrip(":. ") if lines else "malformed"
    return f"the request is not valid HTTP/1.1: {detail[:200]}"


#: Where aiohttp's message quotes the bytes it refused (the client's own: not sent back).
_QUOTED_BYTES = re.compile(r":\s*(?:b'|b\"|bytearray\()")


class _JsonErrorServer(web.Server):
    """aiohttp's server, making :class:`_JsonErrorConnection` connections; they report each
    request they answer themselves to ``count_unparsed(method, status)`` (the API's counter,
    set by :class:`ApiRunner`)."""

    count_unparsed: Callable[[str, int], None]

    def __call__(self) -> web.RequestHandler:
        connection = super().__call__()
        connection.__class__ = _JsonErrorConnection  # the same slots: only handle_error differs
        return connection


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a :class:`_JsonErrorServer` counting what its
    connections answer themselves with ``count_unparsed``."""

    def __init__(
        self, app: web.Application, count_unparsed: Callable[[str, int], None], **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._count_unparsed = count_unparsed

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # (the application builds it: no other way in)
        server.count_unparsed = self._count_unparsed
        return server
