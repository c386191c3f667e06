"""Noise Protocol Framework (revision 34), sans-I/O: the handshake state machine.

Supported: ``Noise_<NN|NK|NX|XN|XK|XX|KN|KK|KX|IN|IK|IX>[psk0..pskN]_25519_ChaChaPoly_<BLAKE2b|
SHA256>``; patterns are data in :mod:`meshinfer.proto.noise_patterns`, primitives in
:mod:`meshinfer.proto.noise_crypto`. No I/O: the caller moves the bytes, and ephemeral keys come
from ``rng`` (default ``os.urandom``) or, to replay test vectors, from ``e``.

Theory of operation. One :class:`HandshakeState` runs one handshake attempt through the phases

    phase       write_message()   read_message()   transport()
    WRITING     -> next message   refused          refused
    READING     refused           -> next message  refused
    COMPLETE    refused           refused          (send, receive)
    FAILED      refused           refused          refused

("refused" raises :class:`HandshakeStateError`). Message ``i`` (0-based) is written by the
initiator when ``i`` is even. After the last message the state splits into two transport
:class:`CipherState` objects and is COMPLETE. Any error -- a refused call, or an exception inside
``write_message``/``read_message`` -- moves it to FAILED for good: a half-processed message leaves
the chaining key and handshake hash in an unknown state, so nothing may continue from it (cipher
states already taken from ``transport()`` keep working). ``handshake_hash`` and
``remote_static`` stay readable in every phase.

Errors: a peer's malformed, short, oversized or undecryptable message, or a low-order DH result,
raises :class:`HandshakeError`; bad constructor arguments raise :class:`ConfigError`; sending a
message over 65535 bytes raises :class:`MessageTooLargeError`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from meshinfer.errors import (
    ConfigError,
    DecryptError,
    HandshakeError,
    HandshakeStateError,
)
from meshinfer.proto.noise_crypto import (
    DHLEN,
    HASH_SUITES,
    KEY_LEN,
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    MAX_PLAINTEXT_LEN,
    TAG_LEN,
    CipherState,
    MessageTooLargeError,
    Rng,
    SymmetricState,
    dh,
    generate_keypair,
    public_key,
    require_key,
)
from meshinfer.proto.noise_patterns import HandshakePattern, ProtocolSpec, parse_protocol_name

__all__ = [
    "DHLEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "MAX_PLAINTEXT_LEN",
    "TAG_LEN",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "MessageTooLargeError",
    "ProtocolSpec",
    "generate_keypair",
    "parse_protocol_name",
    "public_key",
]


class _Phase(enum.Enum):
    WRITING = "our turn to write"
    READING = "the peer's turn to write"
    COMPLETE = "the handshake is complete"
    FAILED = "the handshake failed"


_ALLOWED: dict[_Phase, frozenset[str]] = {
    _Phase.WRITING: frozenset({"write_message"}),
    _Phase.READING: frozenset({"read_message"}),
    _Phase.COMPLETE: frozenset({"transport"}),
    _Phase.FAILED: frozenset(),
}

# (DH token, we are the initiator) -> (our key pair, their public key), each "e" or "s".
_DH_KEYS: dict[tuple[str, bool], tuple[str, str]] = {
    ("ee", True): ("e", "e"),
    ("ee", False): ("e", "e"),
    ("es", True): ("e", "s"),
    ("es", False): ("s", "e"),
    ("se", True): ("s", "e"),
    ("se", False): ("e", "s"),
    ("ss", True): ("s", "s"),
    ("ss", False): ("s", "s"),
}


class HandshakeState:
    """One side of one Noise handshake.

    ``s`` is our static private key; ``e`` an ephemeral private key to use for our ``e`` token
    (only to replay test vectors); ``rs``/``re`` the peer's public keys when the pattern's
    pre-messages require them (and only then); ``psks`` one 32-byte key per ``psk`` token, in
    handshake order. ``rng(n)`` supplies ephemeral keys (default ``os.urandom``).
    """

    __slots__ = (
        "_failure",
        "_initiator",
        "_local",
        "_next_e",
        "_psk_index",
        "_psks",
        "_remote",
        "_rng",
        "_spec",
        "_symmetric",
        "_transport",
        "_turn",
    )

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
        *,
        rng: Rng | None = None,
    ) -> None:
        self._spec = parse_protocol_name(protocol_name)
        self._initiator = bool(initiator)
        self._rng = rng or os.urandom
        self._local: dict[str, tuple[bytes, bytes]] = {}  # "s"/"e" -> (private, public)
        self._remote: dict[str, bytes] = {}  # "s"/"e" -> public
        self._next_e = e
        self._psks = tuple(psks)
        self._psk_index = 0
        self._turn = 0
        self._failure: str | None = None
        self._transport: tuple[CipherState, CipherState] | None = None
        self._symmetric = SymmetricState(protocol_name, HASH_SUITES[self._spec.hash_name])
        self._take_keys(s, e, rs, re)
        self._symmetric.mix_hash(_as_bytes("prologue", prologue))
        self._mix_premessages()

    # --- public API ---------------------------------------------------------------------------

    @property
    def protocol_name(self) -> str:
        """The full protocol name, e.g. ``Noise_XX_25519_ChaChaPoly_BLAKE2b``."""
        return self._spec.name

    @property
    def initiator(self) -> bool:
        """Whether we are the initiator."""
        return self._initiator

    @property
    def writes_next(self) -> bool:
        """True when ``write_message`` is the call the handshake expects next."""
        return self._phase is _Phase.WRITING

    @property
    def is_complete(self) -> bool:
        """True once the last handshake message was written or read, and no error since."""
        return self._transport is not None and self._failure is None

    @property
    def handshake_hash(self) -> bytes:
        """``h``: after completion, a unique channel-binding value both sides agree on."""
        return self._symmetric.handshake_hash

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once given or received (``None`` before)."""
        return self._remote.get("s")

    def write_message(self, payload: bytes = b"") -> bytes:
        """Build the next handshake message carrying ``payload`` (encrypted once keyed)."""
        self._require("write_message")
        with self._fail_on_error():
            return self._write(_as_bytes("payload", payload))

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message; return its payload."""
        self._require("read_message")
        with self._fail_on_error():
            return self._read(_as_bytes("message", message))

    def transport(self) -> tuple[CipherState, CipherState]:
        """``(for sending, for receiving)`` cipher states; only after completion.

        Repeated calls return the same two objects (so their nonces stay shared).
        """
        self._require("transport")
        assert self._transport is not None
        return self._transport

    # --- phases -------------------------------------------------------------------------------

    @property
    def _phase(self) -> _Phase:
        if self._failure is not None:
            return _Phase.FAILED
        if self._transport is not None:
            return _Phase.COMPLETE
        ours = self._spec.pattern.sender_is_initiator(self._turn) == self._initiator
        return _Phase.WRITING if ours else _Phase.READING

    def _require(self, operation: str) -> None:
        phase = self._phase
        if operation in _ALLOWED[phase]:
            return
        detail = phase.value
        if phase is _Phase.FAILED:
            detail = f"the handshake failed earlier ({self._failure}); this state is unusable"
        elif phase is not _Phase.COMPLETE:
            detail = f"{detail} message {self._turn + 1} of {len(self._spec.pattern.messages)}"
        error = HandshakeStateError(
            f"{self._spec.name} ({self._role}): {operation}() refused: {detail}"
        )
        if self._failure is None:
            self._failure = f"HandshakeStateError: {error}"
        raise error

    @contextmanager
    def _fail_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            raise

    @property
    def _role(self) -> str:
        return "initiator" if self._initiator else "responder"

    def _where(self, token: str) -> str:
        verb = "writing" if self.writes_next else "reading"
        total = len(self._spec.pattern.messages)
        return f"{self._spec.name} {self._role} {verb} message {self._turn + 1}/{total}, {token}"

    def _advance(self) -> None:
        self._turn += 1
        if self._turn < len(self._spec.pattern.messages):
            return
        to_responder, to_initiator = self._symmetric.split(self._spec.name)
        if self._initiator:
            self._transport = (to_responder, to_initiator)
        else:
            self._transport = (to_initiator, to_responder)
        self._local.pop("e", None)  # the ephemeral private key is not needed any more

    # --- setup --------------------------------------------------------------------------------

    def _take_keys(
        self, s: bytes | None, e: bytes | None, rs: bytes | None, re: bytes | None
    ) -> None:
        pattern = self._spec.pattern
        ours, theirs = _premessages(pattern, self._initiator)
        if s is not None:
            require_key("s (our static private key)", s)
            self._local["s"] = (s, public_key(s))
        elif "s" in ours or any("s" in pattern.messages[i] for i in self._our_messages()):
            raise ConfigError(f"{self._spec.name} ({self._role}) needs our static key s")
        if e is not None:
            require_key("e (our ephemeral private key)", e)
        for token, key in (("s", rs), ("e", re)):
            self._take_remote_premessage_key(token, key, token in theirs)
        if "e" in ours:
            raise ConfigError(f"{self._spec.name}: pre-message ephemeral keys are not supported")
        self._take_psks(pattern)

    def _take_remote_premessage_key(self, token: str, key: bytes | None, needed: bool) -> None:
        name = f"r{token}"
        if needed and key is None:
            raise ConfigError(f"{self._spec.name} ({self._role}) needs the peer's key {name}")
        if not needed and key is not None:
            raise ConfigError(
                f"{self._spec.name} ({self._role}) does not take {name} before the handshake; "
                "compare remote_static after completion instead"
            )
        if key is not None:
            require_key(f"{name} (the peer's public key)", key)
            self._remote[token] = key

    def _take_psks(self, pattern: HandshakePattern) -> None:
        if len(self._psks) != pattern.psk_count:
            raise ConfigError(
                f"{self._spec.name} needs {pattern.psk_count} psks, got {len(self._psks)}"
            )
        for psk in self._psks:
            if not isinstance(psk, bytes) or len(psk) != KEY_LEN:
                raise ConfigError(f"{self._spec.name}: every psk must be {KEY_LEN} bytes")

    def _our_messages(self) -> range:
        return range(0 if self._initiator else 1, len(self._spec.pattern.messages), 2)

    def _mix_premessages(self) -> None:
        pattern = self._spec.pattern
        for is_initiator, tokens in (
            (True, pattern.initiator_premessage),
            (False, pattern.responder_premessage),
        ):
            for token in tokens:
                if is_initiator == self._initiator:
                    self._mix_public_key(token, self._local[token][1])
                else:
                    self._mix_public_key(token, self._remote[token])

    def _mix_public_key(self, token: str, key: bytes) -> None:
        self._symmetric.mix_hash(key)
        if token == "e" and self._spec.pattern.psk_count:
            self._symmetric.mix_key(key)

    # --- writing ------------------------------------------------------------------------------

    def _write(self, payload: bytes) -> bytes:
        parts = [self._write_token(token) for token in self._spec.pattern.messages[self._turn]]
        if len(payload) > MAX_PLAINTEXT_LEN:
            raise MessageTooLargeError(f"{self._where('payload')}: {len(payload)} bytes")
        parts.append(self._symmetric.encrypt_and_hash(payload))
        message = b"".join(parts)
        if len(message) > MAX_MESSAGE_LEN:
            raise MessageTooLargeError(
                f"{self._where('payload')}: message of {len(message)} bytes exceeds "
                f"{MAX_MESSAGE_LEN}; send a smaller payload"
            )
        self._advance()
        return message

    def _write_token(self, token: str) -> bytes:
        if token == "e":
            return self._write_ephemeral()
        if token == "s":
            return self._symmetric.encrypt_and_hash(self._local["s"][1])
        if token == "psk":
            self._mix_psk()
        else:
            self._mix_dh(token)
        return b""

    def _write_ephemeral(self) -> bytes:
        private = self._next_e if self._next_e is not None else self._rng(DHLEN)
        self._next_e = None
        public = public_key(private)
        self._local["e"] = (private, public)
        self._mix_public_key("e", public)
        return public

    def _mix_psk(self) -> None:
        self._symmetric.mix_key_and_hash(self._psks[self._psk_index])
        self._psk_index += 1

    def _mix_dh(self, token: str) -> None:
        ours, theirs = _DH_KEYS[(token, self._initiator)]
        try:
            shared = dh(self._local[ours][0], self._remote[theirs])
        except HandshakeError as exc:
            raise HandshakeError(f"{self._where(f'token {token!r}')}: {exc}") from exc
        self._symmetric.mix_key(shared)

    # --- reading ------------------------------------------------------------------------------

    def _read(self, message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_LEN:
            raise HandshakeError(
                f"{self._where('whole message')}: {len(message)} bytes exceeds {MAX_MESSAGE_LEN}"
            )
        rest = message
        for token in self._spec.pattern.messages[self._turn]:
            rest = self._read_token(token, rest)
        payload = self._decrypt(rest, "payload")
        self._advance()
        return payload

    def _read_token(self, token: str, rest: bytes) -> bytes:
        if token == "e":
            public, rest = self._split_off(rest, DHLEN, token)
            self._remote["e"] = public
            self._mix_public_key("e", public)
        elif token == "s":
            size = DHLEN + (TAG_LEN if self._symmetric.has_key else 0)
            sealed, rest = self._split_off(rest, size, token)
            self._remote["s"] = self._decrypt(sealed, "token 's'")
        elif token == "psk":
            self._mix_psk()
        else:
            self._mix_dh(token)
        return rest

    def _split_off(self, rest: bytes, size: int, token: str) -> tuple[bytes, bytes]:
        if len(rest) < size:
            raise HandshakeError(
                f"{self._where(f'token {token!r}')}: message too short, "
                f"need {size} bytes, {len(rest)} left"
            )
        return rest[:size], rest[size:]

    def _decrypt(self, sealed: bytes, what: str) -> bytes:
        try:
            return self._symmetric.decrypt_and_hash(sealed)
        except DecryptError as exc:
            raise HandshakeError(f"{self._where(what)}: failed to decrypt ({exc})") from exc


def _premessages(pattern: HandshakePattern, initiator: bool) -> tuple[tuple[str, ...], ...]:
    """(our pre-message tokens, the peer's pre-message tokens)."""
    if initiator:
        return pattern.initiator_premessage, pattern.responder_premessage
    return pattern.responder_premessage, pattern.initiator_premessage


def _as_bytes(what: str, data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
