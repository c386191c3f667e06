"""Noise crypto primitives on pynacl/hashlib: X25519, ChaChaPoly, HASH/HKDF, Cipher/SymmetricState.

Noise revision 34, sections 4 and 5.1-5.2. :class:`CipherState` is the per-direction transport
cipher the session layer calls for every frame, so its ``encrypt``/``decrypt`` are kept to one
libsodium call plus a counter and two bounds checks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions

from meshinfer.errors import (
    ConfigError,
    DecryptError,
    HandshakeError,
    MessageTooLargeError,
    NonceExhaustedError,
)

DHLEN = 32
KEY_LEN = 32
TAG_LEN = 16
MAX_MESSAGE_LEN = 65535  # every Noise message, handshake or transport (section 3)
MAX_PLAINTEXT_LEN = MAX_MESSAGE_LEN - TAG_LEN
MAX_NONCE = 2**64 - 1  # reserved: never used to encrypt (section 5.1)

_aead_encrypt = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt
_aead_decrypt = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt
_pack_nonce = struct.Struct("<4xQ").pack  # 32 zero bits, then the 64-bit counter little-endian
_CryptoError = nacl.exceptions.CryptoError
_REKEY_NONCE = _pack_nonce(MAX_NONCE)
_ZERO_KEY = bytes(KEY_LEN)
_EXHAUSTED = "nonces exhausted; reconnect (a rekey keeps the nonce, section 11.3)"

Rng = Callable[[int], bytes]


# --- keys and DH -----------------------------------------------------------------------------


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    require_key("private key", private)
    return nacl.bindings.crypto_scalarmult_base(private)


def generate_keypair(rng: Rng | None = None) -> tuple[bytes, bytes]:
    """A fresh X25519 key pair ``(private, public)``; ``rng(n)`` defaults to ``os.urandom``."""
    private = (rng or os.urandom)(DHLEN)
    require_key("generated private key", private)
    return private, public_key(private)


def dh(private: bytes, remote_public: bytes) -> bytes:
    """X25519; raises :class:`HandshakeError` when the result is all zeros (low-order point)."""
    try:
        return nacl.bindings.crypto_scalarmult(private, remote_public)
    except _CryptoError as exc:
        raise HandshakeError("X25519 gave an invalid result (low-order public key)") from exc


def require_key(what: str, key: object) -> None:
    """Raise :class:`ConfigError` unless ``key`` is 32 bytes."""
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise ConfigError(f"{what} must be {KEY_LEN} bytes, got {_describe(key)}")


def _describe(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{len(value)} bytes"
    return type(value).__name__


# --- hash, HMAC, HKDF ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HashSuite:
    """One Noise hash function: HASH, and HMAC/HKDF with the hash's own block length."""

    name: str
    constructor: Callable[..., Any]  # hashlib constructor; block length comes with it
    hashlen: int

    def hash(self, data: bytes) -> bytes:
        """HASH(data)."""
        return self.constructor(data).digest()

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
        """HKDF(chaining_key, ikm, outputs) of section 4.3, with 2 or 3 outputs."""
        temp_key = hmac.digest(chaining_key, ikm, self.constructor)
        results: list[bytes] = []
        previous = b""
        for index in range(1, outputs + 1):
            previous = hmac.digest(temp_key, previous + bytes((index,)), self.constructor)
            results.append(previous)
        return results


HASH_SUITES: dict[str, HashSuite] = {
    "BLAKE2b": HashSuite("BLAKE2b", hashlib.blake2b, 64),
    "SHA256": HashSuite("SHA256", hashlib.sha256, 32),
}


# --- CipherState -----------------------------------------------------------------------------


