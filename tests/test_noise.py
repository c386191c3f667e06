"""Behaviour of the Noise handshake and transport ciphers: every pattern, misuse, tampering, limits.

Test vectors live in test_noise_vectors.py, interoperability in test_noise_interop.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import nacl.bindings
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshinfer.errors import (
    ConfigError,
    DecryptError,
    HandshakeError,
    HandshakeStateError,
    NonceExhaustedError,
)
from meshinfer.proto.noise import (
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    MAX_PLAINTEXT_LEN,
    TAG_LEN,
    CipherState,
    HandshakeState,
    MessageTooLargeError,
    generate_keypair,
    parse_protocol_name,
    public_key,
)
from meshinfer.proto.noise_patterns import BASE_PATTERNS

HASHES = ("BLAKE2b", "SHA256")
PATTERNS = tuple(BASE_PATTERNS)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def protocol(pattern: str, hash_name: str = "BLAKE2b", modifiers: str = "") -> str:
    return f"Noise_{pattern}{modifiers}_25519_ChaChaPoly_{hash_name}"


@dataclass
class Pair:
    """Two ends of one handshake and the static key pairs they were given."""

    initiator: HandshakeState
    responder: HandshakeState
    init_static: tuple[bytes, bytes]
    resp_static: tuple[bytes, bytes]
    psks: list[bytes]


def make_pair(
    name: str,
    seed: int = 0,
    *,
    resp_psks: list[bytes] | None = None,
    init_rs: bytes | None = None,
    resp_rs: bytes | None = None,
    resp_prologue: bytes = b"meshinfer/1 fleet-a",
) -> Pair:
    """Both sides of ``name`` with deterministic keys; overrides build mismatched peers."""
    rng = random.Random(seed)
    init_static = generate_keypair(rng.randbytes)
    resp_static = generate_keypair(rng.randbytes)
    pattern = parse_protocol_name(name).pattern
    psks = [rng.randbytes(32) for _ in range(pattern.psk_count)]
    init_knows = "s" in pattern.responder_premessage
    resp_knows = "s" in pattern.initiator_premessage
    initiator = HandshakeState(
        name,
        initiator=True,
        prologue=b"meshinfer/1 fleet-a",
        s=init_static[0],
        rs=(init_rs or resp_static[1]) if init_knows else None,
        psks=psks,
        rng=rng.randbytes,
    )
    responder = HandshakeState(
        name,
        initiator=False,
        prologue=resp_prologue,
        s=resp_static[0],
        rs=(resp_rs or init_static[1]) if resp_knows else None,
        psks=psks if resp_psks is None else resp_psks,
        rng=rng.randbytes,
    )
    return Pair(initiator, responder, init_static, resp_static, psks)


def next_writer(pair: Pair) -> tuple[HandshakeState, HandshakeState]:
    if pair.initiator.writes_next:
        return pair.initiator, pair.responder
    return pair.responder, pair.initiator


def run_handshake(pair: Pair, payloads: list[bytes] | None = None) -> list[bytes]:
    """Run the handshake to the end; return the messages sent."""
    messages: list[bytes] = []
    while not pair.initiator.is_complete:
        writer, reader = next_writer(pair)
        turn = len(messages)
        payload = payloads[turn] if payloads and turn < len(payloads) else b"turn %d" % turn
        messages.append(writer.write_message(payload))
        assert reader.read_message(messages[-1]) == payload
    assert pair.responder.is_complete
    return messages


def sends_static(name: str, initiator: bool) -> bool:
    """Whether the given side's static key reaches (or is pre-known by) its peer."""
    pattern = parse_protocol_name(name).pattern
    pre = pattern.initiator_premessage if initiator else pattern.responder_premessage
    own = pattern.messages[0 if initiator else 1 :: 2]
    return "s" in pre or any("s" in message for message in own)


