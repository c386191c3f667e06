"""urllib plumbing of the command-line HTTP clients (:mod:`coordinator.client`, ``meshinfer-node
status``).

:func:`strict_opener` is :func:`~meshinfer.http_url.opener_for` that follows no redirect (it
would carry the API token wherever a 30x pointed, and turn a POST into a GET: the redirect's
``HTTPError`` is raised instead) and ends each request by one deadline, ``timeout`` seconds
after its connection was made, connecting and every read of the answer included (a socket's
own timeout bounds each step alone: a server sending one byte just within it, over and over,
held a request for ever). :func:`read_capped` reads an answer's body in chunks up to a cap.
"""

from __future__ import annotations

import http.client
import io
import time
import urllib.error
import urllib.request
from typing import Any

from meshinfer.http_url import opener_for

__all__ = ["read_body", "read_capped", "strict_opener"]

_READ_CHUNK = 1 << 20


def strict_opener(url: str) -> urllib.request.OpenerDirector:
    """An opener for ``url`` (proxies as :func:`~meshinfer.http_url.opener_for` decides) that
    refuses redirects and bounds each request as a whole (module docstring)."""
    opener = opener_for(url)
    for handler in (_RefuseRedirects(), _DeadlineHTTPHandler(), _DeadlineHTTPSHandler()):
        opener.add_handler(handler)
    return opener


class _RefuseRedirects(urllib.request.BaseHandler):
    """Raises the HTTPError of a redirect, before urllib's HTTPRedirectHandler (order 500)
    follows it with the Authorization header to wherever it points (another host too)."""

    handler_order = 400

    def http_error_302(self, req, fp, code, msg, headers):
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _DeadlineConnection(http.client.HTTPConnection):
    """An HTTP connection whose every step (connecting, each send, each read of the answer)
    ends by one deadline, ``timeout`` seconds after it was made (urllib makes one per request).
    A socket's own timeout bounds each step alone: a server sending one byte just within it,
    over and over, held a request for ever."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timed = isinstance(self.timeout, int | float)
        self._deadline = time.monotonic() + self.timeout if timed else None

    def _left(self) -> float:
        left = self._deadline - time.monotonic()  # type: ignore[operator]
        if left <= 0:
            raise TimeoutError("the request's time ran out")
        return left

    def connect(self) -> None:
        if self._deadline is not None:
            self.timeout = self._left()
        super().connect()

    def send(self, data: Any) -> None:
        if self._deadline is not None and self.sock is not None:
            self.sock.settimeout(self._left())
        super().send(data)

    def response_class(self, sock: Any, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        if self._deadline is not None:
            sock = _DeadlineSocket(sock, self._left)
        return http.client.HTTPResponse(sock, *args, **kwargs)


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineSocket:
    """What an HTTPResponse reads its answer from (it only calls ``makefile``): each read
    waits no longer than what is left of the request's time."""

    def __init__(self, sock: Any, left: Any) -> None:
        self._sock, self._left = sock, left

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._left))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: Any, left: Any) -> None:
        self._sock, self._left = sock, left
        self._raw = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._left())
        return self._raw.readinto(buffer)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    handler_order = 499  # (asked before the opener's own HTTPHandler, order 500)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineConnection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    handler_order = 499

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPSConnection, req, context=self._context)


def read_capped(response: http.client.HTTPResponse, cap: int) -> bytearray | None:
    """The answer's body, read in chunks; None once it is larger than ``cap`` bytes (then no
    more of it is read: a ``Content-Length`` over ``cap`` is not read at all). A body that
    cannot be read as HTTP is an :class:`http.client.HTTPException` (see :func:`read_body`)."""
    if response.length is not None and response.length > cap:
        return None
    body = bytearray()
    while chunk := read_body(response, min(_READ_CHUNK, cap + 1 - len(body))):
        body += chunk
        if len(body) > cap:
            return None
    return body


def read_body(response: http.client.HTTPResponse, size: int) -> bytes:
    """Up to ``size`` bytes of the answer's body. http.client raises a bare ValueError for a
    negative chunk size (it asks its reader for ``-5`` bytes): here an HTTPException, as every
    other answer that is not HTTP, which callers take as the server's fault."""
    try:
        return response.read(size)
    except ValueError as exc:
        raise http.client.HTTPException(f"the answer's body is not valid HTTP ({exc})") from None
