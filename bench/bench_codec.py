"""Codec overhead: meshinfer encode/decode (+ framing) against bare msgpack on the same list.

Run: ``python bench/bench_codec.py [--seconds 0.5]``. For each case it prints operations per second
of the baseline (``msgpack.packb`` + ``msgpack.unpackb`` of the very list the registry puts on the
wire) and of meshinfer (``encode`` + ``decode``: type-id peek, size cap, limits, field validators,
dataclass construction), and the ratio meshinfer / baseline (1.0 = no overhead).
The ``+framing`` rows add ``split_message`` + ``Reassembler.feed`` to the meshinfer side.

The second table runs the whole per-message pipeline without sockets or asyncio: meshinfer
(encode, split, ChaCha20-Poly1305 encrypt, length-prefix, RecordDecoder, decrypt, Reassembler,
decode) against a bare ``packb`` + encrypt + decrypt + ``unpackb`` loop (pynacl's IETF AEAD, the
cipher Noise uses). The session benchmark adds asyncio and the transport on top of this.

Rates are measured in CPU time of this process (``time.process_time``), best of five, so other
load on the machine disturbs them little.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import msgpack
import numpy as np
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt as aead_decrypt,
)
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_encrypt as aead_encrypt,
)

from meshinfer.proto.framing import Reassembler, RecordDecoder, encode_record, split_message
from meshinfer.proto.messages import AppData, Hello, Ping, decode, encode
from meshinfer.proto.tasks_wire import TaskAssign, Tensor


def _rate(fn: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``fn``, best of five runs of about ``seconds`` each."""
    count = 1
    while True:
        start = time.process_time()
        for _ in range(count):
            fn()
        elapsed = time.process_time() - start
        if elapsed >= seconds / 10:
            break
        count *= 2
    per_run = max(1, int(count * seconds / elapsed))
    best = 0.0
    for _ in range(5):
        start = time.process_time()
        for _ in range(per_run):
            fn()
        best = max(best, per_run / (time.process_time() - start))
    return best


def _cases() -> dict[str, object]:
    return {
        "Ping": Ping(123456789),
        "Hello (cert 280 B)": Hello(
            1, "veh-0042", b"\x01" * 280, ("vehicle",), ("chunks",), 1 << 24
        ),
        "AppData 1 KiB": AppData("bench", b"x" * 1024),
        "AppData 64 KiB": AppData("bench", b"x" * 65536),
        "AppData 1 MiB": AppData("bench", b"x" * (1 << 20)),
        "TaskAssign (1x64 float32)": TaskAssign(
            "0123456789abcdef/0",
            "0123456789abcdef",
            "digits-mlp",
            "1",
            Tensor.from_array(np.zeros((1, 64), np.float32)),
            b"\x80",
            5.0,
            0,
            1,
        ),
    }


def _baseline(msg: object) -> Callable[[], object]:
    wire_list = msgpack.unpackb(encode(msg))

    def run() -> object:
        return msgpack.unpackb(msgpack.packb(wire_list))

    return run


def _codec(msg: object) -> Callable[[], object]:
    def run() -> object:
        return decode(encode(msg))

    return run


def _codec_framed(msg: object) -> Callable[[], object]:
    reassembler = Reassembler()

    def run() -> object:
        whole = None
        for chunk in split_message(encode(msg)):
            whole = reassembler.feed(chunk)
        return decode(whole)

    return run


_KEY = bytes(range(32))
_NONCE = bytes(12)


def _bare_pipeline(msg: object) -> Callable[[], object]:
    wire_list = msgpack.unpackb(encode(msg))

    def run() -> object:
        ciphertext = aead_encrypt(msgpack.packb(wire_list), None, _NONCE, _KEY)
        return msgpack.unpackb(aead_decrypt(ciphertext, None, _NONCE, _KEY))

    return run


def _meshinfer_pipeline(msg: object) -> Callable[[], object]:
    decoder, reassembler = RecordDecoder(), Reassembler()

    def run() -> object:
        chunks = split_message(encode(msg))
        stream = b"".join(encode_record(aead_encrypt(c, None, _NONCE, _KEY)) for c in chunks)
        for record in decoder.feed(stream):
            whole = reassembler.feed(aead_decrypt(record, None, _NONCE, _KEY))
        return decode(whole)

    return run


def _table(title: str, pairs: list[tuple[str, Callable, Callable]], seconds: float) -> None:
    print(f"\n{title:<28}{'baseline ops/s':>15}{'meshinfer ops/s':>17}{'ratio':>8}")
    for name, baseline, ours in pairs:
        base, mine = _rate(baseline, seconds), _rate(ours, seconds)
        print(f"{name:<28}{base:>15,.0f}{mine:>17,.0f}{mine / base:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    seconds = parser.parse_args().seconds
    if not seconds > 0:
        parser.error("--seconds must be > 0")
    codec_rows = []
    for name, msg in _cases().items():
        assert _codec(msg)() == msg and _codec_framed(msg)() == msg
        assert _meshinfer_pipeline(msg)() == msg
        codec_rows.append((name, _baseline(msg), _codec(msg)))
        codec_rows.append((name + " +framing", _baseline(msg), _codec_framed(msg)))
    _table("codec vs msgpack", codec_rows, seconds)
    pipeline_rows = [
        (name, _bare_pipeline(msg), _meshinfer_pipeline(msg)) for name, msg in _cases().items()
    ]
    _table("pipeline vs msgpack+pynacl", pipeline_rows, seconds)


if __name__ == "__main__":
    main()
