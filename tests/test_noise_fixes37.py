"""Session 37 adversarial review of identity, XEdDSA and Noise: what a hostile peer can send.

* XEdDSA refuses a Montgomery key with its (ignored) top bit set, as the paper's
  ``xeddsa_verify`` and libsignal do: before, every signature also verified under that second
  encoding of the key.
* A revocation list whose entries are no array is refused as such, not as "too many entries".
* Nonce exhaustion no longer advises a rekey, which keeps the nonce (Noise section 11.3).
* Pinned rules: low-order keys and non-canonical ``s`` verify nothing; a low-order static key
  in a handshake is a :class:`HandshakeError`; the protocols sessions use have public vectors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import nacl.bindings
import pytest

from meshinfer.errors import HandshakeError, NonceExhaustedError, RemoteProtocolError
from meshinfer.proto import xeddsa
from meshinfer.proto.identity import FleetAuthority, RevocationError, RevocationList
from meshinfer.proto.noise import MAX_NONCE, CipherState, HandshakeState, generate_keypair
from meshinfer.proto.noise_patterns import BASE_PATTERNS, HASH_NAMES
from meshinfer.runtime.session import SessionConfig

VECTORS_PATH = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "noise-public.json"
#: X25519 u-coordinates of small order (RFC 7748 / libsodium's blocklist), canonical ones only.
LOW_ORDER_U = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
]


def _signed(message: bytes = b"record") -> tuple[bytes, bytes]:
    private = os.urandom(32)
    public = nacl.bindings.crypto_scalarmult_base(private)
    return public, xeddsa.XEdDSAKey(private).sign(message, os.urandom(xeddsa.NONCE_BYTES))


# --- XEdDSA ------------------------------------------------------------------------------------


def test_xeddsa_refuses_a_public_key_with_its_top_bit_set() -> None:
    public, signature = _signed()
    assert xeddsa.verify(public, b"record", signature)
    second = bytearray(public)
    second[31] |= 0x80  # X25519 ignores this bit: the same point, a non-canonical encoding
    assert xeddsa.edwards_public(bytes(second)) is None
    assert not xeddsa.verify(bytes(second), b"record", signature)  # was True


def test_xeddsa_non_canonical_s_and_flipped_sign_bits_verify_nothing() -> None:
    public, signature = _signed()
    s = int.from_bytes(signature[32:], "little")
    assert not xeddsa.verify(
        public, b"record", signature[:32] + (s + xeddsa.Q).to_bytes(32, "little")
    )
    for position in (31, 63):  # R's sign bit, s's top bit
        flipped = bytearray(signature)
        flipped[position] ^= 0x80
        assert not xeddsa.verify(public, b"record", bytes(flipped))


@pytest.mark.parametrize("u", LOW_ORDER_U)
def test_xeddsa_low_order_keys_verify_no_forgery(u: int) -> None:
    key = u.to_bytes(32, "little")
    identity = (1).to_bytes(32, "little")  # the neutral point as R: s = 0 satisfies sB = R + hA
    for forged in (identity + bytes(32), bytes(64)):
        assert not xeddsa.verify(key, b"record", forged)


# --- Noise -------------------------------------------------------------------------------------


def _low_order_static(state: HandshakeState) -> None:
    """Make ``state`` send the small-order point 0 as its static key (what a hostile peer can)."""
    private = state._local["s"][0]  # (forging a hostile peer)
    state._local["s"] = (private, bytes(32))


def test_low_order_static_key_from_an_xx_responder_is_a_handshake_error() -> None:
    name = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
    initiator = HandshakeState(name, True, s=generate_keypair()[0])
    responder = HandshakeState(name, False, s=generate_keypair()[0])
    responder.read_message(initiator.write_message(b""))
    _low_order_static(responder)
    with pytest.raises(HandshakeError, match=r"token 'es'.*low-order") as caught:
        initiator.read_message(responder.write_message(b""))
    assert isinstance(caught.value, RemoteProtocolError)
    assert not initiator.is_complete


def test_low_order_static_key_from_an_ik_initiator_is_a_handshake_error() -> None:
    name = "Noise_IK_25519_ChaChaPoly_BLAKE2b"
    resp_private, resp_public = generate_keypair()
    initiator = HandshakeState(name, True, s=generate_keypair()[0], rs=resp_public)
    responder = HandshakeState(name, False, s=resp_private)
    _low_order_static(initiator)
    with pytest.raises(HandshakeError, match=r"token 'ss'.*low-order"):
        responder.read_message(initiator.write_message(b"hello"))


def test_nonce_exhaustion_does_not_advise_a_rekey_that_cannot_help() -> None:
    cipher = CipherState(bytes(range(32)), nonce=MAX_NONCE)
    cipher.rekey()  # Rekey keeps the nonce (section 11.3): still exhausted
    with pytest.raises(NonceExhaustedError, match="reconnect") as caught:
        cipher.encrypt(b"x")
    assert "rekey or" not in str(caught.value)  # was: "nonces exhausted; rekey or reconnect"
    assert cipher.nonce == MAX_NONCE


def test_every_protocol_sessions_use_has_public_vectors() -> None:
    names = {v["protocol_name"] for v in json.loads(VECTORS_PATH.read_text())["vectors"]}
    config = SessionConfig()
    assert {config.xx_protocol, config.ik_protocol} <= names
    for pattern in BASE_PATTERNS:
        for hash_name in HASH_NAMES:
            assert f"Noise_{pattern}_25519_ChaChaPoly_{hash_name}" in names


# --- identity ----------------------------------------------------------------------------------


def test_revocation_list_whose_entries_are_no_array_says_so() -> None:
    trust = FleetAuthority.create("fleet-a", seed=bytes(32)).trust
    data = msgpack.packb([1, "fleet-a", {"a": 1}])
    with pytest.raises(RevocationError, match="entries must be an array"):  # was "at most 16384"
        RevocationList.from_bytes(data, trust)
