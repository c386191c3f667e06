"""Membership wire format: packets, member records and the gossiped node state (msgpack).

A packet is one msgpack header array followed by zero or more msgpack record arrays, simply
concatenated, so a sender packs pre-encoded records up to its byte budget without re-encoding::

    header   [PROTOCOL, kind, ...fields]            kind: PacketKind, fields below
             PING      [1, 1, seq, target]          probe; the target answers ACK(seq)
             ACK       [1, 2, seq]
             PING_REQ  [1, 3, seq, target]          please probe target for me
             NACK      [1, 4, seq]                  relay: target did not answer in time
             GOSSIP    [1, 5]                       records only
             PUSH_PULL [1, 6, join, response]       records = the sender's whole member table
             DIGEST    [1, 7]                       items = digest entries, the sender's whole
                                                    table summarised (periodic anti-entropy)
             DIGEST_REPLY [1, 8, [node, ...]]       records = the replier's records the digest
                                                    lacked or listed otherwise; the node ids are
                                                    those whose records it wants back (the
                                                    digest's sender answers PUSH_PULL response)
    record   ALIVE     [0, node, incarnation, version, state, signature]
             SUSPECT   [1, node, incarnation, accuser]
             DEAD      [2, node, incarnation, accuser]
             LEFT      [3, node, incarnation, signature]
    state    [host, port, static_key, roles, models, gpu_free_mb, queue_depth, links,
              position | nil, velocity | nil, revocation_version, (input_cache_mb)]
    model    [model_id, version, digest]
    digest entry [node, status, incarnation, record incarnation, record version]
             status: 0 alive, 1 suspect, 2 dead, 3 left (the RecordKind numbers); incarnation:
             the member's liveness incarnation; the record's: its newest signed ALIVE record

The sender of a packet is never written in it: it is the node id the session layer
authenticated (``handle_packet(from_node=...)``). ALIVE and LEFT records are *self-claims*: only
the node they are about may author them, and they carry that node's proof of authorship over
:func:`signed_body`: node daemons send their fleet certificate and an XEdDSA signature by the
static key it binds (:mod:`membership_auth`); empty when a simulation runs without signatures.

Message kinds and record kinds are append-only registries: never renumber, only append. State
fields are appended too, each optional: the state array ends at its last field that is not its
default, so a state that uses none of the newer fields encodes (and is signed) exactly as
before. A decoder takes the 11 original fields, the appended ones it knows, and up to
:data:`MAX_LATER_FIELDS` it does not (from a newer node): those are kept, each as its msgpack
encoding (``NodeState.later``), and written back after the known ones, so the record is relayed
and its signature verified as its author wrote it (nodes from before ``input_cache_mb`` took
exactly 11 fields and refuse a state with more).
:func:`decode_packet` raises only :class:`MembershipProtocolError` (a RemoteProtocolError).
It reads at most ``max_records`` records (the receiver's
:meth:`~meshinfer.proto.membership_config.MembershipConfig.max_packet_records`, at most
:data:`MAX_RECORDS`) and drops the rest of the packet unread (``Packet.truncated``), so the time
one packet holds the loop is bounded by the limit, not by the session's message size (a
push-pull may be as large as one session message, ``[session] max_message_mib``).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from meshinfer.errors import RemoteProtocolError

PROTOCOL = 1

MAX_PACKET_BYTES = 65535  # one Noise message
MAX_PUSH_PULL_BYTES = 32 * 1024 * 1024
#: Records one packet may carry: a whole table at the largest ``max_members`` (65536).
MAX_RECORDS = 2 * 65536
MAX_STATE_BYTES = 1024  # so an ALIVE record always fits one packet
#: A record's proof of authorship: a certificate (<= 512 bytes) and a signature, msgpack-framed
#: (see :class:`~meshinfer.proto.membership_auth.CertifiedRecordAuthenticator`).
MAX_SIGNATURE_BYTES = 640
MAX_SEQ = 2**63 - 1
MAX_COUNTER = 2**63 - 1
#: Unknown trailing state fields (from a newer node) a decoder keeps and passes on.
MAX_LATER_FIELDS = 8
#: The largest input cache a node may gossip, MiB (as ``[executor] input_cache_mib``).
MAX_INPUT_CACHE_MB = 2**20 - 1
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class MembershipProtocolError(RemoteProtocolError):
    """A membership packet from a peer is malformed or over a size cap."""


class PacketKind(enum.IntEnum):
    """Packet header kinds (append only)."""

    PING = 1
    ACK = 2
    PING_REQ = 3
    NACK = 4
    GOSSIP = 5
    PUSH_PULL = 6
    DIGEST = 7
    DIGEST_REPLY = 8


class RecordKind(enum.IntEnum):
    """Member record kinds (append only)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


