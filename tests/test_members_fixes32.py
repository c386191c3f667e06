"""Membership and model names (session 32): a member's position is aged from when it arrived
(not from when the dispatcher first read it), a record larger than the packet budget still
spreads by gossip, and a model's id or version may not hold ``@``."""

from __future__ import annotations

import random

import pytest

from coordinator.api_errors import ApiError
from coordinator.api_requests import body_to_spec
from coordinator.journal import UnknownTaskError
from meshinfer.proto.membership_config import MembershipConfig
from meshinfer.proto.membership_gossip import BroadcastQueue, UpdateFamily
from meshinfer.proto.membership_table import MemberTable
from meshinfer.proto.membership_wire import (
    MAX_COUNTER,
    MAX_SEQ,
    MAX_SIGNATURE_BYTES,
    MAX_STATE_BYTES,
    AliveRecord,
    NodeState,
    Ping,
    encode_header,
    encode_record,
    encode_state,
)
from meshinfer.proto.models import ModelRef, model_name_problem
from meshinfer.proto.tasks import InvalidTaskError, Pattern, Stage, TaskSpec
from meshinfer.proto.tasks_codec import decode_spec, encode_spec, spec_from_dict, spec_to_dict
from meshinfer.proto.tasks_wire import Tensor
from tests.helpers import until
from tests.test_contact_aware import STAYING, road
from tests.test_coordinator_service import Mesh

# --- 1. a position's age starts when membership received it --------------------------------


def _vehicle(position, velocity=(10.0, 0.0), depth: int = 0) -> NodeState:
    return NodeState(roles=("vehicle",), position=position, velocity=velocity, queue_depth=depth)


def _table(now: float) -> MemberTable:
    local = AliveRecord("local", 0, 0, NodeState())
    return MemberTable(local, MembershipConfig.test(), random.Random(1), now)


def test_the_table_records_when_a_members_position_arrived():
    table = _table(0.0)
    table.apply(AliveRecord("v", 1, 1, _vehicle((0.0, 0.0))), 5.0)
    assert table.get("v").position_at == 5.0
    # a newer record that does not move it (its load changed) keeps the arrival
    table.apply(AliveRecord("v", 1, 2, _vehicle((0.0, 0.0), depth=3)), 7.0)
    assert table.get("v").state.queue_depth == 3 and table.get("v").position_at == 5.0
    # suspected, then back: the status changes, the position does not
    table.suspect("v", 8.0)
    assert table.get("v").position_at == 5.0
    table.apply(AliveRecord("v", 2, 2, _vehicle((0.0, 0.0), depth=3)), 9.0)
    assert table.get("v").status.value == "alive" and table.get("v").position_at == 5.0
    # a new position, or a new velocity, arrives: its age starts again
    table.apply(AliveRecord("v", 2, 3, _vehicle((1.0, 0.0), depth=3)), 10.0)
    assert table.get("v").position_at == 10.0
    table.apply(AliveRecord("v", 2, 4, _vehicle((1.0, 0.0), (0.0, 5.0))), 11.0)
    assert table.get("v").position_at == 11.0
    # a warm start's record arrives when it is seeded
    table.add_known([AliveRecord("w", 1, 1, _vehicle((0.0, 0.0)))], 12.0)
    assert table.get("w").position_at == 12.0


def _contact(c, node: str, *, api: bool) -> float | None:
    if api:
        return {n["node_id"]: n["contact_s"] for n in c.nodes()}[node]
    return {v.node_id: v.contact_s for v in c._views()}[node]


async def test_a_position_the_dispatcher_never_read_is_aged_from_its_arrival(tmp_path):
    """``staying`` gossips 40 s of contact (at -100 m, 10 m/s, range 300 m). Nothing reads it
    until well after it arrived: both ``nodes()`` and placement take it to have driven on since
    (was: taken as current, 40 s, by whichever read came first)."""
    async with road(tmp_path, STAYING, STAYING) as mesh:
        c = mesh.coordinator
        core = c.mesh.membership.core
        loop = c._loop

        def placed() -> bool:
            m = core.member("staying")
            return m is not None and m.is_live and m.state.position == (-100.0, 0.0)

        await until(placed)
        seen_at = loop.time()  # (the position arrived at or before this)
        await until(lambda: loop.time() > seen_at + 0.5)
        api_at = loop.time()
        listed = _contact(c, "staying", api=True)
        assert listed <= 40.0 - (api_at - seen_at) + 1e-3  # (rounded to the ms)
        views_at = loop.time()
        scheduled = _contact(c, "staying", api=False)  # the dispatcher's first read
        assert scheduled <= 40.0 - (views_at - seen_at) + 1e-6
        # once read, the same age goes on (not restarted by the read)
        later_at = loop.time()
        await until(lambda: loop.time() > later_at + 0.1)
        again, again_at = _contact(c, "staying", api=False), loop.time()
        assert again == pytest.approx(scheduled - (again_at - views_at), abs=2e-3)


# --- 2. a record larger than the packet budget ---------------------------------------------


def _largest_alive_record() -> bytes:
    """The largest ALIVE record an honest node sends: a state of MAX_STATE_BYTES, the
    longest node id, counters at their cap and a full certificate and signature."""
    host = "h"
    while len(encode_state(NodeState(host=host + "h", port=65535, static_key=b"k" * 32))) <= (
        MAX_STATE_BYTES
    ):
        host += "h"
    state = NodeState(host=host, port=65535, static_key=b"k" * 32)
    assert len(encode_state(state)) == MAX_STATE_BYTES
    record = AliveRecord("n" * 64, MAX_COUNTER, MAX_COUNTER, state, b"s" * MAX_SIGNATURE_BYTES)
    return encode_record(record)


