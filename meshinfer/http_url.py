"""The HTTP base URLs the command-line clients take (``--url``)."""

from __future__ import annotations

import urllib.parse

from meshinfer.errors import ConfigError

__all__ = ["check_http_url"]


def check_http_url(url: str, what: str) -> str:
    """``url`` without surrounding blanks or a trailing slash; ConfigError naming ``what``
    (e.g. "coordinator URL") unless it is an http(s) URL with a host and, if any, a valid port."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises ValueError for a malformed or out-of-range port
    except ValueError:  # also an unclosed "[" of an IPv6 address
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {url!r} must look like http://HOST:PORT")
    return url.strip().rstrip("/")
