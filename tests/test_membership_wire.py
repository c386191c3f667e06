"""Membership wire format: round trips, size caps, and a decoder that fails only one way."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshinfer.errors import RemoteProtocolError
from meshinfer.proto.membership_wire import (
    MAX_PACKET_BYTES,
    MAX_SIGNATURE_BYTES,
    Ack,
    AliveRecord,
    DeadRecord,
    Digest,
    DigestEntry,
    DigestReply,
    Gossip,
    LeftRecord,
    MembershipProtocolError,
    ModelInfo,
    Nack,
    NodeState,
    Packet,
    Ping,
    PingReq,
    PushPull,
    SuspectRecord,
    decode_packet,
    encode_entry,
    encode_header,
    encode_packet,
    encode_record,
    signed_body,
)

node_ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
counters = st.integers(0, 2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
vectors = st.none() | st.tuples(finite, finite) | st.tuples(finite, finite, finite)
short_texts = st.text(max_size=16)

models = st.builds(ModelInfo, st.text(max_size=64), st.text(max_size=32), st.binary(max_size=64))
states = st.builds(
    NodeState,
    host=st.text(max_size=40),
    port=st.integers(0, 65535),
    static_key=st.just(b"") | st.binary(min_size=32, max_size=32),
    roles=st.lists(short_texts, max_size=8).map(tuple),
    models=st.lists(models, max_size=3).map(tuple),
    gpu_free_mb=st.integers(0, 2**40),
    queue_depth=st.integers(0, 2**32),
    links=st.lists(st.sampled_from(["v2v", "v2i", "wan"]), max_size=3).map(tuple),
    position=vectors,
    velocity=vectors,
    revocation_version=counters,
    input_cache_mb=st.integers(0, 2**20 - 1),
    later=st.lists(
        st.one_of(st.integers(0, 2**32), st.text(max_size=8), st.none()).map(msgpack.packb),
        max_size=2,
    ).map(tuple),
)
records = st.one_of(
    st.builds(AliveRecord, node_ids, counters, counters, states, st.binary(max_size=64)),
    st.builds(SuspectRecord, node_ids, counters, node_ids),
    st.builds(DeadRecord, node_ids, counters, node_ids),
    st.builds(LeftRecord, node_ids, counters, st.binary(max_size=64)),
)
headers = st.one_of(
    st.builds(Ping, counters, node_ids),
    st.builds(Ack, counters),
    st.builds(PingReq, counters, node_ids),
    st.builds(Nack, counters),
    st.just(Gossip()),
    st.builds(PushPull, st.booleans(), st.booleans()),
    st.builds(DigestReply, st.lists(node_ids, max_size=4).map(tuple)),
)
entries = st.builds(DigestEntry, node_ids, st.integers(0, 3), counters, counters, counters)


@settings(max_examples=200)
@given(headers, st.lists(records, max_size=6))
def test_packets_round_trip(header, items) -> None:
    data = encode_packet(header, [encode_record(r) for r in items])
    assert decode_packet(data) == Packet(header, tuple(items))


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_remote_protocol_error(data: bytes) -> None:
    try:
        decode_packet(data)
    except MembershipProtocolError:
        pass


@settings(max_examples=200)
@given(st.lists(entries, max_size=6))
def test_digests_round_trip(items) -> None:
    data = encode_packet(Digest(), [encode_entry(e) for e in items])
    assert decode_packet(data) == Packet(Digest(), (), entries=tuple(items))


def _mutate(packet: bytearray, data) -> bytes:
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(0, max(0, len(packet) - 1)))
        if action == "flip" and packet:
            packet[position] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del packet[position:]
        else:
            packet[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    return bytes(packet)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.lists(records, max_size=3), st.data())
def test_mutated_packets_raise_only_remote_protocol_error(header, items, data) -> None:
    packet = bytearray(encode_packet(header, [encode_record(r) for r in items]))
    try:
        decode_packet(_mutate(packet, data))
    except MembershipProtocolError:
        pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entries, max_size=4), st.data())
def test_mutated_digests_raise_only_remote_protocol_error(items, data) -> None:
    packet = bytearray(encode_packet(Digest(), [encode_entry(e) for e in items]))
    try:
        decode_packet(_mutate(packet, data))
    except MembershipProtocolError:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | finite
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=7),
    max_leaves=20,
)


@settings(max_examples=200)
@given(st.lists(msgpack_values, min_size=1, max_size=4))
def test_wellformed_msgpack_of_wrong_shape_is_refused_cleanly(values) -> None:
    data = b"".join(msgpack.packb(v) for v in values)
    try:
        decode_packet(data)
    except MembershipProtocolError:
        pass


def test_decode_errors_are_remote_protocol_errors() -> None:
    assert issubclass(MembershipProtocolError, RemoteProtocolError)


@pytest.mark.parametrize(
    "fields",
    [
        [2, 5],  # unknown protocol version
        [1, 99],  # unknown packet kind
        [1, 1, 5],  # ping without target
        [1, 1, -1, "a"],  # negative seq
        [1, 1, 1, "bad id!"],  # node id outside the alphabet
        [1, 1, 1, "x" * 65],  # node id too long
        [1, 6, 1, 0],  # push-pull flags not booleans
        [1, 7, 0],  # digest with a field
        [1, 8],  # digest reply without its wanted ids
        [1, 8, "n1"],  # wanted ids not a list
        [1, 8, ["n1", "bad id!"]],  # a wanted id outside the alphabet
        [True, 5],  # protocol version must be an int, not a bool
    ],
)
def test_bad_headers_are_refused(fields) -> None:
    with pytest.raises(MembershipProtocolError):
        decode_packet(msgpack.packb(fields))


def _alive_fields(*appended, **overrides) -> list:
    state = ["h", 1, b"", [], [], 0, 0, [], None, None, 0, *appended]
    for index, value in overrides.items():
        state[int(index[1:])] = value
    return [0, "n1", 0, 1, state, b""]


@pytest.mark.parametrize(
    "record",
    [
        _alive_fields(f1=70000),  # port out of range
        _alive_fields(f2=b"short"),  # static key not 32 bytes
        _alive_fields(f3=["r"] * 9),  # too many roles
        _alive_fields(f8=[1.0]),  # position needs 2 or 3 coordinates
        _alive_fields(f8=[float("nan"), 1.0]),  # not finite
        _alive_fields(f8=[1, 2]),  # integers, not floats
        _alive_fields(f4=[["m", "v"]]),  # model without digest
        _alive_fields(-1),  # input_cache_mb < 0
        _alive_fields(0),  # input_cache_mb 0 written explicitly (a trailing default)
        _alive_fields(2**20),  # input_cache_mb over its cap
        _alive_fields(1, *[2] * 9),  # 9 later fields, over the 8 kept
        [0, "n1", 0, 1, "state", b""],  # state not a list
        [1, "n1", 0],  # suspect without accuser
        [9, "n1", 0, "n2"],  # unknown record kind
        [3, "n1", 0, b"s" * (MAX_SIGNATURE_BYTES + 1)],  # signature over its cap
    ],
)
def test_bad_records_are_refused(record) -> None:
    with pytest.raises(MembershipProtocolError):
        decode_packet(encode_header(Gossip()) + msgpack.packb(record))


@pytest.mark.parametrize(
    "entry",
    [
        ["n1", 4, 0, 0, 1],  # status is not a record kind
        ["n1", True, 0, 0, 1],  # status a bool
        ["n1", 0, 0, 1],  # four fields
        ["n1", 0, 0, 0, 1, 0],  # six fields
        ["bad id!", 0, 0, 0, 1],  # node id outside the alphabet
        ["n1", 0, -1, 0, 1],  # negative incarnation
        ["n1", 0, 0, 0, 2**63],  # version over the counter cap
        [0, "n1", 0, 1, ["h", 1, b"", [], [], 0, 0, [], None, None, 0], b""],  # a record
    ],
)
def test_bad_digest_entries_are_refused(entry) -> None:
    with pytest.raises(MembershipProtocolError):
        decode_packet(encode_header(Digest()) + msgpack.packb(entry))


def test_a_digest_is_read_up_to_max_records_and_may_exceed_one_noise_message() -> None:
    entry = encode_entry(DigestEntry("n" * 64, 0, 2**40, 2**40, 2**40))
    many = [entry] * (MAX_PACKET_BYTES // len(entry) + 1)
    assert len(decode_packet(encode_packet(Digest(), many)).entries) == len(many)
    packet = decode_packet(encode_packet(Digest(), many), max_records=3)
    assert len(packet.entries) == 3 and packet.truncated
    reply = encode_packet(
        DigestReply(("n1",)), [encode_record(SuspectRecord("n1", 0, "n2"))] * 8000
    )
    assert len(reply) > MAX_PACKET_BYTES and len(decode_packet(reply).records) == 8000


def test_map_and_trailing_garbage_are_refused() -> None:
    with pytest.raises(MembershipProtocolError):
        decode_packet(msgpack.packb({"kind": 1}))
    good = encode_packet(Ack(1))
    with pytest.raises(MembershipProtocolError):
        decode_packet(good + b"\x92")  # a truncated record after the header


def test_packets_over_one_noise_message_are_refused_unless_push_pull() -> None:
    record = encode_record(SuspectRecord("n1", 0, "n2"))
    many = [record] * (MAX_PACKET_BYTES // len(record) + 1)
    with pytest.raises(MembershipProtocolError):
        decode_packet(encode_packet(Gossip(), many))
    assert len(decode_packet(encode_packet(PushPull(), many)).records) == len(many)


def test_decoding_is_memoised_but_never_shares_wrong_records() -> None:
    a = encode_record(SuspectRecord("n1", 3, "n2"))
    b = encode_record(SuspectRecord("n1", 4, "n2"))
    first = decode_packet(encode_packet(Gossip(), [a, b, a]))
    assert [r.incarnation for r in first.records] == [3, 4, 3]
    assert decode_packet(encode_packet(Gossip(), [b])).records[0].incarnation == 4


def test_signed_body_separates_kinds_and_covers_state() -> None:
    alive = AliveRecord("n1", 2, 3, NodeState(host="a"))
    moved = AliveRecord("n1", 2, 3, NodeState(host="b"))
    left = LeftRecord("n1", 2)
    assert len({signed_body(alive), signed_body(moved), signed_body(left)}) == 3
    # the signature itself is not part of what is signed
    assert signed_body(alive) == signed_body(AliveRecord("n1", 2, 3, NodeState(host="a"), b"x"))


def test_appended_state_fields_are_written_only_when_set() -> None:
    """A state using no appended field encodes (and so is signed) as the 11 original fields,
    which is what a node before ``input_cache_mb`` sends; one that sets it carries a 12th."""
    plain = AliveRecord("n1", 2, 3, NodeState(host="a"))
    assert len(msgpack.unpackb(encode_record(plain))[4]) == 11
    decoded = decode_packet(encode_packet(Gossip(), [encode_record(plain)])).records[0]
    assert decoded == plain and signed_body(decoded) == signed_body(plain)
    cached = AliveRecord("n1", 2, 3, NodeState(host="a", input_cache_mb=256))
    assert msgpack.unpackb(encode_record(cached))[4][11] == 256
    assert decode_packet(encode_packet(Gossip(), [encode_record(cached)])).records[0] == cached
    assert signed_body(cached) != signed_body(plain)


def test_fields_a_newer_node_appended_are_passed_on_as_signed() -> None:
    """A state with fields this node does not know decodes, re-encodes to the same bytes (so
    the author's signature still verifies) and relays them unchanged."""
    newer = _alive_fields(0, "x", [1, 2])
    record = decode_packet(encode_header(Gossip()) + msgpack.packb(newer)).records[0]
    assert record.state.input_cache_mb == 0
    assert record.state.later == (msgpack.packb("x"), msgpack.packb([1, 2]))
    assert encode_record(record) == msgpack.packb(newer)
    assert signed_body(record)[len(b"meshinfer-member-v1\x00") :] == msgpack.packb(
        [0, "n1", 0, 1, newer[4]]
    )
