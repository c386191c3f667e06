"""The member store keeps its own invariants; one record layout and one exact kind check.

* ``MemberTable`` changes the store's members only through the store's operations, which keep
  the encoded ALIVE records in step with the members, the live count and the random-pick list
  (checked after every step of random claim sequences, this node's record included).
* A stale claim is corrected with the member's cached encoded record (one encoder path): the
  correction fills the cache rather than encoding beside it.
* The encoder (``signed_body``, ``encode_record``) and the decoder go by the layout constants
  ``claimed_static_key`` reads.
* ``claimed_static_key`` takes a body as ALIVE (or LEFT) only when its kind is exactly that
  int: a msgpack ``False`` or ``0.0`` (``3.0``) used to pass ``==``. Only bodies this node
  encodes reach it (the table verifies ``signed_body`` of the decoded record), so it is tested
  directly.

The real table, wire records and msgpack; no mocks.
"""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshinfer.proto.membership_auth import claimed_static_key
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_member import LIVE
from meshinfer.proto.membership_table import MemberTable
from meshinfer.proto.membership_wire import (
    ALIVE_BODY_FIELDS,
    ALIVE_BODY_STATE,
    LEFT_BODY_FIELDS,
    SIGNED_BODY_DOMAIN,
    STATE_STATIC_KEY,
    AliveRecord,
    DeadRecord,
    Gossip,
    LeftRecord,
    MembershipProtocolError,
    NodeState,
    RecordKind,
    SuspectRecord,
    decode_packet,
    encode_packet,
    encode_record,
    record_kind,
    signed_body,
)

KEY = bytes(range(32))


def _table(*node_ids: str) -> MemberTable:
    local = AliveRecord("me", 0, 1, NodeState(host="me", port=1))
    table = MemberTable(local, MembershipConfig.test(), random.Random(3), 0.0)
    table.add_known([AliveRecord(n, 0, 1, NodeState(host=n, port=2)) for n in node_ids], 0.0)
    return table


def _check_store(table: MemberTable) -> None:
    """The store's invariants (what the table must never put out of step)."""
    members = {m.node_id: m for m in table.members()}
    assert set(table._encoded) == set(members) and sorted(table._ids) == sorted(members)
    for node_id, data in table._encoded.items():
        assert data in (b"", encode_record(members[node_id].record))
    assert table.live_count() == 1 + sum(m.status in LIVE for m in members.values())
    assert table.local_bytes == encode_record(table.local.record)


# --- the store's operations keep its invariants ---------------------------------------------

