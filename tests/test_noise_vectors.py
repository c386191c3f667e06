"""Noise test vectors (cacophony, via shared/vectors/noise-public.json) replayed byte for byte.

Each vector sets up both sides with its prologue, psks and keys, runs the handshake with the
given payloads, and compares every ciphertext: messages alternate initiator first, and the ones
after the handshake are transport messages on the split cipher states. Then the handshake hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meshinfer.proto.noise import HandshakeState

VECTORS_PATH = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "noise-public.json"


def _load_vectors() -> list[dict[str, Any]]:
    """The vectors; a missing file yields one placeholder so that test_vector fails, not skips."""
    if not VECTORS_PATH.is_file():
        return [{"protocol_name": "vector-file-missing", "missing": True}]
    return json.loads(VECTORS_PATH.read_text())["vectors"]


VECTORS = _load_vectors()


def test_vector_file_present() -> None:
    assert VECTORS_PATH.is_file(), (
        f"Noise test vectors missing at {VECTORS_PATH}: the shared folder must sit beside the "
        "repository as ../shared (see shared/vectors/README.md)"
    )
    assert len(VECTORS) == 60, f"expected 60 vectors in {VECTORS_PATH}, found {len(VECTORS)}"


def _hex(vector: dict[str, Any], key: str) -> bytes | None:
    value = vector.get(key)
    return None if value is None else bytes.fromhex(value)


def _side(vector: dict[str, Any], prefix: str, initiator: bool) -> HandshakeState:
    return HandshakeState(
        vector["protocol_name"],
        initiator=initiator,
        prologue=_hex(vector, f"{prefix}_prologue") or b"",
        s=_hex(vector, f"{prefix}_static"),
        e=_hex(vector, f"{prefix}_ephemeral"),
        rs=_hex(vector, f"{prefix}_remote_static"),
        psks=[bytes.fromhex(psk) for psk in vector.get(f"{prefix}_psks", [])],
        rng=_no_randomness,
    )


def _no_randomness(size: int) -> bytes:
    raise AssertionError("a vector replay must use the given ephemeral keys, not fresh ones")


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    if vector.get("missing"):
        pytest.fail(f"Noise test vectors missing at {VECTORS_PATH}")
    initiator = _side(vector, "init", initiator=True)
    responder = _side(vector, "resp", initiator=False)
    messages = vector["messages"]
    turn = 0
    while not initiator.is_complete:
        writer, reader = (initiator, responder) if turn % 2 == 0 else (responder, initiator)
        payload = bytes.fromhex(messages[turn]["payload"])
        ciphertext = writer.write_message(payload)
        assert ciphertext.hex() == messages[turn]["ciphertext"], f"handshake message {turn}"
        assert reader.read_message(ciphertext) == payload
        turn += 1
    assert responder.is_complete
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash.hex() == vector["handshake_hash"]
    _check_transport(initiator, responder, messages, turn)


def _check_transport(
    initiator: HandshakeState, responder: HandshakeState, messages: list[Any], first: int
) -> None:
    init_send, init_receive = initiator.transport()
    resp_send, resp_receive = responder.transport()
    assert len(messages) > first, "vector has no transport messages to check"
    for index in range(first, len(messages)):
        if index % 2 == 0:
            sender, receiver = init_send, resp_receive
        else:
            sender, receiver = resp_send, init_receive
        payload = bytes.fromhex(messages[index]["payload"])
        ciphertext = sender.encrypt(payload)
        assert ciphertext.hex() == messages[index]["ciphertext"], f"transport message {index}"
        assert receiver.decrypt(ciphertext) == payload