# --- gossiped node state ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model a node has loaded: id, version and content digest."""

    model_id: str
    version: str
    digest: bytes = b""


@dataclass(frozen=True, slots=True)
class NodeState:
    """What a node tells the fleet about itself (versioned by its owner, newest wins).

    ``host``/``port`` and ``static_key`` (the Noise static public key, X25519) let any member
    dial the node, with ``IK`` since the key is known.
    """

    host: str = ""
    port: int = 0
    static_key: bytes = b""
    roles: tuple[str, ...] = ()
    models: tuple[ModelInfo, ...] = ()
    gpu_free_mb: int = 0
    queue_depth: int = 0
    links: tuple[str, ...] = ()  # link kinds: "v2v", "v2i", "wan"
    position: tuple[float, ...] | None = None  # 2 or 3 coordinates, when known
    velocity: tuple[float, ...] | None = None
    revocation_version: int = 0
    input_cache_mb: int = 0  # MiB of inputs kept by reference (0: none; tasks_wire)
    later: tuple[bytes, ...] = ()  # fields a newer node appended, each msgpack-encoded


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AliveRecord:
    """A node's own signed claim: alive at ``incarnation`` with state ``version``.

    Newer means a larger ``(incarnation, version)``.
    """

    node_id: str
    incarnation: int
    version: int
    state: NodeState
    signature: bytes = b""

    @property
    def key(self) -> tuple[int, int]:
        """The order of records about one node: ``(incarnation, version)``."""
        return (self.incarnation, self.version)


@dataclass(frozen=True, slots=True)
class SuspectRecord:
    """Gossip: ``accuser`` failed to probe ``node_id`` at ``incarnation``."""

    node_id: str
    incarnation: int
    accuser: str


@dataclass(frozen=True, slots=True)
class DeadRecord:
    """Gossip: ``accuser``'s suspicion of ``node_id`` at ``incarnation`` timed out."""

    node_id: str
    incarnation: int
    accuser: str


@dataclass(frozen=True, slots=True)
class LeftRecord:
    """A node's own signed claim that it left gracefully at ``incarnation``."""

    node_id: str
    incarnation: int
    signature: bytes = b""


Record = AliveRecord | SuspectRecord | DeadRecord | LeftRecord


# --- packet headers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe of ``target`` (the receiver checks it is the target)."""

    seq: int
    target: str


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a ping with the same ``seq``; also forwarded by a relay for a ping-req."""

    seq: int


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to probe ``target`` and forward its ack as ``Ack(seq)``."""

    seq: int
    target: str


@dataclass(frozen=True, slots=True)
class Nack:
    """A relay's notice that ``target`` did not answer (Lifeguard: the requester is fine)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Gossip:
    """A packet that only carries records."""


@dataclass(frozen=True, slots=True)
class PushPull:
    """Anti-entropy: the records are the sender's whole table; ``response`` to a request."""

    join: bool = False
    response: bool = False


@dataclass(frozen=True, slots=True)
class Digest:
    """Anti-entropy, first step: the items are the sender's table as :class:`DigestEntry`."""


