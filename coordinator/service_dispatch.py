"""Dispatching work items, from the ready queue to a node: a part of
:class:`~coordinator.service.Coordinator` (the flow is in :mod:`coordinator.service`).

:class:`Dispatch` is a mixin of ``Coordinator`` and works on its state (``_items``, ``_busy``,
``_ready``, ``_parked``, ``_timers``, ``_sets_of``: see ``Coordinator.__init__``). It holds

* queuing: a task's ready items go to the ready queue (a large input is hashed first, see
  :mod:`coordinator.input_refs`); the dispatch loop takes them highest priority first;
* placement: the task's scheduling policy chooses among the views of the reachable live
  members whose certificate is not revoked (``_views``; what is kept of each member's gossip:
  ``_known``; read once per burst of items queued together, placed from its second item on by
  a ``BurstPlacer``: ``_read_burst``), leaving out full nodes and, while another fits, those
  the item was on (a retry waits for a slot on a full node it was not on rather than go back;
  a recovered item's earlier attempts count); an item no node takes is parked with its
  placement class until a slot frees, membership or a node's reachability changes, or a
  second passes (``_parked_loop``);
* sending: the ``TaskAssign`` (with what is left of the task's deadline; its input by
  reference where the node keeps it), a send that cannot be queued or is dropped unwritten
  retried as a refusal, and the item's one timer: its dispatch journaled once overdue
  (``running_mark_delay_s``), then its timeout (``item_timeout_s``).

Every method runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Any, NamedTuple

from coordinator.runs import ItemRun, TaskRun
from coordinator.service_config import Attempt
from meshinfer.proto.contact import infrastructure_positions, node_contact_s
from meshinfer.proto.scheduling import (
    BurstPlacer,
    NodeView,
    Policy,
    choose,
    eligible,
    requirements,
)
from meshinfer.proto.tasks_wire import TaskAssign
from meshinfer.runtime.loop import pop_timer, replace_timer


class _KnownState(NamedTuple):
    """What :meth:`Coordinator._views` keeps of a member, as of its gossiped state object
    (``state``; a new object, gossiped anew, is read again): its models (id, version), roles
    and links as sets, and when (loop time) its position and velocity, as they are, arrived
    here (membership's ``Member.position_at``; the age
    :func:`~meshinfer.proto.contact.node_contact_s` takes runs from it)."""

    state: Any
    models: frozenset[tuple[str, str]]
    roles: frozenset[str]
    links: frozenset[str]
    placed_at: float


class Dispatch:
    """Queuing, placing and sending work items (a mixin of ``Coordinator``: see the module
    docstring)."""

    #: The burst's placements from its second item on (see :meth:`_read_burst`).
    _burst_placer: BurstPlacer | None = None

    def _schedule_ready(self, run: TaskRun, attempts: Mapping[str, Attempt]) -> None:
        """Queue the task's items that are ready; ``attempts``: item id -> :data:`Attempt` as
        the journal has it (recovery), else a first attempt."""
        for item in run.ready():
            attempt, refused, sent = attempts.get(item.item_id, (1, 0, frozenset()))
            entry = ItemRun.at_attempt(item, attempt, refused=refused)
            entry.sent.update(sent)  # earlier attempts went there: only their results count
            if sent:  # and it is retried on another node while one fits, as before the restart
                entry.tried.update(node for _, node in sent)
                entry.last = max(sent)[1]
            run.items[item.item_id] = entry
            self._items[item.item_id] = (run, entry)
            # a large input is hashed in a worker thread first (coordinator.input_refs)
            self._inputs.when_hashed(run, entry, self._queue, item.item_id, run.spec.priority)
        self._arm_aggregation_timeout(run)

    def _queue(self, item_id: str, priority: int) -> None:
        self._ready.put_nowait((-priority, next(self._seq), item_id))

    async def _dispatch_loop(self) -> None:
        while True:
            if self._ready.empty():  # it waits: what the views rest on may change meanwhile
                self._burst_views = self._burst_placer = None
            _, _, item_id = await self._ready.get()
            pair = self._items.get(item_id)
            if pair is None or pair[1].node is not None or pair[0].done:
                # cancelled or finished meanwhile, or out already: queued twice (a retry's
                # timer, or a hash's callback for a task id pruned and submitted again); or
                # its task's end is decided, being journaled: it would only be called back
                continue
            run, entry = pair
            entry.retrying = None  # (its backoff is over: now it waits for a node, if any)
            self._read_burst()
            node = self._choose(run, entry)
            if node is None:
                heap = self._parked.setdefault(self._placement(run, entry), [])
                heapq.heappush(heap, (-run.spec.priority, next(self._seq), item_id))
                continue
            self._send(run, entry, node)

    def _read_burst(self) -> None:
        """Before an item of the burst is placed: the views are read once for the items queued
        together (``_burst_views``); from the burst's second item on, a
        :class:`~meshinfer.proto.scheduling.BurstPlacer` over them places each item as
        :func:`~meshinfer.proto.scheduling.choose` over :meth:`_views` would, without a pass
        over every view per item (``_assign`` tells it the in-flight counts as they change)."""
        if self._burst_views is None:
            self._burst_views = self._view_bases()
        elif self._burst_placer is None:
            limit = self.config.max_in_flight_per_node
            self._burst_placer = BurstPlacer(self._burst_views, self._busy, limit=limit)

    def _choose(self, run: TaskRun, entry: ItemRun) -> str | None:
        policy = run.spec.policy or self.config.default_policy
        kw = {"rng": self.rng, "state": self.scheduler}
        if (placer := self._burst_placer) is not None:  # (it leaves out the full nodes)
            place, full = partial(placer.choose, policy, entry.item, **kw), frozenset()
        else:
            place = partial(choose, policy, self._views(), entry.item, **kw)
            full = self._full_nodes()
        node = place(exclude=frozenset(entry.tried) | full)
        if node is None and entry.tried:
            if self._untried_full(entry):  # one it was not on takes it once a slot frees there
                return None  # (parked: a retry goes back to a node it failed on only if no
                # other can take it, not because the others are busy this moment)
            # every capable node had it once: allow repeats, but
            if entry.last is not None:  # not the one it just came back from while another fits
                node = place(exclude=full | {entry.last})
            if node is None:
                node = place(exclude=full)
        return node

    def _untried_full(self, entry: ItemRun) -> bool:
        """Whether a node the item was not on could take it but for its full slots (read
        from the views the dispatch loop read for its burst; a pure check: the policies keep
        state, which a trial placement would move)."""
        waiting = self._full_nodes() - entry.tried
        if not waiting:
            return False
        views = self._burst_views if self._burst_views is not None else self._view_bases()
        return bool(eligible([v for v in views if v.node_id in waiting], entry.item, frozenset()))

    def _full_nodes(self) -> frozenset[str]:
        """The nodes with ``max_in_flight_per_node`` items of this coordinator on them."""
        limit = self.config.max_in_flight_per_node
        return frozenset(n for n, k in self._busy.items() if k >= limit)

    def _assign(self, entry: ItemRun, node: str | None) -> None:
        """Move a live item to ``node`` (None: to no node), keeping ``_busy`` in step."""
        placer = self._burst_placer
        if entry.node:
            self._busy[entry.node] -= 1
            if not self._busy[entry.node]:
                del self._busy[entry.node]
            if placer is not None:
                placer.set_in_flight(entry.node, self._busy[entry.node])
            self._wake_parked.set()  # a slot on that node is free again
        entry.node = node
        if node:
            self._busy[node] += 1
            if placer is not None:
                placer.set_in_flight(node, self._busy[node])

    def _drop(self, item_id: str) -> tuple[TaskRun, ItemRun] | None:
        """The item is no longer live here (answered, failed, or its task ended)."""
        pair = self._items.pop(item_id, None)
        if pair is not None:
            self._assign(pair[1], None)
        return pair

    def _views(self, *, keep: bool = True) -> list[NodeView]:
        """What the scheduling policies see of each reachable live member, with the items this
        coordinator has on each node (``_busy``) as its queue depth where they are more than it
        gossiped: read now, or from the views the dispatch loop read for its current burst
        (``keep``: see :meth:`_known`)."""
        in_flight = self._busy
        if self._burst_views is None:
            return self._view_bases(in_flight, keep=keep)
        return [
            replace(view, queue_depth=n) if (n := in_flight.get(view.node_id, 0)) > view.queue_depth
            else view
            for view in self._burst_views
        ]  # fmt: skip

    def _view_bases(
        self, in_flight: Mapping[str, int] | None = None, *, keep: bool = True
    ) -> list[NodeView]:
        """What the scheduling policies see of each reachable live member, its queue depth as
        it gossiped it, or the items ``in_flight`` on it where more (:meth:`_views`). A member whose
        certificate is revoked is left out whatever membership says of it
        (:mod:`coordinator.certificates`). The dispatch loop reads them once for the items
        queued together (``_burst_views``, None while it waits: no other task runs between
        those items, so membership, reachability and revocations stay as they are; its sends
        change only ``_busy``). ``keep``: see :meth:`_known`."""
        membership = self.mesh.membership
        if membership is None:
            return []
        views, live = [], membership.core.live_members()
        infrastructure = infrastructure_positions(m.state for m in live)
        now = self._loop.time()
        for m in live:
            if not self._reach.reachable(m) or self._certificates.revoked(m.node_id):
                continue
            s = m.state
            known = self._known(m, now, keep=keep)
            views.append(NodeView(
                node_id=m.node_id, alive=m.status.value == "alive", models=known.models,
                roles=known.roles, has_gpu=s.gpu_free_mb > 0,
                free_gpu_memory=s.gpu_free_mb << 20 if s.gpu_free_mb else None,
                queue_depth=max(s.queue_depth, in_flight.get(m.node_id, 0)) if in_flight
                else s.queue_depth,
                capacity=self.config.node_capacity, rtt_s=membership.core.rtt(m.node_id),
                links=known.links,
                contact_s=node_contact_s(
                    s, infrastructure, self.config.radio_range_m, age_s=now - known.placed_at
                ),
            ))  # fmt: skip
        if keep and len(self._sets_of) > 2 * len(views) + 64:  # members gone for good: forget
            self._sets_of = {v.node_id: self._sets_of[v.node_id] for v in views}
        return views

    def _known(self, member: Any, now: float, *, keep: bool = True) -> _KnownState:
        """What is kept of ``member`` (a membership snapshot) as of its gossiped state (read
        again once that object is new). Its position is aged from when membership received it
        (``member.position_at``: a newer record that does not move the member keeps it), read
        or not by the dispatcher before; from when the dispatcher first read it (or ``now``)
        only where membership did not record it. ``keep=False`` (an API read: ``nodes``,
        ``waiting``) keeps nothing new: a member the dispatcher did not read yet, or not as of
        ``state``, gets a throwaway entry, so what the scheduler sees does not hang on whether,
        and when, someone asked."""
        node, state = member.node_id, member.state
        known = self._sets_of.get(node)
        if known is None or known.state is not state:
            placed_at = member.position_at
            if placed_at is None:  # (not recorded: its age starts at the dispatcher's read)
                same_place = known is not None and _motion(known.state) == _motion(state)
                placed_at = known.placed_at if same_place else now
            known = _KnownState(
                state=state,
                models=frozenset((x.model_id, x.version) for x in state.models),
                roles=frozenset(state.roles),
                links=frozenset(state.links),
                placed_at=placed_at,
            )
            if keep:
                self._sets_of[node] = known
        return known

    def _send(self, run: TaskRun, entry: ItemRun, node: str) -> None:
        self._assign(entry, node)
        entry.tried.add(node)
        entry.sent.add((entry.attempt, node))
        entry.last = node
        entry.dispatched_at = self._loop.time()
        self.stats_.dispatched += 1
        if not self._send_message(run, entry, node):
            return
        # Journaled only if its result is overdue (see the module docstring).
        item_id, attempt = entry.item.item_id, entry.attempt
        delay = self.config.running_mark_delay_s
        if delay < self.config.item_timeout_s:
            self._set_timer(item_id, delay, self._dispatch_overdue, item_id, attempt)
        else:
            self._set_timer(item_id, self.config.item_timeout_s, self._on_timeout, item_id, attempt)

    def _message(self, run: TaskRun, entry: ItemRun, node: str) -> TaskAssign:
        """The item's TaskAssign for ``node``: what is left of the task's deadline, the input
        by reference or to be kept where ``node``'s input cache allows."""
        msg = entry.item.to_message()
        if run.expires_at is not None:  # what is left of the task's budget
            msg = replace(msg, deadline_s=max(0.0, run.expires_at - self._loop.time()))
        return self._inputs.message(run, entry, node, msg)

    def _forget_mirror(self, node: str) -> None:
        """What ``node`` keeps of ours is no longer known (a session with it ended without its
        Close frame, so what was queued on it may never have arrived; a send failed; it died,
        left or was given up on)."""
        self._inputs.forget_node(node)

    def _resend_input(self, run: TaskRun, entry: ItemRun, node: str) -> None:
        """``node`` does not hold the input this attempt named by reference: the same attempt
        goes again with the bytes (not a retry: the node ran nothing)."""
        self._inputs.missed(node, entry)
        self._send_message(run, entry, node)

    def _send_message(self, run: TaskRun, entry: ItemRun, node: str) -> bool:
        """Send the item's TaskAssign to ``node``; if it cannot even be queued, forget what the
        mirror now believes the node keeps and retry the item elsewhere (and the same, later,
        if it is dropped unwritten: :meth:`_unsent`)."""
        unsent = partial(self._unsent, entry.item.item_id, entry.attempt, node)
        if self.mesh.peers.send(node, self._message(run, entry, node), on_failure=unsent):
            self._inputs.queued(entry)
            return True
        self._never_got(run, entry, node, f"could not send to {node}")
        return False

    def _unsent(self, item_id: str, attempt: int, node: str, error: BaseException) -> None:
        """The TaskAssign of this attempt was queued for ``node`` but dropped before it was
        written (no session could be had: e.g. a restarted node not yet found at its new
        address): the node never saw it, so retry it now rather than after its timeout."""
        pair = self._items.get(item_id)
        if pair is None or self._closed:
            return
        run, entry = pair
        if entry.sent_to(attempt, node):
            self._never_got(run, entry, node, f"could not send to {node}: {error}")

    def _never_got(self, run: TaskRun, entry: ItemRun, node: str, reason: str) -> None:
        """``node`` never got this attempt: what the mirror believes it keeps is unknown now,
        and the item is retried as a refusal (see :meth:`_retry`)."""
        self._forget_mirror(node)
        self._retry(run, entry, reason, backoff=True, ran=False)

    def _dispatch_overdue(self, item_id: str, attempt: int) -> None:
        """The item's result is not in ``running_mark_delay_s`` after its dispatch: journal the
        dispatch, then watch for the item's timeout."""
        pair = self._items.get(item_id)
        if pair is None or pair[1].attempt != attempt or self._closed:
            return
        self._journal_dispatch(pair[1])
        remaining = self.config.item_timeout_s - self.config.running_mark_delay_s
        self._set_timer(item_id, remaining, self._on_timeout, item_id, attempt)

    def _journal_dispatch(self, entry: ItemRun) -> None:
        """Journal the item's current dispatch unless that is done or a vouched result of it is
        queued (``take_result(sent_to=...)`` records the dispatch). Told, not waited for: the
        journal's thread runs it before anything queued later (a failure, a result)."""
        item_id, attempt = entry.item.item_id, entry.attempt
        if entry.node is None or entry.journaled == attempt:
            return
        entry.journaled = attempt
        self._db.tell("mark_dispatched", item_id, entry.node, attempt)

    def _set_timer(self, item_id: str, delay: float, callback, *args: object) -> None:
        """The item's one timer (its dispatch mark or its timeout), replacing any before."""
        replace_timer(self._timers, item_id, self._loop.call_later(delay, callback, *args))

    def _on_timeout(self, item_id: str, attempt: int) -> None:
        pair = self._items.get(item_id)
        if pair is not None and pair[1].attempt == attempt:
            run, entry = pair
            self._retry(run, entry, f"no answer from {entry.node} in {self.config.item_timeout_s}s")

    def _placement(self, run: TaskRun, entry: ItemRun) -> tuple:
        """Items of one class fit the same nodes: model, policy and requirements, and under
        ``contact_aware`` the runtime they give (a short one fits nodes leaving sooner). If the
        first of a class fits nowhere, none of the class does (a node an item failed on is only
        avoided while another fits)."""
        model, params = entry.item.model, entry.item.params
        policy = run.spec.policy or self.config.default_policy
        key = (model.model_id, model.version, policy, *requirements(params))
        if policy == Policy.CONTACT_AWARE:
            return (*key, params.get("expected_runtime_s"))
        return key

    async def _parked_loop(self) -> None:
        """Items no node could take wait here, per placement class, until a slot frees,
        membership or a node's reachability changes, or 1 s passes. Then as many of a class's
        items as the reachable nodes serving its model have free slots are tried again, highest
        priority first: a large batch waiting for slots is not re-scheduled whole on every
        result, and a class that fits nowhere holds back no other class."""
        loop = self._loop
        swept_at = loop.time()
        while True:
            self._wake_parked.clear()
            try:
                async with asyncio.timeout(1.0):
                    await self._wake_parked.wait()
            except TimeoutError:
                pass
            if not self._parked:
                continue
            # once a second, by the clock: a busy fleet's gossip and results wake this loop
            # more often than that, and a class no node takes would keep its ended items
            sweep = loop.time() - swept_at >= 1.0
            if sweep:
                swept_at = loop.time()
            free = self._free_slots()
            for key, heap in list(self._parked.items()):
                if sweep:  # drop the entries of items that ended or were cancelled meanwhile
                    heap[:] = [e for e in heap if e[2] in self._items]
                    heapq.heapify(heap)
                budget = free[key[:2]]
                while budget > 0 and heap:
                    _, _, item_id = heapq.heappop(heap)
                    pair = self._items.get(item_id)
                    if pair is not None:
                        self._queue(item_id, pair[0].spec.priority)
                        budget -= 1
                if not heap:
                    del self._parked[key]

    def _free_slots(self) -> Counter[tuple[str, str]]:
        """Per model: the items the reachable nodes serving it could take now (per-node cap;
        a node serving several models counts for each)."""
        cap, free = self.config.max_in_flight_per_node, Counter()
        for view in self._view_bases():  # (models only: no in-flight counts needed)
            room = cap - self._busy[view.node_id]
            if room > 0:
                for model in view.models:
                    free[model] += room
        return free

    def _cancel_timer(self, item_id: str) -> None:
        pop_timer(self._timers, item_id)


def _motion(state: Any) -> tuple[object, object]:
    """A gossiped state's position and velocity (a change restarts the position's age)."""
    return state.position, state.velocity
