"""Micro-benchmark: Noise CipherState.encrypt/decrypt against a bare pynacl loop, and handshakes.

Run: ``python bench/bench_noise.py [--seconds 1.0]``. Prints operations per second and the ratio
of our CipherState to the bare libsodium call it wraps (baseline measured in the same run), for
frames of several sizes, plus XX and IK handshakes per second.
"""

from __future__ import annotations

import argparse
import struct
import time

import nacl.bindings

from meshinfer.proto.noise import CipherState, HandshakeState, generate_keypair

_encrypt = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt
_decrypt = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt
_nonce = struct.Struct("<4xQ").pack
KEY = bytes(range(32))


def rate(operation, seconds: float) -> float:
    """Calls per second of ``operation(count)``, which performs ``count`` operations."""
    count, elapsed = 1000, 0.0
    while elapsed < seconds:
        start = time.perf_counter()
        operation(count)
        elapsed = time.perf_counter() - start
        if elapsed < seconds:
            count *= 2
    return count / elapsed


def bare_roundtrip(frame: bytes):
    def run(count: int) -> None:
        for n in range(count):
            nonce = _nonce(n)
            _decrypt(_encrypt(frame, b"", nonce, KEY), b"", nonce, KEY)

    return run


def cipher_roundtrip(frame: bytes):
    def run(count: int) -> None:
        sender, receiver = CipherState(KEY), CipherState(KEY)
        for _ in range(count):
            receiver.decrypt(sender.encrypt(frame))

    return run


def handshakes(name: str):
    responder_static = generate_keypair()

    def run(count: int) -> None:
        for _ in range(count // 100 or 1):
            initiator = HandshakeState(
                name,
                True,
                s=generate_keypair()[0],
                rs=responder_static[1] if "_IK_" in name else None,
            )
            responder = HandshakeState(name, False, s=responder_static[0])
            writer, reader = initiator, responder
            while not initiator.is_complete:
                reader.read_message(writer.write_message(b""))
                writer, reader = reader, writer

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    seconds = parser.parse_args().seconds
    if not seconds > 0:
        parser.error("--seconds must be > 0")
    print("frame bytes   bare pynacl rt/s   CipherState rt/s   ratio")
    for size in (64, 1024, 16384, 65519):
        frame = bytes(size)
        bare = rate(bare_roundtrip(frame), seconds)
        ours = rate(cipher_roundtrip(frame), seconds)
        print(f"{size:>11}   {bare:>16,.0f}   {ours:>16,.0f}   {ours / bare:.3f}")
    for name in ("Noise_XX_25519_ChaChaPoly_BLAKE2b", "Noise_IK_25519_ChaChaPoly_BLAKE2b"):
        per_second = rate(handshakes(name), seconds) / 100
        print(f"{name}: {per_second:,.0f} handshakes/s (both sides, one process)")


if __name__ == "__main__":
    main()
