"""The log an aiohttp server (the node's and the coordinator's HTTP) writes its own errors to.

aiohttp logs a request it could not parse (a malformed request line or header, a URL over
8 KiB, a body that does not decode as its Content-Encoding) at ERROR with a traceback, as if it
were the server's bug. It is the client's fault, and the client got its 400: such a request is
one DEBUG line here, its text on that one line with every character that is not printable
escaped (a request line or header may carry ESC or CR: aiohttp's pure-Python parser quotes a
refused request target as it came). A handler that raised (answered 500) still logs at ERROR
with its traceback. :data:`LINGER_S` is the two servers' other shared setting;
:func:`refused_coding` tells a body in a Content-Encoding aiohttp would not decode.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import compression_utils
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from meshinfer.runtime.log_lines import printable

#: What aiohttp raises for a request it cannot parse or whose body it cannot decode (the
#: latter when the rest of a body answered before it was read is drained).
CLIENT_ERRORS = (HttpProcessingError, RequestPayloadError)

LINGER_S = 1.0
"""``lingering_time`` of both servers: how long a body left unread (answered first: a 403, a
413, an unauthorized request) is read on and dropped before the connection closes. aiohttp's
default is 10 s; this is long enough for the client to read the answer before the close
(closing on unread bytes resets the connection), short enough not to hold a handler for a
client that keeps sending."""

#: The body Content-Encodings aiohttp decodes (besides ``identity``): only these, named alone
#: (``gzip, identity`` is read as it came), and ``br``/``zstd`` only with their library
#: (``compression_utils.HAS_BROTLI``/``HAS_ZSTD``, aiohttp internals).
_LIBRARY = {"gzip": "", "deflate": "", "br": "HAS_BROTLI", "zstd": "HAS_ZSTD"}
BODY_CODINGS: tuple[str, ...] = tuple(
    coding
    for coding, present in _LIBRARY.items()
    if not present or getattr(compression_utils, present, False)
)


def refused_coding(headers: CIMultiDictProxy[str]) -> str | None:
    """The Content-Encoding (as sent) of a request body aiohttp would not decode but read as it
    came, compressed or not: an unknown coding, a list (``gzip, identity``) or the header twice
    (aiohttp reads the first only). None for none, ``identity`` or one of :data:`BODY_CODINGS`.
    Such a body is answered 415 with ``Accept-Encoding`` naming those (RFC 9110 15.5.16)."""
    sent = headers.getall("Content-Encoding", [])
    if not sent:
        return None
    if len(sent) > 1:
        return ", ".join(sent)
    coding = sent[0].strip().lower() if sent[0].isascii() else sent[0]  # (as aiohttp reads it)
    return None if coding in ("", "identity", *BODY_CODINGS) else sent[0]


def unsupported_coding(coding: str) -> tuple[str, dict[str, str]]:
    """The message and headers of the 415 answering a body in ``coding`` (RFC 9110 15.5.16:
    ``Accept-Encoding`` names the codings that are decoded here)."""
    accepted = ", ".join(("identity", *BODY_CODINGS))
    message = (
        f"Content-Encoding {coding[:40]!r} is not supported here: send the body uncompressed"
        f" or in one of {accepted}"
    )
    return message, {"Accept-Encoding": ", ".join(BODY_CODINGS)}


class ClientErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``logger`` for ``web.AppRunner(..., logger=ClientErrorLog(logger))`` (module doc)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, CLIENT_ERRORS):
            level, kwargs["exc_info"] = logging.DEBUG, None
            msg, args = f"{msg}: %s", (*args, printable(str(exc).replace("\n", " ")))
        super().log(level, msg, *args, **kwargs)
