"""The ``contact_aware`` policy end to end: nodes gossip where they are and how they move
(``[mobility]``, ``POST /position``), the coordinator turns that into each node's contact time
(:mod:`meshinfer.proto.contact`) and keeps work off a vehicle about to leave radio range."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import aiohttp
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from coordinator.config import config_from_dict as coordinator_config
from coordinator.daemon import service_config
from coordinator.service import CoordinatorConfig
from meshinfer.errors import ConfigError
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.contact import (
    check_vector,
    contact_time,
    infrastructure_positions,
    node_contact_s,
)
from node.config import config_from_dict as node_config
from node.config import render_defaults
from node.http import _is_loopback
from tests.helpers import until
from tests.test_coordinator_service import Mesh, spec

R = 300.0

# --- the pure function -------------------------------------------------------------------------

coordinate = st.floats(-2000.0, 2000.0, allow_nan=False)
component = st.floats(-60.0, 60.0, allow_nan=False)
points = st.lists(coordinate, min_size=2, max_size=3).map(tuple)
velocities = st.lists(component, min_size=2, max_size=3).map(tuple)
ranges = st.floats(10.0, 1000.0)


def _at(p, v, t):
    p, v = list(p) + [0.0] * (3 - len(p)), list(v) + [0.0] * (3 - len(v))
    return [a + b * t for a, b in zip(p, v, strict=True)]


def _distance(p, v, t, unit) -> float:
    q = list(unit) + [0.0] * (3 - len(unit))
    return math.dist(_at(p, v, t), q)


def _speed(v) -> float:
    return math.hypot(*v)


@st.composite
def in_range(draw):
    """(position, unit, range) with the position within the unit's range."""
    radio_range, unit = draw(ranges), draw(points)
    offset = draw(st.lists(st.floats(-0.57, 0.57), min_size=len(unit), max_size=len(unit)))
    position = tuple(c + radio_range * o for c, o in zip(unit, offset, strict=True))
    return position, unit, radio_range


@settings(max_examples=300, deadline=None)
@given(in_range(), velocities)
def test_at_the_contact_time_the_node_is_at_the_edge_of_range(placed, v):
    p, unit, radio_range = placed
    assume(_speed(v) > 0.1)
    t = contact_time(p, v, [unit], radio_range)
    assert t is not None and t >= 0
    tol = 1e-6 * (1 + radio_range + _speed(v) * t)
    assert math.isclose(_distance(p, v, t, unit), radio_range, abs_tol=tol)
    assert _distance(p, v, t * 1.01 + 0.01, unit) > radio_range  # it leaves then, not later


@settings(max_examples=300, deadline=None)
@given(points, velocities, st.lists(points, min_size=1, max_size=4), ranges)
def test_with_several_units_the_node_stays_in_range_of_one_until_the_contact_time(
    p, v, units, radio_range
):
    assume(_speed(v) > 0.1)
    t = contact_time(p, v, units, radio_range)
    assert t is not None and t >= 0
    nearest = [min(_distance(p, v, x, u) for u in units) for x in (t * k / 16 for k in range(17))]
    tol = 1e-6 * (1 + radio_range + _speed(v) * t)
    if t == 0:  # out of every unit's range now
        assert nearest[0] >= radio_range - tol
    else:
        assert all(d <= radio_range + tol for d in nearest)
        assert math.isclose(nearest[-1], radio_range, abs_tol=tol)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 299.0), st.floats(0.5, 60.0), st.floats(0.0, 2 * math.pi), points)
def test_a_node_moving_straight_away_has_what_is_left_of_the_range_over_its_speed(
    d, speed, angle, unit
):
    u = (math.cos(angle), math.sin(angle))
    unit = unit[:2]
    p = (unit[0] + d * u[0], unit[1] + d * u[1])
    v = (speed * u[0], speed * u[1])
    assert math.isclose(contact_time(p, v, [unit], R), (R - d) / speed, rel_tol=1e-9, abs_tol=1e-6)
    toward = (-v[0], -v[1])  # through the unit and out the other side
    assert math.isclose(contact_time(p, toward, [unit], R), (R + d) / speed, rel_tol=1e-9)


@given(points, points)
def test_a_stationary_node_or_one_of_unknown_motion_has_no_contact_time(p, unit):
    assert contact_time(p, (0.0, 0.0), [unit], R) is None
    assert contact_time(p, (0.0, 0.0, 0.0), [unit], R) is None
    assert contact_time(p, None, [unit], R) is None
    assert contact_time(None, (5.0, 0.0), [unit], R) is None


