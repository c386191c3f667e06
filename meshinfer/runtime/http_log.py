"""The log an aiohttp server (the node's and the coordinator's HTTP) writes its own errors to.

aiohttp logs a request it could not parse (a malformed request line or header, a URL over
8 KiB, a body that does not decode as its Content-Encoding) at ERROR with a traceback, as if it
were the server's bug. It is the client's fault, and the client got its 400: such a request is
one DEBUG line here. A handler that raised (answered 500) still logs at ERROR with its
traceback. :data:`LINGER_S` is the two servers' other shared setting.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

#: What aiohttp raises for a request it cannot parse or whose body it cannot decode (the
#: latter when the rest of a body answered before it was read is drained).
CLIENT_ERRORS = (HttpProcessingError, RequestPayloadError)

LINGER_S = 1.0
"""``lingering_time`` of both servers: how long a body left unread (answered first: a 403, a
413, an unauthorized request) is read on and dropped before the connection closes. aiohttp's
default is 10 s; this is long enough for the client to read the answer before the close
(closing on unread bytes resets the connection), short enough not to hold a handler for a
client that keeps sending."""


class ClientErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``logger`` for ``web.AppRunner(..., logger=ClientErrorLog(logger))`` (module doc)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, CLIENT_ERRORS):
            level, kwargs["exc_info"] = logging.DEBUG, None
            msg, args = f"{msg}: %s", (*args, str(exc).replace("\n", " "))
        super().log(level, msg, *args, **kwargs)
