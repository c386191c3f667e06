"""XEdDSA: Ed25519-compatible signatures made with an X25519 (Montgomery) key pair.

A node's only long-term secret is its Noise static key (X25519), and its fleet certificate binds
that key's public half to its node id. XEdDSA (Trevor Perrin, "The XEdDSA and VXEdDSA Signature
Schemes", Signal, revision 1, 2016-10-20) lets the same key pair sign, so a node can sign its own
membership records with nothing new to enrol or store, and any fleet member can check them with
the certificate alone. Reusing one key for Diffie-Hellman and signatures this way is what the
Signal protocol does with its identity keys; the signed bytes carry a domain prefix of their own
(see :func:`meshinfer.proto.membership_wire.signed_body`), unlike anything Noise hashes.

How it works (the paper's section 2.3, with the curve's own constants):

* The signer clamps its X25519 scalar ``k`` and computes the Edwards point ``E = kB``. The
  Montgomery public key ``u`` fixes ``E`` only up to sign, so the signer uses ``a = k`` or
  ``a = -k (mod q)``, whichever makes the Edwards public key ``A = aB`` have sign bit 0.
* ``r = SHA-512(0xFE || 0xFF * 31 || a || message || Z) mod q`` with 64 fresh random bytes ``Z``,
  ``R = rB``, ``h = SHA-512(R || A || message) mod q``, ``s = r + h a (mod q)``; the signature is
  ``R || s`` -- an ordinary Ed25519 signature by ``A``.
* The verifier refuses a non-canonical ``u`` (``u >= p``, the top bit included), maps ``u`` to
  Edwards ``y = (u - 1) / (u + 1) (mod p)`` with sign bit 0 and runs
  libsodium's Ed25519 verification (which also refuses small-order keys and non-canonical ``s``).

Point arithmetic is libsodium's (through pynacl); only the scalar and field reductions are
Python integers. Both functions are pure; the caller passes ``Z`` in (STYLE.md 4).
"""

from __future__ import annotations

import hashlib

import nacl.bindings
import nacl.exceptions
import nacl.signing

#: The field prime and the prime order of the base point's subgroup (RFC 7748, RFC 8032).
P = 2**255 - 19
Q = 2**252 + 27742317777372353535851937790883648493
KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 64
_HASH1_PREFIX = b"\xfe" + b"\xff" * 31


class XEdDSAKey:
    """The signing half of one X25519 key pair (its Edwards scalar is computed once)."""

    def __init__(self, x25519_private: bytes) -> None:
        if len(x25519_private) != KEY_BYTES:
            raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes")
        clamped = bytearray(x25519_private)
        clamped[0] &= 248
        clamped[31] &= 127
        clamped[31] |= 64
        a = int.from_bytes(clamped, "little") % Q
        public = bytearray(_base(a))
        if public[31] & 0x80:  # -E has the same y; use the scalar whose point has sign bit 0
            a = (Q - a) % Q
            public[31] &= 0x7F
        self._a = a
        self._a_bytes = a.to_bytes(KEY_BYTES, "little")
        #: The Edwards public key ``A`` (what :func:`edwards_public` computes from ``u``).
        self.edwards_public = bytes(public)

    def sign(self, message: bytes, nonce: bytes) -> bytes:
        """``R || s`` over ``message``; ``nonce`` is 64 fresh random bytes (``Z``)."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"the XEdDSA nonce is {NONCE_BYTES} random bytes")
        r = _reduce(_HASH1_PREFIX + self._a_bytes + message + nonce)
        big_r = _base(r)
        h = _reduce(big_r + self.edwards_public + message)
        s = (r + h * self._a) % Q
        return big_r + s.to_bytes(KEY_BYTES, "little")


def edwards_public(x25519_public: bytes) -> bytes | None:
    """The Edwards form (sign bit 0) of a Montgomery public key, or None if it has none.

    Only the canonical encoding ``u < p`` has one: the paper's ``xeddsa_verify`` refuses
    ``u >= p`` before it masks the top bit (so does libsignal), else a key with its ignored top
    bit set would be a second encoding that every signature of the key verifies under.
    """
    if len(x25519_public) != KEY_BYTES:
        return None
    u = int.from_bytes(x25519_public, "little")
    if u >= P or u == P - 1:  # not canonical (top bit set too); or u + 1 = 0: no inverse
        return None
    y = (u - 1) * pow(u + 1, -1, P) % P
    return y.to_bytes(KEY_BYTES, "little")


def verify(x25519_public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``message`` was made with the key pair of ``x25519_public``."""
    public = edwards_public(x25519_public)
    if public is None or len(signature) != SIGNATURE_BYTES:
        return False
    return verify_edwards(public, message, signature)


def verify_edwards(edwards: bytes, message: bytes, signature: bytes) -> bool:
    """:func:`verify` with the Edwards key already computed (callers cache it per key)."""
    try:
        nacl.signing.VerifyKey(edwards).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True


def _base(scalar: int) -> bytes:
    return nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(
        scalar.to_bytes(KEY_BYTES, "little")
    )


def _reduce(data: bytes) -> int:
    return int.from_bytes(hashlib.sha512(data).digest(), "little") % Q
