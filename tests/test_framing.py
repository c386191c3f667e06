"""Stream framing: records, chunking, reassembly, and fuzzing of both decoders."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from meshinfer.proto import messages
from meshinfer.proto.framing import (
    FLAG_FINAL,
    FLAG_MORE,
    FLAG_PACKED,
    MAX_CHUNK,
    MAX_RECORD,
    TAG_SIZE,
    Reassembler,
    RecordDecoder,
    encode_record,
    frame_messages,
    split_message,
)


def _split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions (taken modulo its length, in order)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _feed_all(decoder: RecordDecoder, pieces: list[bytes]) -> list[bytes]:
    records = []
    for piece in pieces:
        records.extend(decoder.feed(piece))
    return records


# --- records -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 255, 256, MAX_RECORD])
def test_encode_record_prefixes_big_endian_length(size):
    body = bytes(i % 251 for i in range(size))
    record = encode_record(body)
    assert record[:2] == bytes((size >> 8, size & 0xFF))
    assert record[2:] == body


@pytest.mark.parametrize("size", [0, MAX_RECORD + 1])
def test_encode_record_refuses_empty_and_oversized(size):
    with pytest.raises(LocalProtocolError):
        encode_record(b"x" * size)


_bodies = st.lists(st.binary(min_size=1, max_size=300), max_size=8)


@settings(max_examples=300, deadline=None)
@given(bodies=_bodies, cuts=st.lists(st.integers(0, 1 << 16), max_size=12))
def test_records_split_anywhere_come_out_the_same(bodies, cuts):
    stream = b"".join(encode_record(b) for b in bodies)
    decoder = RecordDecoder()
    assert _feed_all(decoder, _split_at(stream, cuts)) == bodies
    assert decoder.buffered == 0


@settings(max_examples=200, deadline=None)
@given(bodies=_bodies.filter(bool), keep=st.integers(1, 1 << 16))
def test_buffered_counts_the_partial_record(bodies, keep):
    stream = b"".join(encode_record(b) for b in bodies)
    cut = keep % len(stream)
    decoder = RecordDecoder()
    complete = decoder.feed(stream[:cut])
    consumed = sum(2 + len(b) for b in complete)
    assert decoder.buffered == cut - consumed
    assert complete + decoder.feed(stream[cut:]) == bodies


def test_largest_record_byte_at_a_time_and_in_one_piece():
    body = bytes(range(256)) * 255 + b"x" * 255  # 65535 bytes
    stream = encode_record(body) * 2
    one_by_one = _feed_all(RecordDecoder(), [stream[i : i + 1] for i in range(len(stream))])
    assert one_by_one == [body, body]
    assert RecordDecoder().feed(stream) == [body, body]


def test_many_records_in_one_feed():
    bodies = [bytes([i % 256]) * (1 + i % 700) for i in range(3000)]
    assert RecordDecoder().feed(b"".join(map(encode_record, bodies))) == bodies


def test_records_do_not_alias_a_mutable_input():
    data = bytearray(encode_record(b"abc") + encode_record(b"defg")[:3])
    decoder = RecordDecoder()
    records = decoder.feed(data)
    data[:] = b"\xff" * len(data)
    assert records == [b"abc"]
    assert decoder.feed(b"efg") == [b"defg"]


def test_zero_length_record_is_refused_and_the_decoder_stays_failed():
    decoder = RecordDecoder()
    with pytest.raises(RemoteProtocolError, match="zero-length"):
        decoder.feed(encode_record(b"ok") + b"\x00\x00")
    with pytest.raises(RemoteProtocolError):
        decoder.feed(encode_record(b"ok"))


def test_zero_length_record_after_a_partial_header_is_refused():
    decoder = RecordDecoder()
    assert decoder.feed(b"\x00") == []
    with pytest.raises(RemoteProtocolError, match="zero-length"):
        decoder.feed(b"\x00")


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=512), cuts=st.lists(st.integers(0, 1024), max_size=8))
def test_fuzz_record_decoder_only_raises_remote_errors(data, cuts):
    decoder = RecordDecoder()
    try:
        records = _feed_all(decoder, _split_at(data, cuts))
    except RemoteProtocolError:
        return
    assert all(type(r) is bytes and 0 < len(r) <= MAX_RECORD for r in records)
    assert sum(2 + len(r) for r in records) + decoder.buffered == len(data)


# --- chunks ------------------------------------------------------------------------------------


def test_max_chunk_fills_one_noise_message_exactly():
    assert MAX_CHUNK + 1 + TAG_SIZE == MAX_RECORD
    chunks = split_message(b"z" * (MAX_CHUNK + 1))
    assert [len(c) for c in chunks] == [MAX_CHUNK + 1, 2]


@settings(max_examples=300, deadline=None)
@given(plaintext=st.binary(max_size=600), max_chunk=st.integers(1, 64))
def test_split_message_shape(plaintext, max_chunk):
    chunks = split_message(plaintext, max_chunk)
    assert len(chunks) == max(1, -(-len(plaintext) // max_chunk))
    assert [c[0] for c in chunks] == [FLAG_MORE] * (len(chunks) - 1) + [FLAG_FINAL]
    assert all(2 <= len(c) <= max_chunk + 1 for c in chunks[:-1])
    assert b"".join(c[1:] for c in chunks) == plaintext


def test_empty_message_is_one_empty_final_chunk():
    assert split_message(b"") == [bytes((FLAG_FINAL,))]
    assert Reassembler().feed(split_message(b"")[0]) == b""


@pytest.mark.parametrize("max_chunk", [0, MAX_CHUNK + 1, 1.5])
@pytest.mark.parametrize("pack", [None, False, True])
def test_framing_refuses_bad_chunk_sizes(max_chunk, pack):
    with pytest.raises(LocalProtocolError):
        if pack is None:
            split_message(b"abc", max_chunk)
        else:
            frame_messages([b"abc", b"de"], pack=pack, max_chunk=max_chunk)


@settings(max_examples=300, deadline=None)
@given(messages_=st.lists(st.binary(max_size=300), max_size=5), max_chunk=st.integers(1, 40))
def test_reassembler_joins_a_sequence_of_messages(messages_, max_chunk):
    reassembler = Reassembler(max_message_size=300)
    out = []
    for plaintext in messages_:
        results = [reassembler.feed(c) for c in split_message(plaintext, max_chunk)]
        assert results[:-1] == [None] * (len(results) - 1)
        out.append(results[-1])
    assert out == messages_
    assert reassembler.buffered == 0


def test_single_chunk_message_is_returned_as_bytes():
    assert Reassembler().feed(bytearray(b"\x00abc")) == b"abc"
    assert type(Reassembler().feed(bytearray(b"\x00abc"))) is bytes


def test_multi_chunk_parts_do_not_alias_a_mutable_input():
    reassembler = Reassembler()
    first = bytearray(b"\x01abc")
    assert reassembler.feed(first) is None
    first[:] = b"\x01xyz"
    assert reassembler.feed(b"\x00def") == b"abcdef"


def test_message_at_the_cap_is_accepted():
    plaintext = b"m" * 100
    reassembler = Reassembler(max_message_size=100)
    assert [reassembler.feed(c) for c in split_message(plaintext, 30)][-1] == plaintext


def test_over_cap_is_refused_before_the_final_chunk_and_stays_refused():
    reassembler = Reassembler(max_message_size=100)
    chunks = split_message(b"m" * 200, 30)
    assert [reassembler.feed(c) for c in chunks[:3]] == [None] * 3
    with pytest.raises(FrameTooLarge, match="cap of 100"):
        reassembler.feed(chunks[3])  # 120 bytes so far: over the cap, though more follows
    assert reassembler.buffered == 0
    with pytest.raises(RemoteProtocolError):
        reassembler.feed(split_message(b"small")[0])


def test_over_cap_single_chunk_is_refused():
    with pytest.raises(FrameTooLarge):
        Reassembler(max_message_size=4).feed(b"\x00hello")


@pytest.mark.parametrize(
    ("chunk", "match"), [(b"", "empty chunk"), (b"\x01", "empty non-final"), (b"\x02x", "flag 2")]
)
def test_malformed_chunks_are_refused(chunk, match):
    reassembler = Reassembler()
    assert reassembler.feed(b"\x01start") is None
    with pytest.raises(RemoteProtocolError, match=match):
        reassembler.feed(chunk)
    with pytest.raises(RemoteProtocolError):
        reassembler.feed(b"\x00end")


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(st.binary(max_size=20), max_size=10), cap=st.integers(0, 64))
def test_fuzz_reassembler_only_raises_remote_errors(chunks, cap):
    reassembler = Reassembler(max_message_size=cap)
    try:
        results = [reassembler.feed(c) for c in chunks]
    except RemoteProtocolError:
        return
    done = [r for r in results if r is not None]
    assert all(type(r) is bytes and len(r) <= cap for r in done)
    assert reassembler.buffered <= cap


# --- packed chunks -----------------------------------------------------------------------------


def _unframe(chunks: list[bytes], cap: int = 1 << 20) -> list[bytes]:
    reassembler = Reassembler(max_message_size=cap)
    out = [whole for chunk in chunks for whole in reassembler.feed_all(chunk)]
    assert reassembler.buffered == 0
    return out


@settings(max_examples=300, deadline=None)
@given(
    plaintexts=st.lists(
        st.one_of(st.binary(max_size=12), st.binary(min_size=30, max_size=90)), max_size=12
    ),
    max_chunk=st.integers(1, 64),
)
def test_packed_framing_gives_the_messages_back_in_order(plaintexts, max_chunk):
    chunks = frame_messages(plaintexts, pack=True, max_chunk=max_chunk)
    assert _unframe(chunks) == plaintexts
    assert all(len(c) <= max_chunk + 1 for c in chunks)
    unpacked = frame_messages(plaintexts, pack=False, max_chunk=max_chunk)
    assert len(chunks) <= len(unpacked)
    for chunk in chunks:  # a packed chunk holds two or more messages, none of them empty
        if chunk[0] == FLAG_PACKED:
            assert len(Reassembler().feed_all(chunk)) >= 2


def test_without_packing_each_message_is_split_alone():
    plaintexts = [b"a" * 10, b"", b"b" * 100]
    assert frame_messages(plaintexts, pack=False, max_chunk=40) == [
        c for p in plaintexts for c in split_message(p, 40)
    ]


def test_small_messages_share_one_chunk_and_a_lone_one_is_a_plain_final_chunk():
    burst = [bytes([i]) * 100 for i in range(50)]
    (chunk,) = frame_messages(burst, pack=True)
    assert chunk[0] == FLAG_PACKED and len(chunk) == 1 + 50 * 102
    assert Reassembler().feed_all(chunk) == burst
    assert frame_messages([b"one"], pack=True) == split_message(b"one")


def test_a_pack_fills_its_chunk_exactly_and_no_further():
    # two messages of 10 bytes need 1 + 2 * (2 + 10) = 25 bytes: max_chunk 24 holds both
    (chunk,) = frame_messages([b"a" * 10, b"b" * 10], pack=True, max_chunk=24)
    assert len(chunk) == 25 and chunk[0] == FLAG_PACKED
    one_short = frame_messages([b"a" * 10, b"b" * 10], pack=True, max_chunk=23)
    assert one_short == [b"\x00" + b"a" * 10, b"\x00" + b"b" * 10]


def test_a_large_message_between_small_ones_keeps_its_place():
    big = b"L" * (MAX_CHUNK + 10)
    plaintexts = [b"s1", b"s2", big, b"s3", b"", b"s4", b"s5"]
    chunks = frame_messages(plaintexts, pack=True)
    assert [c[0] for c in chunks] == [FLAG_PACKED, FLAG_MORE, FLAG_FINAL, FLAG_FINAL, FLAG_FINAL,
                                      FLAG_PACKED]  # fmt: skip
    assert _unframe(chunks) == plaintexts


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        (b"\x02", "no message"),
        (b"\x02\x00", "inside a length"),
        (b"\x02\x00\x01a\x00", "inside a length"),
        (b"\x02\x00\x00", "empty message"),
        (b"\x02\x00\x01a\x00\x00", "empty message"),
        (b"\x02\x00\x05abc", "runs past"),
    ],
)
def test_malformed_packed_chunks_are_refused_and_the_reassembler_stays_failed(chunk, match):
    reassembler = Reassembler()
    with pytest.raises(RemoteProtocolError, match=match):
        reassembler.feed_all(chunk)
    with pytest.raises(RemoteProtocolError):
        reassembler.feed_all(b"\x00fine")


def test_a_packed_chunk_inside_a_chunked_message_is_refused():
    reassembler = Reassembler()
    assert reassembler.feed_all(b"\x01start") == []
    with pytest.raises(RemoteProtocolError, match="inside a chunked message"):
        reassembler.feed_all(frame_messages([b"x", b"y"], pack=True)[0])
    assert reassembler.buffered == 0


def test_a_packed_message_over_the_cap_is_refused():
    (chunk,) = frame_messages([b"ok", b"m" * 11], pack=True)
    with pytest.raises(FrameTooLarge, match="cap of 10"):
        Reassembler(max_message_size=10).feed_all(chunk)
    assert Reassembler(max_message_size=11).feed_all(chunk) == [b"ok", b"m" * 11]


@settings(max_examples=400, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(st.binary(max_size=20), st.binary(max_size=20).map(lambda b: b"\x02" + b)),
        max_size=10,
    ),
    cap=st.integers(0, 64),
)
def test_fuzz_feed_all_only_raises_remote_errors(chunks, cap):
    reassembler = Reassembler(max_message_size=cap)
    try:
        done = [whole for c in chunks for whole in reassembler.feed_all(c)]
    except RemoteProtocolError:
        return
    assert all(type(r) is bytes and len(r) <= cap for r in done)
    assert reassembler.buffered <= cap


# --- the whole stack, with a stand-in for the Noise cipher --------------------------------------

_FAKE_TAG = b"T" * TAG_SIZE


def _send(msg: object, max_chunk: int) -> bytes:
    return _send_many([msg], max_chunk, pack=False)


def _send_many(msgs: list[object], max_chunk: int, *, pack: bool) -> bytes:
    chunks = frame_messages([messages.encode(m) for m in msgs], pack=pack, max_chunk=max_chunk)
    return b"".join(encode_record(c + _FAKE_TAG) for c in chunks)


def _receive(pieces: list[bytes]) -> list[object]:
    decoder, reassembler, received = RecordDecoder(), Reassembler(), []
    for record in _feed_all(decoder, pieces):
        assert record.endswith(_FAKE_TAG)
        received += [messages.decode(w) for w in reassembler.feed_all(record[:-TAG_SIZE])]
    return received


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=2000), min_size=1, max_size=12),
    max_chunk=st.sampled_from([7, 100, 1000, MAX_CHUNK]),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=10),
    pack=st.booleans(),
)
def test_messages_survive_framing_and_arbitrary_stream_splits(payloads, max_chunk, cuts, pack):
    sent = [messages.AppData("topic", p) for p in payloads]
    stream = _send_many(sent, max_chunk, pack=pack)
    assert _receive(_split_at(stream, cuts)) == sent


def test_a_large_message_crosses_many_records():
    sent = messages.AppData("bulk", bytes(range(256)) * 1024)  # 256 KiB
    stream = _send(sent, MAX_CHUNK)
    assert _receive(_split_at(stream, list(range(0, len(stream), 40_000)))) == [sent]