@dataclass(frozen=True, slots=True)
class DigestReply:
    """Anti-entropy, second step: the records are the replier's that the digest lacked or
    listed otherwise; ``wants`` names the members whose records it asks back."""

    wants: tuple[str, ...] = ()


Header = Ping | Ack | PingReq | Nack | Gossip | PushPull | Digest | DigestReply
#: Headers of packets that may be larger than one Noise message (up to one session message).
LARGE_HEADERS = (PushPull, Digest, DigestReply)


class DigestEntry(NamedTuple):
    """What one table says about one member, in a few bytes: two tables that list equal
    entries for a member hold the same records about it (a signed ALIVE record is fixed by its
    ``(incarnation, version)``; a status by its kind and incarnation)."""

    node_id: str
    status: int  # RecordKind number of the member's status: ALIVE, SUSPECT, DEAD or LEFT
    incarnation: int  # the liveness incarnation (the highest accepted claim)
    record_incarnation: int  # the newest ALIVE record's key
    record_version: int


@dataclass(frozen=True, slots=True)
class Packet:
    """A decoded packet: its header and the records it carried (``truncated``: it carried
    more than the decoder's ``max_records``, and the rest was dropped unread). A
    :class:`Digest` carries ``entries`` instead of records."""

    header: Header
    records: tuple[Record, ...]
    truncated: bool = False
    entries: tuple[DigestEntry, ...] = ()


# --- encoding --------------------------------------------------------------------------------


def _state_fields(state: NodeState) -> list[Any]:
    models = [[m.model_id, m.version, m.digest] for m in state.models]
    position = None if state.position is None else [float(x) for x in state.position]
    velocity = None if state.velocity is None else [float(x) for x in state.velocity]
    return [
        state.host,
        state.port,
        state.static_key,
        list(state.roles),
        models,
        state.gpu_free_mb,
        state.queue_depth,
        list(state.links),
        position,
        velocity,
        state.revocation_version,
        *_appended(state),
    ]


def _appended(state: NodeState) -> list[Any]:
    """The state fields after the original 11, up to the last one that is set."""
    if not state.later and not state.input_cache_mb:
        return []
    return [state.input_cache_mb, *(msgpack.unpackb(raw) for raw in state.later)]


def encode_state(state: NodeState) -> bytes:
    """The canonical encoding of a node state (used for its size cap)."""
    return msgpack.packb(_state_fields(state))


#: The domain prefix of :func:`signed_body`; the msgpack array of the record's fields follows.
SIGNED_BODY_DOMAIN = b"meshinfer-member-v1\x00"


#: The layout of the self-claims, spelled here once: an ALIVE or LEFT record is its signed body
#: (:func:`signed_body`) followed by its signature. An ALIVE body ``[kind, node, incarnation,
#: version, state]`` has ``ALIVE_BODY_FIELDS`` fields, its state at ``ALIVE_BODY_STATE`` (the
#: last), and the state (:func:`_state_fields`: ``[host, port, static_key, ...]``) keeps the Noise
#: static key at ``STATE_STATIC_KEY``; a LEFT body is ``[kind, node, incarnation]``. The encoder
#: (:func:`_alive_body`, :func:`_left_body`), the decoder (:func:`_record`, :func:`_state`) and
#: :func:`~meshinfer.proto.membership_auth.claimed_static_key` all go by these.
ALIVE_BODY_STATE, STATE_STATIC_KEY = 4, 2
ALIVE_BODY_FIELDS = ALIVE_BODY_STATE + 1  # (the state is the last field)
LEFT_BODY_FIELDS = 3


def record_kind(value: Any) -> RecordKind | None:
    """The record kind a decoded field names, exactly: an ``int`` (not a ``bool`` or a float
    that compares equal) of a known kind; None otherwise."""
    if type(value) is not int or value not in _STATUSES:
        return None
    return RecordKind(value)


