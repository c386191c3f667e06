"""A discrete-event packet network on a virtual clock, driving many sans-I/O cores.

:class:`VirtualNetwork` holds a virtual clock and one heap of timed entries: core timers,
packet deliveries and scheduled callbacks. It hands every packet a core emits to its
destination after a random latency, unless the (seeded) loss draw, a partition or a crashed
destination drops it. Loss and latency draw from two streams of their own, both derived from the
network's generator, and every packet draws both whether it is delivered or not: as long as
the traffic is the same, the k-th packet gets the same loss draw and the same delay at every loss
level, so one lost at a level is lost at every higher one (common random numbers across levels).
Cores only need the :class:`PacketCore` shape (``handle_packet``, ``tick``,
``next_deadline``, ``drain_packets``, ``drain_events``), so any sans-I/O protocol core can run
here; nothing sleeps, so a minute of a 1000-node fleet takes seconds of CPU.

Each node has a *generation*, bumped when it crashes or restarts: timers and in-flight packets of
an older generation are dropped (a restart loses its sessions). A core's timer is kept in the heap
once, at its earliest deadline; entries made stale by a later reschedule are skipped when popped.

:class:`MembershipCluster` builds a fleet of :class:`~meshinfer.proto.membership.Membership`
cores on top, with an event log and the helpers the membership tests and benchmark share.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshinfer.errors import LocalProtocolError, RemoteProtocolError
from meshinfer.proto.membership import Membership, MembershipConfig, MemberStatus, NodeState
from meshinfer.proto.membership_auth import RecordAuthenticator
from meshinfer.proto.membership_wire import AliveRecord, signed_body

_TIMER, _DELIVERY, _CALLBACK = 0, 1, 2


class PacketCore(Protocol):
    """What the network drives: a sans-I/O core with timers, packets out and events out."""

    def handle_packet(self, from_node: str, data: bytes, now: float) -> None: ...

    def tick(self, now: float) -> None: ...

    def next_deadline(self) -> float: ...

    def drain_packets(self) -> list[tuple[str, bytes]]: ...

    def drain_events(self) -> list[Any]: ...


@dataclass(slots=True)
class NetworkStats:
    """Packet counters of one run (sent counts every packet a core emitted)."""

    sent: int = 0
    bytes_sent: int = 0
    delivered: int = 0
    lost: int = 0  # random loss
    cut: int = 0  # partition
    undeliverable: int = 0  # destination down or restarted meanwhile
    protocol_errors: int = 0
    sent_by: dict[str, int] = field(default_factory=dict)
    bytes_by: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Node:
    core: PacketCore
    generation: int
    timer_at: float = float("inf")


EventHook = Callable[[float, str, Any], None]


class VirtualNetwork:
    """Virtual clock + lossy, partitionable packet delivery between cores."""

    def __init__(
        self,
        rng: random.Random,
        *,
        latency: tuple[float, float] = (0.001, 0.005),
        loss: float = 0.0,
        on_event: EventHook | None = None,
        strict: bool = True,
    ) -> None:
        """``strict``: a RemoteProtocolError from a core propagates (honest cores never provoke
        one); otherwise it is counted in ``stats.protocol_errors`` and the packet dropped.

        ``rng`` seeds the loss stream and the latency stream once, here; the network draws
        nothing more from it, so a generator shared with others is not perturbed by traffic."""
        self.rng = rng
        self._loss_rng = random.Random(rng.getrandbits(64))
        self._latency_rng = random.Random(rng.getrandbits(64))
        self.latency = latency  # checked by the property setters below
        self.loss = loss
        self.on_event = on_event
        #: Optional ``on_send(src, dst, data)``, called for every packet a core emits.
        self.on_send: Callable[[str, str, bytes], None] | None = None
        self.strict = strict
        self.now = 0.0
        self.stats = NetworkStats()
        self._nodes: dict[str, _Node] = {}
        self._generations: dict[str, int] = {}
        self._groups: dict[str, int] = {}
        self._heap: list[tuple[float, int, int, str, int, Any]] = []
        self._seq = 0

    @property
    def latency(self) -> tuple[float, float]:
        """One-way delay of every packet, uniform in ``(low, high)`` seconds, each direction."""
        return self._latency

    @latency.setter
    def latency(self, value: tuple[float, float]) -> None:
        low, high = value
        if not 0 <= low <= high < math.inf:  # a negative delay would turn the clock back
            raise ValueError(
                f"latency must be (low, high) with 0 <= low <= high < inf, got {value!r}"
            )
        self._latency = (low, high)

    @property
    def loss(self) -> float:
        """Probability that one packet is dropped, drawn for each packet."""
        return self._loss

    @loss.setter
    def loss(self, value: float) -> None:
        if not 0 <= value <= 1:  # NaN would silently mean no loss
            raise ValueError(f"loss must be a probability from 0 to 1, got {value!r}")
        self._loss = value

    # --- topology --------------------------------------------------------------------------

    def add(self, node_id: str, core: PacketCore) -> None:
        """Bring ``node_id`` up with ``core`` (a restart when it ran before)."""
        generation = self._generations.get(node_id, 0) + 1
        self._generations[node_id] = generation
        self._nodes[node_id] = _Node(core, generation)
        self._flush(node_id)

    def crash(self, node_id: str) -> None:
        """Stop ``node_id`` abruptly: its timers and the packets in flight to it are dropped."""
        self._nodes.pop(node_id, None)
        self._generations[node_id] = self._generations.get(node_id, 0) + 1

    def is_up(self, node_id: str) -> bool:
        """Whether ``node_id`` is running."""
        return node_id in self._nodes

    def core(self, node_id: str) -> PacketCore:
        """The running core of ``node_id``."""
        return self._nodes[node_id].core

    def up_nodes(self) -> list[str]:
        """Ids of the running nodes."""
        return list(self._nodes)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the links between the groups (nodes not named talk to everyone). A packet is
        dropped when its link is cut as it is sent or as it arrives (in flight across a cut).
        A node named in two groups is refused (ValueError): which side it is on would be a guess.
        A partition lasts until :meth:`heal` or the next ``partition`` call."""
        placed: dict[str, int] = {}
        for index, group in enumerate(groups):
            for node in group:
                if placed.setdefault(node, index) != index:
                    raise ValueError(f"partition: {node!r} is named in two groups")
        self._groups = placed

    def heal(self) -> None:
        """Remove every partition."""
        self._groups = {}

    def generation(self, node_id: str) -> int:
        """How many times ``node_id`` was started or crashed (changes on every restart)."""
        return self._generations.get(node_id, 0)

    def _cut(self, src: str, dst: str) -> bool:
        a, b = self._groups.get(src), self._groups.get(dst)
        return a is not None and b is not None and a != b

    # --- driving ---------------------------------------------------------------------------

    def call(self, node_id: str, action: Callable[[Any, float], None]) -> None:
        """Run ``action(core, now)`` on a running node (an API call), then collect its output."""
        action(self._nodes[node_id].core, self.now)
        self._flush(node_id)

    def schedule(self, at: float, callback: Callable[[float], None]) -> None:
        """Run ``callback(now)`` at virtual time ``at`` (a time already past means now)."""
        if math.isnan(at):  # a NaN in the heap would stop run_until at it for good
            raise ValueError("schedule: at is NaN")
        self._push(max(at, self.now), _CALLBACK, "", 0, callback)

    def inject(self, src: str, dst: str, data: bytes) -> None:
        """Send ``data`` as if ``src`` had (fault injection: forged or malformed packets)."""
        self._send(src, dst, data)

    def run_until(self, until: float) -> None:
        """Process everything due up to ``until``, then set the clock to ``until``.

        ``until`` must be finite (ValueError): NaN would silently do nothing, and infinity
        never returns while a core keeps a timer (or stops the clock at infinity)."""
        if not math.isfinite(until):
            raise ValueError(f"run_until: until must be a finite time, got {until!r}")
        heap = self._heap
        while heap and heap[0][0] <= until:
            at, _, kind, node_id, generation, payload = heapq.heappop(heap)
            self.now = at
            if kind == _DELIVERY:
                self._deliver(node_id, generation, payload)
            elif kind == _TIMER:
                self._fire(node_id, generation, at)
            else:
                payload(at)
        self.now = max(self.now, until)

    def run_for(self, duration: float) -> None:
        """Advance the clock by ``duration``."""
        self.run_until(self.now + duration)

    # --- internals -------------------------------------------------------------------------

    def _push(self, at: float, kind: int, node_id: str, generation: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, node_id, generation, payload))

    def _fire(self, node_id: str, generation: int, at: float) -> None:
        node = self._nodes.get(node_id)
        if node is None or node.generation != generation or node.timer_at != at:
            return  # crashed, restarted or rescheduled meanwhile
        node.timer_at = float("inf")
        node.core.tick(at)
        self._flush(node_id)
        if node.timer_at <= at:
            raise LocalProtocolError(f"{node_id}: core asks for a tick at {node.timer_at} <= {at}")

    def _deliver(self, node_id: str, generation: int, payload: tuple[str, bytes]) -> None:
        node = self._nodes.get(node_id)
        if node is None or node.generation != generation:
            self.stats.undeliverable += 1
            return
        if self._groups and self._cut(payload[0], node_id):  # cut while in flight
            self.stats.cut += 1
            return
        self.stats.delivered += 1
        try:
            node.core.handle_packet(payload[0], payload[1], self.now)
        except RemoteProtocolError:
            self.stats.protocol_errors += 1
            if self.strict:
                raise
        self._flush(node_id)

    def _flush(self, node_id: str) -> None:
        node = self._nodes[node_id]
        for to_node, data in node.core.drain_packets():
            self._send(node_id, to_node, data)
        if self.on_event is not None:
            for event in node.core.drain_events():
                self.on_event(self.now, node_id, event)
        deadline = node.core.next_deadline()
        if math.isnan(deadline):  # it would never be pushed: the core would stop ticking
            raise LocalProtocolError(f"{node_id}: core asks for a tick at NaN")
        deadline = max(deadline, self.now)  # overdue: now, never back in time
        if deadline < node.timer_at:
            node.timer_at = deadline
            self._push(deadline, _TIMER, node_id, node.generation, None)

    def _send(self, src: str, dst: str, data: bytes) -> None:
        stats = self.stats
        stats.sent += 1
        stats.bytes_sent += len(data)
        stats.sent_by[src] = stats.sent_by.get(src, 0) + 1
        stats.bytes_by[src] = stats.bytes_by.get(src, 0) + len(data)
        if self.on_send is not None:
            self.on_send(src, dst, data)
        # both drawn for every packet, even at no loss: see the module's docstring
        lost, delay = self._loss_rng.random() < self.loss, self._latency_rng.uniform(*self.latency)
        if lost:
            stats.lost += 1
            return
        if self._groups and self._cut(src, dst):
            stats.cut += 1
            return
        target = self._nodes.get(dst)
        if target is None:
            stats.undeliverable += 1
            return
        self._push(self.now + delay, _DELIVERY, dst, target.generation, (src, data))


