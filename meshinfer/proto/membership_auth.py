"""Record authentication: who may author a member's ALIVE and LEFT records.

ALIVE (incarnation, state) and LEFT records are *self-claims*. Relaying them is how gossip
spreads joins, refutations and state, so a receiver cannot tell a faithful relay from a forger
by the sender alone. A :class:`RecordAuthenticator` closes that gap: every node signs its own
records and every receiver verifies them against the key bound to the claimed node id.

* ``None`` (the default of :class:`~meshinfer.proto.membership.Membership`) -- no signatures:
  relays are trusted. Admission already limits the mesh to fleet members; use this in tests and
  simulations, or in fleets whose certificates bind no signing key.
* :class:`Ed25519RecordAuthenticator` -- Ed25519 signatures; the caller supplies the lookup of a
  node's public signing key (from its fleet certificate). Unknown keys fail closed.

An authenticator must be pure and fast: it runs inside the sans-I/O core, once per *new* record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import nacl.exceptions
import nacl.signing


class RecordAuthenticator(Protocol):
    """Signs this node's own records and verifies other nodes' records."""

    def sign(self, body: bytes) -> bytes:
        """Signature of this node over ``body`` (from :func:`membership_wire.signed_body`)."""
        ...

    def verify(self, node_id: str, body: bytes, signature: bytes) -> bool:
        """Whether ``signature`` over ``body`` was made by ``node_id``'s key."""
        ...


class Ed25519RecordAuthenticator:
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
