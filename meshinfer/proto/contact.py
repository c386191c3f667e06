"""Radio contact: how long a moving node stays in range of the roadside infrastructure.

The ``contact_aware`` scheduling policy (:mod:`meshinfer.proto.scheduling`) needs, per node,
``contact_s``: the seconds until it is expected to leave radio range. Nodes gossip their
``position`` (metres, 2 or 3 coordinates) and ``velocity`` (metres/second) in their
:class:`~meshinfer.proto.membership_wire.NodeState`; the coordinator derives ``contact_s`` from
them with :func:`node_contact_s`, a pure function (no clock: the caller says how old a position
is, ``age_s``, and the node is taken to have moved on meanwhile).

Model: the node moves in a straight line at constant velocity; infrastructure nodes (role
``rsu`` or link kind ``v2i``) stand still, each covering a ball of radius ``radio_range_m``.
The node is in range at time ``t`` while ``|p + v t - q| <= R`` for some infrastructure position
``q``: for each ``q`` that is an interval of ``t`` (the roots of a quadratic). The contact time
is the end of the run of overlapping intervals that holds ``t = 0`` (a hand-over between units
whose coverage overlaps keeps the contact); 0 when out of range of every unit now. Where
intervals meet, or a node on the edge of range is heading in, the rounding of the figures may
leave a gap of a few ulps; one narrower than ``radio_range_m * 1e-9`` does not end the contact
(a node on the edge heading in is in range). None --
"unknown, counts as long enough" -- for an infrastructure node, a node not moving (no velocity,
or zero), one with no position, when no infrastructure position is known, or when the figures
are too large to compute with (an expected contact beyond any float).

A 2-coordinate vector is taken as lying in the plane ``z = 0``, so 2- and 3-coordinate figures
can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from meshinfer.proto.membership_wire import NodeState

__all__ = [
    "INFRASTRUCTURE_LINKS",
    "INFRASTRUCTURE_ROLES",
    "check_vector",
    "contact_time",
    "infrastructure_positions",
    "is_infrastructure",
    "moved",
    "node_contact_s",
]

INFRASTRUCTURE_ROLES = frozenset({"rsu"})
"""Roles of a fixed infrastructure node (a roadside unit)."""
INFRASTRUCTURE_LINKS = frozenset({"v2i"})
"""Link kinds of a fixed infrastructure node (its interface is the V2I side)."""

Vector = tuple[float, ...]


def check_vector(value: Any, what: str) -> Vector | None:
    """``value`` as a position or velocity: None or empty is unknown (None); otherwise a list
    or tuple of 2 or 3 finite numbers (ints are taken as floats). ValueError naming ``what``
    for anything else."""
    if value is None or (isinstance(value, list | tuple) and not value):
        return None
    if not isinstance(value, list | tuple) or len(value) not in (2, 3):
        raise ValueError(f"{what}: expected 2 or 3 numbers (metres), got {value!r}")
    out = []
    for x in value:
        if type(x) not in (int, float):
            raise ValueError(f"{what}: expected numbers, got {x!r}")
        try:
            f = float(x)
        except OverflowError:  # an integer beyond any float
            f = math.inf
        if not math.isfinite(f):
            raise ValueError(f"{what}: expected finite numbers, got {x!r}")
        out.append(f)
    return tuple(out)


def is_infrastructure(state: NodeState) -> bool:
    """Whether a gossiped state (``roles``, ``links``) is that of a fixed infrastructure node."""
    return bool(INFRASTRUCTURE_ROLES.intersection(state.roles)) or bool(
        INFRASTRUCTURE_LINKS.intersection(state.links)
    )


def infrastructure_positions(states: Iterable[NodeState]) -> tuple[Vector, ...]:
    """The positions of the infrastructure nodes among ``states`` that gossip one."""
    return tuple(s.position for s in states if s.position is not None and is_infrastructure(s))


def node_contact_s(
    state: NodeState, infrastructure: Sequence[Vector], radio_range_m: float, age_s: float = 0.0
) -> float | None:
    """``contact_s`` of the node gossiping ``state`` (module docstring): None for an
    infrastructure node, else :func:`contact_time` of its position and velocity, the node taken
    to have gone on moving for ``age_s`` seconds since its position was taken (the caller's
    lower bound on the gossip's age; 0 or less: taken as current)."""
    if is_infrastructure(state):
        return None
    position = state.position
    if position is not None and state.velocity is not None and age_s > 0:
        position = moved(position, state.velocity, age_s)
    return contact_time(position, state.velocity, infrastructure, radio_range_m)


def moved(position: Sequence[float], velocity: Sequence[float], seconds: float) -> Vector:
    """Where a node at ``position`` moving at ``velocity`` is ``seconds`` later (straight line,
    constant velocity; a 2-coordinate figure stays in the plane)."""
    p, v = _xyz(position), _xyz(velocity)
    out = tuple(p[i] + v[i] * seconds for i in range(3))
    return out if len(position) > 2 or len(velocity) > 2 else out[:2]


def _xyz(v: Sequence[float]) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]) if len(v) > 2 else 0.0)


