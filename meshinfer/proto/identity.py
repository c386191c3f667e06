"""Fleet identity: node certificates, revocations and session admission (sans-I/O).

A fleet authority holds an Ed25519 signing key. It signs a :class:`NodeCertificate` for every
node, binding the node id, the node's Noise static public key (X25519), the fleet id, the node's
roles, a validity window and a serial number. Every node holds the :class:`FleetTrust` (fleet id +
authority public key). A certificate rides in the Noise handshake payload, and :func:`admit`
decides whether a session may exist.

Wire encodings. Every signed object travels as the msgpack array ``[body, signature]``: ``body``
is the msgpack encoding of a fixed-order field array, ``signature`` the authority's Ed25519
signature over ``DOMAIN + body`` (one domain per object kind, so a signature can never be replayed
as another kind). Decoders re-encode what they decoded and refuse anything that is not
byte-for-byte canonical, so one object has exactly one encoding (body field order)::

    certificate  [fleet_id, serial, node_id, static_public, sorted roles, not_before, not_after]
    revocation   [fleet_id, sequence, revoked_at, serial | nil, node_id | nil, reason]
    list         [LIST_FORMAT, fleet_id, [revocation entry bytes, ...]]   (not signed itself)

Revocations. Each :class:`RevocationEntry` is signed on its own, so a :class:`RevocationList` is a
plain set of verified entries: any node can merge lists learned from different peers without the
authority (union: commutative, associative, idempotent), and a forged or truncated list can only
fail to add entries, never remove one. ``version`` is the highest sequence number seen. An entry
names either a serial (that one certificate) or a node id (every certificate of that node whose
``not_before`` is at or before ``revoked_at``; a certificate issued later re-admits the node).

Admission checks, in order; the first that fails names the :class:`AdmissionError` reason:
``malformed`` (does not decode), ``wrong-fleet``, ``bad-signature``, ``key-mismatch`` (not the
static key the handshake proved), ``not-yet-valid`` / ``expired`` (with a clock-skew tolerance),
``revoked``, ``missing-role``.

Keys are real cryptographic keys: they come from the OS CSPRNG (pynacl) unless the caller passes
the key material in (a seed), never from a seeded ``random.Random``.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, InitVar, dataclass, field, replace
from functools import cached_property
from typing import Any

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from meshinfer.errors import (
    AdmissionError,
    ConfigError,
    IdentityError,
    LocalProtocolError,
    RemoteProtocolError,
    RevocationError,
)

CERT_DOMAIN = b"meshinfer-cert-v1\x00"
REVOCATION_DOMAIN = b"meshinfer-revocation-v1\x00"
PROLOGUE_DOMAIN = b"meshinfer-noise-prologue-v1\x00"

ROLES = frozenset({"vehicle", "rsu", "coordinator"})
KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_NAME_CHARS = 64
MAX_REASON_CHARS = 128
MAX_COUNTER = 2**63 - 1
MAX_CERTIFICATE_BYTES = 512
MAX_REVOCATION_ENTRY_BYTES = 1024
MAX_REVOCATION_ENTRIES = 16384
MAX_REVOCATION_LIST_BYTES = 8 * 1024 * 1024
LIST_FORMAT = 1
#: Seconds of tolerance on either side of a certificate's validity window: the one default of
#: session admission (``SessionConfig.clock_skew``) and of membership records' certificate checks
#: (Kerberos' 5 minutes; the daemons' ``[session] clock_skew``).
DEFAULT_CLOCK_SKEW_S = 300.0
#: The largest clock skew a daemon's file may give: a day (a wider window would let a long
#: expired certificate in).
MAX_CLOCK_SKEW_S = 86400.0


def check_clock_skew(value: float) -> None:
    """ValueError unless ``value`` is a clock skew in 0..:data:`MAX_CLOCK_SKEW_S` seconds (NaN
    is not: with it every certificate's validity would be refused)."""
    if not 0 <= value <= MAX_CLOCK_SKEW_S:
        raise ValueError(f"clock_skew must be in 0..{MAX_CLOCK_SKEW_S:g} seconds")


_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_NAME_CHARS}}}")
_FINGERPRINT_PERSON = b"meshinfer-fp"

ErrorFactory = Callable[[str], RemoteProtocolError]


# --- field validation (ConfigError for local callers; decoders translate) ----------------------


