"""The reassembler copies small parts of a chunked message together (session 38: a view per
part held ~350 bytes each, see tests/test_session_fixes38.py); any mix of small and large
parts, as bytes or bytearray, still joins to the message sent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.proto import framing

part_sizes = st.lists(st.sampled_from([1, 2, 100, 4095, 4096, 4097, 20_000]), max_size=12)


@settings(max_examples=150, deadline=None)
@given(sizes=part_sizes, final=st.integers(0, 5000), mutable=st.lists(st.booleans()))
def test_any_mix_of_part_sizes_joins_to_the_message(sizes, final, mutable):
    reassembler = framing.Reassembler(1 << 20)
    sent, seed = b"", 0
    for i, size in enumerate([*sizes, final]):
        part = bytes((seed + k) % 251 for k in range(size))
        seed += size
        sent += part
        flag = framing.FLAG_FINAL if i == len(sizes) else framing.FLAG_MORE
        if flag == framing.FLAG_MORE and size == 0:
            continue
        chunk = bytes((flag,)) + part
        as_bytearray = i < len(mutable) and mutable[i]
        got = reassembler.feed(bytearray(chunk) if as_bytearray else chunk)
        if flag == framing.FLAG_FINAL:
            assert got == sent
        else:
            assert got is None
            assert reassembler.buffered == len(sent)
    assert reassembler.buffered == 0
