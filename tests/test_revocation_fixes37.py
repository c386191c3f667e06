"""Revocations at run time, session 37: a node that cuts a peer off (or refuses its handshake)
because the peer's certificate is revoked tells it why with the authority-signed entry, so the
revoked node learns of its own revocation although nobody talks to it any more; forged, foreign
or garbage notices are refused (MeshNodes on loopback TCP, real Noise sessions)."""

from __future__ import annotations

import logging

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.errors import RemoteProtocolError, RevocationError, StreamClosed
from meshinfer.identity_files import load_revocations, replace_file
from meshinfer.proto import messages
from meshinfer.proto.identity import MAX_REVOCATION_ENTRY_BYTES, RevocationEntry, RevocationList
from meshinfer.proto.revocation_sync import RevocationExchange
from meshinfer.proto.revocation_wire import NOTICE_FEATURE, RevocationNotice
from meshinfer.runtime.endpoint import dial
from meshinfer.runtime.mesh_metrics import mesh_families
from meshinfer.runtime.metrics import render_family
from meshinfer.runtime.session import Admission, Session
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from meshinfer.transport.tcp import TcpTransport
from tests.helpers import until
from tests.test_revocation_sync import Fleet

_FLEET = make_fleet(None, ["car-x"])
_FLEET.revoke("car-x", "stolen")
(_ENTRY,) = _FLEET.revocations.entries
_RAW = _ENTRY.to_bytes()


async def _dial_as(f: Fleet, name: str, to: str, *, ik: bool) -> Session:
    """A session with node ``to`` under ``name``'s identity, with an empty list of its own."""
    identity, node = f.fleet.identities[name], f.nodes[to]
    return await dial(
        TcpTransport(),
        Address("127.0.0.1", node.address.port),
        Admission(identity, RevocationList(f.fleet.authority.fleet_id)),
        expected_static=node.identity.static_public if ik else None,
        expected_node_id=to,
    )


async def _first_notice(session: Session) -> RevocationNotice:
    """The first RevocationNotice that comes over ``session`` (StreamClosed if none does)."""
    while True:
        msg = await session.recv()
        if isinstance(msg, RevocationNotice):
            return msg


async def _refused(a, b, notice: RevocationNotice) -> None:
    """``a`` sends ``notice`` to ``b`` until ``b`` checks it (one within ``answer_interval_s``
    of the last is dropped unread) and refuses it."""
    stats = b.revocation_sync.stats
    refused = stats.notices_refused
    while stats.notices_refused == refused:
        dropped = stats.notices_dropped
        assert a.peers.send(b.node_id, notice)
        await until(lambda d=dropped: stats.notices_refused > refused or stats.notices_dropped > d)


async def test_a_node_cut_off_for_its_revoked_certificate_learns_it_from_the_peer(tmp_path):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a, b = f.nodes["car-a"], f.nodes["car-b"]
        told: list[RevocationEntry] = []
        a.revocation_sync.on_self_revoked(told.append)
        await until(lambda: a.peers.session("car-b") is not None)
        f.fleet.revoke("gone")
        f.fleet.revoke("gone-too")
        f.fleet.revoke("car-a", "stolen")
        replace_file(f.files["car-b"], f.fleet.revocations.to_bytes())  # b's file only

        await until(lambda: told, timeout=10)
        (entry,) = told
        assert entry.node_id == "car-a" and entry.sequence == 3
        assert a.revocation_sync.own_revocation == entry
        assert b.revocation_sync.stats.notices_sent >= 1
        assert a.revocation_sync.stats.notices == 1
        # merged as any list: in force, written down (a restart refuses to start), and
        # gossiped below the gap (entries 1 and 2 are still to be asked for)
        assert a.admission.revocations.is_revoked(a.identity.certificate)
        await until(lambda: f.files["car-a"].exists())
        written = load_revocations(f.files["car-a"], a.identity.trust)
        assert entry in written.entries
        assert a.revocation_sync.version == 0
        assert a.membership.state.revocation_version == 0
        # both ends on the nodes' /metrics
        assert _notices(b)["sent"] >= 1 and _notices(a)["taken"] == 1


def _notices(node) -> dict[str, float]:
    page = "".join(render_family(fam) for fam in mesh_families(node))
    return {
        s.labels["outcome"]: s.value
        for fam in text_string_to_metric_families(page)
        for s in fam.samples
        if s.name == "meshinfer_revocation_notices_total"
    }


