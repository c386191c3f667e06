"""The HTTP base URLs the command-line clients take (``--url``), and how they are opened."""

from __future__ import annotations

import ipaddress
import urllib.parse
import urllib.request

from meshinfer.errors import ConfigError

__all__ = ["check_http_url", "opener_for"]


def check_http_url(url: str, what: str) -> str:
    """``url`` without surrounding blanks or a trailing slash; ConfigError naming ``what``
    (e.g. "coordinator URL") unless it is an http(s) URL with a host and, if any, a valid port
    and a path, without a query, a fragment, a user, blanks or control characters (the API's
    paths are appended to it)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises ValueError for a malformed or out-of-range port
    except ValueError:  # also an unclosed "[" of an IPv6 address
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {url!r:.200} must look like http://HOST:PORT")
    # the API's paths are appended to it: a query or fragment would swallow them, a user
    # would be taken for part of the host, a blank or control character is no URL
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ConfigError(f"{what} {url!r:.200} must not hold a query or fragment (? or #)")
    if "@" in parts.netloc:
        raise ConfigError(f"{what} {url!r:.200} must not hold a user name (give no user@)")
    if any(c.isspace() or not c.isprintable() for c in url.strip()):
        raise ConfigError(f"{what} {url!r:.200} must not hold blanks or control characters")
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
