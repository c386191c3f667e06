"""Scheduling policies: which node runs a work item, from the gossiped node state.

:func:`choose` is a pure function of the nodes (:class:`NodeView`, what membership gossips plus
the round trip the coordinator's own membership probes measured, ``Membership.rtt``), the item,
the nodes to avoid (``exclude``: those that already failed this item), a seeded
``random.Random`` for tie breaks and a :class:`SchedulerState` the caller keeps between calls
(round-robin cursor, model affinity, runtime estimates). No clock is read.

Every policy first narrows the nodes to the *eligible* ones -- alive, not excluded, serving the
item's model (id and version), and meeting the hard requirements in the item's params
(``requires_gpu``, ``min_gpu_memory``, ``requires_role``) -- and returns one of those, or None
when there is none. Then:

* ``round_robin``   -- the next eligible node id after the last one chosen (sorted ids, wrapping).
* ``least_loaded``  -- the lowest load ``queue_depth / capacity``; ties by ``rng``.
* ``capability``    -- for a large batch (rows >= ``gpu_batch_rows``) GPU nodes first, most free
  GPU memory first; then least loaded.
* ``latency``       -- the lowest measured RTT; unknown RTT only when no node has one; ties by load.
* ``model_affinity`` -- the node that last ran the model if it still qualifies, else rendezvous
  (highest-random-weight) hashing of the model over the eligible nodes, so a model stays where
  its weights are loaded and only the models of a departed node move. A saturated node
  (``queue_depth >= capacity``) is passed over while an unsaturated one exists.
* ``contact_aware`` -- drops nodes whose expected contact time (``contact_s``: until the
  vehicle leaves radio range) is shorter than the expected runtime + RTT + a margin; then least
  loaded. Unknown contact time counts as long enough (fixed or infrastructure nodes). The
  coordinator derives ``contact_s`` from the position and velocity each node gossips, relative
  to the roadside units' positions (:func:`meshinfer.proto.contact.node_contact_s`).

Degenerate gossiped figures never make a policy raise: an RTT that is NaN, negative, infinite
or beyond any float counts as not measured, a NaN or negative free GPU memory as none, a load
that is NaN (infinite depth over infinite capacity) or beyond any float as the highest load,
and a runtime observation or ``expected_runtime_s`` that is not a finite, non-negative number
of seconds as not given.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tasks imports Policy from here; only annotations need WorkItem
    from meshinfer.proto.tasks import WorkItem

__all__ = [
    "NodeView",
    "Policy",
    "SchedulerConfig",
    "SchedulerState",
    "choose",
    "eligible",
    "load_ratio",
    "requirements",
    "unplaced_reason",
]


class Policy(enum.StrEnum):
    """A scheduling policy (module docstring); selectable per task and as a default."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    CAPABILITY = "capability"
    LATENCY = "latency"
    MODEL_AFFINITY = "model_affinity"
    CONTACT_AWARE = "contact_aware"


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the scheduler knows about one node.

    ``models``: ``(model_id, version)`` pairs the node serves. ``capacity``: how many items it
    runs at once (a capacity below 1 counts as 1). ``rtt_s``: round trip measured by the
    coordinator (None: not measured). ``contact_s``: seconds until the node is expected to leave
    range (None: unknown or not moving).
    """

    node_id: str
    alive: bool = True
    models: frozenset[tuple[str, str]] = frozenset()
    roles: frozenset[str] = frozenset()
    has_gpu: bool = False
    device: str = "cpu"
    free_gpu_memory: int | None = None
    queue_depth: int = 0
    capacity: int = 1
    rtt_s: float | None = None
    links: frozenset[str] = frozenset()
    contact_s: float | None = None


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Tunables of the policies (all durations in seconds)."""

    #: ``capability``: a batch of at least this many rows prefers GPU nodes.
    gpu_batch_rows: int = 32
    #: ``contact_aware``: RTT assumed for a node that has none measured.
    default_rtt_s: float = 0.05
    #: ``contact_aware``: runtime assumed for a model never observed (unless the item's params
    #: give ``expected_runtime_s``).
    default_runtime_s: float = 0.1
    #: ``contact_aware``: the contact must outlast runtime + RTT by this factor (>= 1).
    contact_safety: float = 1.5
    #: Weight of a new observation in the runtime moving average (0..1].
    runtime_smoothing: float = 0.2