def test_contact_time_cases():
    assert contact_time((100.0, 0.0), (10.0, 0.0), [(0.0, 0.0)], R) == pytest.approx(20.0)
    assert contact_time((100.0, 0.0), (10.0, 0.0), [], R) is None  # no unit's position known
    assert contact_time((400.0, 0.0), (-10.0, 0.0), [(0.0, 0.0)], R) == 0.0  # out, coming in
    assert contact_time((400.0, 0.0), (10.0, 0.0), [(0.0, 0.0)], R) == 0.0  # out, going away
    # a hand-over: the next unit's range overlaps this one's, so the contact runs through both
    units = [(0.0, 0.0), (500.0, 0.0)]
    assert contact_time((100.0, 0.0), (10.0, 0.0), units, R) == pytest.approx(70.0)
    gap = [(0.0, 0.0), (700.0, 0.0)]  # a stretch out of range in between: the contact ends
    assert contact_time((100.0, 0.0), (10.0, 0.0), gap, R) == pytest.approx(20.0)
    # a 2-coordinate figure lies in the plane z = 0
    assert contact_time((0.0, 0.0, 0.0), (10.0, 0.0), [(0.0, 0.0, 0.0)], R) == pytest.approx(30.0)
    # tiny and huge speeds are exact (their squares leave the floats; the speed does not)
    assert contact_time((0.0, 0.0), (1e-300, 0.0), [(0.0, 0.0)], R) == pytest.approx(3e302)
    hypot = math.hypot(1e300, 1e300)
    assert contact_time((0.0, 0.0), (1e300, 1e300), [(0.0, 0.0)], R) == pytest.approx(300 / hypot)
    assert contact_time((1e300, 0.0), (1.0, 0.0), [(0.0, 0.0)], R) == 0.0


@dataclass(frozen=True)
class State:
    roles: tuple[str, ...] = ("vehicle",)
    links: tuple[str, ...] = ("v2v",)
    position: tuple[float, ...] | None = None
    velocity: tuple[float, ...] | None = None


def test_infrastructure_is_a_roadside_unit_or_a_v2i_node_with_a_position():
    rsu = State(roles=("rsu",), position=(0.0, 0.0))
    v2i = State(links=("v2i",), position=(900.0, 0.0))
    unplaced = State(roles=("rsu",))
    car = State(position=(5.0, 5.0), velocity=(1.0, 0.0))
    assert infrastructure_positions([rsu, v2i, unplaced, car]) == ((0.0, 0.0), (900.0, 0.0))
    leaving = State(position=(290.0, 0.0), velocity=(20.0, 0.0))
    assert node_contact_s(leaving, [(0.0, 0.0)], R) == pytest.approx(0.5)
    moving_rsu = State(roles=("rsu",), position=(290.0, 0.0), velocity=(20.0, 0.0))
    assert node_contact_s(moving_rsu, [(0.0, 0.0)], R) is None  # infrastructure itself


@pytest.mark.parametrize(
    "value",
    [[1.0], [1.0, 2.0, 3.0, 4.0], [1.0, "x"], [True, 1.0], [math.nan, 0.0], [10**400, 0], 5],
)
def test_check_vector_refuses_what_is_not_2_or_3_finite_numbers(value):
    with pytest.raises(ValueError, match="where"):
        check_vector(value, "where")


def test_check_vector_takes_numbers_and_empty_as_unknown():
    assert check_vector([1, 2.5], "p") == (1.0, 2.5)
    assert check_vector((1, 2, 3), "p") == (1.0, 2.0, 3.0)
    assert check_vector([], "p") is None and check_vector(None, "p") is None


# --- configuration ------------------------------------------------------------------------------


def test_node_config_has_a_documented_mobility_section():
    rendered = render_defaults()
    assert "[mobility]" in rendered
    assert "position = []" in rendered and "velocity = []" in rendered
    config = node_config({"mobility": {"position": [1, 2.5, 3], "velocity": [0, -4, 0]}})
    assert config.mobility.position == (1.0, 2.5, 3.0)
    assert config.mobility.velocity == (0.0, -4.0, 0.0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"position": [1.0]}, r"\[mobility\] position: 2 or 3 numbers"),
        ({"position": [1.0, 2.0, 3.0, 4.0]}, r"\[mobility\] position: 2 or 3 numbers"),
        ({"position": [1.0, "north"]}, r"\[mobility\] position\[1\]: expected float"),
        ({"position": [math.inf, 0.0]}, r"\[mobility\] position\[0\]: must be a finite number"),
        ({"position": "1,2"}, r"\[mobility\] position: expected a list"),
        ({"velocity": [1.0, 0.0]}, r"\[mobility\] velocity needs a position"),
        ({"position": [0.0, 0.0], "velocity": [1.0, 0.0, 0.0]}, r"\[mobility\] velocity needs"),
        ({"speed": 3.0}, r"\[mobility\] unknown key 'speed'"),
    ],
)
def test_node_config_refuses_bad_mobility_naming_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        node_config({"mobility": table}, "node.toml")