_NODES = ("a", "b", "c")
_claims = st.lists(
    st.tuples(
        st.sampled_from(("alive", "suspect", "dead", "left", "reap", "update")),
        st.sampled_from((*_NODES, "me")),
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    max_size=30,
)


@settings(max_examples=120, deadline=None)
@given(_claims)
def test_the_store_stays_in_step_with_its_members_whatever_the_table_applies(claims) -> None:
    table, now = _table("a"), 0.0
    for kind, node, incarnation, version in claims:
        now += 1.0
        if kind == "alive":
            table.apply(AliveRecord(node, incarnation, version, NodeState(port=version)), now)
        elif kind == "suspect":
            table.apply(SuspectRecord(node, incarnation, "a"), now)
        elif kind == "dead":
            table.apply(DeadRecord(node, incarnation, "a"), now, push_pull=version % 2 == 0)
        elif kind == "left" and node != "me":
            table.apply(LeftRecord(node, incarnation), now)
        elif kind == "reap":
            table.reap(now + table.config.dead_node_reclaim_time * (version % 2))
        elif kind == "update" and not table.has_left:
            table.update_local_state(NodeState(port=version + 3), now)
        table.records_for(_NODES)  # fills the lazily encoded records
        table.corrections.clear()
        _check_store(table)
    table.leave(now)
    _check_store(table)


def test_a_stale_claim_is_corrected_from_the_encoded_record_cache() -> None:
    table = _table()
    newer = AliveRecord("b", 2, 1, NodeState(host="b", port=2))
    table.add_known([newer], 0.0)  # a warm-start member: its record is encoded on first use
    assert table._encoded["b"] == b""
    table.apply(SuspectRecord("b", 1, "c"), 2.0)  # c missed the refutation at 2
    (correction,) = table.corrections
    assert correction == encode_record(newer)
    assert table._encoded["b"] is correction  # the one encoder path: the cache


def test_a_refreshed_record_reaches_the_queue_and_the_push_pull_alike() -> None:
    table = _table("b")
    newer = AliveRecord("b", 0, 5, NodeState(host="b", port=9))
    table.apply(newer, 1.0)
    assert table.records_for(["b"]) == [encode_record(newer)]
    table.apply(SuspectRecord("b", 0, "me"), 2.0)
    assert table.live_count() == 2 and table.records_for(["b"])[0] == encode_record(newer)
    table.apply(DeadRecord("b", 0, "me"), 3.0)
    assert table.live_count() == 1


# --- one layout: encoder, decoder and claimed_static_key ---------------------------------------


def test_the_encoder_and_decoder_go_by_the_layout_constants() -> None:
    alive = AliveRecord("n", 3, 4, NodeState(host="h", port=5, static_key=KEY), b"sig")
    fields = msgpack.unpackb(encode_record(alive))
    assert len(fields) == ALIVE_BODY_FIELDS + 1 and fields[ALIVE_BODY_FIELDS] == b"sig"
    assert fields[ALIVE_BODY_STATE][STATE_STATIC_KEY] == KEY
    body = SIGNED_BODY_DOMAIN + msgpack.packb(fields[:ALIVE_BODY_FIELDS])
    assert signed_body(alive) == body and claimed_static_key(body) == KEY
    left = LeftRecord("n", 3, b"sig")
    fields = msgpack.unpackb(encode_record(left))
    assert len(fields) == LEFT_BODY_FIELDS + 1 and fields[LEFT_BODY_FIELDS] == b"sig"
    assert signed_body(left) == SIGNED_BODY_DOMAIN + msgpack.packb(fields[:LEFT_BODY_FIELDS])
    packet = decode_packet(encode_packet(Gossip(), [encode_record(alive), encode_record(left)]))
    assert packet.records == (alive, left)


def _body(kind: object, *fields: object) -> bytes:
    return SIGNED_BODY_DOMAIN + msgpack.packb([kind, *fields])


_STATE = ["h", 5, KEY, [], [], 0, 0, [], None, None, 0]


@pytest.mark.parametrize("kind", [False, 0.0])
def test_a_body_whose_kind_only_compares_equal_to_alive_is_no_alive_body(kind) -> None:
    assert claimed_static_key(_body(RecordKind.ALIVE, "n", 1, 1, _STATE)) == KEY
    assert claimed_static_key(_body(kind, "n", 1, 1, _STATE)) is None


@pytest.mark.parametrize("kind", [3.0, True])
def test_a_body_whose_kind_is_not_exactly_left_is_no_left_body(kind) -> None:
    assert claimed_static_key(_body(RecordKind.LEFT, "n", 1)) == b""
    assert claimed_static_key(_body(kind, "n", 1)) is None


@pytest.mark.parametrize("kind", [False, True, 0.0, 1.0, 3.0, "0", None, -1, 4])
def test_record_kind_is_exact_and_the_decoder_refuses_the_near_misses(kind) -> None:
    assert record_kind(kind) is None
    for length in (4, 6):
        record = [kind, "n", 1, *([b""] * (length - 3))]
        with pytest.raises(MembershipProtocolError):
            decode_packet(encode_packet(Gossip()) + msgpack.packb(record))
    assert [record_kind(int(k)) for k in RecordKind] == list(RecordKind)