@dataclass(slots=True)
class SchedulerState:
    """What policies remember between calls; one per coordinator, mutated by :func:`choose`
    (round-robin cursor, model affinity) and :meth:`observe_runtime`."""

    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    rr_cursor: str | None = None  # the node round robin chose last
    affinity: dict[tuple[str, str], str] = field(default_factory=dict)
    runtime_s: dict[tuple[str, str], float] = field(default_factory=dict)

    def observe_runtime(self, model: tuple[str, str], seconds: float) -> None:
        """Fold a measured runtime of ``model`` into its moving average (one that is NaN,
        infinite or negative is ignored: it would stay in the average for good)."""
        if _seconds(seconds) is None:
            return
        old = self.runtime_s.get(model)
        alpha = self.config.runtime_smoothing
        self.runtime_s[model] = seconds if old is None else old + alpha * (seconds - old)

    def expected_runtime(self, model: tuple[str, str]) -> float:
        """The runtime estimate of ``model`` (the default when never observed)."""
        return self.runtime_s.get(model, self.config.default_runtime_s)


# --- eligibility -----------------------------------------------------------------------------


def _seconds(value: object) -> float | None:
    """``value`` as seconds a policy can use (a finite, non-negative number), else None."""
    if type(value) not in (int, float):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer beyond any float
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _rtt(node: NodeView) -> float | None:
    """The node's measured RTT, None if not measured or not usable (NaN, negative, infinite)."""
    return _seconds(node.rtt_s)


def _free_gpu_memory(node: NodeView) -> int | float:
    """The node's free GPU memory, 0 if unknown or not usable (NaN, negative)."""
    free = node.free_gpu_memory
    return free if free is not None and free > 0 else 0


def _model_key(item: WorkItem) -> tuple[str, str]:
    return (item.model.model_id, item.model.version)


def requirements(params: Mapping[str, object]) -> tuple[bool, int | None, str | None]:
    """What an item's ``params`` ask of a node (``requires_gpu``, ``min_gpu_memory``,
    ``requires_role``; values of the wrong type ask nothing): items of one model, policy and
    requirements are eligible on the same nodes."""
    need, role = params.get("min_gpu_memory"), params.get("requires_role")
    return (
        params.get("requires_gpu") is True,
        need if type(need) is int else None,
        role if type(role) is str else None,
    )


def _meets_requirements(node: NodeView, params: Mapping[str, object]) -> bool:
    gpu, need, role = requirements(params)
    if gpu and not node.has_gpu:
        return False
    if need is not None and (node.free_gpu_memory is None or not _free_gpu_memory(node) >= need):
        return False
    return role is None or role in node.roles


def eligible(nodes: Sequence[NodeView], item: WorkItem, exclude: frozenset[str]) -> list[NodeView]:
    """The nodes a policy may choose for ``item`` (module docstring), in input order."""
    model = _model_key(item)
    return [
        node
        for node in nodes
        if node.alive
        and node.node_id not in exclude
        and model in node.models
        and _meets_requirements(node, item.params)
    ]


def load_ratio(node: NodeView) -> float:
    """``queue_depth / capacity`` (a capacity below 1 counts as 1).

    Equal ratios compare equal (IEEE division is correctly rounded), and distinct ratios of
    realistic queue depths and capacities (below 2**20) never round to the same float. A ratio
    that is NaN (an infinite depth over an infinite capacity) or beyond any float is infinite.
    """
    try:
        ratio = max(0, node.queue_depth) / max(1, node.capacity)
    except OverflowError:  # an integer depth beyond any float
        return math.inf
    return math.inf if math.isnan(ratio) else ratio


def _least_loaded(nodes: Sequence[NodeView], rng: random.Random) -> NodeView:
    loads = [load_ratio(n) for n in nodes]
    lowest = min(loads)
    tied = sorted((n for n, load in zip(nodes, loads, strict=True) if load == lowest),
                  key=lambda n: n.node_id)  # fmt: skip
    return tied[0] if len(tied) == 1 else rng.choice(tied)


# --- policies --------------------------------------------------------------------------------

#: A policy: (eligible nodes, never empty; item; rng; state) -> the chosen node or None.
_Choose = Callable[[list[NodeView], "WorkItem", random.Random, SchedulerState], NodeView | None]


def _round_robin(nodes, item, rng, state) -> NodeView:
    ordered = sorted(nodes, key=lambda n: n.node_id)
    last = state.rr_cursor
    after = [n for n in ordered if last is not None and n.node_id > last]
    chosen = (after or ordered)[0]
    state.rr_cursor = chosen.node_id
    return chosen


def _least_loaded_policy(nodes, item, rng, state) -> NodeView:
    return _least_loaded(nodes, rng)


def _capability(nodes, item, rng, state) -> NodeView:
    if item.input.rows >= state.config.gpu_batch_rows:
        gpus = [n for n in nodes if n.has_gpu]
        if gpus:
            most = max(_free_gpu_memory(n) for n in gpus)
            nodes = [n for n in gpus if _free_gpu_memory(n) == most]
    return _least_loaded(nodes, rng)


