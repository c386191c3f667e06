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

* ``round_robin``   -- the next eligible node id after the last one chosen for the item's
  placement class (its model and requirements; sorted ids, wrapping), so that items of classes
  eligible on different nodes, queued in turn, do not each go back to the same node; a class
  not seen yet goes on from the last node chosen for any.
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

import bisect
import enum
import hashlib
import heapq
import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tasks imports Policy from here; only annotations need WorkItem
    from meshinfer.proto.tasks import WorkItem

__all__ = [
    "BurstPlacer",
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
    rr_cursor: str | None = None  # the node round robin chose last (for any placement class)
    #: The node round robin chose last per placement class (model, requirements), the classes
    #: used last kept (at most ``_MAX_RR_CURSORS``: requirements come from submitted specs).
    rr_cursors: dict[tuple, str] = field(default_factory=dict)
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

    def rr_last(self, key: tuple) -> str | None:
        """The node round robin chose last for placement class ``key`` (else for any)."""
        return self.rr_cursors.get(key, self.rr_cursor)

    def rr_chose(self, key: tuple, node: str) -> None:
        """Round robin chose ``node`` for placement class ``key``."""
        self.rr_cursor = node
        cursors = self.rr_cursors
        cursors.pop(key, None)  # (to the end: the class used last)
        cursors[key] = node
        if len(cursors) > _MAX_RR_CURSORS:
            del cursors[next(iter(cursors))]

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


def _class_key(item: WorkItem) -> tuple:
    """The item's placement class: items of one class are eligible on the same nodes."""
    return (_model_key(item), requirements(item.params))


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
    return _ratio(node.queue_depth, node.capacity)


def _ratio(queue_depth: int, capacity: int) -> float:
    """:func:`load_ratio` of a node with this queue depth and capacity."""
    try:
        ratio = max(0, queue_depth) / max(1, capacity)
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
    key = _class_key(item)
    last = state.rr_last(key)
    after = [n for n in ordered if last is not None and n.node_id > last]
    chosen = (after or ordered)[0]
    state.rr_chose(key, chosen.node_id)
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
    config, runtime = state.config, _expected_runtime(item, state)

    def stays_long_enough(node: NodeView) -> bool:
        rtt = _rtt(node)
        rtt = config.default_rtt_s if rtt is None else rtt
        return node.contact_s is None or node.contact_s >= (runtime + rtt) * config.contact_safety

    return [n for n in nodes if stays_long_enough(n)]


def _expected_runtime(item: WorkItem, state: SchedulerState) -> float:
    """``contact_aware``: the item's ``expected_runtime_s``, else its model's estimate."""
    runtime = _seconds(item.params.get("expected_runtime_s"))
    return state.expected_runtime(_model_key(item)) if runtime is None else runtime


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


# --- a burst of placements -------------------------------------------------------------------


class _LoadIndex:
    """Nodes bucketed by load ratio (each bucket's ids sorted, as ``_least_loaded`` sorts its
    ties), the loads in a lazy min-heap: the least loaded of them without a scan."""

    __slots__ = ("_buckets", "_heap", "_load")

    def __init__(self, loads: Mapping[str, float]) -> None:
        self._load: dict[str, float] = {}
        self._buckets: dict[float, list[str]] = {}
        for node, load in loads.items():
            self._load[node] = load
            self._buckets.setdefault(load, []).append(node)
        for bucket in self._buckets.values():
            bucket.sort()
        self._heap = list(self._buckets)
        heapq.heapify(self._heap)

    def _add(self, node: str, load: float) -> bool:
        """Add ``node``; True if its load is new to the index."""
        self._load[node] = load
        bucket = self._buckets.get(load)
        if bucket is None:
            self._buckets[load] = [node]
            return True
        bisect.insort(bucket, node)
        return False

    def place(self, node: str, load: float | None) -> None:
        """``node`` now has ``load`` (None: it is full, out of the index until it is not)."""
        old = self._load.pop(node, None)
        if old is not None:
            bucket = self._buckets[old]
            del bucket[bisect.bisect_left(bucket, node)]
            if not bucket:
                del self._buckets[old]  # (its heap entry goes when it comes to the top)
        if load is not None and self._add(node, load):
            heap = self._heap
            if len(heap) > 2 * len(self._buckets) + 16:  # stale entries: rebuild
                heap[:] = self._buckets
                heapq.heapify(heap)
            else:
                heapq.heappush(heap, load)

    def least_loaded(self, exclude: frozenset[str], rng: random.Random) -> str | None:
        """What ``_least_loaded`` chooses among the nodes not in ``exclude`` (None: none)."""
        heap, buckets = self._heap, self._buckets
        while heap and heap[0] not in buckets:
            heapq.heappop(heap)
        if not heap:
            return None
        tied = self._without(heap[0], exclude)
        if not tied:  # every least-loaded node is excluded: the next loads, in order
            for load in sorted(buckets):
                if tied := self._without(load, exclude):
                    break
            else:
                return None
        return tied[0] if len(tied) == 1 else rng.choice(tied)

    def _without(self, load: float, exclude: frozenset[str]) -> list[str]:
        bucket, loads = self._buckets[load], self._load
        if not any(loads.get(node) == load for node in exclude):
            return bucket
        return [node for node in bucket if node not in exclude]


@dataclass(slots=True)
class _PlacementClass:
    """The nodes eligible for the items of one model and requirements (in view order), and
    what each policy keeps of them, built when first asked for."""

    key: tuple  # (model, requirements)
    nodes: list[NodeView]
    by_node: dict[str, NodeView]
    least_loaded: _LoadIndex | None = None
    by_id: list[str] | None = None  # round_robin
    gpu_tiers: list[_LoadIndex] | None = None  # capability: most free GPU memory first
    rtt_tiers: list[_LoadIndex] | None = None  # latency: lowest RTT first
    ranked: list[NodeView] | None = None  # model_affinity: highest rendezvous weight first
    in_contact: dict[tuple, _LoadIndex] = field(default_factory=dict)  # contact_aware


class BurstPlacer:
    """:func:`choose` for the items of one dispatch burst, over views that stay as they are
    but for the queue depths the caller's own in-flight counts raise as the burst goes.

    ``placer.choose(policy, item, exclude=X, rng=rng, state=state)`` returns what
    ``choose(policy, placer.views(), item, exclude=X | placer.full(), rng=rng, state=state)``
    returns, uses ``rng`` and changes ``state`` as it does, where ``views()`` are the views
    with each node's queue depth raised to its in-flight count (:meth:`set_in_flight`) where
    that is more, and ``full()`` the nodes with ``limit`` or more in flight. It narrows the
    nodes to each placement class (model, requirements) once, and keeps them indexed as the
    policies need (by load, id, free GPU memory, RTT, rendezvous weight, contact): an item is
    placed without rebuilding or scanning every view. Views with a node id twice are placed by
    :func:`choose` itself. Not thread-safe; the views' figures other than the queue depth
    must not change while it is used (a dispatch burst: nothing else runs meanwhile).
    """

    def __init__(
        self,
        views: Sequence[NodeView],
        in_flight: Mapping[str, int],
        *,
        limit: int | None = None,
    ) -> None:
        self._views = list(views)
        self._by_id = {view.node_id: view for view in self._views}
        self._unique = len(self._by_id) == len(self._views)
        self._limit = None if limit is None else max(1, limit)
        self._in_flight: dict[str, int] = {}
        self._full: set[str] = set()
        self._indexes: dict[str, list[_LoadIndex]] = {}  # node -> the indexes it is in
        self._classes: dict[tuple, _PlacementClass] = {}
        for node, count in in_flight.items():
            self._count(node, count)

    def views(self) -> list[NodeView]:
        """The views as :func:`choose` would be given them now."""
        return [
            replace(view, queue_depth=n) if (n := self._in_flight.get(view.node_id, 0))
            > view.queue_depth else view
            for view in self._views
        ]  # fmt: skip

    def full(self) -> frozenset[str]:
        """The nodes with ``limit`` or more items in flight (those of the views only)."""
        return frozenset(self._full)

    def set_in_flight(self, node: str, count: int) -> None:
        """``node`` now has ``count`` items in flight."""
        if self._count(node, count):
            load = self._load(node)
            for index in self._indexes.get(node, ()):
                index.place(node, load)

    def _count(self, node: str, count: int) -> bool:
        if node not in self._by_id:
            return False
        if count:
            self._in_flight[node] = count
        else:
            self._in_flight.pop(node, None)
        if self._limit is not None and count >= self._limit:
            self._full.add(node)
        else:
            self._full.discard(node)
        return True

    def _depth(self, view: NodeView) -> int:
        n = self._in_flight.get(view.node_id, 0)
        return n if n > view.queue_depth else view.queue_depth

    def _load(self, node: str) -> float | None:
        """The node's load ratio in the views, None while it is full."""
        if node in self._full:
            return None
        view = self._by_id[node]
        return _ratio(self._depth(view), view.capacity)

    def _index(self, nodes: Sequence[NodeView]) -> _LoadIndex:
        index = _LoadIndex({
            view.node_id: load for view in nodes if (load := self._load(view.node_id)) is not None
        })  # fmt: skip
        for view in nodes:
            self._indexes.setdefault(view.node_id, []).append(index)
        return index

    def _class(self, item: WorkItem) -> _PlacementClass:
        key = _class_key(item)
        found = self._classes.get(key)
        if found is None:
            nodes = eligible(self._views, item, frozenset())
            found = self._classes[key] = _PlacementClass(key, nodes, {n.node_id: n for n in nodes})
        return found

    def choose(
        self,
        policy: Policy | str,
        item: WorkItem,
        *,
        exclude: frozenset[str] = frozenset(),
        rng: random.Random,
        state: SchedulerState,
    ) -> str | None:
        """What :func:`choose` returns over :meth:`views`, leaving out ``exclude`` and the
        :meth:`full` nodes (see the class docstring). Raises ValueError for an unknown policy."""
        policy = Policy(policy)
        if not self._unique:
            views, exclude = self.views(), exclude | self._full
            return choose(policy, views, item, exclude=exclude, rng=rng, state=state)
        cls = self._class(item)
        if policy is Policy.LEAST_LOADED:
            return self._least_loaded(cls).least_loaded(exclude, rng)
        if policy is Policy.CAPABILITY:
            return self._capability(cls, item, exclude, rng, state)
        if policy is Policy.LATENCY:
            return self._latency(cls, exclude, rng)
        if policy is Policy.ROUND_ROBIN:
            return self._round_robin(cls, exclude, state)
        if policy is Policy.MODEL_AFFINITY:
            return self._model_affinity(cls, item, exclude, state)
        return self._contact_aware(cls, item, exclude, rng, state)

    def _least_loaded(self, cls: _PlacementClass) -> _LoadIndex:
        if cls.least_loaded is None:
            cls.least_loaded = self._index(cls.nodes)
        return cls.least_loaded

    def _tiers(self, nodes: Sequence[NodeView], key, *, reverse: bool) -> list[_LoadIndex]:
        """One index per value of ``key`` (None: not in any), in order of the value."""
        groups: dict[object, list[NodeView]] = {}
        for view in nodes:
            value = key(view)
            if value is not None:
                groups.setdefault(value, []).append(view)
        return [self._index(groups[value]) for value in sorted(groups, reverse=reverse)]

    def _first_of(self, tiers, cls, exclude, rng) -> str | None:
        for tier in tiers:
            if (node := tier.least_loaded(exclude, rng)) is not None:
                return node
        return self._least_loaded(cls).least_loaded(exclude, rng)

    def _capability(self, cls, item, exclude, rng, state) -> str | None:
        if item.input.rows < state.config.gpu_batch_rows:
            return self._least_loaded(cls).least_loaded(exclude, rng)
        if cls.gpu_tiers is None:
            gpu = lambda n: _free_gpu_memory(n) if n.has_gpu else None  # noqa: E731
            cls.gpu_tiers = self._tiers(cls.nodes, gpu, reverse=True)
        return self._first_of(cls.gpu_tiers, cls, exclude, rng)

    def _latency(self, cls, exclude, rng) -> str | None:
        if cls.rtt_tiers is None:
            cls.rtt_tiers = self._tiers(cls.nodes, _rtt, reverse=False)
        return self._first_of(cls.rtt_tiers, cls, exclude, rng)

    def _round_robin(self, cls, exclude, state) -> str | None:
        if cls.by_id is None:
            cls.by_id = sorted(view.node_id for view in cls.nodes)
        ids, last, full = cls.by_id, state.rr_last(cls.key), self._full
        start = len(ids) if last is None else bisect.bisect_right(ids, last)
        for node in itertools.chain(ids[start:], ids[:start]):
            if node not in exclude and node not in full:
                state.rr_chose(cls.key, node)
                return node
        return None

    def _model_affinity(self, cls, item, exclude, state) -> str | None:
        model = _model_key(item)
        if cls.ranked is None:
            weight = partial(_rendezvous_weight, model)
            cls.ranked = sorted(cls.nodes, key=lambda n: weight(n.node_id), reverse=True)
        home, full = state.affinity.get(model), self._full
        chosen = first = None
        view = cls.by_node.get(home)
        if view is not None and home not in exclude and home not in full:
            first = view  # the last home first, if it still qualifies
            chosen = view if self._depth(view) < max(1, view.capacity) else None
        if chosen is None:  # then the others, highest weight first: the first unsaturated
            for view in cls.ranked:
                node = view.node_id
                if node == home or node in exclude or node in full:
                    continue
                first = first or view
                if self._depth(view) < max(1, view.capacity):
                    chosen = view
                    break
        chosen = chosen or first
        if chosen is None:
            return None
        state.affinity[model] = chosen.node_id
        return chosen.node_id

    def _contact_aware(self, cls, item, exclude, rng, state) -> str | None:
        key = (_expected_runtime(item, state), state.config)
        index = cls.in_contact.get(key)
        if index is None:
            if len(cls.in_contact) >= _MAX_CONTACT_INDEXES:  # (runtimes of every kind)
                views, exclude = self.views(), exclude | self._full
                return choose(Policy.CONTACT_AWARE, views, item, exclude=exclude, rng=rng,
                              state=state)  # fmt: skip
            reachable = _in_contact_long_enough(cls.nodes, item, state)
            index = cls.in_contact[key] = self._index(reachable)
        return index.least_loaded(exclude, rng)


#: ``round_robin``: the placement classes whose last node :class:`SchedulerState` keeps.
_MAX_RR_CURSORS = 1024

#: ``contact_aware``: the expected runtimes of one class a burst keeps an index for.
_MAX_CONTACT_INDEXES = 16