@st.composite
def protocol_names(draw: st.DrawFn) -> str:
    pattern = draw(st.sampled_from(PATTERNS))
    messages = len(BASE_PATTERNS[pattern][2])
    positions = draw(st.lists(st.integers(0, messages), unique=True, max_size=2))
    modifiers = "+".join(f"psk{position}" for position in sorted(positions))
    return protocol(pattern, draw(st.sampled_from(HASHES)), modifiers)


# --- every pattern completes and carries transport traffic ------------------------------------


@pytest.mark.parametrize("modifiers", ["", "psk0", "psk2", "psk0+psk1"])
@pytest.mark.parametrize("hash_name", HASHES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_completes(pattern: str, hash_name: str, modifiers: str) -> None:
    name = protocol(pattern, hash_name, modifiers)
    pair = make_pair(name)
    run_handshake(pair)
    assert pair.initiator.handshake_hash == pair.responder.handshake_hash
    assert len(pair.initiator.handshake_hash) == (64 if hash_name == "BLAKE2b" else 32)
    expected_at_initiator = pair.resp_static[1] if sends_static(name, False) else None
    expected_at_responder = pair.init_static[1] if sends_static(name, True) else None
    assert pair.initiator.remote_static == expected_at_initiator
    assert pair.responder.remote_static == expected_at_responder
    init_send, init_receive = pair.initiator.transport()
    resp_send, resp_receive = pair.responder.transport()
    assert resp_receive.decrypt(init_send.encrypt(b"to responder")) == b"to responder"
    assert init_receive.decrypt(resp_send.encrypt(b"to initiator")) == b"to initiator"


@FAST
@given(
    name=protocol_names(),
    seed=st.integers(0, 2**32),
    handshake_payloads=st.lists(st.binary(max_size=64), max_size=3),
    traffic=st.lists(st.tuples(st.booleans(), st.binary(max_size=300), st.binary(max_size=16))),
)
def test_handshake_then_traffic_both_ways(
    name: str,
    seed: int,
    handshake_payloads: list[bytes],
    traffic: list[tuple[bool, bytes, bytes]],
) -> None:
    pair = make_pair(name, seed)
    run_handshake(pair, handshake_payloads)
    init_send, init_receive = pair.initiator.transport()
    resp_send, resp_receive = pair.responder.transport()
    for from_initiator, plaintext, ad in traffic:
        sender, receiver = (
            (init_send, resp_receive) if from_initiator else (resp_send, init_receive)
        )
        ciphertext = sender.encrypt(plaintext, ad)
        assert len(ciphertext) == len(plaintext) + TAG_LEN
        assert receiver.decrypt(ciphertext, ad) == plaintext
    assert init_send.nonce == resp_receive.nonce == sum(1 for t in traffic if t[0])
    assert resp_send.nonce == init_receive.nonce == sum(1 for t in traffic if not t[0])


def test_several_psks_in_one_pattern() -> None:
    name = protocol("XX", modifiers="psk0+psk3")
    pattern = parse_protocol_name(name).pattern
    assert pattern.messages[0][0] == "psk" and pattern.messages[2][-1] == "psk"
    pair = make_pair(name)
    run_handshake(pair)
    assert pair.initiator.handshake_hash == pair.responder.handshake_hash


def test_same_rng_gives_same_handshake_and_fresh_keys_differ() -> None:
    name = protocol("XX")
    assert run_handshake(make_pair(name, seed=7)) == run_handshake(make_pair(name, seed=7))
    assert run_handshake(make_pair(name, seed=7)) != run_handshake(make_pair(name, seed=8))
    first = HandshakeState(name, initiator=True, s=generate_keypair()[0]).write_message()
    second = HandshakeState(name, initiator=True, s=generate_keypair()[0]).write_message()
    assert first != second  # os.urandom ephemerals by default


def test_public_key_matches_generated_pair() -> None:
    private, public = generate_keypair()
    assert public_key(private) == public and len(public) == 32


# --- out-of-turn calls and unusable states ----------------------------------------------------


def assert_unusable(state: HandshakeState) -> None:
    for call in (
        lambda: state.write_message(b""),
        lambda: state.read_message(b""),
        state.transport,
    ):
        with pytest.raises(HandshakeStateError, match="failed earlier"):
            call()
    assert not state.is_complete


def test_responder_cannot_write_first() -> None:
    pair = make_pair(protocol("XX"))
    with pytest.raises(HandshakeStateError, match=r"responder.*write_message\(\) refused"):
        pair.responder.write_message(b"")
    assert_unusable(pair.responder)


def test_initiator_cannot_read_first() -> None:
    pair = make_pair(protocol("XX"))
    with pytest.raises(HandshakeStateError, match=r"read_message\(\) refused.*message 1 of 3"):
        pair.initiator.read_message(b"\0" * 48)
    assert_unusable(pair.initiator)


def test_transport_before_completion_is_refused() -> None:
    pair = make_pair(protocol("IK"))
    pair.responder.read_message(pair.initiator.write_message(b""))
    with pytest.raises(HandshakeStateError, match=r"transport\(\) refused"):
        pair.responder.transport()
    assert_unusable(pair.responder)


def test_handshake_calls_after_completion_are_refused() -> None:
    pair = make_pair(protocol("NN"))
    run_handshake(pair)
    sending, receiving = pair.initiator.transport()
    assert pair.initiator.transport() == (sending, receiving)
    with pytest.raises(HandshakeStateError, match="complete"):
        pair.initiator.write_message(b"more")
    assert_unusable(pair.initiator)
    assert pair.initiator.remote_static is None  # still readable
    receiver = pair.responder.transport()[1]
    assert receiver.decrypt(sending.encrypt(b"still works")) == b"still works"


# --- tampering, truncation, wrong keys ---------------------------------------------------------


@FAST
@given(
    name=protocol_names(),
    turn=st.integers(0, 2),
    position=st.integers(0, 2**16),
    xor=st.integers(1, 255),
)
def test_any_changed_byte_fails_the_handshake(name: str, turn: int, position: int, xor: int):
    pair = make_pair(name)
    messages = len(parse_protocol_name(name).pattern.messages)
    turn %= messages
    failed_reader = None
    for index in range(messages):
        writer, reader = next_writer(pair)
        message = bytearray(writer.write_message(b"payload"))
        if index == turn:
            message[position % len(message)] ^= xor
        try:
            reader.read_message(bytes(message))
        except HandshakeError:
            failed_reader = reader
            break
    assert failed_reader is not None, "a changed handshake message went unnoticed"
    assert index >= turn
    assert_unusable(failed_reader)


def test_tampered_payload_in_unencrypted_first_message_is_caught_next_turn() -> None:
    pair = make_pair(protocol("XX"))
    first = bytearray(pair.initiator.write_message(b"hello"))
    first[-1] ^= 1
    assert pair.responder.read_message(bytes(first)) == b"helln"  # not yet authenticated
    second = pair.responder.write_message(b"")
    with pytest.raises(HandshakeError, match=r"initiator reading message 2/3, token 's'"):
        pair.initiator.read_message(second)
    assert_unusable(pair.initiator)


@pytest.mark.parametrize("name", [protocol("XX"), protocol("IK", "SHA256", "psk2")])
def test_every_truncation_of_a_handshake_message_fails(name: str) -> None:
    message = make_pair(name).initiator.write_message(b"payload")
    for length in range(len(message)):
        pair = make_pair(name)
        pair.initiator.write_message(b"payload")
        reader = pair.responder
        try:
            reader.read_message(message[:length])
        except HandshakeError:
            assert_unusable(reader)
            continue
        # An unencrypted first message (XX) only fails once the initiator authenticates it.
        with pytest.raises(HandshakeError):
            pair.initiator.read_message(reader.write_message(b""))


def test_short_message_names_the_token_and_turn() -> None:
    pair = make_pair(protocol("XX"))
    pair.responder.read_message(pair.initiator.write_message(b""))
    second = pair.responder.write_message(b"")
    with pytest.raises(HandshakeError, match=r"Noise_XX.*message 2/3, token 's'.*too short"):
        pair.initiator.read_message(second[:40])


def test_low_order_ephemeral_is_rejected() -> None:
    pair = make_pair(protocol("NN"))
    pair.responder.read_message(pair.initiator.write_message(b""))
    forged = bytes(32) + b"payload" + bytes(TAG_LEN)
    with pytest.raises(HandshakeError, match="low-order"):
        pair.initiator.read_message(forged)
    assert_unusable(pair.initiator)


@pytest.mark.parametrize(
    "name", [protocol("NN", modifiers="psk0"), protocol("XX", "SHA256", "psk3")]
)
def test_wrong_psk_fails_the_handshake(name: str) -> None:
    pair = make_pair(name, resp_psks=[bytes(32)])
    with pytest.raises(HandshakeError):
        run_handshake(pair)


@pytest.mark.parametrize("pattern", ["NK", "IK", "XK", "KK"])
def test_wrong_remote_static_fails_the_handshake(pattern: str) -> None:
    pair = make_pair(protocol(pattern), init_rs=generate_keypair()[1])
    with pytest.raises(HandshakeError):
        run_handshake(pair)


def test_responder_with_wrong_initiator_key_fails_kk() -> None:
    pair = make_pair(protocol("KK"), resp_rs=generate_keypair()[1])
    with pytest.raises(HandshakeError):
        run_handshake(pair)


def test_prologue_mismatch_fails_the_handshake() -> None:
    pair = make_pair(protocol("XX"), resp_prologue=b"meshinfer/1 fleet-b")
    with pytest.raises(HandshakeError):
        run_handshake(pair)


# --- size limits -------------------------------------------------------------------------------


def test_handshake_message_size_limits() -> None:
    pair = make_pair(protocol("XX"))
    pair.responder.read_message(pair.initiator.write_message(b""))
    overhead = 32 + (32 + TAG_LEN) + TAG_LEN  # e, encrypted s, payload tag
    largest = pair.responder.write_message(bytes(MAX_MESSAGE_LEN - overhead))
    assert len(largest) == MAX_MESSAGE_LEN
    assert pair.initiator.read_message(largest) == bytes(MAX_MESSAGE_LEN - overhead)
    too_big = make_pair(protocol("XX"))
    too_big.responder.read_message(too_big.initiator.write_message(b""))
    with pytest.raises(MessageTooLargeError, match="65536 bytes exceeds 65535"):
        too_big.responder.write_message(bytes(MAX_MESSAGE_LEN - overhead + 1))
    assert_unusable(too_big.responder)


def test_oversized_incoming_handshake_message_is_rejected() -> None:
    pair = make_pair(protocol("NN"))
    with pytest.raises(HandshakeError, match="exceeds 65535"):
        pair.responder.read_message(bytes(MAX_MESSAGE_LEN + 1))
    with pytest.raises(MessageTooLargeError):
        pair.initiator.write_message(bytes(MAX_MESSAGE_LEN))


def test_transport_size_limits() -> None:
    sender, receiver = CipherState(bytes(range(32))), CipherState(bytes(range(32)))
    ciphertext = sender.encrypt(bytes(MAX_PLAINTEXT_LEN))
    assert len(ciphertext) == MAX_MESSAGE_LEN
    assert receiver.decrypt(ciphertext) == bytes(MAX_PLAINTEXT_LEN)
    with pytest.raises(MessageTooLargeError):
        sender.encrypt(bytes(MAX_PLAINTEXT_LEN + 1))
    with pytest.raises(DecryptError, match="outside"):
        receiver.decrypt(bytes(MAX_MESSAGE_LEN + 1))
    assert sender.nonce == receiver.nonce == 1


# --- transport: tampering, nonces, rekey ------------------------------------------------------


def transport_pair(name: str = protocol("XX")) -> tuple[CipherState, CipherState]:
    pair = make_pair(name)
    run_handshake(pair)
    return pair.initiator.transport()[0], pair.responder.transport()[1]


def test_tampered_transport_message_fails_without_advancing_the_nonce() -> None:
    sender, receiver = transport_pair()
    ciphertext = sender.encrypt(b"frame", b"header")
    for position in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[position] ^= 0x80
        with pytest.raises(DecryptError, match="authentication failed at nonce 0"):
            receiver.decrypt(bytes(tampered), b"header")
    with pytest.raises(DecryptError):
        receiver.decrypt(ciphertext, b"other header")
    assert receiver.nonce == 0
    assert receiver.decrypt(ciphertext, b"header") == b"frame"
    assert receiver.nonce == 1


def test_truncated_transport_ciphertexts_fail() -> None:
    sender, receiver = transport_pair()
    ciphertext = sender.encrypt(b"some frame")
    for length in range(len(ciphertext)):
        with pytest.raises(DecryptError):
            receiver.decrypt(ciphertext[:length])
    assert receiver.decrypt(ciphertext) == b"some frame"


def test_replayed_or_reordered_transport_message_fails() -> None:
    sender, receiver = transport_pair()
    first, second = sender.encrypt(b"one"), sender.encrypt(b"two")
    with pytest.raises(DecryptError):
        receiver.decrypt(second)
    assert receiver.decrypt(first) == b"one"
    with pytest.raises(DecryptError):
        receiver.decrypt(first)
    assert receiver.decrypt(second) == b"two"


def test_nonce_exhaustion() -> None:
    key = bytes(range(32))
    sender, receiver = CipherState(key, nonce=MAX_NONCE - 1), CipherState(key, nonce=MAX_NONCE - 1)
    assert receiver.decrypt(sender.encrypt(b"last")) == b"last"
    assert sender.nonce == receiver.nonce == MAX_NONCE
    with pytest.raises(NonceExhaustedError, match="exhausted"):
        sender.encrypt(b"one too many")
    with pytest.raises(NonceExhaustedError):
        receiver.decrypt(bytes(TAG_LEN + 4))
    assert sender.nonce == MAX_NONCE
    with pytest.raises(ConfigError):
        CipherState(key, nonce=MAX_NONCE + 1)


def test_set_nonce_lets_a_receiver_skip_ahead() -> None:
    key = bytes(32)
    sender, receiver = CipherState(key, nonce=41), CipherState(key)
    receiver.set_nonce(41)
    assert receiver.decrypt(sender.encrypt(b"x")) == b"x"


def test_rekey_on_both_sides_keeps_them_in_sync() -> None:
    sender, receiver = transport_pair(protocol("IK", "SHA256"))
    assert receiver.decrypt(sender.encrypt(b"before")) == b"before"
    sender.rekey()
    receiver.rekey()
    for _ in range(3):
        assert receiver.decrypt(sender.encrypt(b"after")) == b"after"
    assert sender.nonce == receiver.nonce == 4  # rekey keeps the nonce
    sender.rekey()  # only one side: the next frame must not decrypt
    with pytest.raises(DecryptError):
        receiver.decrypt(sender.encrypt(b"lost"))


def test_rekey_matches_the_spec_definition() -> None:
    key = bytes(range(32))
    rekeyed, unchanged = CipherState(key, nonce=5), CipherState(key, nonce=5)
    rekeyed.rekey()
    # REKEY(k) = ENCRYPT(k, 2**64-1, zerolen, zeros)[:32], computed here straight from libsodium.
    max_nonce = bytes(4) + MAX_NONCE.to_bytes(8, "little")
    expected_key = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
        bytes(32), None, max_nonce, key
    )[:32]
    reference = CipherState(expected_key, nonce=5)
    probe = rekeyed.encrypt(b"probe")
    assert probe == reference.encrypt(b"probe")
    assert probe != unchanged.encrypt(b"probe")