def _alive_body(record: AliveRecord) -> list[Any]:
    """An ALIVE record's signed fields (see the layout above)."""
    state = _state_fields(record.state)
    return [RecordKind.ALIVE, record.node_id, record.incarnation, record.version, state]


def _left_body(record: LeftRecord) -> list[Any]:
    """A LEFT record's signed fields (see the layout above)."""
    return [RecordKind.LEFT, record.node_id, record.incarnation]


def signed_body(record: AliveRecord | LeftRecord) -> bytes:
    """The bytes a node signs for its own ALIVE or LEFT record (kind-tagged, canonical)."""
    body = _alive_body(record) if isinstance(record, AliveRecord) else _left_body(record)
    return SIGNED_BODY_DOMAIN + msgpack.packb(body)


def encode_record(record: Record) -> bytes:
    """One record as a msgpack array (see the module docstring)."""
    if isinstance(record, AliveRecord):
        return msgpack.packb([*_alive_body(record), record.signature])
    if isinstance(record, LeftRecord):
        return msgpack.packb([*_left_body(record), record.signature])
    kind = RecordKind.SUSPECT if isinstance(record, SuspectRecord) else RecordKind.DEAD
    return msgpack.packb([kind, record.node_id, record.incarnation, record.accuser])


def encode_header(header: Header) -> bytes:
    """A packet header as a msgpack array."""
    if isinstance(header, Ping | PingReq):
        kind = PacketKind.PING if isinstance(header, Ping) else PacketKind.PING_REQ
        return msgpack.packb([PROTOCOL, kind, header.seq, header.target])
    if isinstance(header, Ack | Nack):
        kind = PacketKind.ACK if isinstance(header, Ack) else PacketKind.NACK
        return msgpack.packb([PROTOCOL, kind, header.seq])
    if isinstance(header, PushPull):
        return msgpack.packb([PROTOCOL, PacketKind.PUSH_PULL, header.join, header.response])
    if isinstance(header, Digest):
        return msgpack.packb([PROTOCOL, PacketKind.DIGEST])
    if isinstance(header, DigestReply):
        return msgpack.packb([PROTOCOL, PacketKind.DIGEST_REPLY, list(header.wants)])
    return msgpack.packb([PROTOCOL, PacketKind.GOSSIP])


def encode_entry(entry: DigestEntry) -> bytes:
    """One digest entry as a msgpack array (see the module docstring)."""
    return msgpack.packb(list(entry))


def encode_packet(header: Header, encoded_records: Iterable[bytes] = ()) -> bytes:
    """A header followed by already encoded records (from :func:`encode_record`)."""
    return encode_header(header) + b"".join(encoded_records)


# --- decoding --------------------------------------------------------------------------------


def _fail(detail: str) -> MembershipProtocolError:
    return MembershipProtocolError(f"membership packet: {detail}")


def _list(value: Any, low: int, high: int, what: str) -> list[Any]:
    if type(value) is not list or not low <= len(value) <= high:
        raise _fail(f"{what} must be a list of {low}..{high} items")
    return value