def _latency(nodes, item, rng, state) -> NodeView:
    measured = [n for n in nodes if _rtt(n) is not None]
    if not measured:
        return _least_loaded(nodes, rng)
    best = min(_rtt(n) for n in measured)
    return _least_loaded([n for n in measured if _rtt(n) == best], rng)


def _rendezvous_weight(model: tuple[str, str], node_id: str) -> bytes:
    key = f"{model[0]}\0{model[1]}\0{node_id}".encode()
    return hashlib.blake2b(key, digest_size=8).digest()


def _model_affinity(nodes, item, rng, state) -> NodeView:
    model = _model_key(item)
    ranked = sorted(nodes, key=lambda n: _rendezvous_weight(model, n.node_id), reverse=True)
    home = state.affinity.get(model)
    ranked = sorted(ranked, key=lambda n: n.node_id != home)  # stable: the last home first
    unsaturated = [n for n in ranked if n.queue_depth < max(1, n.capacity)]
    chosen = (unsaturated or ranked)[0]
    state.affinity[model] = chosen.node_id
    return chosen


def _in_contact_long_enough(nodes, item, state: SchedulerState) -> list[NodeView]:
    """``contact_aware``: the nodes expected to stay in range for the item's runtime + RTT."""
    config = state.config
    runtime = _seconds(item.params.get("expected_runtime_s"))
    if runtime is None:
        runtime = state.expected_runtime(_model_key(item))

    def stays_long_enough(node: NodeView) -> bool:
        rtt = _rtt(node)
        rtt = config.default_rtt_s if rtt is None else rtt
        return node.contact_s is None or node.contact_s >= (runtime + rtt) * config.contact_safety

    return [n for n in nodes if stays_long_enough(n)]


def _contact_aware(nodes, item, rng, state) -> NodeView | None:
    reachable = _in_contact_long_enough(nodes, item, state)
    return _least_loaded(reachable, rng) if reachable else None


_POLICIES: Mapping[Policy, _Choose] = {
    Policy.ROUND_ROBIN: _round_robin,
    Policy.LEAST_LOADED: _least_loaded_policy,
    Policy.CAPABILITY: _capability,
    Policy.LATENCY: _latency,
    Policy.MODEL_AFFINITY: _model_affinity,
    Policy.CONTACT_AWARE: _contact_aware,
}


def choose(
    policy: Policy | str,
    nodes: Sequence[NodeView],
    item: WorkItem,
    *,
    exclude: frozenset[str] = frozenset(),
    rng: random.Random,
    state: SchedulerState,
) -> str | None:
    """The id of the node that should run ``item`` under ``policy``, or None if none can.

    Only ever an eligible node (alive, has the model, not in ``exclude``, meets the item's
    hardware requirements). Raises ValueError for an unknown policy name.
    """
    run = _POLICIES[Policy(policy)]
    candidates = eligible(nodes, item, exclude)
    chosen = run(candidates, item, rng, state) if candidates else None
    return None if chosen is None else chosen.node_id


def _describe_requirements(params: Mapping[str, object]) -> str:
    gpu, need, role = requirements(params)
    asked = ["a GPU"] if gpu else []
    if need is not None:
        asked.append(f"{need} bytes of free GPU memory")
    if role is not None:
        asked.append(f"role {role!r}")
    return ", ".join(asked)


def unplaced_reason(
    policy: Policy | str,
    nodes: Sequence[NodeView],
    item: WorkItem,
    *,
    full: frozenset[str] = frozenset(),
    state: SchedulerState,
) -> str:
    """Why ``item`` may be on no node now, for people (a task's status): the first of "no
    live node serves its model", "none of those meets its requirements", "none stays in range
    long enough" (``contact_aware``), "all of those are ``full``" (at the caller's in-flight
    limit); else it is only waiting for its turn. Reads ``state``, never changes it."""
    model = f"{item.model.model_id}@{item.model.version}"
    key = _model_key(item)
    serving = [n for n in nodes if n.alive and key in n.models]
    if not serving:
        return f"no live, reachable node serves model {model}"
    fit = [n for n in serving if _meets_requirements(n, item.params)]
    if not fit:
        asked = _describe_requirements(item.params)
        return f"no live node serving {model} ({len(serving)}) has what the item asks for: {asked}"
    if Policy(policy) is Policy.CONTACT_AWARE:
        fit = _in_contact_long_enough(fit, item, state)
        if not fit:
            return f"no node serving {model} is expected to stay in range long enough"
    if all(n.node_id in full for n in fit):
        return f"every node that can run it ({len(fit)}) has its limit of items in flight"
    return "waiting for its turn to be dispatched"
