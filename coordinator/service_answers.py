"""What nodes and membership tell the coordinator: answers about work items (accepted, a
result, a failure) and the loss of a node. A part of :class:`~coordinator.service.Coordinator`
(the rules are in :mod:`coordinator.service`).

:class:`NodeAnswers` is a mixin of ``Coordinator`` and works on its state (``_items``,
``_answered``, ``_lost_while_answered``, ``_failing``: see ``Coordinator.__init__``). It holds

* results: an answer counts only from the node its attempt went to (or, for an earlier
  attempt, one the journal has it dispatched to; others are refused: ``foreign_results``); a
  result is journaled once (``take_result``, with the task's end when it alone decides it:
  ``_ending_with``), then recorded in the task's run and credited to a node (``_credited``,
  ``completed_by_node``); a result taken calls back the other attempts of its item
  still out (a later one, or an earlier one that timed out: it runs on);
* accepts and failures: a running mark journaled only once overdue; a failure retried (a
  refusal does not count) or failed for good; ``INPUT_NOT_CACHED`` sends the same attempt
  again with the input's bytes;
* losses: the items of a node that died or left, or answered no ping after a lost session
  (:mod:`coordinator.failover`), are retried at once (one whose result is being journaled once
  that is handled: ``_answer_handled``); a node reachable again gets its items sent again
  under the same attempt.

Every method runs on the coordinator's event loop.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from coordinator.journal import TaskEnd, TaskEnding, TaskRecord
from coordinator.runs import ItemRun, Outcome, TaskRun, encode_outcome
from coordinator.service_config import (
    _TRANSIENT,
    KEEP_GONE_NODES,
    fold_gone_nodes,
)
from meshinfer.proto import messages
from meshinfer.proto.membership import MemberEvent, MemberEventKind
from meshinfer.proto.tasks import TaskState
from meshinfer.proto.tasks_wire import (
    REFUSALS,
    FailureKind,
    TaskAccepted,
    TaskCancel,
    TaskFailed,
    TaskResult,
)

log = logging.getLogger("coordinator.service")  # the Coordinator's one logger, as before the split


class NodeAnswers:
    """Taking answers from nodes and handling node losses (a mixin of ``Coordinator``: see the
    module docstring)."""

    def _on_accepted(self, peer: str, msg: TaskAccepted) -> None:
        pair = self._items.get(msg.item_id)
        if pair is None or not self._started or not pair[1].sent_to(msg.attempt, peer):
            return  # stale: e.g. a send before a restart (the same attempt is sent again)
        self._loop.call_later(
            self.config.running_mark_delay_s, self._mark_running, msg.item_id, msg.attempt
        )

    def _mark_running(self, item_id: str, attempt: int) -> None:
        """Journal the item as running unless its result (or a retry) came first."""
        pair = self._items.get(item_id)
        if pair is None or pair[1].attempt != attempt or not self._started or self._closed:
            return
        self._journal_dispatch(pair[1])  # first, if its own timer has not fired yet
        self._db.tell("mark_running", item_id, attempt)

    def _on_result(self, peer: str, msg: TaskResult) -> None:
        if not self._recovered:  # its item may not be live yet, to take a result the journal
            return  # takes: recovery sends it again, and its node answers that send
        self._answered[msg.item_id] += 1  # being journaled: not to be re-dispatched meanwhile
        self._steps.spawn(self._accept_result(peer, msg))

    async def _accept_result(self, peer: str, msg: TaskResult) -> None:
        try:
            pair = self._items.get(msg.item_id)
            known = pair[1] if pair is not None else self._failing.get(msg.item_id)
            if known is not None and not known.may_answer(msg.attempt, peer):
                self.stats_.foreign_results += 1
                log.warning(
                    "refused a result of %s attempt %d from %s: that attempt went to %s",
                    msg.item_id, msg.attempt, peer, known.nodes_of(msg.attempt) or "no node",
                )  # fmt: skip
                return
            msg = self._credited(peer, msg)
            taken = await self._take_result(pair, peer, msg)
        finally:
            self._answered[msg.item_id] -= 1
            if not self._answered[msg.item_id]:
                del self._answered[msg.item_id]
                if msg.item_id in self._lost_while_answered:
                    self._loop.call_soon(self._answer_handled, msg.item_id)
        if taken is None:  # never written: the item runs on here (or again after a restart)
            return
        (fresh, ended), ending, failed_before = taken
        if not fresh:
            if failed_before and await self._take_result_whose_write_committed(pair, msg):
                return
            self.stats_.duplicates += 1
            return
        self._call_back_superseded(peer, msg)
        live, pair = pair, self._drop(msg.item_id)
        if pair is None and live is not None and self._runs.get(live[0].task_id) is live[0]:
            pair = live  # given up on meanwhile (its timeout): the journal took this result first
        self._cancel_timer(msg.item_id)
        if pair is not None:
            self._count_result(pair[1], msg)
        if ending is not None:  # the journal ended the task together with this result
            self._ended(ending.task_id, *ended)
            return
        if pair is None:
            return
        run = pair[0]
        # (an output we cannot use fails the task in there, naming the node: it raises nothing)
        run.record_result(msg.item_id, msg.output, msg.node_id, self._loop.time())
        await self._advance(run)

    async def _take_result(
        self, pair: tuple[TaskRun, ItemRun] | None, peer: str, msg: TaskResult
    ) -> tuple[tuple[bool, TaskEnd | None], TaskEnding | None, bool] | None:
        """Journal ``msg`` (``take_result``, with the task's end when it decides it), written
        again while the write fails for a cause that may pass (see :meth:`_until_durable`) and
        the item's task is live here. Returns the journal's answer, the ending it was given,
        and whether a write failed first (it may have committed all the same: its sync
        failed); None if it was never written (the task ended meanwhile, or the coordinator
        closes: recovery sends the item again, and its node answers that).

        A result of the attempt now out, from the node it went to, vouches for its dispatch
        (``sent_to``): that dispatch counts as journaled while the write is under way (no
        ``mark_dispatched`` after it), and no longer once a write failed (a crash or a failure
        of the item then finds the journal's item as it was)."""
        sent = pair is not None and pair[1].sent_to(msg.attempt, peer)
        blob, failures, ending, alone = messages.encode(msg), 0, None, False

        async def write() -> tuple[bool, TaskEnd | None]:
            # (a loop, not a call of itself: a closure naming itself is a reference cycle
            # per result, holding its message and blob until the cyclic collector runs)
            nonlocal failures, ending, alone
            while True:
                # (again: the run may have moved on meanwhile)
                ending = None if alone else self._ending_with(msg)
                entry = pair[1] if sent and pair[1].sent_to(msg.attempt, peer) else None
                before = entry.journaled if entry is not None else 0
                if entry is not None:
                    entry.journaled = msg.attempt
                try:
                    return await self._db.run(
                        "take_result", msg.item_id, msg.attempt, blob, node=msg.node_id,
                        sent_to=peer if sent else None, ending=ending,
                    )  # fmt: skip
                except Exception as exc:
                    transient = isinstance(exc, _TRANSIENT)
                    failures += transient
                    if entry is not None and entry.journaled == msg.attempt:
                        entry.journaled = before
                    if transient or ending is None:
                        raise
                # the end it decides was refused (e.g. SQLite's "string or blob too big" for
                # a batch's joined outputs): the result alone, the end then as _finish
                # writes it
                log.warning("journal: the end of task %s with the result of %s was refused,"
                            " taking the result alone", ending.task_id, msg.item_id)  # fmt: skip
                alone = True

        try:
            if pair is None:  # not live here: the journal refuses it (one try)
                answer = await write()
            else:
                what = f"taking the result of {msg.item_id} from {peer}"
                answer = await self._until_durable(pair[0], what, write)
        except _TRANSIENT as exc:
            log.warning("journal: the result of %s from %s is not journaled: %s",
                        msg.item_id, peer, exc)  # fmt: skip
            return None
        return None if answer is None else (answer, ending, failures > 0)

    async def _take_result_whose_write_committed(
        self, pair: tuple[TaskRun, ItemRun] | None, msg: TaskResult
    ) -> bool:
        """``msg``'s write failed, then the journal refused it when it was written again: the
        failed write may have committed (its sync failed). If the item is still live here and
        the journal has a result of it, that is its outcome, taken as a fresh one would be
        (the item dropped, its timer cancelled, the result counted); whether it was. (Compare
        ``_take_result_journaled_first``: the result the journal took before an item's
        failure.)"""
        item_id = msg.item_id
        if pair is None or self._items.get(item_id) is not pair:
            return False
        run = pair[0]
        blob = await self._journaled_result(run, item_id)
        if blob is None or self._items.get(item_id) is not pair:
            return False
        self._drop(item_id)
        self._cancel_timer(item_id)
        self._count_result(pair[1], msg)
        await self._decide_with_journaled(run, item_id, blob)
        return True

    def _call_back_superseded(self, peer: str, msg: TaskResult) -> None:
        """The journal took ``msg``: ``TaskCancel`` to every other node that may still run an
        attempt of the item (:meth:`_nodes_on`), which would finish wasted work once the item is
        dropped here (and no longer counted on it): the node of the later attempt now out (a
        late answer after a retry), and a node an earlier attempt timed out on (it runs on)."""
        pair = self._items.get(msg.item_id)
        if pair is None:
            return
        entry = pair[1]
        if entry.node in (None, peer) and all(node == peer for _, node in entry.sent):
            return  # (the common case: no attempt went anywhere else)
        for node in sorted(self._nodes_on(entry) - {peer}):
            log.info("%s answered by %s (attempt %d): cancelling it on %s",
                     msg.item_id, peer, msg.attempt, node)  # fmt: skip
            self.mesh.peers.send(node, TaskCancel(msg.item_id, "answered by another attempt"))

    def _nodes_on(self, entry: ItemRun) -> set[str]:
        """The nodes that may still run an attempt of the item: the node of the attempt now out,
        and the live members earlier attempts went to (one given up on for its timeout runs it
        on; a dead one is not dialled for a cancel, and one that answered ignores it)."""
        membership = self.mesh.membership
        nodes = {entry.node} if entry.node else set()
        for _, node in entry.sent:
            member = membership.core.member(node) if membership is not None else None
            if member is not None and member.is_live:
                nodes.add(node)
        return nodes

    def _credited(self, peer: str, msg: TaskResult) -> TaskResult:
        """``msg`` naming as the node that ran it one this coordinator can vouch for: the
        sender, or another member (one the sender passed the item to: work sharing). Any
        other ``node_id`` is the sender's say-so alone: the sender is credited (in the journal,
        the task document and ``completed_by_node``, whose series stay one per member)."""
        if msg.node_id == peer:
            return msg
        membership = self.mesh.membership
        if msg.node_id != self.mesh.node_id and membership is not None:
            if membership.core.member(msg.node_id) is not None:
                return msg
        log.info("result of %s from %s names %s, no member: credited to %s",
                 msg.item_id, peer, msg.node_id, peer)  # fmt: skip
        return replace(msg, node_id=peer)

    def _count_result(self, entry: ItemRun, msg: TaskResult) -> None:
        completed, node = self.stats_.completed_by_node, msg.node_id
        new = node not in completed
        completed[node] += 1
        self._credited_at[node] = None
        self._credited_at.move_to_end(node)
        if new:  # (only a new series can take the count past the bound)
            membership = self.mesh.membership
            known = {m.node_id for m in membership.core.members()} if membership else set()
            fold_gone_nodes(completed, self._credited_at, known, KEEP_GONE_NODES)
        if entry.dispatched_at is not None:
            elapsed = self._loop.time() - entry.dispatched_at
            model = entry.item.model
            self.scheduler.observe_runtime((model.model_id, model.version), elapsed)

    def _ending_with(self, msg: TaskResult) -> TaskEnding | None:
        """How the task ends if ``msg`` is accepted, when that alone decides it: the last
        missing result of a single, batch or pipeline task (aggregations are left to
        :meth:`_advance`: their outcome may depend on time). Tried on a copy of the run."""
        pair = self._items.get(msg.item_id)
        if pair is None:
            return None  # not live here: the journal will refuse it
        run = pair[0]
        ids = run.all_item_ids()
        if run.aggregator is not None or run.done or len(run.results) + 1 != len(ids):
            return None
        try:
            trial = object.__new__(TaskRun)  # a shallow copy whose result maps can change
            trial.__dict__.update(
                run.__dict__,
                results=dict(run.results),
                nodes=dict(run.nodes),
                failed=dict(run.failed),
            )
            trial.items = {}
            trial.record_result(msg.item_id, msg.output, msg.node_id, self._loop.time())
        except Exception:  # e.g. an output we cannot use: the ordinary way handles it
            return None
        outcome = trial.outcome
        if outcome is None:
            return None
        return self._ending(run, trial, outcome)

    def _ending(self, run: TaskRun, source: TaskRun, outcome: Outcome) -> TaskEnding:
        state = TaskState.SUCCEEDED if outcome.succeeded else TaskState.FAILED
        summary = encode_outcome(source, outcome)
        # read the record back with the end if someone waits, or soon will (see _handed)
        waited = run.task_id in self._waiters or run.task_id in self._submitting
        return TaskEnding(run.task_id, state, summary, outcome.error or None, waited)

    def _ended(
        self, task_id: str, in_flight: list[tuple[str, str]], record: TaskRecord | None
    ) -> None:
        """The journal ended the task: tell nodes still on its items (e.g. an ensemble that
        reached its quorum early), forget it here."""
        self._call_back(task_id, in_flight, "task finished")
        self._forget(task_id, record)

    def _call_back(self, task_id: str, in_flight: list[tuple[str, str]], reason: str) -> None:
        """``TaskCancel`` to every node on one of the task's items: those the journal had in
        flight, and those sent from here (a dispatch is journaled only once overdue), earlier
        attempts' nodes included (:meth:`_nodes_on`: one that timed out there runs on)."""
        calls = {(item_id, node) for item_id, node in in_flight if node}
        run = self._runs.get(task_id)
        if run is not None:
            calls.update(
                (item_id, node)
                for item_id, entry in run.items.items()
                if item_id in self._items
                for node in self._nodes_on(entry)
            )
        for item_id, node in sorted(calls):
            self.mesh.peers.send(node, TaskCancel(item_id, reason))

    def _on_failed(self, peer: str, msg: TaskFailed) -> None:
        pair = self._items.get(msg.item_id)
        if pair is None or not pair[1].sent_to(msg.attempt, peer):
            return  # stale (see _on_accepted); relayed failures come from the node sent to
        run, entry = pair
        if msg.code == FailureKind.INPUT_NOT_CACHED:
            if entry.by_reference:
                self._resend_input(run, entry, peer)
                return
            if entry.referenced == entry.attempt:  # the answer to a reference sent earlier in
                return  # this attempt: the bytes went after it (a resend after a re-dial)
            self._inputs.forget_input(peer, entry)  # sent with its bytes, yet not kept there
        reason = f"{peer}: {msg.message}"
        if msg.retryable:
            self._retry(run, entry, reason, backoff=True, ran=msg.code not in REFUSALS)
        else:
            self._steps.spawn(self._fail_item(run, entry, reason))

    def _on_member(self, event: MemberEvent) -> None:
        node = event.member.node_id
        if event.kind in (MemberEventKind.DEAD, MemberEventKind.LEFT):
            self._forget_mirror(node)  # if it comes back, its cache starts empty
            self._redispatch_from(node, f"node {node} {event.kind.value}")
        self._reach.on_member(event)
        if event.kind in (MemberEventKind.JOINED, MemberEventKind.ALIVE, MemberEventKind.UPDATED):
            self._wake_parked.set()

    def _lost(self, node: str, why: str) -> None:
        """``node``'s session ended abruptly and it answered no ping (over another session or a
        re-dial), or this node cut it off for a revoked certificate (``why`` says which)."""
        self._forget_mirror(node)
        self._redispatch_from(node, why, fast=True)

    def _resend_to(self, node: str) -> None:
        """A session with ``node`` was lost abruptly, and ``node`` is reachable again: what
        went over the lost session may never have arrived, an answer coming back on it is gone,
        and a node that restarted meanwhile holds nothing. Each item in flight there goes again
        under the same attempt (not a retry): a node still holding it keeps running it and
        answers once, one that does not runs it, and a second answer is dropped as a
        duplicate. (Not while the session they would go over is being cut for a revoked
        certificate: :class:`~coordinator.failover.Reachability` calls this once it is cut.)"""
        for run, entry in self._in_flight_on(node):
            if not run.done:
                self.stats_.resent_after_redial += 1
                self._send_message(run, entry, node)

    def _in_flight_on(self, node: str) -> list[tuple[TaskRun, ItemRun]]:
        """The items on ``node`` whose result is not being journaled (a copy: callers change
        ``_items``)."""
        return [
            (run, entry)
            for run, entry in self._items.values()
            if entry.node == node and entry.item.item_id not in self._answered
        ]

    def _redispatch_from(self, node: str, reason: str, *, fast: bool = False) -> None:
        """Retry at once every item in flight on ``node`` (it died, left or is unreachable);
        one whose result is being handled only once that is over, and only if it was not
        taken: refused here or by the journal, or not written (:meth:`_answer_handled`)."""
        for item_id in self._answered:
            pair = self._items.get(item_id)
            if pair is not None and pair[1].node == node:
                self._lost_while_answered[item_id] = (node, pair[1].attempt, reason, fast)
        for run, entry in self._in_flight_on(node):
            self._redispatch(run, entry, reason, fast)

    def _answer_handled(self, item_id: str) -> None:
        """The item's answers are handled (called soon after the last one's journal call: the
        step that took a result has dropped the item by then). If its node was lost meanwhile
        and it is still live there at that attempt (its result was refused, here or by the
        journal, or could not be written), it is retried now, as the loss would have done,
        rather than after its timeout."""
        if item_id in self._answered:  # another answer came meanwhile: once it is handled
            return
        lost = self._lost_while_answered.pop(item_id, None)
        pair = self._items.get(item_id)
        if lost is None or pair is None or self._closed:
            return
        node, attempt, reason, fast = lost
        run, entry = pair
        if entry.node == node and entry.attempt == attempt:
            self._redispatch(run, entry, reason, fast)

    def _redispatch(self, run: TaskRun, entry: ItemRun, reason: str, fast: bool) -> None:
        """Retry an item its lost node had, counted as re-dispatched only if it goes on (one
        on its last attempt fails instead)."""
        if self._retry(run, entry, reason, backoff=False):
            self.stats_.redispatched_after_death += 1
            self.stats_.redispatched_after_disconnect += fast
