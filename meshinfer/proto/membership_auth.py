"""Record authentication: who may author a member's ALIVE and LEFT records.

ALIVE (incarnation, state) and LEFT records are *self-claims*. Relaying them is how gossip
spreads joins, refutations and state, so a receiver cannot tell a faithful relay from a forger
by the sender alone. A :class:`RecordAuthenticator` closes that gap: every node signs its own
records and every receiver verifies them against the key bound to the claimed node id.

* ``None`` (the default of :class:`~meshinfer.proto.membership.Membership`) -- no signatures:
  relays are trusted. Admission already limits the mesh to fleet members; use this in tests and
  simulations, or in fleets whose certificates bind no signing key.
* :class:`Ed25519RecordAuthenticator` -- Ed25519 signatures; the caller supplies the lookup of a
  node's public signing key. Unknown keys fail closed. (Simulations and tests.)
* :class:`CertifiedRecordAuthenticator` -- what node daemons run: each record carries its
  author's fleet certificate and an XEdDSA signature by the Noise static key that certificate
  binds (:mod:`meshinfer.proto.xeddsa`), so a receiver that never met the author checks it with
  the fleet's trust anchor alone. A fleet member can no longer author another member's ALIVE or
  LEFT records, nor invent members: every node id in a table holds a certificate the fleet
  authority signed, and an unrevoked one. An ALIVE record must announce the Noise static key its
  certificate binds (or none), and, given a wall clock, the certificate must be valid. A record
  already held is judged again as time passes (:meth:`CertifiedRecordAuthenticator.expired`).

An authenticator must be pure and fast: it runs inside the sans-I/O core, once per *new* record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Protocol

import msgpack
import nacl.exceptions
import nacl.signing

from meshinfer.errors import AdmissionError
from meshinfer.proto import xeddsa
from meshinfer.proto.identity import (
    DEFAULT_CLOCK_SKEW_S,
    MAX_CERTIFICATE_BYTES,
    FleetTrust,
    NodeCertificate,
    check_clock_skew,
)
from meshinfer.proto.membership_wire import (
    ALIVE_BODY_FIELDS,
    ALIVE_BODY_STATE,
    LEFT_BODY_FIELDS,
    SIGNED_BODY_DOMAIN,
    STATE_STATIC_KEY,
    RecordKind,
    record_kind,
)

#: The largest proof :class:`CertifiedRecordAuthenticator` makes: [certificate, signature].
MAX_PROOF_BYTES = MAX_CERTIFICATE_BYTES + xeddsa.SIGNATURE_BYTES + 16


class RecordAuthenticator(Protocol):
    """Signs this node's own records and verifies other nodes' records.

    Implementations subclass it to inherit the defaults of the members an authenticator that
    does not judge certificates' validity needs not write (:attr:`judges_validity`,
    :meth:`expired`). Called from the member table only (one thread: the sans-I/O core's).
    """

    def sign(self, body: bytes) -> bytes:
        """Signature of this node over ``body`` (from :func:`membership_wire.signed_body`)."""
        ...

    def verify(self, node_id: str, body: bytes, signature: bytes) -> bool:
        """Whether ``signature`` over ``body`` was made by ``node_id``'s key."""
        ...

    @property
    def judges_validity(self) -> bool:
        """Whether records' certificates are judged against a wall clock: if so the member
        table asks :meth:`expired` about the records it holds as time passes. False here."""
        return False

    def expired(self, signature: bytes) -> bool:
        """Whether the proof of a held record (its ``signature``, accepted by :meth:`verify`
        earlier) no longer vouches for it, its certificate having expired. False here."""
        return False


class Ed25519RecordAuthenticator(RecordAuthenticator):
    """Ed25519 signatures with a caller-supplied public key lookup (fails closed)."""

    def __init__(
        self,
        signing_key: nacl.signing.SigningKey,
        public_key_for: Callable[[str], bytes | None],
    ) -> None:
        self._signing_key = signing_key
        self._public_key_for = public_key_for
        self._verify_keys: dict[bytes, nacl.signing.VerifyKey] = {}

    def sign(self, body: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes)."""
        return self._signing_key.sign(body).signature

    def verify(self, node_id: str, body: bytes, signature: bytes) -> bool:
        """Check ``signature`` against the key registered for ``node_id``."""
        public = self._public_key_for(node_id)
        if public is None or len(public) != 32 or len(signature) != 64:
            return False
        key = self._verify_keys.get(public)
        if key is None:
            key = self._verify_keys[public] = nacl.signing.VerifyKey(public)
        try:
            key.verify(body, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True


class CertifiedRecordAuthenticator(RecordAuthenticator):
    """Records proven by the author's fleet certificate and its Noise static key (XEdDSA).

    A proof is the msgpack array ``[certificate, signature]``: the author's certificate as it
    travels in the Noise handshake, and the XEdDSA signature over the signed body by the static
    key the certificate binds. :meth:`verify` accepts it when the certificate is the fleet
    authority's, names the record's node id and is not revoked (``revoked``, read at each call:
    the list grows while the node runs), is valid at ``wallclock()`` give or take
    ``clock_skew`` seconds (as :func:`~meshinfer.proto.identity.admit` judges sessions; the
    runtime passes its session clock skew and its admission's clock; None, as on a virtual
    clock, leaves validity unchecked), an ALIVE record's state announces the static key the
    certificate binds (or none: peers then dial with XX and the handshake proves the key), and
    the signature verifies. Each refusal is counted in :attr:`refusals` by reason:
    ``malformed``, ``untrusted``, ``wrong-node``, ``revoked``, ``not-yet-valid``, ``expired``,
    ``key-mismatch`` or ``bad-signature``.

    A record accepted earlier is not valid for ever: :meth:`expired` tells the member table
    that the certificate proving one it holds has since expired (counted ``expired`` too).

    Checked certificates, with their Edwards keys, are kept (at most ``cache_entries``, the
    cache emptied when full), so a member's further records cost one Ed25519 verification
    (~55 us) and signing one ~25 us. ``random_bytes`` gives each signature's nonce (the runtime
    passes the OS CSPRNG: nothing here reads randomness of its own).
    """

    def __init__(
        self,
        certificate: NodeCertificate,
        static_private: bytes,
        trust: FleetTrust,
        *,
        random_bytes: Callable[[int], bytes],
        revoked: Callable[[NodeCertificate], bool] = lambda cert: False,
        cache_entries: int = 8192,
        wallclock: Callable[[], float] | None = None,
        clock_skew: float = DEFAULT_CLOCK_SKEW_S,
    ) -> None:
        self._key = xeddsa.XEdDSAKey(static_private)
        if xeddsa.edwards_public(certificate.static_public) != self._key.edwards_public:
            raise ValueError("the certificate does not bind this static key")
        check_clock_skew(clock_skew)
        self._certificate = certificate.to_bytes()
        self._static_public = certificate.static_public
        self._trust = trust
        self._revoked = revoked
        self._random_bytes = random_bytes
        self._cache_entries = cache_entries
        self._wallclock = wallclock
        self._clock_skew = clock_skew
        self._known: dict[bytes, tuple[NodeCertificate, bytes] | None] = {}
        #: refused proofs by reason (see the class docstring)
        self.refusals: Counter[str] = Counter()

    @property
    def static_public(self) -> bytes:
        """The Noise static key this node's certificate binds: the key its records announce."""
        return self._static_public

    def sign(self, body: bytes) -> bytes:
        """``[certificate, XEdDSA signature over body]`` (~230 bytes)."""
        signature = self._key.sign(body, self._random_bytes(xeddsa.NONCE_BYTES))
        return msgpack.packb([self._certificate, signature])

    def verify(self, node_id: str, body: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is a proof by ``node_id``'s certified key over ``body``."""
        proof = _proof(signature)
        if proof is None:
            return self._refuse("malformed")
        known = self._certified(proof[0])
        if known is None:
            return self._refuse("untrusted")
        reason = self._refusal(node_id, body, known[0])
        if reason is None and not xeddsa.verify_edwards(known[1], body, proof[1]):
            reason = "bad-signature"
        return reason is None or self._refuse(reason)

    @property
    def judges_validity(self) -> bool:
        """Whether certificates are judged against a wall clock (else :meth:`expired` is
        always False, and the member table need not ask it)."""
        return self._wallclock is not None

    def expired(self, signature: bytes) -> bool:
        """Whether the certificate in a held record's proof (its ``signature`` field, accepted
        by :meth:`verify` earlier) expired more than ``clock_skew`` seconds before
        ``wallclock()``; counted as a refusal ``expired``. False without a wall clock, and for
        a proof that is not one of ours (nothing to judge it by)."""
        if self._wallclock is None:
            return False
        proof = _proof(signature)
        known = None if proof is None else self._certified(proof[0])
        if known is None or self._validity_problem(known[0]) != "expired":
            return False
        self.refusals["expired"] += 1
        return True

    def _refuse(self, reason: str) -> bool:
        self.refusals[reason] += 1
        return False

    def _refusal(self, node_id: str, body: bytes, cert: NodeCertificate) -> str | None:
        """Why ``cert`` does not vouch for ``body`` by ``node_id`` (None: it does)."""
        if cert.node_id != node_id:
            return "wrong-node"
        if self._revoked(cert):
            return "revoked"
        problem = self._validity_problem(cert)
        if problem is not None:
            return problem
        if claimed_static_key(body) not in (b"", cert.static_public):
            return "key-mismatch"
        return None

    def _validity_problem(self, cert: NodeCertificate) -> str | None:
        """``cert``'s :meth:`~NodeCertificate.validity_problem` at ``wallclock()`` (None
        without a wall clock)."""
        if self._wallclock is None:
            return None
        return cert.validity_problem(self._wallclock(), self._clock_skew)

    def _certified(self, data: bytes) -> tuple[NodeCertificate, bytes] | None:
        """The certificate ``data`` and its Edwards key, if the fleet authority signed it."""
        if data not in self._known:
            if len(self._known) >= self._cache_entries:
                self._known.clear()
            self._known[data] = _certified(data, self._trust)
        return self._known[data]


def _certified(data: bytes, trust: FleetTrust) -> tuple[NodeCertificate, bytes] | None:
    try:
        cert = NodeCertificate.from_bytes(data)
        cert.verify(trust)
    except AdmissionError:
        return None
    edwards = xeddsa.edwards_public(cert.static_public)
    return None if edwards is None else (cert, edwards)


def claimed_static_key(body: bytes) -> bytes | None:
    """The Noise static key an ALIVE record's signed body announces (``b""`` for none, and for
    a LEFT body, which has no state); None when ``body`` is not a signed body."""
    if not body.startswith(SIGNED_BODY_DOMAIN):
        return None
    try:
        fields = msgpack.unpackb(body[len(SIGNED_BODY_DOMAIN) :])
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(fields, list) or not fields:
        return None
    kind = record_kind(fields[0])  # exact: a msgpack False or 0.0 is no ALIVE
    if kind is RecordKind.LEFT and len(fields) == LEFT_BODY_FIELDS:
        return b""
    if kind is not RecordKind.ALIVE or len(fields) != ALIVE_BODY_FIELDS:
        return None
    state = fields[ALIVE_BODY_STATE]
    if not isinstance(state, list) or len(state) <= STATE_STATIC_KEY:
        return None
    key = state[STATE_STATIC_KEY]
    return key if isinstance(key, bytes) else None


def _proof(data: bytes) -> tuple[bytes, bytes] | None:
    """``[certificate, signature]`` from a record's signature field, or None if malformed."""
    if len(data) > MAX_PROOF_BYTES:
        return None
    try:
        proof = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not (isinstance(proof, list) and len(proof) == 2):
        return None
    cert, signature = proof
    if not (isinstance(cert, bytes) and isinstance(signature, bytes)):
        return None
    if len(signature) != xeddsa.SIGNATURE_BYTES:
        return None
    return cert, signature
