"""The HTTP base URLs the command-line clients take (``--url``), and how they are opened."""

from __future__ import annotations

import ipaddress
import urllib.parse
import urllib.request

from meshinfer.errors import ConfigError

__all__ = ["check_http_url", "opener_for"]


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


def opener_for(url: str) -> urllib.request.OpenerDirector:
    """A urllib opener for ``url``; environment proxies (``http_proxy``) apply except to a
    daemon on this host, which no proxy can reach: at a loopback address (the default listen
    address), or at the wildcard one a daemon listening on every address recorded."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        loopback = host == "localhost"
    else:
        loopback = address.is_loopback or address.is_unspecified
    return urllib.request.build_opener(urllib.request.ProxyHandler({} if loopback else None))