# --- fuzzing: peer bytes only ever raise Noise errors ------------------------------------------


@FAST
@given(name=protocol_names(), turn=st.integers(0, 2), junk=st.binary(max_size=200))
def test_random_bytes_to_read_message_at_any_turn(name: str, turn: int, junk: bytes) -> None:
    pair = make_pair(name)
    turn %= len(parse_protocol_name(name).pattern.messages)
    for _ in range(turn):
        writer, reader = next_writer(pair)
        reader.read_message(writer.write_message(b""))
    _, reader = next_writer(pair)
    try:
        reader.read_message(junk)
    except HandshakeError:  # anything else propagates and fails the test
        assert_unusable(reader)


@FAST
@given(junk=st.binary(max_size=300), ad=st.binary(max_size=8))
def test_random_bytes_to_decrypt_raise_decrypt_error(junk: bytes, ad: bytes) -> None:
    receiver = CipherState(bytes(range(32)), nonce=3)
    with pytest.raises(DecryptError):
        receiver.decrypt(junk, ad)
    assert receiver.nonce == 3


# --- protocol names and constructor arguments --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "complaint"),
    [
        ("Noise_XX_448_ChaChaPoly_BLAKE2b", "DH function '448'"),
        ("Noise_XX_25519_AESGCM_SHA256", "cipher 'AESGCM'"),
        ("Noise_XX_25519_ChaChaPoly_SHA512", "hash 'SHA512'"),
        ("Noise_N_25519_ChaChaPoly_BLAKE2b", "not a Noise protocol name"),
        ("Noise_XXfallback_25519_ChaChaPoly_BLAKE2b", "modifier 'fallback'"),
        ("Noise_XXpsk4_25519_ChaChaPoly_BLAKE2b", "past the pattern's 3 messages"),
        ("Noise_XXpsk3+psk0_25519_ChaChaPoly_BLAKE2b", "ascending"),
        ("Noise_ZZ_25519_ChaChaPoly_BLAKE2b", "pattern 'ZZ'"),
        ("Noise_XX_25519_ChaChaPoly", "expected _<DH>_<cipher>_<hash>"),
        ("XX", "not a Noise protocol name"),
    ],
)
def test_unsupported_protocol_names(name: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        HandshakeState(name, initiator=True, s=bytes(32))


def test_psk_modifier_placement() -> None:
    messages = parse_protocol_name(protocol("IK", modifiers="psk0+psk2")).pattern.messages
    assert messages == (("psk", "e", "es", "s", "ss"), ("e", "ee", "se", "psk"))


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"name": protocol("IK")}, "needs the peer's key rs"),
        ({"name": protocol("XX"), "rs": bytes(32)}, "does not take rs"),
        ({"name": protocol("NN"), "re": bytes(32)}, "does not take re"),
        ({"name": protocol("XX"), "s": None}, "needs our static key"),
        ({"name": protocol("XX"), "s": bytes(31)}, "31 bytes"),
        ({"name": protocol("NN", modifiers="psk0")}, "needs 1 psks, got 0"),
        ({"name": protocol("NN", modifiers="psk0"), "psks": [b"short"]}, "32 bytes"),
        ({"name": protocol("NN"), "e": b"x"}, "ephemeral"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, complaint: str) -> None:
    arguments = {"s": bytes(range(32)), **kwargs}
    name = arguments.pop("name")
    with pytest.raises(ConfigError, match=complaint):
        HandshakeState(name, True, **arguments)


def test_bytes_like_arguments_take_the_slow_path() -> None:
    sender, receiver = CipherState(bytes(range(32))), CipherState(bytes(range(32)))
    ciphertext = sender.encrypt(bytearray(b"frame"), memoryview(b"ad"))
    assert ciphertext == CipherState(bytes(range(32))).encrypt(b"frame", b"ad")
    assert receiver.decrypt(memoryview(ciphertext), bytearray(b"ad")) == b"frame"
    with pytest.raises(DecryptError):
        receiver.decrypt(bytearray(ciphertext), b"ad")  # nonce 1 now: replay refused
    with pytest.raises(TypeError, match="must be bytes"):
        receiver.decrypt("not bytes" * 4)
    assert receiver.nonce == 1