class CipherState:
    """A ChaChaPoly key with its 64-bit nonce counter (section 5.1): one direction of a session.

    ``nonce`` is the starting counter (the test hook for exhaustion). Nonce ``2**64-1`` is
    reserved, so after nonce ``2**64-2`` every ``encrypt``/``decrypt`` raises
    :class:`NonceExhaustedError`. A ``decrypt`` that fails (bad tag, truncated, tampered, oversized)
    raises :class:`DecryptError` and does NOT advance the nonce, as the spec requires: the next
    genuine message still decrypts. ``plaintext``, ``ciphertext`` and ``ad`` should be ``bytes``;
    ``bytearray``/``memoryview`` work too but take a slower path that copies them.
    """

    __slots__ = ("_key", "_n", "label")

    def __init__(self, key: bytes, nonce: int = 0, *, label: str = "") -> None:
        require_key("cipher key", key)
        if not 0 <= nonce <= MAX_NONCE:
            raise ConfigError(f"nonce must be in 0..2**64-1, got {nonce}")
        self._key = key
        self._n = nonce
        self.label = label  # names the protocol and direction in error messages

    @property
    def nonce(self) -> int:
        """The nonce the next ``encrypt``/``decrypt`` will use."""
        return self._n

    def set_nonce(self, nonce: int) -> None:
        """SetNonce (section 5.1): for out-of-order transports, and for tests."""
        if not 0 <= nonce <= MAX_NONCE:
            raise ConfigError(f"nonce must be in 0..2**64-1, got {nonce}")
        self._n = nonce

    def encrypt(self, plaintext: bytes, ad: bytes = b"") -> bytes:
        """EncryptWithAd: ciphertext + 16-byte tag; plaintext at most 65519 bytes."""
        n = self._n
        if n >= MAX_NONCE:
            raise NonceExhaustedError(f"{self.label}: {_EXHAUSTED}")
        if len(plaintext) > MAX_PLAINTEXT_LEN:
            raise MessageTooLargeError(
                f"{self.label}: plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT_LEN}"
            )
        try:
            ciphertext = _aead_encrypt(plaintext, ad, _pack_nonce(n), self._key)
        except TypeError:  # slow path: bytearray/memoryview arguments are copied to bytes
            ciphertext = _aead_encrypt(
                _to_bytes(plaintext), _to_bytes(ad), _pack_nonce(n), self._key
            )
        self._n = n + 1
        return ciphertext

    def decrypt(self, ciphertext: bytes, ad: bytes = b"") -> bytes:
        """DecryptWithAd; raises :class:`DecryptError` without advancing the nonce on failure."""
        n = self._n
        if n >= MAX_NONCE:
            raise NonceExhaustedError(f"{self.label}: {_EXHAUSTED}")
        if not TAG_LEN <= len(ciphertext) <= MAX_MESSAGE_LEN:
            raise DecryptError(
                f"{self.label}: ciphertext of {len(ciphertext)} bytes is outside "
                f"{TAG_LEN}..{MAX_MESSAGE_LEN} (nonce {n})"
            )
        try:
            plaintext = _aead_decrypt(ciphertext, ad, _pack_nonce(n), self._key)
        except _CryptoError as exc:
            plaintext = self._retry_or_fail(exc, ciphertext, ad, n)
        self._n = n + 1
        return plaintext

    def _retry_or_fail(self, exc: Exception, ciphertext: bytes, ad: bytes, n: int) -> bytes:
        """Slow path of ``decrypt``: retry bytes-like arguments as bytes, else DecryptError."""
        if isinstance(exc, TypeError):
            ciphertext, ad = _to_bytes(ciphertext), _to_bytes(ad)
            try:
                return _aead_decrypt(ciphertext, ad, _pack_nonce(n), self._key)
            except _CryptoError as again:
                exc = again
        raise DecryptError(f"{self.label}: authentication failed at nonce {n}") from exc

    def rekey(self) -> None:
        """Rekey (section 11.3): k = first 32 bytes of ENCRYPT(k, 2**64-1, b"", zeros)."""
        self._key = _aead_encrypt(_ZERO_KEY, None, _REKEY_NONCE, self._key)[:KEY_LEN]


def _to_bytes(data: object) -> bytes:
    if data is None:
        return b""
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"plaintext, ciphertext and ad must be bytes, got {type(data).__name__}")


# --- SymmetricState --------------------------------------------------------------------------


class SymmetricState:
    """The chaining key ``ck``, the handshake hash ``h`` and the handshake cipher (section 5.2)."""

    __slots__ = ("_cipher", "_label", "_suite", "chaining_key", "handshake_hash")

    def __init__(self, protocol_name: str, suite: HashSuite) -> None:
        name = protocol_name.encode("ascii")
        if len(name) <= suite.hashlen:
            h = name.ljust(suite.hashlen, b"\0")
        else:
            h = suite.hash(name)
        self._suite = suite
        self._label = f"{protocol_name} handshake"
        self._cipher: CipherState | None = None
        self.chaining_key = h
        self.handshake_hash = h

    @property
    def has_key(self) -> bool:
        """Whether a key has been mixed in yet (payloads and ``s`` are encrypted from then on)."""
        return self._cipher is not None

    def mix_key(self, ikm: bytes) -> None:
        """MixKey: fold DH output (or ``e`` in psk handshakes) into ``ck`` and a new key."""
        self.chaining_key, temp_key = self._suite.hkdf(self.chaining_key, ikm, 2)
        self._cipher = CipherState(temp_key[:KEY_LEN], label=self._label)

    def mix_hash(self, data: bytes) -> None:
        """MixHash: h = HASH(h || data)."""
        self.handshake_hash = self._suite.hash(self.handshake_hash + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        """MixKeyAndHash: used for ``psk`` tokens."""
        self.chaining_key, temp_h, temp_key = self._suite.hkdf(self.chaining_key, ikm, 3)
        self.mix_hash(temp_h)
        self._cipher = CipherState(temp_key[:KEY_LEN], label=self._label)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash: encrypt with h as associated data once keyed, then mix the result."""
        ciphertext = plaintext
        if self._cipher is not None:
            ciphertext = self._cipher.encrypt(plaintext, self.handshake_hash)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash; raises :class:`DecryptError` on a bad tag."""
        plaintext = ciphertext
        if self._cipher is not None:
            plaintext = self._cipher.decrypt(ciphertext, self.handshake_hash)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self, protocol_name: str) -> tuple[CipherState, CipherState]:
        """Split: (initiator-to-responder, responder-to-initiator) transport ciphers."""
        temp_k1, temp_k2 = self._suite.hkdf(self.chaining_key, b"", 2)
        return (
            CipherState(temp_k1[:KEY_LEN], label=f"{protocol_name} initiator->responder"),
            CipherState(temp_k2[:KEY_LEN], label=f"{protocol_name} responder->initiator"),
        )
