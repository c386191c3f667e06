"""The append-only message registry: frozen dataclasses <-> compact msgpack arrays.

Every message type is a frozen, slotted dataclass registered with a unique integer type id and a
size cap (the most encoded bytes a peer may send for it)::

    @message(type_id=2, max_size=64)
    @dataclass(frozen=True, slots=True)
    class Ping:
        nonce: int

Wire form: one msgpack array ``[type_id, field1, field2, ...]`` in dataclass field order. A field
whose type is another registered dataclass (a message or an :func:`embedded` type) is an array of
that type's fields, without a type id (the annotation already says which type it is).

ONLY APPEND to the registry. Never renumber or reuse a type id, and never reorder, retype or remove
the fields of a registered type: ``tests/test_messages.py`` pins the id table. Type id ranges:

=========  ======================================================================
ids        use
=========  ======================================================================
1-15       session control (this module: Hello, Ping, Pong, Close, AppData)
16-31      membership / gossip (this module: Gossip = 16; the rest to membership)
32-79      tasks and results
80-127     telemetry, cache, other
128-65535  experimental (tests use 60000+)
=========  ======================================================================

Decoding a peer's bytes (:meth:`MessageRegistry.decode`), in order:

1. peek the type id and array length from the header without unpacking; unknown id -> error;
2. refuse input longer than that type's ``max_size`` (:class:`~meshinfer.errors.FrameTooLarge`),
   then a wrong field count;
3. ``msgpack.unpackb`` with limits computed per type at registration: arrays no longer than the
   type's widest fixed shape (or ``max_items`` where it has variable-length tuples/dicts), maps no
   longer than ``max_items`` (0 when it has none), no ext types, ``strict_map_key``, UTF-8 strings
   (``raw=False``); string/bin lengths are bounded by the input length (msgpack's default); trailing
   bytes are an error; a frame over 4 KiB also refuses more arrays and maps, and more values
   (array items, map entries), than a valid encoding of its type holds (for an extensible type,
   room for a newer peer's fields: ``max_items`` more arrays and maps, ``4 * max_items`` more
   values), as it unpacks them: each costs up to ~70 times its bytes in memory;
4. check each field with a validator compiled once, at registration, from the field annotation:
   ``int`` (never ``bool``), ``float`` (an int is accepted and converted), ``str``, ``bytes``,
   ``bool``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]``, an ``IntEnum``
   (unknown values refused) and nested registered dataclasses;
5. build the dataclass and run its optional ``validate(self)`` hook (semantic checks such as
   lengths; it raises :class:`~meshinfer.errors.RemoteProtocolError` naming the type).

Steps 4-5 run, for the usual exact field count, in a straight-line function generated per type at
registration (scalar checks inline, the instance filled through its slots, as ``dataclasses``
generates ``__init__``); any mismatch falls back to the generic per-field path, which produces the
precise error. Dataclass ``__init__`` is therefore not called on decode: use ``validate``, not
``__post_init__`` (refused at registration).

Anything wrong raises :class:`~meshinfer.errors.RemoteProtocolError` naming the type and field.
Registration problems (duplicate id, unsupported annotation, a ``__post_init__``) raise
:class:`~meshinfer.errors.LocalProtocolError` at import time.

Forward compatibility: a type registered with ``extensible=True`` ignores extra trailing fields
from a newer peer, and fills missing trailing fields from their defaults for an older peer; fields
appended to such a type must therefore have defaults. Any other type needs the exact field count.

:meth:`MessageRegistry.encode` does not re-validate field types (it stays a thin layer over
msgpack); it refuses unregistered types, unencodable values and encodings over the type's cap with
:class:`~meshinfer.errors.LocalProtocolError`. It is safe to call from several threads.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import threading
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from meshinfer.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from meshinfer.proto.message_codec import (
    COUNTED_SIZE,
    EXTENSION_VALUES,
    Check,
    Convert,
    MessageSpec,
    Mismatch,
    TypeCodec,
    check_float,
    counting_hook,
    dict_check,
    enum_check,
    fixed_tuple_check,
    generate_fast_build,
    generate_to_wire,
    no_ext,
    optional_check,
    peek_header,
    scalar_check,
    tuple_of_check,
)

__all__ = [
    "DEFAULT_MAX_ITEMS",
    "MAX_MESSAGE_SIZE",
    "REGISTRY",
    "AppData",
    "Close",
    "CloseCode",
    "Gossip",
    "Hello",
    "Message",
    "MessageRegistry",
    "MessageSpec",
    "Ping",
    "Pong",
    "decode",
    "decode_as",
    "embedded",
    "encode",
    "is_plain_text",
    "message",
    "message_types",
    "spec_of",
]

#: The largest encoded message any type may declare as its cap (and the default reassembly cap).
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: Default bound on the length of variable-length tuples and dicts inside one message.
DEFAULT_MAX_ITEMS = 1024
_MAX_TYPE_ID = 0xFFFF
#: What an id or a name may not hold: C0 and C1 controls, DEL, line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def is_plain_text(value: str) -> bool:
    """Whether ``value`` holds no control character (C0, DEL, C1) and no line or paragraph
    separator: what ids and names must be, as they end up in logs, file names and HTTP answers.
    (A printable string, the usual id, is answered by one C pass.)"""
    return value.isprintable() or _CONTROL.search(value) is None


#: What :func:`decode` returns: an instance of some registered message dataclass.
Message = object

T = TypeVar("T")
M = TypeVar("M")


class MessageRegistry:
    """An append-only table of message types: register with :meth:`message`, then
    :meth:`encode`/:meth:`decode`. The module-level :data:`REGISTRY` is the one the mesh uses;
    tests may build private ones."""

    def __init__(self) -> None:
        self._by_id: dict[int, TypeCodec] = {}
        self._by_class: dict[type, TypeCodec] = {}
        self._local = threading.local()

    # --- registration --------------------------------------------------------------------

    def message(
        self,
        type_id: int,
        max_size: int,
        *,
        extensible: bool = False,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> Callable[[type[T]], type[T]]:
        """Class decorator: register a frozen, slotted dataclass as message ``type_id``.

        ``max_size`` caps its encoding in bytes; ``max_items`` bounds each variable-length tuple
        or dict inside it; ``extensible`` enables the forward-compatibility rule (module doc).
        """
        _require_int("type_id", type_id, 1, _MAX_TYPE_ID)
        _require_int("max_size", max_size, 1, MAX_MESSAGE_SIZE)
        _require_int("max_items", max_items, 1, MAX_MESSAGE_SIZE)

        def register(cls: type[T]) -> type[T]:
            if type_id in self._by_id:
                taken = self._by_id[type_id].name
                raise LocalProtocolError(f"message type id {type_id} is already taken by {taken}")
            codec = self._compile(cls, type_id, max_size, extensible, max_items)
            self._by_id[type_id] = codec
            self._by_class[cls] = codec
            return cls

        return register

    def embedded(self, *, extensible: bool = False) -> Callable[[type[T]], type[T]]:
        """Class decorator: register a frozen, slotted dataclass used only inside messages.

        It has no type id and cannot be sent on its own; the enclosing message's caps apply.
        """

        def register(cls: type[T]) -> type[T]:
            self._by_class[cls] = self._compile(cls, None, None, extensible, DEFAULT_MAX_ITEMS)
            return cls

        return register

    def _compile(
        self,
        cls: type,
        type_id: int | None,
        max_size: int | None,
        extensible: bool,
        max_items: int,
    ) -> TypeCodec:
        fields = _message_fields(cls, self._by_class)
        hints = _resolve_hints(cls)
        codec = TypeCodec()
        codec.cls, codec.name, codec.type_id = cls, cls.__name__, type_id
        codec.max_size, codec.extensible, codec.max_items = max_size, extensible, max_items
        codec.field_names = tuple(f.name for f in fields)
        codec.arity = len(fields)
        codec.required = sum(1 for f in fields if _has_no_default(f))
        codec.has_validate = callable(getattr(cls, "validate", None))
        hint_list = [hints[f.name] for f in fields]
        codec.hints = tuple(hint_list)
        codec.checks = tuple(self._check_for(h, cls) for h in hint_list)
        codec.scalar_types = tuple(h if h in (int, str, bytes, bool) else None for h in hint_list)
        fixed, variable = self._shape(hint_list)
        codec.fixed_len = max(fixed, codec.arity)
        codec.variable = variable or extensible
        converts = [self._convert_for(h) for h in hint_list]
        codec.fields_to_wire = generate_to_wire(codec.field_names, converts, None)
        codec.to_wire = generate_to_wire(codec.field_names, converts, type_id)
        codec.unpack_kwargs = _unpack_kwargs(codec)
        codec.containers, values = self._bounds_of(codec, max_items)
        codec.container_limit = codec.containers if max_size is not None else None
        codec.value_limit = 1 + values  # (1: the type id)
        codec.fast_build = generate_fast_build(codec, skip=0)
        codec.fast_build_top = generate_fast_build(codec, skip=1)
        return codec

    def _check_for(self, hint: Any, owner: type) -> Check:
        """Compile the validator for one annotation (LocalProtocolError if unsupported)."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint in (int, str, bytes, bool):
            return scalar_check(hint)
        if hint is float:
            return check_float
        if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
            return enum_check(hint)
        if hint in self._by_class:
            return self._by_class[hint].nested_check
        if origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
            inner = args[0] if args[1] is type(None) else args[1]
            return optional_check(self._check_for(inner, owner))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple_of_check(self._check_for(args[0], owner))
        if origin is tuple and args and Ellipsis not in args:
            return fixed_tuple_check(tuple(self._check_for(a, owner) for a in args))
        if origin is dict and args and args[0] is str:
            return dict_check(self._check_for(args[1], owner))
        raise LocalProtocolError(
            f"{owner.__name__}: unsupported field annotation {hint!r} (nested dataclasses must be "
            "registered first; use tuple, not list)"
        )

    def _convert_for(self, hint: Any) -> Convert:
        """How to turn a field value into msgpack-ready data; None when it already is."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint in self._by_class:
            return self._by_class[hint].fields_to_wire
        if origin in (types.UnionType, typing.Union):
            inner = self._convert_for(args[0] if args[1] is type(None) else args[1])
            return None if inner is None else (lambda v: None if v is None else inner(v))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            inner = self._convert_for(args[0])
            return None if inner is None else (lambda v: [inner(x) for x in v])
        if origin is tuple and args:
            inners = [self._convert_for(a) for a in args]
            if all(c is None for c in inners):
                return None
            return lambda v: [x if c is None else c(x) for c, x in zip(inners, v, strict=True)]
        if origin is dict:
            inner = self._convert_for(args[1])
            return None if inner is None else (lambda v: {k: inner(x) for k, x in v.items()})
        return None

    def _shape(self, hints: list[Any]) -> tuple[int, bool]:
        """(widest fixed-length array, has variable-length tuple/dict) over the annotations."""
        widest, variable = 0, False
        for hint in hints:
            origin, args = typing.get_origin(hint), typing.get_args(hint)
            if hint in self._by_class:
                nested = self._by_class[hint]
                widest, variable = max(widest, nested.fixed_len), variable or nested.variable
            elif origin is dict or (origin is tuple and Ellipsis in args):
                sub_widest, _ = self._shape(list(args))
                widest, variable = max(widest, sub_widest), True
            elif origin is not None:
                sub_widest, sub_variable = self._shape([a for a in args if a is not Ellipsis])
                fixed = len(args) if origin is tuple else 0
                widest, variable = max(widest, sub_widest, fixed), variable or sub_variable
        return widest, variable

    def _bounds_of(self, codec: TypeCodec, max_items: int) -> tuple[int, int]:
        """The most arrays and maps (its own included) and the most values (array items, map
        entries) a valid encoding of ``codec``'s type holds at any depth; an extensible type
        may hold ``max_items`` more containers and ``EXTENSION_VALUES * max_items`` more
        values in a newer peer's fields."""
        containers = 1 + (max_items if codec.extensible else 0)
        values = codec.arity + (EXTENSION_VALUES * max_items if codec.extensible else 0)
        for hint in codec.hints:
            nested_containers, nested_values = self._bounds(hint, max_items)
            containers += nested_containers
            values += nested_values
        return containers, values

    def _bounds(self, hint: Any, max_items: int) -> tuple[int, int]:
        """The most (containers, values) a valid value of one (supported) annotation holds."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint in self._by_class:
            return self._bounds_of(self._by_class[hint], max_items)
        if origin in (types.UnionType, typing.Union):
            each = [self._bounds(a, max_items) for a in args]
            return max(c for c, _ in each), max(v for _, v in each)
        if (origin is tuple and Ellipsis in args) or origin is dict:
            containers, values = self._bounds(args[-1 if origin is dict else 0], max_items)
            return 1 + max_items * containers, max_items * (1 + values)
        if origin is tuple:
            each = [self._bounds(a, max_items) for a in args]
            return 1 + sum(c for c, _ in each), len(args) + sum(v for _, v in each)
        return 0, 0

    # --- lookups -------------------------------------------------------------------------

    def spec_of(self, cls_or_id: type | int) -> MessageSpec:
        """The registration of a message class (or type id); LocalProtocolError if unknown."""
        table: Mapping[Any, TypeCodec] = self._by_id if type(cls_or_id) is int else self._by_class
        codec = table.get(cls_or_id)
        if codec is None:
            raise LocalProtocolError(f"{cls_or_id!r} is not registered")
        return codec.spec()

    def message_types(self) -> Mapping[int, type]:
        """A snapshot ``{type_id: class}`` of every registered message type."""
        return types.MappingProxyType({i: c.cls for i, c in sorted(self._by_id.items())})

    # --- encode / decode ------------------------------------------------------------------

    def encode(self, msg: Message) -> bytes:
        """Encode a registered message as ``[type_id, *fields]`` msgpack bytes."""
        codec = self._by_class.get(type(msg))
        if codec is None or codec.type_id is None:
            raise LocalProtocolError(f"{type(msg).__name__} is not a registered message type")
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._local.packer = msgpack.Packer(autoreset=True, use_bin_type=True)
        try:
            data = packer.pack(codec.to_wire(msg))
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode {codec.name}: {exc}") from exc
        if len(data) > codec.max_size:
            raise LocalProtocolError(
                f"{codec.name} encodes to {len(data)} bytes, over its cap of {codec.max_size}"
            )
        return data

    def decode(self, data: bytes) -> Message:
        """Decode and validate one message from a peer; RemoteProtocolError if anything is off."""
        return self._decode_with(self._codec_for(data), data)

    def decode_as(self, data: bytes, cls: type[M]) -> M:
        """Like :meth:`decode`, but the message must be a ``cls`` (checked before unpacking)."""
        codec = self._codec_for(data)
        if codec.cls is not cls:
            raise RemoteProtocolError(f"expected a {cls.__name__} message, got {codec.name}")
        return self._decode_with(codec, data)

    def _codec_for(self, data: bytes) -> TypeCodec:
        """The codec of the type id in ``data``, after the cap and field count checks."""
        type_id, count = peek_header(data)
        codec = self._by_id.get(type_id)
        if codec is None:
            raise RemoteProtocolError(f"unknown message type id {type_id}")
        if len(data) > codec.max_size:
            raise FrameTooLarge(
                f"{codec.name} message of {len(data)} bytes exceeds its cap of {codec.max_size}"
            )
        if not codec.count_ok(count - 1):
            raise RemoteProtocolError(
                f"{codec.name}: expected {codec.arity} fields, got {count - 1}"
            )
        return codec

    def _decode_with(self, codec: TypeCodec, data: bytes) -> Any:
        limit = codec.container_limit
        try:
            if limit is None or len(data) <= COUNTED_SIZE:
                items = msgpack.unpackb(data, **codec.unpack_kwargs)
            else:
                hook = counting_hook(codec.name, limit, codec.value_limit)
                items = msgpack.unpackb(
                    data, list_hook=hook, object_hook=hook, **codec.unpack_kwargs
                )
        except msgpack.ExtraData:
            raise RemoteProtocolError(f"trailing bytes after {codec.name} message") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            detail = str(exc) or type(exc).__name__
            raise RemoteProtocolError(f"malformed {codec.name} message: {detail}") from None
        try:
            return codec.fast_build_top(items)
        except Mismatch as exc:
            path = "".join(reversed(exc.path))
            raise RemoteProtocolError(f"bad {codec.name}{path}: {exc.detail}") from None


# --- registration helpers ---------------------------------------------------------------------


def _require_int(name: str, value: Any, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be an int in {low}..{high}, got {value!r}")


def _message_fields(cls: Any, registered: Mapping[type, Any]) -> tuple[dataclasses.Field, ...]:
    name = getattr(cls, "__name__", repr(cls))
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise LocalProtocolError(f"{name} must be a dataclass")
    if not cls.__dataclass_params__.frozen or "__slots__" not in cls.__dict__:
        raise LocalProtocolError(f"{name} must be @dataclass(frozen=True, slots=True)")
    if cls in registered:
        raise LocalProtocolError(f"{name} is already registered")
    if hasattr(cls, "__post_init__"):
        raise LocalProtocolError(f"{name}: use a validate() hook instead of __post_init__")
    fields = dataclasses.fields(cls)
    if any(f.kw_only or not f.init for f in fields):
        raise LocalProtocolError(f"{name}: every field must be positional and in __init__")
    return fields


def _resolve_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as exc:
        raise LocalProtocolError(f"{cls.__name__}: cannot resolve annotations: {exc}") from exc


def _has_no_default(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _unpack_kwargs(codec: TypeCodec) -> dict[str, Any]:
    widest = codec.fixed_len + (1 if codec.type_id is not None else 0)
    return {
        "use_list": False,
        "raw": False,
        "strict_map_key": True,
        "max_ext_len": 0,
        "ext_hook": no_ext,
        "max_array_len": max(widest, codec.max_items) if codec.variable else widest,
        "max_map_len": codec.max_items if codec.variable else 0,
    }


REGISTRY = MessageRegistry()
message = REGISTRY.message
embedded = REGISTRY.embedded
encode = REGISTRY.encode
decode = REGISTRY.decode
decode_as = REGISTRY.decode_as
spec_of = REGISTRY.spec_of
message_types = REGISTRY.message_types


# --- session control (ids 1-15) and gossip (16) ---------------------------------------------------

MAX_NODE_ID_LEN = 128
MAX_CERTIFICATE_LEN = 4096
MAX_NAME_LEN = 64
MAX_ROLES = 16
MAX_FEATURES = 64
MAX_TOPIC_LEN = 256
_UINT64 = 1 << 64


class CloseCode(enum.IntEnum):
    """Why a session was closed (:class:`Close`). ONLY APPEND."""

    NORMAL = 0
    GOING_AWAY = 1
    PROTOCOL_ERROR = 2
    IDLE_TIMEOUT = 3
    ADMISSION_REFUSED = 4
    OVERLOADED = 5
    #: the sender cut an open session: the receiver's certificate expired (beyond the clock
    #: skew); what the receiver sent meanwhile was dropped unread. An older peer takes it as
    #: an unknown code: closed (``PROTOCOL_ERROR``), not lost.
    CERTIFICATE_EXPIRED = 6


def _refuse(cls_name: str, detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"invalid {cls_name}: {detail}")


def _check_names(owner: str, field: str, names: tuple[str, ...], limit: int) -> None:
    if len(names) > limit:
        raise _refuse(owner, f"{field} has {len(names)} entries, at most {limit} allowed")
    if any(not 0 < len(n) <= MAX_NAME_LEN for n in names):
        raise _refuse(owner, f"{field} entries must be 1..{MAX_NAME_LEN} characters")
    if not all(map(is_plain_text, names)):
        raise _refuse(owner, f"{field} entries may not hold control characters")


@message(type_id=1, max_size=8192)
@dataclass(frozen=True, slots=True)
class Hello:
    """The handshake payload: who I am (certificate), what I do (roles) and support."""

    protocol_version: int
    node_id: str
    certificate: bytes
    roles: tuple[str, ...]
    features: tuple[str, ...]
    max_message_size: int

    def validate(self) -> None:
        """Refuse out-of-range versions, sizes and over-long names."""
        if self.protocol_version < 1:
            raise _refuse("Hello", f"protocol_version {self.protocol_version} < 1")
        if not 0 < len(self.node_id) <= MAX_NODE_ID_LEN:
            raise _refuse("Hello", f"node_id must be 1..{MAX_NODE_ID_LEN} characters")
        if not is_plain_text(self.node_id):
            raise _refuse("Hello", "node_id holds a control character")
        if len(self.certificate) > MAX_CERTIFICATE_LEN:
            raise _refuse("Hello", f"certificate longer than {MAX_CERTIFICATE_LEN} bytes")
        if self.max_message_size < 1:
            raise _refuse("Hello", f"max_message_size {self.max_message_size} < 1")
        _check_names("Hello", "roles", self.roles, MAX_ROLES)
        _check_names("Hello", "features", self.features, MAX_FEATURES)


def _check_nonce(owner: str, nonce: int) -> None:
    if not 0 <= nonce < _UINT64:
        raise _refuse(owner, f"nonce {nonce} is not an unsigned 64-bit integer")


@message(type_id=2, max_size=64)
@dataclass(frozen=True, slots=True)
class Ping:
    """Keep-alive probe; the peer answers with a :class:`Pong` carrying the same nonce."""

    nonce: int

    def validate(self) -> None:
        """The nonce is an unsigned 64-bit integer."""
        _check_nonce("Ping", self.nonce)


@message(type_id=3, max_size=64)
@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a :class:`Ping` (echoes its nonce; the sender measures the round trip)."""

    nonce: int

    def validate(self) -> None:
        """The nonce is an unsigned 64-bit integer."""
        _check_nonce("Pong", self.nonce)


@message(type_id=4, max_size=1024)
@dataclass(frozen=True, slots=True)
class Close:
    """Graceful close. ``code`` is usually a :class:`CloseCode`; unknown codes (a newer peer's)
    are accepted as plain ints."""

    code: int
    reason: str

    def validate(self) -> None:
        """The code fits in 16 bits."""
        if not 0 <= self.code <= 0xFFFF:
            raise _refuse("Close", f"code {self.code} out of range 0..65535")


@message(type_id=5, max_size=MAX_MESSAGE_SIZE)
@dataclass(frozen=True, slots=True)
class AppData:
    """A generic application message (demos, tests, benchmarks): opaque ``payload`` on a topic."""

    topic: str
    payload: bytes

    def validate(self) -> None:
        """The topic is 1..MAX_TOPIC_LEN characters."""
        if not 0 < len(self.topic) <= MAX_TOPIC_LEN:
            raise _refuse("AppData", f"topic must be 1..{MAX_TOPIC_LEN} characters")


@message(type_id=16, max_size=4 * 1024 * 1024)
@dataclass(frozen=True, slots=True)
class Gossip:
    """An opaque membership packet; :mod:`meshinfer.proto.membership` encodes its contents."""

    payload: bytes