def _int(value: Any, high: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise _fail(f"{what} must be an integer in 0..{high}")
    return value


def _str(value: Any, high: int, what: str) -> str:
    if type(value) is not str or len(value) > high:
        raise _fail(f"{what} must be a string of at most {high} characters")
    return value


def _bytes(value: Any, high: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) > high:
        raise _fail(f"{what} must be at most {high} bytes")
    return value


def _node_id(value: Any, what: str = "node id") -> str:
    if type(value) is not str or _NODE_ID.fullmatch(value) is None:
        raise _fail(f"{what} must be 1..64 of [A-Za-z0-9._-]")
    return value


def _vector(value: Any, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = _list(value, 2, 3, what)
    if any(type(x) is not float or not math.isfinite(x) for x in items):
        raise _fail(f"{what} must hold finite floats")
    return tuple(items)


def _strings(value: Any, count: int, length: int, what: str) -> tuple[str, ...]:
    return tuple(_str(item, length, what) for item in _list(value, 0, count, what))


def _model(value: Any) -> ModelInfo:
    model_id, version, digest = _list(value, 3, 3, "model")
    return ModelInfo(
        _str(model_id, 64, "model id"),
        _str(version, 32, "model version"),
        _bytes(digest, 64, "model digest"),
    )


def _state(value: Any) -> NodeState:
    fields = _list(value, 11, 12 + MAX_LATER_FIELDS, "state")
    static_key = _bytes(fields[STATE_STATIC_KEY], 32, "static key")
    if len(static_key) not in (0, 32):
        raise _fail("static key must be empty or 32 bytes")
    return NodeState(
        host=_str(fields[0], 253, "host"),
        port=_int(fields[1], 65535, "port"),
        static_key=static_key,
        roles=_strings(fields[3], 8, 32, "roles"),
        models=tuple(_model(m) for m in _list(fields[4], 0, 32, "models")),
        gpu_free_mb=_int(fields[5], 2**40, "gpu_free_mb"),
        queue_depth=_int(fields[6], 2**32, "queue_depth"),
        links=_strings(fields[7], 8, 16, "links"),
        position=_vector(fields[8], "position"),
        velocity=_vector(fields[9], "velocity"),
        revocation_version=_int(fields[10], MAX_COUNTER, "revocation_version"),
        input_cache_mb=_input_cache_mb(fields),
        later=tuple(msgpack.packb(v) for v in fields[12:]),
    )


def _input_cache_mb(fields: list[Any]) -> int:
    if len(fields) < 12:
        return 0
    mb = _int(fields[11], MAX_INPUT_CACHE_MB, "input_cache_mb")
    if mb == 0 and len(fields) == 12:  # a trailing default is never written
        raise _fail("input_cache_mb is written only when set")
    return mb


def _record(value: Any) -> Record:
    fields = _list(value, LEFT_BODY_FIELDS + 1, ALIVE_BODY_FIELDS + 1, "record")
    node, incarnation = _node_id(fields[1]), _int(fields[2], MAX_COUNTER, "inc")
    kind = record_kind(fields[0])
    if kind is RecordKind.ALIVE and len(fields) == ALIVE_BODY_FIELDS + 1:
        version = _int(fields[3], MAX_COUNTER, "version")
        signature = _bytes(fields[ALIVE_BODY_FIELDS], MAX_SIGNATURE_BYTES, "signature")
        return AliveRecord(node, incarnation, version, _state(fields[ALIVE_BODY_STATE]), signature)
    if len(fields) != LEFT_BODY_FIELDS + 1 or type(fields[0]) is not int:
        raise _fail("record has the wrong number of fields")
    if kind is RecordKind.SUSPECT:
        return SuspectRecord(node, incarnation, _node_id(fields[3], "accuser"))
    if kind is RecordKind.DEAD:
        return DeadRecord(node, incarnation, _node_id(fields[3], "accuser"))
    if kind is RecordKind.LEFT:
        signature = _bytes(fields[LEFT_BODY_FIELDS], MAX_SIGNATURE_BYTES, "signature")
        return LeftRecord(node, incarnation, signature)
    raise _fail(f"unknown record kind {fields[0]!r}")


def _header(value: Any) -> Header:
    fields = _list(value, 2, 4, "header")
    if fields[0] != PROTOCOL or type(fields[0]) is not int:
        raise _fail(f"unsupported protocol {fields[0]!r}")
    kind, arity = fields[1], len(fields)
    if kind == PacketKind.PING and arity == 4:
        return Ping(_int(fields[2], MAX_SEQ, "seq"), _node_id(fields[3], "target"))
    if kind == PacketKind.PING_REQ and arity == 4:
        return PingReq(_int(fields[2], MAX_SEQ, "seq"), _node_id(fields[3], "target"))
    if kind in (PacketKind.ACK, PacketKind.NACK) and arity == 3:
        seq = _int(fields[2], MAX_SEQ, "seq")
        return Ack(seq) if kind == PacketKind.ACK else Nack(seq)
    if kind == PacketKind.GOSSIP and arity == 2:
        return Gossip()
    if kind == PacketKind.PUSH_PULL and arity == 4:
        if type(fields[2]) is not bool or type(fields[3]) is not bool:
            raise _fail("push-pull flags must be booleans")
        return PushPull(join=fields[2], response=fields[3])
    if kind == PacketKind.DIGEST and arity == 2:
        return Digest()
    if kind == PacketKind.DIGEST_REPLY and arity == 3:
        return DigestReply(
            tuple(_node_id(n, "wanted node") for n in _list(fields[2], 0, MAX_RECORDS, "wants"))
        )
    raise _fail(f"unknown packet kind {kind!r} with {arity} fields")


def _entry(value: Any) -> DigestEntry:
    node, status, incarnation, record_incarnation, version = _list(value, 5, 5, "digest entry")
    if type(status) is not int or status not in _STATUSES:
        raise _fail(f"digest entry status must be one of {sorted(_STATUSES)}")
    return DigestEntry(
        _node_id(node),
        status,
        _int(incarnation, MAX_COUNTER, "inc"),
        _int(record_incarnation, MAX_COUNTER, "record inc"),
        _int(version, MAX_COUNTER, "version"),
    )


_STATUSES = frozenset(int(kind) for kind in RecordKind)


class _RecordMemo:
    """Decoded records by their exact bytes (decoding is a pure function of them), so the
    unchanged records of every push-pull cost one dict lookup instead of a validation."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: dict[bytes, Record] = {}

    def decode(self, raw: bytes, value: Any) -> Record:
        record = self._records.get(raw)
        if record is None:
            record = _record(value)
            if len(self._records) >= self.capacity:
                self._records.clear()
            self._records[raw] = record
        return record


_MEMO = _RecordMemo(capacity=16384)


_END = object()  # the unpacker ran out: the packet ends inside a record


def _decode(data: bytes, max_records: int) -> Packet:
    # No array on the wire is longer than MAX_RECORDS (a DIGEST_REPLY's wants): a longer one is
    # refused at its header, before msgpack fills a list of it (8 bytes a 1-byte item).
    unpacker = msgpack.Unpacker(
        max_buffer_size=max(1, len(data)), max_array_len=MAX_RECORDS, max_map_len=0, raw=False
    )
    unpacker.feed(data)
    header = _header(next(unpacker))
    if not isinstance(header, LARGE_HEADERS) and len(data) > MAX_PACKET_BYTES:
        raise _fail("packet larger than one Noise message")
    items: list[Any] = []
    digest = isinstance(header, Digest)
    start = unpacker.tell()
    while start != len(data) and len(items) < max_records:
        value = next(unpacker, _END)
        if value is _END:
            raise _fail("truncated")
        end = unpacker.tell()
        items.append(_entry(value) if digest else _MEMO.decode(data[start:end], value))
        start = end
    truncated = start != len(data)
    if digest:
        return Packet(header, (), truncated, tuple(items))
    return Packet(header, tuple(items), truncated)


def decode_packet(data: bytes, max_records: int = MAX_RECORDS) -> Packet:
    """Decode and validate one packet, up to ``max_records`` records (at most
    :data:`MAX_RECORDS`); the rest is dropped unread and the packet marked ``truncated``.
    Raises only :class:`MembershipProtocolError`."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_PUSH_PULL_BYTES:
        raise _fail("not bytes, or larger than the push-pull cap")
    try:
        return _decode(bytes(data), min(max_records, MAX_RECORDS))
    except MembershipProtocolError:
        raise
    except (StopIteration, ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise _fail(f"undecodable ({type(exc).__name__})") from None