def _direction(v: tuple[float, float, float]) -> tuple[tuple[float, float, float], float] | None:
    """``v`` as (unit vector, speed), None if zero or not finite. Scaled by its largest
    component first, so that no square of a speed in range of a float underflows or overflows
    (the speed itself may overflow to infinity: a node out of range at once)."""
    largest = max(abs(v[0]), abs(v[1]), abs(v[2]))
    if not 0 < largest < math.inf:  # not moving, or NaN, or infinite
        return None
    w = (v[0] / largest, v[1] / largest, v[2] / largest)
    norm = math.hypot(*w)  # in [1, sqrt(3)]
    return (w[0] / norm, w[1] / norm, w[2] / norm), largest * norm


def _in_range_interval(
    rel: tuple[float, float, float], u: tuple[float, float, float], r: float
) -> tuple[float, float] | None:
    """The distances ``[x_in, x_out]`` along the unit vector ``u`` with ``|rel + u x| <= r``
    (``x_out >= 0``), or None if never at or after 0 (or NaN from figures too large). Roots
    of ``a x^2 + 2 b x + c`` (``a = |u|^2``, 1 but for rounding) with the cancellation-free
    formula."""
    a = u[0] * u[0] + u[1] * u[1] + u[2] * u[2]
    b = rel[0] * u[0] + rel[1] * u[1] + rel[2] * u[2]
    distance = math.hypot(*rel)
    c = (distance - r) * (distance + r)
    disc = b * b - a * c
    if not disc >= 0:  # passes by out of range (or NaN from figures too large)
        return None
    s = math.sqrt(disc)
    if b > 0:
        q = -(b + s)
        x_in, x_out = q / a, c / q
    elif b < 0:
        q = s - b
        x_in, x_out = c / q, q / a
    else:
        x_in, x_out = -s / a, s / a
    return (x_in, x_out) if x_out >= 0 else None


def contact_time(
    position: Sequence[float] | None,
    velocity: Sequence[float] | None,
    infrastructure: Sequence[Sequence[float]],
    radio_range_m: float,
) -> float | None:
    """Seconds until a node at ``position`` moving at ``velocity`` leaves the range
    ``radio_range_m`` of every ``infrastructure`` position (module docstring): 0 if out of
    range now, None if unknown (no position, not moving, no infrastructure, a NaN figure, a
    contact beyond any float); a unit whose position is not finite is left out. Computed along
    the way in metres, then over the speed, so that no speed a float holds is too large or small.
    For one unit it is the largest ``t >= 0`` with ``|position + velocity t - unit| = R``."""
    if position is None or velocity is None or not infrastructure:
        return None
    p, motion = _xyz(position), _direction(_xyz(velocity))
    if motion is None or any(math.isnan(x) for x in p):  # not moving, or figures unusable
        return None
    u, speed = motion
    intervals = []  # in metres along the way: a speed far from 1 m/s loses no precision
    for unit in infrastructure:
        q = _xyz(unit)
        rel = (p[0] - q[0], p[1] - q[1], p[2] - q[2])
        found = _in_range_interval(rel, u, radio_range_m)
        if found is not None:
            intervals.append(found)
    if not all(math.isfinite(x) for pair in intervals for x in pair):
        return None  # a contact beyond any float
    end = 0.0  # out of range of every unit now: no interval holds 0
    slack = radio_range_m * _GAP  # (rounding: a node on the edge heading in is in range)
    for x_in, x_out in sorted(intervals):
        if x_in <= end + slack:
            end = max(end, x_out)
    seconds = end / speed
    return seconds if seconds < math.inf else None  # (a speed that small: beyond any float)


#: The gap between in-range intervals, relative to the range, that rounding may leave where a
#: node is on the edge of range or at a hand-over: one narrower does not end the contact.
_GAP = 1e-9
