"""The DNS-SD names and TXT records of meshinfer's mDNS adverts (RFC 6763).

Every node advertises one service ``<label>._meshinfer._tcp.local.``, its instance label derived
from its fleet and node ids (:func:`instance_label`), with a TXT record carrying node id, fleet
id, Noise static key, key fingerprint, roles and protocol version (:func:`txt_for_advert` /
:func:`advert_from_txt`). Pure functions: no zeroconf, no sockets. Re-exported by
:mod:`meshinfer.discovery.mdns`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence

from meshinfer.discovery.base import MAX_ADDRESSES, MalformedAdvert, PeerAdvert, key_fingerprint
from meshinfer.errors import ConfigError
from meshinfer.transport.base import LinkKind

SERVICE_TYPE = "_meshinfer._tcp.local."
TXT_VERSION = 1
_HEX_KEY_RE = re.compile(r"[0-9a-f]{64}")
_DECIMAL_RE = re.compile(r"[0-9]{1,6}")
_LABEL_UNSAFE_RE = re.compile(r"[^A-Za-z0-9-]+")


def instance_label(node_id: str, fleet_id: str) -> str:
    """The DNS-SD instance label of a node: readable node id prefix + 16 hex digits of a hash.

    The hash covers fleet id and node id: node ids are unique within a fleet, but two fleets may
    share a link (and a node id). mDNS names compare case-insensitively and a label holds 63
    bytes; the hash keeps labels of distinct nodes distinct (``"A"`` and ``"a"`` included), the
    prefix keeps them legible in mDNS browsers.
    """
    identity = f"{fleet_id}\x00{node_id}".encode()
    digest = hashlib.blake2b(identity, digest_size=8).hexdigest()
    readable = _LABEL_UNSAFE_RE.sub("-", node_id).strip("-")[:40] or "node"
    return f"{readable}-{digest}"


def pack_txt(items: Mapping[str, str]) -> bytes:
    """Encode ``key=value`` pairs as TXT record data (RFC 6763 section 6). Local input only."""
    out = bytearray()
    for key, value in items.items():
        entry = f"{key}={value}".encode()
        if not key or "=" in key or len(entry) > 255:
            raise ConfigError(f"TXT entry {key!r}: empty key, '=' in key, or over 255 bytes")
        out += bytes([len(entry)]) + entry
    return bytes(out) or b"\x00"


def unpack_txt(data: bytes, keys: Collection[str] | None = None) -> dict[str, bytes | None]:
    """Decode TXT record data into ``{key: value}``; a key without ``=`` maps to ``None``.

    Keys are ASCII and compared case-insensitively (returned lower-case); the first occurrence of
    a key wins and empty strings are skipped (RFC 6763 section 6.4). ``keys`` (lower-case), if
    given, are the keys wanted: entries under any other key are skipped unread, whatever their
    bytes (forward compatibility). Raises :class:`~meshinfer.discovery.base.MalformedAdvert` for
    truncated data or for a non-ASCII key that is not skipped.
    """
    if not isinstance(data, bytes):
        raise MalformedAdvert("TXT data is not bytes")
    wanted = None if keys is None else frozenset(k.encode("ascii") for k in keys)
    items: dict[str, bytes | None] = {}
    pos = 0
    while pos < len(data):
        end = pos + 1 + data[pos]
        if end > len(data):
            raise MalformedAdvert("TXT string runs past the end of the record")
        _add_txt_entry(items, data[pos + 1 : end], wanted)
        pos = end
    return items


def _add_txt_entry(
    items: dict[str, bytes | None], entry: bytes, wanted: frozenset[bytes] | None
) -> None:
    key, equals, value = entry.partition(b"=")
    if not key or (wanted is not None and key.lower() not in wanted):
        return
    if not key.isascii() or not key.decode("ascii").isprintable():
        raise MalformedAdvert("TXT key is not printable ASCII")
    items.setdefault(key.decode("ascii").lower(), value if equals else None)


TXT_KEYS = frozenset({"txtvers", "id", "fleet", "key", "fp", "roles", "pv", "link"})
"""The TXT keys :func:`advert_from_txt` reads; entries under any other key are ignored."""


def txt_for_advert(advert: PeerAdvert) -> bytes:
    """The TXT record data that advertises ``advert`` (everything but addresses and port)."""
    items = {
        "txtvers": str(TXT_VERSION),
        "id": advert.node_id,
        "fleet": advert.fleet_id,
        "key": advert.static_key.hex(),
        "fp": advert.fingerprint,
        "roles": ",".join(advert.roles),
        "pv": str(advert.protocol_version),
    }
    if advert.link is not None:
        items["link"] = advert.link.value
    return pack_txt(items)


def advert_from_txt(data: bytes, *, addresses: Sequence[str], port: int | None) -> PeerAdvert:
    """Parse a peer's TXT record data (plus its SRV port and addresses) into a PeerAdvert.

    Raises :class:`~meshinfer.discovery.base.MalformedAdvert` (a RemoteProtocolError) for
    anything a peer could get wrong; unknown keys are ignored for forward compatibility.
    """
    items = unpack_txt(data, TXT_KEYS)
    if _txt_int(items, "txtvers") != TXT_VERSION:
        raise MalformedAdvert(f"unsupported txtvers (we read {TXT_VERSION})")
    static_key = _txt_key(items)
    if _txt_text(items, "fp") != key_fingerprint(static_key):
        raise MalformedAdvert("TXT fp is not the fingerprint of TXT key")
    roles = _txt_text(items, "roles")
    try:
        return PeerAdvert(
            node_id=_txt_text(items, "id"),
            fleet_id=_txt_text(items, "fleet"),
            static_key=static_key,
            roles=tuple(roles.split(",")) if roles else (),
            protocol_version=_txt_int(items, "pv"),
            addresses=tuple(addresses)[:MAX_ADDRESSES],
            port=port,  # type: ignore[arg-type]  # None is refused by validation
            link=_txt_link(items),
        )
    except ConfigError as exc:
        raise MalformedAdvert(str(exc)) from None


def _txt_text(items: Mapping[str, bytes | None], key: str) -> str:
    value = items.get(key)
    if value is None:
        raise MalformedAdvert(f"TXT lacks {key}=")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedAdvert(f"TXT {key} is not UTF-8") from None


def _txt_int(items: Mapping[str, bytes | None], key: str) -> int:
    text = _txt_text(items, key)
    if not _DECIMAL_RE.fullmatch(text):
        raise MalformedAdvert(f"TXT {key} is not a small decimal number")
    return int(text)


def _txt_key(items: Mapping[str, bytes | None]) -> bytes:
    text = _txt_text(items, "key")
    if not _HEX_KEY_RE.fullmatch(text):
        raise MalformedAdvert("TXT key is not 64 lower-case hex digits")
    return bytes.fromhex(text)


def _txt_link(items: Mapping[str, bytes | None]) -> LinkKind | None:
    if "link" not in items:
        return None
    try:
        return LinkKind(_txt_text(items, "link"))
    except ValueError:
        raise MalformedAdvert("TXT link is not a known link kind") from None
