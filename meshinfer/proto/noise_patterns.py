"""Noise handshake patterns as data, and the parser for Noise protocol names.

A handshake pattern (Noise revision 34, section 7) is two pre-messages (public keys each side
knows about the other before the handshake starts) and a list of messages, sent alternately by
the initiator (even indexes) and the responder (odd indexes). Every message is a tuple of tokens:

* ``e`` / ``s``  -- send (or receive) an ephemeral / static public key;
* ``ee`` ``es`` ``se`` ``ss`` -- mix a Diffie-Hellman result in (first letter: initiator's key);
* ``psk`` -- mix a pre-shared key in (added by the ``pskN`` modifiers, section 9).

Only the twelve interactive base patterns are supported, with any ascending combination of
``psk0``..``pskN`` modifiers, and only ``25519`` / ``ChaChaPoly`` / ``BLAKE2b`` or ``SHA256``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshinfer.errors import ConfigError

Tokens = tuple[str, ...]

DH_NAME = "25519"
CIPHER_NAME = "ChaChaPoly"
HASH_NAMES = ("BLAKE2b", "SHA256")

# name -> (initiator pre-message, responder pre-message, messages). Noise rev 34, section 7.4.
BASE_PATTERNS: dict[str, tuple[Tokens, Tokens, tuple[Tokens, ...]]] = {
    "NN": ((), (), (("e",), ("e", "ee"))),
    "NK": ((), ("s",), (("e", "es"), ("e", "ee"))),
    "NX": ((), (), (("e",), ("e", "ee", "s", "es"))),
    "XN": ((), (), (("e",), ("e", "ee"), ("s", "se"))),
    "XK": ((), ("s",), (("e", "es"), ("e", "ee"), ("s", "se"))),
    "XX": ((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
    "KN": (("s",), (), (("e",), ("e", "ee", "se"))),
    "KK": (("s",), ("s",), (("e", "es", "ss"), ("e", "ee", "se"))),
    "KX": (("s",), (), (("e",), ("e", "ee", "se", "s", "es"))),
    "IN": ((), (), (("e", "s"), ("e", "ee", "se"))),
    "IK": ((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
    "IX": ((), (), (("e", "s"), ("e", "ee", "se", "s", "es"))),
}

_NAME_RE = re.compile(r"Noise_(?P<pattern>[A-Z]{2})(?P<modifiers>[a-z0-9+]*)_(?P<rest>.*)")
_PSK_RE = re.compile(r"psk([0-9]+)")


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """One handshake pattern with its modifiers applied, e.g. ``XXpsk3``."""

    name: str
    initiator_premessage: Tokens
    responder_premessage: Tokens
    messages: tuple[Tokens, ...]

    @property
    def psk_count(self) -> int:
        """How many ``psk`` tokens (so how many pre-shared keys) the pattern needs."""
        return sum(message.count("psk") for message in self.messages)

    def sender_is_initiator(self, index: int) -> bool:
        """Whether message ``index`` (0-based) is written by the initiator."""
        return index % 2 == 0


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """A parsed protocol name such as ``Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b``."""

    name: str
    pattern: HandshakePattern
    hash_name: str  # "BLAKE2b" or "SHA256"


def parse_protocol_name(name: str) -> ProtocolSpec:
    """Parse ``Noise_<pattern><modifiers>_25519_ChaChaPoly_<BLAKE2b|SHA256>``.

    Raises :class:`ConfigError` naming the unsupported part (pattern, modifier, DH, cipher, hash).
    """
    match = _NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ConfigError(
            f"not a Noise protocol name: {name!r} "
            "(expected Noise_<pattern><modifiers>_25519_ChaChaPoly_<BLAKE2b|SHA256>)"
        )
    base, modifiers = match["pattern"], match["modifiers"]
    hash_name = _parse_primitives(name, match["rest"])
    pattern = _build_pattern(name, base, modifiers)
    return ProtocolSpec(name=name, pattern=pattern, hash_name=hash_name)


def _parse_primitives(name: str, rest: str) -> str:
    parts = rest.split("_")
    if len(parts) != 3:
        raise ConfigError(f"{name!r}: expected _<DH>_<cipher>_<hash> after the pattern")
    dh, cipher, hash_name = parts
    if dh != DH_NAME:
        raise ConfigError(f"{name!r}: unsupported DH function {dh!r} (only {DH_NAME!r})")
    if cipher != CIPHER_NAME:
        raise ConfigError(f"{name!r}: unsupported cipher {cipher!r} (only {CIPHER_NAME!r})")
    if hash_name not in HASH_NAMES:
        raise ConfigError(f"{name!r}: unsupported hash {hash_name!r} (one of {HASH_NAMES})")
    return hash_name


def _build_pattern(name: str, base: str, modifiers: str) -> HandshakePattern:
    if base not in BASE_PATTERNS:
        known = " ".join(BASE_PATTERNS)
        raise ConfigError(f"{name!r}: unsupported handshake pattern {base!r} (one of {known})")
    initiator_pre, responder_pre, messages = BASE_PATTERNS[base]
    positions = _parse_psk_modifiers(name, modifiers, len(messages))
    patched = [list(message) for message in messages]
    for position in positions:
        if position == 0:
            patched[0].insert(0, "psk")
        else:
            patched[position - 1].append("psk")
    return HandshakePattern(
        name=base + modifiers,
        initiator_premessage=initiator_pre,
        responder_premessage=responder_pre,
        messages=tuple(tuple(message) for message in patched),
    )


def _parse_psk_modifiers(name: str, modifiers: str, message_count: int) -> list[int]:
    """``"psk0+psk2"`` -> ``[0, 2]``; modifiers must be pskN, strictly ascending, in range."""
    if not modifiers:
        return []
    positions: list[int] = []
    for modifier in modifiers.split("+"):
        match = _PSK_RE.fullmatch(modifier)
        if match is None:
            raise ConfigError(f"{name!r}: unsupported pattern modifier {modifier!r} (only pskN)")
        position = int(match[1])
        if position > message_count:
            raise ConfigError(
                f"{name!r}: modifier {modifier!r} is past the pattern's {message_count} messages"
            )
        if positions and position <= positions[-1]:
            raise ConfigError(f"{name!r}: psk modifiers must be distinct and ascending")
        positions.append(position)
    return positions