def test_the_largest_record_exceeds_the_default_budget_so_no_minimum_can_fix_it():
    """Why raising ``packet_budget``'s minimum is not the fix: the largest record a node may
    send (1753 bytes) exceeds even the default budget (1400), before any header."""
    largest = _largest_alive_record()
    assert len(largest) == 1753
    assert len(largest) > MembershipConfig().packet_budget
    assert len(encode_header(Ping(MAX_SEQ, "t" * 64))) == 78


def test_a_record_larger_than_the_budget_is_still_piggybacked_alone():
    largest = _largest_alive_record()
    queue = BroadcastQueue()
    queue.enqueue("n" * 64, UpdateFamily.RECORD, largest)
    room = MembershipConfig().packet_budget - 78  # after a ping's largest header
    sent = [queue.take(room, limit=2) for _ in range(3)]
    assert sent == [[largest], [largest], []]  # alone, its full number of times, then retired


# --- 3. "@" in a model's id or version -----------------------------------------------------

_IN = {"values": [[1.0, 2.0]], "dtype": "float32"}


def _body(**changes) -> dict:
    return {"task_id": "t", "pattern": "single", "inputs": _IN, **changes}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model": "a@b@c"}, "models[0]: version 'b@c' holds \"@\""),
        ({"models": [{"model_id": "a@b", "version": "c"}]}, "models[0]: id 'a@b' holds \"@\""),
        ({"models": ["x", {"model_id": "a", "version": "b@c"}], "pattern": "parallel"},
         "models[1]: version 'b@c' holds \"@\""),
        ({"pattern": "pipeline", "stages": [
            {"name": "s1", "model": "x"}, {"name": "s2", "model": "a@b@1", "after": ["s1"]}]},
         "stages[1].model: version 'b@1' holds \"@\""),
    ],
)  # fmt: skip
def test_the_api_refuses_a_model_name_holding_an_at_sign(changes, match):
    with pytest.raises(ApiError) as caught:
        body_to_spec(_body(**changes), lambda: "t")
    assert caught.value.status == 400 and match in str(caught.value)


def test_spec_from_dict_refuses_an_at_sign_and_keeps_every_other_name():
    tensor = Tensor(bytes(8), "float32", (1, 2))
    refused = TaskSpec("t", Pattern.SINGLE, tensor, (ModelRef("x", "y@z"),))
    with pytest.raises(InvalidTaskError, match=r"models\[0\]: version 'y@z' holds"):
        spec_from_dict(spec_to_dict(refused))
    # the shipped models' names, and names like the tests'
    for ref in (
        ModelRef("digits-mlp"), ModelRef("digits-mlp-wide", "1"), ModelRef("digits-mlp-deep"),
        ModelRef("synthetic-mlp", "w4096-d8"), ModelRef("a.b_c:d", "2024-01-01+build.7"),
    ):  # fmt: skip
        spec = TaskSpec("t", Pattern.SINGLE, tensor, (ref,))
        assert spec_from_dict(spec_to_dict(spec)) == spec
        assert model_name_problem(ref.model_id, ref.version) is None
    assert "holds" in model_name_problem("a@b", "1") and "holds" in model_name_problem("a", "@")


def test_a_spec_journaled_with_an_at_sign_still_recovers():
    """A task accepted before the rule reads back from the journal as it was written."""
    tensor = Tensor(bytes(8), "float32", (1, 2))
    stages = (Stage("s1", ModelRef("a@b")), Stage("s2", ModelRef("a", "b@c"), ("s1",)))
    for spec in (
        TaskSpec("t", Pattern.SINGLE, tensor, (ModelRef("x", "y@z"),)),
        TaskSpec("p", Pattern.PIPELINE, tensor, (), stages=stages),
    ):
        assert decode_spec(encode_spec(spec)) == spec


async def test_submit_refuses_a_python_spec_with_an_at_sign(tmp_path):
    """A spec built in Python reaches ``Coordinator.submit`` without ``spec_from_dict``: it
    took an ambiguous model name (the journal then held one no API client could name)."""
    tensor = Tensor(bytes(8), "float32", (1, 2))
    async with Mesh(tmp_path, n=0) as mesh:
        with pytest.raises(InvalidTaskError, match=r"models\[0\]: version 'y@z' holds"):
            await mesh.coordinator.submit(
                TaskSpec("t", Pattern.SINGLE, tensor, (ModelRef("x", "y@z"),))
            )
        with pytest.raises(UnknownTaskError):
            await mesh.coordinator.get("t")  # nothing was journaled


def test_a_node_config_model_name_holding_an_at_sign_is_refused():
    """``models = ["a@b@c"]`` was served as ``a`` version ``b@c``: a model no task can name."""
    from meshinfer.errors import ConfigError
    from node.config import parse_models

    with pytest.raises(ConfigError, match=r"models\[1\]: 'a@b@c': version 'b@c' holds"):
        parse_models(["digits-mlp@1", "a@b@c"], "models")
    assert [str(r) for r in parse_models(["digits-mlp", "m@w10-d1"], "models")] == [
        "digits-mlp@1",
        "m@w10-d1",
    ]
