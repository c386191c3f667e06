"""Results a node keeps for a while, so an item sent to it again is answered, not run again.

A coordinator sends a node an item it already answered when the answer may have been lost: the
session it went over ended abruptly and the node answered the coordinator's ping
(:mod:`coordinator.failover` sends its items again), or the coordinator restarted before it
journaled the result (recovery sends every item in flight again, with the next attempt). The
result was computed; running the item a second time only spends the node's engine on work
done. :class:`ResultReplay` keeps each result this node sent, keyed by item id, for
``keep_s`` seconds and within ``budget_bytes`` (oldest first out); the executor answers a
``TaskAssign`` for a kept item with the kept result under the new attempt.

A kept result answers a later attempt of the same item only if it is the same work asked by the
same peer (:func:`work_of`: the coordinator, the model and version, the input's dtype, shape and
CRC-32, the parameters): item ids are ``task/n`` and a client may choose its task ids, so
another coordinator, or the same one after losing its journal, may reuse an id for other work;
and a peer can only ever get back what it asked for itself. Each entry counts its output's bytes
plus :data:`ENTRY_OVERHEAD` (the Python objects around it), so a budget bounds the count of tiny
results as well, plus its text past :data:`TEXT_ALLOWANCE` (:func:`text_bytes`): a relayed result's
ids, engine, device and timings are the helper peer's to choose (up to ~4 KiB of objects an entry,
against the ~700 bytes a node's own result takes), and uncounted they let it hold several times
the budget. An entry is kept as a flat tuple of strings, numbers and bytes, which the
garbage collector stops tracking: thousands of long-lived results would otherwise be walked by
every older-generation collection (measured: ~10 us more node CPU per task at 64 in flight).

Expired entries are dropped whenever the store is used (:meth:`~ResultReplay.keep`,
:meth:`~ResultReplay.answer`) and by :meth:`~ResultReplay.expire`, which says when to call it
next: the executor calls it from a timer, so an idle node does not hold its budget.
:meth:`~ResultReplay.forget` drops one entry at once: the executor forgets a result the peer
table could not send (over the session's size cap), so the item sent again runs again and is
answered with its failure, instead of with a replay that would be dropped as well.

Pure and synchronous: the clock is passed in. Not thread-safe (the node's event loop owns it).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass

from meshinfer.errors import ConfigError
from meshinfer.proto.tasks_wire import TaskAssign, TaskResult, Tensor

__all__ = [
    "ENTRY_OVERHEAD",
    "TEXT_ALLOWANCE",
    "ReplayStats",
    "ResultReplay",
    "Work",
    "text_bytes",
    "work_of",
]

#: Bytes an entry is counted for besides its output's data: its result, tensor, timings, item
#: id and this store's bookkeeping (``tracemalloc``: ~690 bytes for a one-row result).
ENTRY_OVERHEAD = 700
#: The :func:`text_bytes` :data:`ENTRY_OVERHEAD` covers: a node's own result's (~600: an item id
#: of a few dozen characters, its node id, engine and device names, three timings) is within.
TEXT_ALLOWANCE = 768
#: What one timing takes besides its name's characters: its (name, seconds) pair, the name's
#: string header and the float.
_TIMING_BYTES = 160


@dataclass
class ReplayStats:
    replayed: int = 0  # assignments answered from a kept result
    evicted: int = 0  # results dropped for room before they expired


#: What an item asks of this node, and who asks it: (peer, model id, version, input dtype,
#: input shape, CRC-32 of the input, CRC-32 of the parameters). See :func:`work_of`.
Work = tuple


def work_of(asker: str, item: TaskAssign) -> Work:
    """The :data:`Work` of ``item`` (its input inline) asked by ``asker``. CRC-32 runs at
    several GB/s (~4 ms for the largest input a session carries) and tells accidental reuse
    of an id apart; the peer in the key keeps anyone else from asking for a result."""
    x = item.input
    return (asker, item.model_id, item.model_version, x.dtype, x.shape, zlib.crc32(x.data),
            zlib.crc32(item.params))  # fmt: skip


def text_bytes(result: TaskResult) -> int:
    """What ``result``'s text takes kept (its item id, node id, engine, device and timings),
    about: a character a byte (four, in a string that is not ASCII) and :data:`_TIMING_BYTES` a
    timing more. At most a few KiB (the decoder bounds each name and the count of timings)."""
    names = (result.item_id, result.node_id, result.engine, result.device, *result.timings)
    chars = sum(len(n) if n.isascii() else 4 * len(n) for n in names)
    return chars + _TIMING_BYTES * len(result.timings)


#: One kept result: (stored_at, size, work, dtype, shape, data, node id, engine, device,
#: timings as (name, seconds) pairs). Atomic parts only: see the module docstring.
_Kept = tuple


def _flat(now: float, size: int, work: Work, result: TaskResult) -> _Kept:
    out = result.output
    timings = tuple(result.timings.items())
    return (now, size, work, out.dtype, out.shape, out.data,
            result.node_id, result.engine, result.device, timings)  # fmt: skip


def _result(item_id: str, attempt: int, kept: _Kept) -> TaskResult:
    *_, dtype, shape, data, node_id, engine, device, timings = kept
    output = Tensor(data, dtype, shape)
    return TaskResult(item_id, attempt, output, node_id, engine, device, dict(timings))


class ResultReplay:
    """The last results this node sent, for ``keep_s`` seconds, within ``budget_bytes``."""

    def __init__(self, budget_bytes: int, keep_s: float) -> None:
        if budget_bytes < 0 or not keep_s >= 0:
            raise ConfigError(
                f"result replay needs budget_bytes >= 0 and keep_s >= 0, got {budget_bytes},"
                f" {keep_s}"
            )
        self.budget_bytes = budget_bytes
        self.keep_s = keep_s
        self.stats = ReplayStats()
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # in the order stored
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, item_id: object) -> bool:
        """Whether a result of ``item_id`` is kept (perhaps expired, or for other work)."""
        return item_id in self._kept

    @property
    def bytes(self) -> int:
        return self._bytes

    def keep(self, asker: str, item: TaskAssign, result: TaskResult, now: float) -> None:
        """Remember ``result``, the answer to ``item`` (its input inline) asked by ``asker``,
        dropping expired entries and, if still over budget, the oldest. A result larger than
        the whole budget is not kept. It counts its output's bytes, :data:`ENTRY_OVERHEAD` and
        its :func:`text_bytes` past :data:`TEXT_ALLOWANCE`."""
        self._expire(now)
        text = max(0, text_bytes(result) - TEXT_ALLOWANCE)
        size = len(result.output.data) + ENTRY_OVERHEAD + text
        if size > self.budget_bytes or self.keep_s <= 0:
            return
        self.forget(result.item_id)
        while self._bytes + size > self.budget_bytes:
            self.forget(next(iter(self._kept)))
            self.stats.evicted += 1
        self._kept[result.item_id] = _flat(now, size, work_of(asker, item), result)
        self._bytes += size

    def answer(self, asker: str, item: TaskAssign, now: float) -> TaskResult | None:
        """The kept result of ``item``'s id, as the answer to its attempt, if it answered the
        same work asked by the same peer (:func:`work_of`); None if none is (never run here,
        expired, evicted, or other work or another peer under that id)."""
        self._expire(now)
        kept = self._kept.get(item.item_id)
        if kept is None or kept[2] != work_of(asker, item):
            return None
        self.stats.replayed += 1
        return _result(item.item_id, item.attempt, kept)

    def forget(self, item_id: str) -> bool:
        """Drop the kept result of ``item_id``; whether one was kept."""
        kept = self._kept.pop(item_id, None)
        if kept is not None:
            self._bytes -= kept[1]
        return kept is not None

    def expire(self, now: float) -> float | None:
        """Drop the entries expired by ``now``; return when the oldest one left expires (on
        the clock ``now`` is read from), None if none is left."""
        self._expire(now)
        if not self._kept:
            return None
        return next(iter(self._kept.values()))[0] + self.keep_s

    def _expire(self, now: float) -> None:
        while self._kept:
            item_id, oldest = next(iter(self._kept.items()))
            if now - oldest[0] < self.keep_s:
                return
            self.forget(item_id)
