"""Inputs by reference, the coordinator's side: what each node's input cache holds of ours.

An input of at least ``min_bytes`` goes to a node that gossips an input cache with
``keep_input``, and again to that node as a reference to its sha256, while the node's
:class:`~meshinfer.inference.cache.InputMirror` says it holds it. A mirror is per node
incarnation and cache budget: a restarted node, or one with a new budget, starts from an empty
mirror, and the coordinator has one start again (:meth:`InputRefs.forget_node`) when messages to
its node may not have arrived (a session lost, a send failed, the node died or left): it then
knows less than the node keeps, never more.

Counting: an item is counted as sent by reference (and its input's bytes as saved) once its
message is queued (:meth:`InputRefs.queued`), and the bytes are taken back when the node did not
hold the input after all and the same attempt goes again with them (:meth:`InputRefs.missed`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from meshinfer.inference.cache import InputMirror, Send
from meshinfer.proto.tasks_wire import TaskAssign, by_reference

if TYPE_CHECKING:
    from coordinator.runs import ItemRun, TaskRun
    from meshinfer.runtime.node import MeshNode


class InputRefStats(Protocol):
    """Where :class:`InputRefs` counts (the coordinator's stats)."""

    inputs_by_reference: int
    input_bytes_saved: int
    input_cache_misses: int


class InputRefs:
    """Per node, an :class:`InputMirror` of its input cache, and the messages that follow."""

    def __init__(self, mesh: MeshNode, min_bytes: int, stats: InputRefStats) -> None:
        self.mesh = mesh
        self.min_bytes = min_bytes
        self.stats = stats
        #: per node that keeps inputs: what it holds of ours, for its (incarnation, MiB)
        self._mirrors: dict[str, tuple[tuple[int, int], InputMirror]] = {}

    def message(self, run: TaskRun, entry: ItemRun, node: str, msg: TaskAssign) -> TaskAssign:
        """``msg`` as it goes to ``node``: its input by reference if the node holds it, with
        ``keep_input`` if the node's cache will keep it, else unchanged. Sets
        ``entry.by_reference``; the mirror now holds what the node will once it has ``msg``."""
        entry.by_reference = False
        size = len(msg.input.data)
        if not self.min_bytes or size < self.min_bytes:
            return msg
        mirror = self.mirror(node)
        if mirror is None:
            return msg
        if not entry.digest:
            entry.digest = run.digest_of(msg.input.data)
        how = mirror.send(entry.digest, size)
        if how is Send.REF:
            entry.by_reference = True
            return by_reference(msg, entry.digest)
        return replace(msg, keep_input=True) if how is Send.KEEP else msg

    def queued(self, entry: ItemRun) -> None:
        """The message :meth:`message` made for ``entry`` was queued for its node."""
        if entry.by_reference:
            entry.referenced = entry.attempt
            self.stats.inputs_by_reference += 1
            self.stats.input_bytes_saved += len(entry.item.input.data)

    def missed(self, node: str, entry: ItemRun) -> None:
        """``node`` answered that it does not hold the input ``entry`` named by reference: the
        same attempt goes again with the bytes, which are not saved after all."""
        self.stats.input_cache_misses += 1
        self.stats.input_bytes_saved -= len(entry.item.input.data)
        self.forget_input(node, entry)

    def mirror(self, node: str) -> InputMirror | None:
        """What ``node``'s input cache holds of ours (None: it gossips no input cache)."""
        membership = self.mesh.membership
        member = membership.core.member(node) if membership is not None else None
        if member is None or not member.state.input_cache_mb:
            self._mirrors.pop(node, None)
            return None
        key = (member.record.incarnation, member.state.input_cache_mb)
        known = self._mirrors.get(node)
        if known is None or known[0] != key:
            known = self._mirrors[node] = (key, InputMirror(member.state.input_cache_mb << 20))
        return known[1]

    def forget_node(self, node: str) -> None:
        """What ``node`` keeps of ours is no longer known: its mirror starts again."""
        self._mirrors.pop(node, None)

    def forget_input(self, node: str, entry: ItemRun) -> None:
        """``node`` does not hold the item's input, whatever its mirror said."""
        mirror = self.mirror(node)
        if mirror is not None and entry.digest:
            mirror.forget(entry.digest)