async def test_the_cut_session_carries_the_entry_before_its_close(tmp_path):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        b = f.nodes["car-b"]
        session = await _dial_as(f, "car-a", "car-b", ik=True)
        try:
            assert NOTICE_FEATURE in session.peer_features
            await until(lambda: any(s.peer_id == "car-a" for s in b.peers.open_sessions()))
            f.fleet.revoke("car-a", "stolen")
            replace_file(f.files["car-b"], f.fleet.revocations.to_bytes())
            notice = await _first_notice(session)
            entry = RevocationEntry.from_bytes(notice.entry, f.fleet.identities["car-b"].trust)
            assert entry.covers(f.fleet.identities["car-a"].certificate)
            await session.wait_closed()
            assert "certificate revoked" in session.close_reason
        finally:
            await session.aclose()


@pytest.mark.parametrize("ik", [True, False], ids=["IK", "XX"])
async def test_a_refused_handshake_says_which_entry_revokes_the_dialler(tmp_path, ik):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        b = f.nodes["car-b"]
        f.fleet.revoke("car-a", "stolen")
        replace_file(f.files["car-b"], f.fleet.revocations.to_bytes())
        await until(lambda: b.revocation_sync.version == 1)
        session = await _dial_as(f, "car-a", "car-b", ik=ik)
        try:
            notice = await _first_notice(session)
            assert notice.entry == next(iter(f.fleet.revocations.entries)).to_bytes()
            with pytest.raises(StreamClosed, match="admission refused: revoked"):
                await _first_notice(session)
        finally:
            await session.aclose()
        assert b.metrics.handshake_failures["revoked"] >= 1
        await until(lambda: b.peers.session("car-a") is None)  # (the running car-a: cut)


async def test_forged_foreign_and_garbage_notices_are_refused_and_nothing_merged(tmp_path, caplog):
    async with Fleet(tmp_path, names=("car-a", "car-b")) as f:
        a, b = f.nodes["car-a"], f.nodes["car-b"]
        await until(lambda: a.peers.session("car-b") is not None)
        f.fleet.revoke("gone", "someone else")  # authority-signed, but not about b
        (other,) = f.fleet.revocations.entries
        f.fleet.revoke("car-b", "stolen")
        own = next(e for e in f.fleet.revocations.entries if e.node_id == "car-b")
        raw = bytearray(own.to_bytes())
        raw[-1] ^= 1  # a signature that fails
        sent = [b"garbage", bytes(raw), other.to_bytes(), _RAW]  # _RAW: another fleet's
        with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.revocations"):
            for data in sent:
                await _refused(a, b, RevocationNotice(data))
        assert b.revocation_sync.stats.notices_refused == len(sent)
        assert "revocation notice from car-a refused" in caplog.text
        assert "does not revoke this node's certificate" in caplog.text
        assert b.revocation_sync.own_revocation is None
        assert b.admission.revocations.entries == frozenset()  # nothing merged, nothing cut
        assert b.peers.session("car-a") is not None


def test_notices_are_checked_at_most_once_per_interval_per_peer():
    exchange = RevocationExchange(RevocationList("f"), patience=1.0, answer_interval=0.5)
    assert exchange.notice("car-a", 10.0)
    assert not exchange.notice("car-a", 10.4)  # (a flood costs one signature check)
    assert exchange.notice("car-b", 10.4)  # another peer is not held up by car-a
    assert exchange.notice("car-a", 10.5)
    for i in range(200):  # what is kept is bounded
        exchange.notice(f"n-{i}", 20.0 + i)
    assert len(exchange._noticed) <= 66


@given(st.binary(max_size=MAX_REVOCATION_ENTRY_BYTES))
def test_a_notice_round_trips(entry):
    msg = RevocationNotice(entry)
    assert messages.decode(messages.encode(msg)) == msg


@given(st.binary(max_size=2 * MAX_REVOCATION_ENTRY_BYTES), st.binary(max_size=64))
def test_any_bytes_decode_as_a_notice_or_a_remote_protocol_error(data, tail):
    shapes = ([19, data], [19, data, tail], [19], [19, len(data)], [19, tail.hex()])
    candidates = [msgpack.packb(shape) for shape in shapes]
    for candidate in [*candidates, bytes([0x92, 19]) + data, data]:
        try:
            msg = messages.decode(candidate)
        except RemoteProtocolError:
            continue
        if isinstance(msg, RevocationNotice):
            assert len(msg.entry) <= MAX_REVOCATION_ENTRY_BYTES


@given(st.binary(max_size=2 * MAX_REVOCATION_ENTRY_BYTES), st.integers(0, len(_RAW) - 1))
def test_the_receiver_s_entry_check_raises_only_revocation_error(data, flip):
    mutated = bytearray(_RAW)
    mutated[flip] ^= 0xFF
    trust = _FLEET.identities["car-x"].trust
    for candidate in (data, bytes(mutated), _RAW[:flip]):
        try:
            RevocationEntry.from_bytes(candidate, trust)
        except RevocationError:
            pass
    assert RevocationEntry.from_bytes(_RAW, trust) == _ENTRY
