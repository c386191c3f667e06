"""What a message queued for a peer holds in memory, estimated without encoding it.

A peer's outbox (:class:`~meshinfer.runtime.peers.PeerTable`) is bounded by bytes as well as by
count: a message may be up to 16 MiB (a :class:`~meshinfer.proto.tasks_wire.TaskAssign`'s input,
a :class:`~meshinfer.proto.tasks_wire.TaskResult`'s output, an
:class:`~meshinfer.proto.messages.AppData` payload), and a queued message holds its bytes until
it is written. :func:`queued_size` is taken once per message as it is queued, on the task path:
a type check and a few attribute reads, no encoding. It counts the payload bytes a message
carries (a tensor's ``data``, ``params``, a payload, revocation entries) plus
:data:`MESSAGE_OVERHEAD` for everything else (ids, timings, the object itself), so it is close to
what the message holds and to its encoded size for the messages that can be large.
"""

from __future__ import annotations

from meshinfer.proto.messages import AppData, Gossip, Message
from meshinfer.proto.revocation_wire import RevocationsOffer
from meshinfer.proto.tasks_wire import TaskAssign, TaskResult

__all__ = ["MESSAGE_OVERHEAD", "OUTBOX_BYTES", "queued_size"]

#: What a queued message is counted at beyond the payload bytes it carries: its ids, small
#: fields and the Python objects themselves (a small message is counted at this alone).
MESSAGE_OVERHEAD = 256
#: The default byte bound of one peer's outbox: four of the largest messages, many times what
#: a peer's sender writes at once (1 MiB), and far above what the task path queues for a
#: working peer; at most this (or one message larger than it) is held per stalled peer.
OUTBOX_BYTES = 64 * 1024 * 1024


def queued_size(msg: Message) -> int:
    """The bytes ``msg`` is counted at in an outbox (see the module docstring). The types that
    can be large are named here; any other, or one whose payload is no sized object (it will
    not encode), is counted at :data:`MESSAGE_OVERHEAD`. Never raises."""
    kind = type(msg)
    try:
        if kind is TaskAssign:  # (the task path's messages first)
            return len(msg.input.data) + len(msg.params) + MESSAGE_OVERHEAD
        if kind is TaskResult:
            return len(msg.output.data) + MESSAGE_OVERHEAD
        if kind is AppData or kind is Gossip:
            return len(msg.payload) + MESSAGE_OVERHEAD
        if kind is RevocationsOffer:  # (a page of up to 1024 entries of about 1 KiB each)
            return sum(map(len, msg.entries)) + MESSAGE_OVERHEAD
    except (AttributeError, TypeError):  # a field of the wrong type: the message does not
        pass  # encode, and the sender drops it (as too-large) when it tries
    return MESSAGE_OVERHEAD
