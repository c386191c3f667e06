"""Interoperability with an independent Noise implementation: ``noiseprotocol`` (plizonczyk).

``noiseprotocol`` is pure Python on ``cryptography`` (OpenSSL), so it shares no crypto code with
our pynacl/libsodium stack. One side of each handshake is ours, the other theirs, both ways.
It is a test dependency (the ``test`` extra); without it this module fails to collect.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from meshinfer.errors import HandshakeError
from meshinfer.proto.noise import HandshakeState, generate_keypair

try:
    from cryptography.exceptions import InvalidTag
    from noise.connection import Keypair, NoiseConnection
except ImportError:  # pragma: no cover - depends on the environment
    pytest.fail(
        "the noiseprotocol package is missing: pip install noiseprotocol (test extra)",
        pytrace=False,
    )

PROLOGUE = b"meshinfer/1 fleet-a"
NAMES = [
    f"Noise_{pattern}_25519_ChaChaPoly_{hash_name}"
    for pattern in ("XX", "IK", "NNpsk0")
    for hash_name in ("BLAKE2b", "SHA256")
]


class TheirSide:
    """noiseprotocol's NoiseConnection behind our HandshakeState's method names."""

    def __init__(
        self, name: str, initiator: bool, s: bytes | None, rs: bytes | None, psks: list[bytes]
    ) -> None:
        self.connection = NoiseConnection.from_name(name.encode("ascii"))
        if initiator:
            self.connection.set_as_initiator()
        else:
            self.connection.set_as_responder()
        self.connection.set_prologue(PROLOGUE)
        if s is not None:
            self.connection.set_keypair_from_private_bytes(Keypair.STATIC, s)
        if rs is not None:
            self.connection.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, rs)
        if psks:
            self.connection.set_psks(psks=list(psks))
        self.connection.start_handshake()

    def write_message(self, payload: bytes) -> bytes:
        return bytes(self.connection.write_message(payload))

    def read_message(self, message: bytes) -> bytes:
        return bytes(self.connection.read_message(message))

    @property
    def is_complete(self) -> bool:
        return self.connection.handshake_finished

    @property
    def handshake_hash(self) -> bytes:
        return self.connection.get_handshake_hash()


@dataclass
class Sides:
    """One handshake: who initiates, which end is ours, and the static key pairs used."""

    initiator: HandshakeState | TheirSide
    responder: HandshakeState | TheirSide
    ours: HandshakeState
    theirs: TheirSide
    init_static: tuple[bytes, bytes]
    resp_static: tuple[bytes, bytes]


def build_sides(name: str, we_initiate: bool, their_psks: list[bytes] | None = None) -> Sides:
    rng = random.Random(name)
    init_static, resp_static = generate_keypair(rng.randbytes), generate_keypair(rng.randbytes)
    statics = not name.startswith("Noise_NN")
    psks = [rng.randbytes(32)] if "psk" in name else []
    init_keys = {
        "s": init_static[0] if statics else None,
        "rs": resp_static[1] if "_IK" in name else None,
    }
    resp_keys = {"s": resp_static[0] if statics else None, "rs": None}
    their_psks = psks if their_psks is None else their_psks
    if we_initiate:
        ours = HandshakeState(name, True, PROLOGUE, psks=psks, **init_keys)
        theirs = TheirSide(name, False, psks=their_psks, **resp_keys)
        return Sides(ours, theirs, ours, theirs, init_static, resp_static)
    theirs = TheirSide(name, True, psks=their_psks, **init_keys)
    ours = HandshakeState(name, False, PROLOGUE, psks=psks, **resp_keys)
    return Sides(theirs, ours, ours, theirs, init_static, resp_static)


def run_handshake(sides: Sides) -> None:
    writer, reader = sides.initiator, sides.responder
    turn = 0
    while not (writer.is_complete and reader.is_complete):
        payload = b"handshake payload %d" % turn
        assert reader.read_message(writer.write_message(payload)) == payload
        writer, reader = reader, writer
        turn += 1
    assert turn == (3 if "_XX" in sides.ours.protocol_name else 2)


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiates", "theirs-initiates"])
@pytest.mark.parametrize("name", NAMES)
def test_handshake_and_transport_with_noiseprotocol(name: str, we_initiate: bool) -> None:
    sides = build_sides(name, we_initiate)
    run_handshake(sides)
    assert sides.ours.handshake_hash == sides.theirs.handshake_hash
    if not name.startswith("Noise_NN"):
        expected = sides.resp_static[1] if we_initiate else sides.init_static[1]
        assert sides.ours.remote_static == expected
    sending, receiving = sides.ours.transport()
    for size in (0, 1, 1000, 65000):
        frame = random.Random(size).randbytes(size)
        assert sides.theirs.connection.decrypt(sending.encrypt(frame)) == frame
        assert receiving.decrypt(sides.theirs.connection.encrypt(frame)) == frame


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiates", "theirs-initiates"])
def test_rekey_interoperates(we_initiate: bool) -> None:
    sides = build_sides("Noise_XX_25519_ChaChaPoly_SHA256", we_initiate)
    run_handshake(sides)
    sending, receiving = sides.ours.transport()
    theirs = sides.theirs.connection
    assert theirs.decrypt(sending.encrypt(b"before rekey")) == b"before rekey"
    sending.rekey()
    theirs.rekey_inbound_cipher()
    receiving.rekey()
    theirs.rekey_outbound_cipher()
    assert theirs.decrypt(sending.encrypt(b"after rekey")) == b"after rekey"
    assert receiving.decrypt(theirs.encrypt(b"and back")) == b"and back"


@pytest.mark.parametrize("we_initiate", [True, False], ids=["ours-initiates", "theirs-initiates"])
def test_wrong_psk_fails_across_implementations(we_initiate: bool) -> None:
    sides = build_sides("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2b", we_initiate, [bytes(32)])
    first = sides.initiator.write_message(b"hello")
    if we_initiate:  # their responder rejects our first message with its own exception
        with pytest.raises(InvalidTag):
            sides.responder.read_message(first)
        return
    with pytest.raises(HandshakeError, match="failed to decrypt"):
        sides.responder.read_message(first)
    assert not sides.ours.is_complete