# --- a fleet of membership cores ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One membership event as the cluster saw it."""

    at: float
    observer: str
    kind: str  # MemberEventKind value
    subject: str
    incarnation: int
    version: int


class MembershipCluster:
    """N :class:`Membership` cores on a :class:`VirtualNetwork`, with an event log.

    ``authenticator_for(node_id)`` (optional) gives each core its record authenticator.
    ``seed`` seeds two independent streams: ``rng`` (each core's generator and each node's
    made-up state, drawn as nodes start) and the network's loss and latency draws. Traffic never
    moves ``rng``, so a node gets the same generator and state at every loss or latency setting.
    """

    def __init__(
        self,
        config: MembershipConfig,
        *,
        seed: int = 0,
        loss: float = 0.0,
        latency: tuple[float, float] = (0.001, 0.005),
        authenticator_for: Callable[[str], RecordAuthenticator | None] | None = None,
        keep_log: bool = True,
    ) -> None:
        self.config = config
        self.rng = random.Random(seed)
        self.log: list[LoggedEvent] = []
        self.keep_log = keep_log
        self.hooks: list[EventHook] = []
        network_rng = random.Random(f"meshinfer/virtual-network/{seed!r}")
        self.network = VirtualNetwork(
            network_rng, latency=latency, loss=loss, on_event=self._record
        )
        self._authenticator_for = authenticator_for or (lambda node_id: None)
        self._states: dict[str, NodeState] = {}

    @property
    def now(self) -> float:
        """The virtual clock."""
        return self.network.now

    def node_ids(self) -> list[str]:
        """Every node ever added, running or not."""
        return list(self._states)

    def up(self) -> list[str]:
        """The running nodes."""
        return self.network.up_nodes()

    def membership(self, node_id: str) -> Membership:
        """The running core of ``node_id``."""
        return self.network.core(node_id)  # type: ignore[return-value]

    # --- building --------------------------------------------------------------------------

    def start_node(
        self,
        node_id: str,
        *,
        seeds: Iterable[str] = (),
        known: Iterable[AliveRecord] = (),
    ) -> Membership:
        """Start (or restart, with no memory) ``node_id`` and join it through ``seeds``."""
        state = self._states.setdefault(node_id, self._state_for(len(self._states), node_id))
        core = Membership(
            node_id,
            state,
            self.config,
            random.Random(self.rng.getrandbits(64)),
            self.now,
            authenticator=self._authenticator_for(node_id),
            known_members=known,
        )
        self.network.add(node_id, core)
        seeds = list(seeds)
        if seeds:
            self.network.call(node_id, lambda c, now: c.join(seeds, now))
        return core

    def join_all(self, count: int, *, spacing: float = 0.05, prefix: str = "n") -> list[str]:
        """Start ``count`` nodes, each joining through the first running node (or, in an empty
        cluster, the first of them), ``spacing`` seconds apart. ``count`` 0 starts none."""
        if not 0 <= spacing < math.inf:
            raise ValueError(f"join_all: spacing must be finite and >= 0, got {spacing!r}")
        ids = self._new_ids(count, prefix)
        if not ids:
            return []
        seeds = self.up()[:1]
        self.start_node(ids[0], seeds=seeds)
        for node_id in ids[1:]:
            self.network.run_for(spacing)
            self.start_node(node_id, seeds=seeds or ids[:1])
        return ids

    def warm_start(self, count: int, *, prefix: str = "n") -> list[str]:
        """Start ``count`` nodes that already know each other (a converged fleet, no gossip).
        A second call starts another such fleet, with hosts of its own, that knows only itself."""
        ids = self._new_ids(count, prefix)
        for node_id in ids:
            self._states[node_id] = self._state_for(len(self._states), node_id)
        records = [self._signed(AliveRecord(n, 0, 1, self._states[n])) for n in ids]
        for node_id in ids:
            self.start_node(node_id, known=records)
        return ids

    def _new_ids(self, count: int, prefix: str) -> list[str]:
        """``count`` fresh node ids; ValueError for a negative count or an id already used."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        ids = [f"{prefix}{len(self._states) + i:04d}" for i in range(count)]
        taken = [node_id for node_id in ids if node_id in self._states]
        if taken:
            raise ValueError(f"node ids already in the cluster: {', '.join(taken)}")
        return ids

    def _signed(self, record: AliveRecord) -> AliveRecord:
        """``record`` with its author's proof, as its core would have signed it."""
        authenticator = self._authenticator_for(record.node_id)
        if authenticator is None:
            return record
        proof = authenticator.sign(signed_body(record))
        return AliveRecord(record.node_id, record.incarnation, record.version, record.state, proof)

    def _state_for(self, index: int, node_id: str) -> NodeState:
        """A made-up state; a node whose authenticator has a certificate announces its key."""
        key = self.rng.randbytes(32)  # drawn either way: the same seed, the same trace
        certified = getattr(self._authenticator_for(node_id), "static_public", None)
        return NodeState(
            host=f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}",
            port=7946,
            static_key=certified or key,
            roles=("vehicle",),
            links=("v2v",),
            gpu_free_mb=8192,
        )

    # --- faults ----------------------------------------------------------------------------

    def crash(self, node_id: str) -> None:
        """Kill ``node_id`` abruptly."""
        self.network.crash(node_id)

    def restart(self, node_id: str, seeds: Iterable[str]) -> Membership:
        """Restart a crashed node with no memory (incarnation 0) and join through ``seeds``."""
        self.network.crash(node_id)
        return self.start_node(node_id, seeds=seeds)

    def leave(self, node_id: str, *, poll: float = 0.1, linger: float = 30.0) -> None:
        """Leave gracefully; the node stops once its LEFT news is out (or after ``linger``).

        ``poll`` must be finite and > 0, ``linger`` finite and >= 0 (ValueError, before the core
        leaves): a ``poll`` of 0 re-checks at one instant for ever, a NaN ``linger`` never ends."""
        if not (0 < poll < math.inf and 0 <= linger < math.inf):
            raise ValueError(
                f"leave: poll must be finite and > 0, linger finite and >= 0, got {poll!r}, "
                f"{linger!r}"
            )
        self.network.call(node_id, lambda core, now: core.leave(now))
        generation = self.network.generation(node_id)
        give_up = self.now + linger

        def check(now: float) -> None:
            if self.network.generation(node_id) != generation:
                return
            if self.membership(node_id).leave_announced or now >= give_up:
                self.network.crash(node_id)
            else:
                self.network.schedule(now + poll, check)

        self.network.schedule(self.now + poll, check)

    # --- observing -------------------------------------------------------------------------

    def run_for(self, duration: float) -> None:
        """Advance the virtual clock by ``duration``."""
        self.network.run_for(duration)

    def run_until(self, done: Callable[[], bool], *, timeout: float, step: float = 0.1) -> bool:
        """Advance in ``step``s until ``done()``; False if ``timeout`` virtual seconds passed.

        ``timeout`` must be finite and ``step`` positive and large enough to move the clock
        (ValueError): either would otherwise loop for ever on a condition that never comes true
        (a partition that never heals)."""
        if not (math.isfinite(timeout) and 0 < step < math.inf):
            raise ValueError(
                f"run_until: timeout must be finite and step > 0, got {timeout!r}, {step!r}"
            )
        end = self.now + timeout
        while not done():
            if self.now >= end:
                return False
            if self.now + step == self.now:  # below the clock's precision: it would never move
                raise ValueError(f"run_until: step {step!r} does not move the clock at {self.now}")
            self.network.run_for(step)
        return True

    def view(self, observer: str) -> dict[str, tuple[MemberStatus, int, int]]:
        """``observer``'s table: subject -> (status, incarnation, state version), self included."""
        core = self.membership(observer)
        view = {m.node_id: (m.status, m.incarnation, m.version) for m in core.members()}
        local = core.local_member
        view[observer] = (local.status, local.incarnation, local.version)
        return view

    def live_view(self, observer: str) -> dict[str, tuple[int, int]]:
        """The live members ``observer`` sees: subject -> (incarnation, version)."""
        return {
            subject: (incarnation, version)
            for subject, (status, incarnation, version) in self.view(observer).items()
            if status is MemberStatus.ALIVE
        }

    def converged(self) -> bool:
        """Every running node sees exactly the running nodes alive, with the same versions."""
        up = sorted(self.up())
        views = [self.live_view(node_id) for node_id in up]
        return all(sorted(v) == up for v in views) and all(v == views[0] for v in views)

    def _record(self, at: float, observer: str, event: Any) -> None:
        member = event.member
        if self.keep_log:
            self.log.append(
                LoggedEvent(
                    at,
                    observer,
                    event.kind.value,
                    member.node_id,
                    member.incarnation,
                    member.version,
                )
            )
        for hook in self.hooks:
            hook(at, observer, event)