def test_coordinator_config_has_the_radio_range():
    assert CoordinatorConfig().radio_range_m == 300.0
    config = coordinator_config({"coordinator": {"radio_range_m": 150}})
    assert service_config(config).radio_range_m == 150.0
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match=r"\[coordinator\] radio_range_m"):
            coordinator_config({"coordinator": {"radio_range_m": bad}})
    with pytest.raises(ConfigError, match="radio_range_m"):
        CoordinatorConfig(radio_range_m=math.inf)


# --- through the real coordinator --------------------------------------------------------------

RSU_AT = "[mobility]\nposition = [0.0, 0.0]\n"
#: (300 - 290) / 20 = 0.5 s of contact left: less than the items' expected runtime
LEAVING = "[mobility]\nposition = [290.0, 0.0]\nvelocity = [20.0, 0.0]\n"
#: (300 + 100) / 10 = 40 s of contact left
STAYING = "[mobility]\nposition = [-100.0, 0.0]\nvelocity = [10.0, 0.0]\n"


def road(tmp_path, leaving: str, staying: str, *, http: bool = False) -> Mesh:
    """A coordinator, a roadside unit at the origin (serving another model, so that no item
    goes to it) and two vehicles, ``leaving`` and ``staying`` (their extra TOML)."""
    mesh = Mesh(tmp_path, n=0)
    on = f"[http]\nenabled = {str(http).lower()}\n"
    nodes = [
        ("rsu", ("rsu",), '[http]\nenabled = false\n[inference]\nmodels = ["digits-mlp-wide@1"]\n'
         + RSU_AT),
        ("leaving", ("vehicle",), on + leaving),
        ("staying", ("vehicle",), on + staying),
    ]  # fmt: skip
    for name, roles, extra in nodes:
        mesh.names.append(name)
        mesh.configs.append(mesh.cluster.add_node(name, roles=roles, extra=extra))
    return mesh


async def run_batch(mesh: Mesh, task_id: str, policy: str) -> Counter:
    """A 12-shard batch task under ``policy`` whose items each expect 2 s of runtime; the
    number of its items each node completed."""
    c = mesh.coordinator
    before = Counter(c.stats_.completed_by_node)
    x, _ = load_digits_holdout()
    params = {"expected_runtime_s": 2.0}
    task = spec(task_id, "batch", x[:24], shard_size=2, policy=policy, params=params)
    record = await c.wait(await c.submit(task), 10)
    assert record.state.value == "succeeded", record.summary.error
    return c.stats_.completed_by_node - before


def contact_of(mesh: Mesh, node: str) -> float | None:
    return {v.node_id: v.contact_s for v in mesh.coordinator._views()}[node]


async def test_contact_aware_keeps_work_off_the_vehicle_leaving_range(tmp_path):
    async with road(tmp_path, LEAVING, STAYING) as mesh:
        await until(lambda: contact_of(mesh, "leaving") is not None)
        # (what is left of it: the coordinator takes them to drive on since it saw them)
        assert 0.0 <= contact_of(mesh, "leaving") <= 0.5
        assert 39.0 < contact_of(mesh, "staying") <= 40.0
        assert contact_of(mesh, "rsu") is None
        assert await run_batch(mesh, "aware", "contact_aware") == Counter({"staying": 12})
        spread = await run_batch(mesh, "loaded", "least_loaded")
        assert set(spread) == {"leaving", "staying"}  # least loaded minds no contact time


async def test_a_position_posted_at_run_time_is_gossiped_and_scheduled_on(tmp_path):
    async with road(tmp_path, STAYING, STAYING, http=True) as mesh:
        url = mesh.daemons["leaving"].http.url + "/position"
        async with aiohttp.ClientSession() as http:
            bad = [
                {"position": [1.0]},
                {"position": [1.0, "x"]},
                {"velocity": [20.0, 0.0]},
                {"position": [0.0, 0.0], "heading": 90},
                [290.0, 0.0],
            ]
            for body in bad:
                async with http.post(url, json=body) as response:
                    assert response.status == 400, body
                    assert (await response.json())["error"]
            for raw in (b"{not json", b"[" * 100_000):  # (the second nested past the parser)
                async with http.post(url, data=raw) as response:
                    assert response.status == 400
            body = {"position": [290, 0], "velocity": [20, 0]}
            async with http.post(url, json=body) as response:
                assert response.status == 200
                assert await response.json() == {"position": [290.0, 0.0], "velocity": [20.0, 0.0]}
        assert mesh.daemons["leaving"].mesh.membership.state.position == (290.0, 0.0)
        await until(lambda: contact_of(mesh, "leaving") <= 0.5)  # (was ~40 s before the post)
        assert await run_batch(mesh, "aware", "contact_aware") == Counter({"staying": 12})


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.7", False),
        ("fe80::1%eth0", False),
        (None, False),
        ("", False),
    ],
)
def test_position_updates_are_taken_from_loopback_only(remote, loopback):
    assert _is_loopback(remote) is loopback
