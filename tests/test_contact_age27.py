"""A gossiped position is not taken as current forever: the coordinator counts its age from when
it first saw it and takes the vehicle to have driven on meanwhile, so the contact time left
shrinks as the position ages, and a new position starts it again."""

from __future__ import annotations

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshinfer.proto.contact import contact_time, moved, node_contact_s
from meshinfer.proto.membership_wire import NodeState
from tests.helpers import until
from tests.test_contact_aware import STAYING, road

UNIT = ((0.0, 0.0),)
coordinate = st.floats(-1e4, 1e4)
speed = st.floats(-50, 50).filter(lambda v: abs(v) > 0.1)


def vehicle(position, velocity) -> NodeState:
    return NodeState(
        host="127.0.0.1", port=1, static_key=b"k" * 32, roles=("vehicle",), links=("v2v",),
        position=position, velocity=velocity,
    )  # fmt: skip


@given(x=coordinate, y=coordinate, vx=speed, vy=speed, age=st.floats(0.0, 100.0))
def test_an_aged_position_gives_the_contact_of_where_the_vehicle_is_now(x, y, vx, vy, age):
    state = vehicle((x, y), (vx, vy))
    aged = node_contact_s(state, UNIT, 300.0, age_s=age)
    now_at = contact_time(moved((x, y), (vx, vy), age), (vx, vy), UNIT, 300.0)
    assert aged == now_at
    fresh = node_contact_s(state, UNIT, 300.0)
    if fresh is not None and fresh > age:  # still in range after `age`: that much less is left
        assert aged == pytest.approx(fresh - age, abs=1e-6 * max(1.0, fresh))


def test_contact_of_a_vehicle_seen_a_while_ago():
    # 290 m from the unit at 20 m/s, range 300 m: 0.5 s left when taken
    state = vehicle((290.0, 0.0), (20.0, 0.0))
    assert node_contact_s(state, UNIT, 300.0) == pytest.approx(0.5)
    assert node_contact_s(state, UNIT, 300.0, age_s=0.3) == pytest.approx(0.2)
    assert node_contact_s(state, UNIT, 300.0, age_s=2.0) == 0.0  # out of range by now
    assert moved((1.0, 2.0), (1.0, -1.0), 2.0) == (3.0, 0.0)
    assert moved((1.0, 2.0, 3.0), (1.0, 0.0), 1.0) == (2.0, 2.0, 3.0)


def contact_and_time(mesh, node: str) -> tuple[float | None, float]:
    c = mesh.coordinator
    views = {v.node_id: v.contact_s for v in c._views()}
    return views[node], c._loop.time()


async def test_the_coordinator_ages_a_gossiped_position_until_a_new_one_comes(tmp_path):
    async with road(tmp_path, STAYING, STAYING, http=True) as mesh:
        await until(lambda: contact_and_time(mesh, "staying")[0] is not None)
        first, at = contact_and_time(mesh, "staying")
        await until(lambda: contact_and_time(mesh, "staying")[1] > at + 0.2)
        later, later_at = contact_and_time(mesh, "staying")
        # it drove on: what is left shrank by the time that passed (was: 40.0 both times)
        assert later == pytest.approx(first - (later_at - at), abs=1e-3)  # (read just after)
        url = mesh.daemons["leaving"].http.url + "/position"
        async with aiohttp.ClientSession() as http:  # the vehicle says where it is now
            body = {"position": [-90, 0], "velocity": [10, 0]}  # 1 s on from its start: 39 s left
            async with http.post(url, json=body) as response:
                assert response.status == 200
        core = mesh.coordinator.mesh.membership.core
        await until(lambda: core.member("leaving").state.position == (-90.0, 0.0))
        fresh, _ = contact_and_time(mesh, "leaving")
        assert 38.0 < fresh <= 39.0  # a new position: its age starts again