def check_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid node or fleet id: 1-64 chars of ``[A-Za-z0-9._-]``.

    ``.`` and ``..`` are refused: ids name files and directories (a fleet's certificates, a
    cluster's node directories), where those two mean "here" and "the parent".
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(
            f"{kind} must be 1-64 characters of A-Z a-z 0-9 . _ - (not . or ..), got {value!r:.80}"
        )
    return value


def check_roles(value: Iterable[object]) -> frozenset[str]:
    """Return ``value`` as a frozenset if it is a non-empty subset of :data:`ROLES`."""
    items = list(value)
    unknown = sorted(repr(r) for r in items if not isinstance(r, str) or r not in ROLES)
    if unknown or not items:
        raise ConfigError(
            f"roles must be a non-empty subset of {', '.join(sorted(ROLES))}; "
            f"got {', '.join(unknown) or 'none'}"
        )
    return frozenset(items)  # type: ignore[arg-type]


def check_reason(value: object) -> str:
    """Return ``value`` if it is a revocation reason: text of at most 128 characters (UTF-8)."""
    if not isinstance(value, str) or len(value) > MAX_REASON_CHARS:
        raise ConfigError(f"revocation reason must be a string of <= {MAX_REASON_CHARS} chars")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. undecodable bytes from a command line
        raise ConfigError(f"revocation reason is not valid text, got {value!r:.80}") from None
    return value


def _check_key(kind: str, value: object) -> bytes:
    if type(value) is not bytes or len(value) != KEY_BYTES:
        raise ConfigError(f"{kind} must be {KEY_BYTES} bytes")
    return value


#: A fixed scalar to multiply a public key by: X25519 clamps it to a multiple of 8, so the
#: product is the all-zero point exactly when the key has small order (libsodium then fails).
_ORDER_PROBE = b"\x01" * KEY_BYTES


def check_static_public(value: object) -> bytes:
    """Return ``value`` if it can be a Noise static public key: 32 bytes that are no X25519 point
    of small order (all zeros, one, ... : Diffie-Hellman with one gives all zeros, which the
    handshake refuses, so a node holding such a key could never join). ConfigError if not."""
    key = _check_key("static public key", value)
    try:
        nacl.bindings.crypto_scalarmult(_ORDER_PROBE, key)
    except nacl.exceptions.CryptoError:
        raise ConfigError(
            "static public key is an X25519 point of small order (such as all zeros): "
            "no Noise handshake can complete with it"
        ) from None
    return key


def _check_time(kind: str, value: object) -> float:
    if type(value) not in (int, float):
        raise ConfigError(f"{kind} must be a number of unix seconds")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ConfigError(f"{kind} is out of range") from None
    if not math.isfinite(seconds):
        raise ConfigError(f"{kind} must be finite")
    return seconds


def _check_counter(kind: str, value: object, low: int) -> int:
    if type(value) is not int or not low <= value <= MAX_COUNTER:
        raise ConfigError(f"{kind} must be an integer in [{low}, 2**63-1]")
    return value


def _check_signature(value: object) -> bytes:
    if type(value) is not bytes or len(value) != SIGNATURE_BYTES:
        raise ConfigError(f"signature must be {SIGNATURE_BYTES} bytes")
    return value


def key_fingerprint(public_key: bytes) -> str:
    """Short hex digest (16 chars) of a public key, for logs, mDNS TXT records and people."""
    digest = hashlib.blake2b(public_key, digest_size=8, person=_FINGERPRINT_PERSON)
    return digest.hexdigest()


def static_public_key(static_private: bytes) -> bytes:
    """The X25519 public key that belongs to a 32-byte Noise static private key."""
    return nacl.bindings.crypto_scalarmult_base(_check_key("static private key", static_private))


def generate_static_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 Noise static key pair ``(private, public)`` from the OS CSPRNG."""
    private = nacl.public.PrivateKey.generate().encode()
    return private, static_public_key(private)


# --- signed envelopes --------------------------------------------------------------------------


def _unpack(data: bytes, what: str, limit: int, error: ErrorFactory) -> Any:
    if len(data) > limit:
        raise error(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise error(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def _open_envelope(data: bytes, what: str, limit: int, error: ErrorFactory) -> tuple[bytes, bytes]:
    """Split ``[body, signature]``; the envelope must be canonical msgpack."""
    outer = _unpack(data, what, limit, error)
    if not (isinstance(outer, list) and len(outer) == 2 and all(type(p) is bytes for p in outer)):
        raise error(f"{what} must be a [body, signature] pair of byte strings")
    if len(outer[1]) != SIGNATURE_BYTES or msgpack.packb(outer) != bytes(data):
        raise error(f"{what} envelope is not canonical")
    return outer[0], outer[1]


def _body_fields(body: bytes, what: str, count: int, error: ErrorFactory) -> list[Any]:
    fields = _unpack(body, what, len(body), error)
    if not isinstance(fields, list) or len(fields) != count:
        raise error(f"{what} body must be an array of {count} fields")
    return fields


def _seal(body: bytes, signature: bytes) -> bytes:
    return msgpack.packb([body, signature])


def _signature_ok(public_key: bytes, domain: bytes, body: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(domain + body, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


# --- trust anchor and certificates -------------------------------------------------------------


@dataclass(frozen=True)
class FleetTrust:
    """What every node holds: the fleet id and the fleet authority's Ed25519 public key."""

    fleet_id: str
    authority_public_key: bytes

    def __post_init__(self) -> None:
        check_name("fleet id", self.fleet_id)
        _check_key("authority public key", self.authority_public_key)

    @property
    def authority_fingerprint(self) -> str:
        """Short hex fingerprint of the authority key."""
        return key_fingerprint(self.authority_public_key)


@dataclass(frozen=True)
class NodeCertificate:
    """A fleet authority's statement that ``static_public`` belongs to ``node_id`` in ``fleet_id``.

    Times are wall-clock unix seconds (stored as float). Constructing one with invalid fields
    raises :class:`ConfigError`; decoding invalid bytes raises ``AdmissionError("malformed")``.
    """

    fleet_id: str
    serial: int
    node_id: str
    static_public: bytes = field(repr=False)
    roles: frozenset[str]
    not_before: float
    not_after: float
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_name("fleet id", self.fleet_id)
        _check_counter("serial", self.serial, 0)
        check_name("node id", self.node_id)
        _check_key("static public key", self.static_public)
        object.__setattr__(self, "roles", check_roles(self.roles))
        object.__setattr__(self, "not_before", _check_time("not_before", self.not_before))
        object.__setattr__(self, "not_after", _check_time("not_after", self.not_after))
        if self.not_after < self.not_before:
            raise ConfigError("certificate not_after is before not_before")
        _check_signature(self.signature)

    @property
    def fingerprint(self) -> str:
        """Short hex fingerprint of the static key (what mDNS TXT records advertise)."""
        return key_fingerprint(self.static_public)

    def seconds_left(self, now: float, clock_skew: float) -> float:
        """Seconds from ``now`` until the certificate expires beyond ``clock_skew``: negative
        exactly when :meth:`validity_problem` says ``"expired"`` (valid up to ``not_after +
        clock_skew`` inclusive)."""
        return self.not_after + clock_skew - now

    def validity_problem(self, now: float, clock_skew: float) -> str | None:
        """Why the certificate is not valid at ``now`` (unix seconds), give or take
        ``clock_skew`` seconds on either side: ``"not-yet-valid"`` (``now`` before
        ``not_before - clock_skew``), ``"expired"`` (after ``not_after + clock_skew``), or
        None: valid, both ends inclusive. The one validity rule of admission, membership
        records, sessions, daemon start-up (``clock_skew`` 0) and ``fleet status``. Fails
        closed: a NaN ``now`` or ``clock_skew`` is never valid."""
        if not now >= self.not_before - clock_skew:
            return "not-yet-valid"
        if not self.seconds_left(now, clock_skew) >= 0:
            return "expired"
        return None

    def body(self) -> bytes:
        """The canonical encoding the authority signs (without the domain prefix)."""
        fields = [self.fleet_id, self.serial, self.node_id, self.static_public]
        return msgpack.packb([*fields, sorted(self.roles), self.not_before, self.not_after])

    def to_bytes(self) -> bytes:
        """The wire form carried in handshake payloads and stored as ``node.cert``."""
        return _seal(self.body(), self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeCertificate:
        """Decode (without verifying the signature); raise ``AdmissionError("malformed")``."""

        def malformed(detail: str) -> AdmissionError:
            return AdmissionError("malformed", detail)

        body, signature = _open_envelope(data, "certificate", MAX_CERTIFICATE_BYTES, malformed)
        fleet_id, serial, node_id, static, roles, not_before, not_after = _body_fields(
            body, "certificate", 7, malformed
        )
        if not isinstance(roles, list):
            raise malformed("certificate roles must be an array")
        try:
            cert = cls(fleet_id, serial, node_id, static, roles, not_before, not_after, signature)
        except ConfigError as exc:
            raise malformed(str(exc)) from None
        if cert.body() != body:
            raise malformed("certificate body is not canonical")
        return cert

    def verify(self, trust: FleetTrust) -> None:
        """Raise ``AdmissionError`` (wrong-fleet, bad-signature) unless ``trust`` vouches for it."""
        if self.fleet_id != trust.fleet_id:
            raise AdmissionError(
                "wrong-fleet", f"certificate is for fleet {self.fleet_id!r}, not {trust.fleet_id!r}"
            )
        if not _signature_ok(trust.authority_public_key, CERT_DOMAIN, self.body(), self.signature):
            raise AdmissionError("bad-signature", f"certificate of node {self.node_id!r}")


# --- revocations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevocationEntry:
    """One authority-signed revocation, of a serial or of a node id (exactly one of the two)."""

    fleet_id: str
    sequence: int
    revoked_at: float
    serial: int | None
    node_id: str | None
    reason: str
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_name("fleet id", self.fleet_id)
        _check_counter("sequence", self.sequence, 1)
        object.__setattr__(self, "revoked_at", _check_time("revoked_at", self.revoked_at))
        if (self.serial is None) == (self.node_id is None):
            raise ConfigError("a revocation names exactly one of serial or node id")
        if self.serial is not None:
            _check_counter("serial", self.serial, 0)
        if self.node_id is not None:
            check_name("node id", self.node_id)
        check_reason(self.reason)
        _check_signature(self.signature)

    def covers(self, cert: NodeCertificate) -> bool:
        """Whether this entry revokes ``cert``."""
        if cert.fleet_id != self.fleet_id:
            return False
        if self.serial is not None:
            return cert.serial == self.serial
        return cert.node_id == self.node_id and cert.not_before <= self.revoked_at

    def body(self) -> bytes:
        """The canonical encoding the authority signs (without the domain prefix)."""
        fields = [self.fleet_id, self.sequence, self.revoked_at, self.serial, self.node_id]
        return msgpack.packb([*fields, self.reason])

    def to_bytes(self) -> bytes:
        """Wire form of this one entry."""
        return _seal(self.body(), self.signature)

    @classmethod
    def from_bytes(cls, data: bytes, trust: FleetTrust) -> RevocationEntry:
        """Decode and verify one entry against ``trust``; raise :class:`RevocationError`."""
        what = "revocation entry"
        body, signature = _open_envelope(data, what, MAX_REVOCATION_ENTRY_BYTES, RevocationError)
        fields = _body_fields(body, what, 6, RevocationError)
        try:
            entry = cls(*fields, signature=signature)
        except ConfigError as exc:
            raise RevocationError(f"{what}: {exc}") from None
        if entry.body() != body:
            raise RevocationError(f"{what} body is not canonical")
        entry.verify(trust)
        return entry

    def verify(self, trust: FleetTrust) -> None:
        """Raise :class:`RevocationError` unless the fleet authority of ``trust`` signed this."""
        if self.fleet_id != trust.fleet_id:
            raise RevocationError(f"revocation entry is for fleet {self.fleet_id!r}")
        if not _signature_ok(
            trust.authority_public_key, REVOCATION_DOMAIN, self.body(), self.signature
        ):
            raise RevocationError(f"revocation entry {self.sequence} has a bad signature")


@dataclass(frozen=True)
class RevocationList:
    """An immutable, mergeable set of verified revocation entries of one fleet."""

    fleet_id: str
    entries: frozenset[RevocationEntry] = frozenset()
    _: KW_ONLY
    #: :data:`_ENTRIES_CHECKED` from :meth:`_of_checked` only (not a field: never stored)
    entries_checked: InitVar[object] = None

    def __post_init__(self, entries_checked: object) -> None:
        check_name("fleet id", self.fleet_id)
        if entries_checked is not _ENTRIES_CHECKED:  # (else a frozenset, each entry checked)
            object.__setattr__(self, "entries", frozenset(self.entries))
            _check_one_fleet(self.fleet_id, self.entries)

    @classmethod
    def _of_checked(
        cls, fleet_id: str, entries: frozenset[RevocationEntry], version: int | None = None
    ) -> RevocationList:
        """A list of ``entries`` that lists of ``fleet_id`` already hold (each checked when
        that list was built), built by the constructor but without its pass over them all: a
        merge into a list of 16k entries checks only what is new (see :meth:`merge`).
        ``version``, when the caller knows it, fills the :attr:`version` cache."""
        made = cls(fleet_id, entries, entries_checked=_ENTRIES_CHECKED)
        if version is not None:
            made.__dict__["version"] = version  # (where the cached_property keeps its value)
        return made

    @cached_property
    def version(self) -> int:
        """The highest sequence number seen (0 for an empty list). Computed once per list (the
        list is immutable): :meth:`FleetAuthority.revoke` and gossip read it often."""
        return max((e.sequence for e in self.entries), default=0)

    def merge(self, other: RevocationList) -> RevocationList:
        """Union with ``other`` (same fleet): commutative, associative and idempotent."""
        if other.fleet_id != self.fleet_id:
            raise LocalProtocolError(f"cannot merge revocations of {other.fleet_id!r}")
        new = other.entries - self.entries  # (set operations in C: no Python pass over all)
        if not new:
            return self  # (its lookup indexes, once built, kept)
        _check_one_fleet(self.fleet_id, new)  # only the new: this list's were checked
        version = max(self.version, max(e.sequence for e in new))
        return RevocationList._of_checked(self.fleet_id, self.entries | new, version)

    def records(self) -> list[dict[str, Any]]:
        """The entries as plain dicts (sequence, serial, node_id, revoked_at, reason), oldest
        first: for JSON documents."""
        fields = ("sequence", "serial", "node_id", "revoked_at", "reason")
        ordered = sorted(self.entries, key=lambda e: e.sequence)
        return [{name: getattr(e, name) for name in fields} for e in ordered]

    def since(self, version: int) -> RevocationList:
        """The entries with a sequence above ``version`` (a delta to gossip to a peer)."""
        newer = frozenset(e for e in self.entries if e.sequence > version)
        return RevocationList._of_checked(self.fleet_id, newer)

    def revocation_for(self, cert: NodeCertificate) -> RevocationEntry | None:
        """The entry that revokes ``cert`` (the earliest by sequence), or None."""
        candidates = self._by_serial.get(cert.serial, []) + self._by_node.get(cert.node_id, [])
        hits = [e for e in candidates if e.covers(cert)]
        return min(hits, key=lambda e: e.sequence, default=None)

    def is_revoked(self, cert: NodeCertificate) -> bool:
        """Whether any entry revokes ``cert``."""
        return self.revocation_for(cert) is not None

    @cached_property
    def _by_serial(self) -> dict[int, list[RevocationEntry]]:
        index: dict[int, list[RevocationEntry]] = {}
        for entry in self.entries:
            if entry.serial is not None:
                index.setdefault(entry.serial, []).append(entry)
        return index

    @cached_property
    def _by_node(self) -> dict[str, list[RevocationEntry]]:
        index: dict[str, list[RevocationEntry]] = {}
        for entry in self.entries:
            if entry.node_id is not None:
                index.setdefault(entry.node_id, []).append(entry)
        return index

    def to_bytes(self) -> bytes:
        """Deterministic wire form (entries ordered by sequence, then signature)."""
        ordered = sorted(self.entries, key=lambda e: (e.sequence, e.signature))
        return msgpack.packb([LIST_FORMAT, self.fleet_id, [e.to_bytes() for e in ordered]])

    @cached_property
    def _by_wire(self) -> dict[bytes, RevocationEntry]:
        """Each entry by its wire form (computed once per list: the list is immutable)."""
        return {entry.to_bytes(): entry for entry in self.entries}

    @classmethod
    def from_bytes(
        cls, data: bytes, trust: FleetTrust, held: RevocationList | None = None
    ) -> RevocationList:
        """Decode a list, verifying each entry against ``trust``; raise :class:`RevocationError`.
        An entry whose bytes are those of one in ``held`` (a list of the same fleet, verified
        when it was built) is taken from it unverified: pushing a 16k-entry list again costs
        no 16k signature checks."""
        outer = _unpack(data, "revocation list", MAX_REVOCATION_LIST_BYTES, RevocationError)
        if not (isinstance(outer, list) and len(outer) == 3 and outer[0] == LIST_FORMAT):
            raise RevocationError(f"revocation list must be [{LIST_FORMAT}, fleet id, entries]")
        _, fleet_id, raw_entries = outer
        if fleet_id != trust.fleet_id:
            raise RevocationError(f"revocation list is for fleet {fleet_id!r:.80}")
        if not isinstance(raw_entries, list):
            raise RevocationError("revocation list entries must be an array")
        if len(raw_entries) > MAX_REVOCATION_ENTRIES:
            raise RevocationError(f"revocation list holds at most {MAX_REVOCATION_ENTRIES} entries")
        if not all(type(raw) is bytes for raw in raw_entries):
            raise RevocationError("revocation entries must be byte strings")
        known = held._by_wire if held is not None and held.fleet_id == trust.fleet_id else {}
        return cls(
            trust.fleet_id,
            frozenset(known.get(r) or RevocationEntry.from_bytes(r, trust) for r in raw_entries),
        )


#: The token by which :meth:`RevocationList._of_checked` tells the constructor that every entry
#: is already known to be of the list's fleet.
_ENTRIES_CHECKED = object()


def _check_one_fleet(fleet_id: str, entries: frozenset[RevocationEntry]) -> None:
    if any(e.fleet_id != fleet_id for e in entries):
        raise LocalProtocolError("revocation list mixes entries of different fleets")


# --- admission and prologue --------------------------------------------------------------------


def admit(
    cert_bytes: bytes,
    *,
    proven_static: bytes,
    trust: FleetTrust,
    revocations: RevocationList,
    now: float,
    required_roles: frozenset[str] | None = None,
    clock_skew: float = DEFAULT_CLOCK_SKEW_S,
) -> NodeCertificate:
    """Admit a peer or raise :class:`AdmissionError` with a stable reason code.

    ``proven_static`` is the remote static key the Noise handshake authenticated; ``now`` is the
    wall-clock time in unix seconds; ``clock_skew`` widens the validity window on both sides.
    """
    if revocations.fleet_id != trust.fleet_id:
        raise LocalProtocolError("revocation list and trust anchor are for different fleets")
    cert = NodeCertificate.from_bytes(cert_bytes)
    cert.verify(trust)
    if cert.static_public != proven_static:
        raise AdmissionError("key-mismatch", f"node {cert.node_id!r} proved a different static key")
    _check_validity(cert, now, clock_skew)
    entry = revocations.revocation_for(cert)
    if entry is not None:
        raise AdmissionError(
            "revoked", f"node {cert.node_id!r} serial {cert.serial}: {entry.reason}"
        )
    missing = (required_roles or frozenset()) - cert.roles
    if missing:
        raise AdmissionError(
            "missing-role", f"node {cert.node_id!r} lacks {', '.join(sorted(missing))}"
        )
    return cert


_VALIDITY_DETAIL = {"not-yet-valid": "starts later", "expired": "has expired"}


def _check_validity(cert: NodeCertificate, now: float, clock_skew: float) -> None:
    problem = cert.validity_problem(now, clock_skew)
    if problem is not None:
        detail = _VALIDITY_DETAIL[problem]
        raise AdmissionError(problem, f"node {cert.node_id!r} certificate {detail}")


def prologue(fleet_id: str, protocol_version: int) -> bytes:
    """The Noise prologue: domain, 4-byte big-endian version, 1-byte length, ASCII fleet id."""
    fleet = check_name("fleet id", fleet_id).encode("ascii")
    if type(protocol_version) is not int or not 0 <= protocol_version < 2**32:
        raise ConfigError("protocol version must be an integer in [0, 2**32)")
    return PROLOGUE_DOMAIN + protocol_version.to_bytes(4, "big") + bytes([len(fleet)]) + fleet


# --- authority and node identity ---------------------------------------------------------------


@dataclass(frozen=True)
class FleetAuthority:
    """The fleet's Ed25519 signing key: issues certificates and revocations."""

    fleet_id: str
    signing_key: nacl.signing.SigningKey = field(repr=False)

    def __post_init__(self) -> None:
        check_name("fleet id", self.fleet_id)

    @classmethod
    def create(cls, fleet_id: str, seed: bytes | None = None) -> FleetAuthority:
        """A new authority; a fresh key from the OS CSPRNG unless a 32-byte ``seed`` is given."""
        if seed is None:
            return cls(fleet_id, nacl.signing.SigningKey.generate())
        return cls(fleet_id, nacl.signing.SigningKey(_check_key("authority seed", seed)))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed (what ``authority.key`` stores)."""
        return self.signing_key.encode()

    @property
    def trust(self) -> FleetTrust:
        """The public trust anchor nodes need."""
        return FleetTrust(self.fleet_id, self.signing_key.verify_key.encode())

    def sign(
        self,
        *,
        node_id: str,
        static_public: bytes,
        roles: Iterable[str],
        not_before: float,
        not_after: float,
        serial: int,
    ) -> NodeCertificate:
        """Issue a certificate binding ``static_public`` to ``node_id``; ConfigError for a key of
        small order (:func:`check_static_public`), which could never complete a handshake."""
        check_static_public(static_public)
        draft = NodeCertificate(
            self.fleet_id,
            serial,
            node_id,
            static_public,
            frozenset(roles),
            not_before,
            not_after,
            bytes(SIGNATURE_BYTES),
        )
        return replace(draft, signature=self._sign(CERT_DOMAIN, draft.body()))

    def revoke(
        self,
        revocations: RevocationList,
        *,
        now: float,
        serial: int | None = None,
        node_id: str | None = None,
        reason: str = "",
    ) -> RevocationList:
        """Return ``revocations`` plus a new entry numbered ``version + 1``."""
        draft = RevocationEntry(
            self.fleet_id,
            revocations.version + 1,
            now,
            serial,
            node_id,
            reason,
            bytes(SIGNATURE_BYTES),
        )
        entry = replace(draft, signature=self._sign(REVOCATION_DOMAIN, draft.body()))
        return revocations.merge(RevocationList(self.fleet_id, frozenset({entry})))

    def enroll(
        self,
        node_id: str,
        roles: Iterable[str],
        *,
        now: float,
        lifetime_s: float,
        serial: int,
        static_private: bytes | None = None,
    ) -> NodeIdentity:
        """Make a complete in-memory :class:`NodeIdentity` (for tests and simulations)."""
        if static_private is None:
            static_private, _ = generate_static_keypair()
        cert = self.sign(
            node_id=node_id,
            static_public=static_public_key(static_private),
            roles=roles,
            not_before=now,
            not_after=now + lifetime_s,
            serial=serial,
        )
        return NodeIdentity.from_parts(static_private, cert, self.trust)

    def _sign(self, domain: bytes, body: bytes) -> bytes:
        return self.signing_key.sign(domain + body).signature


@dataclass(frozen=True)
class NodeIdentity:
    """Everything a node needs to run sessions: its Noise static key pair, certificate and trust.

    Construction checks that the pieces belong together and raises :class:`IdentityError` if not.
    A node directory on disk is read by ``meshinfer.identity_files.NodeDirectory(path).load()``
    (file I/O lives outside ``proto/``).
    """

    node_id: str
    static_private: bytes = field(repr=False)
    static_public: bytes
    certificate: NodeCertificate
    trust: FleetTrust

    def __post_init__(self) -> None:
        try:
            derived = static_public_key(self.static_private)
        except ConfigError as exc:
            raise IdentityError(str(exc)) from None
        if derived != self.static_public:
            raise IdentityError("static public key does not match the static private key")
        if self.certificate.static_public != self.static_public:
            raise IdentityError("certificate's static key does not match the node's private key")
        if self.certificate.node_id != self.node_id:
            raise IdentityError(f"certificate is for node {self.certificate.node_id!r}")
        try:
            self.certificate.verify(self.trust)
        except AdmissionError as exc:
            raise IdentityError(f"certificate does not verify against the fleet: {exc}") from None

    @classmethod
    def from_parts(
        cls, static_private: bytes, certificate: NodeCertificate, trust: FleetTrust
    ) -> NodeIdentity:
        """Assemble an identity, taking node id and public key from the private key and cert."""
        try:
            public = static_public_key(static_private)
        except ConfigError as exc:
            raise IdentityError(str(exc)) from None
        return cls(certificate.node_id, static_private, public, certificate, trust)


def utc_text(seconds: float) -> str:
    """``seconds`` (a certificate's or revocation's time) as a UTC date and time for people,
    or as a number where no calendar date fits."""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.6g} s"
    return moment.strftime("%Y-%m-%d %H:%M:%S")
