"""How one registered message type is checked, built and encoded: the machinery behind
:class:`~meshinfer.proto.messages.MessageRegistry`, compiled once per type at registration.

Field validators (value from msgpack -> value for the dataclass, or :class:`Mismatch`), the
per-type :class:`TypeCodec` with its generated straight-line encoder and builder, the msgpack
hooks that refuse ext types and count what a large frame unpacks, and the peek at a frame's
header (type id and field count) before anything is unpacked. The rules they enforce are
described in :mod:`meshinfer.proto.messages`; nothing here is used elsewhere.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshinfer.errors import LocalProtocolError, RemoteProtocolError

Check = Callable[[Any], Any]
Convert = Callable[[Any], Any] | None


class Mismatch(Exception):
    """A field value does not match its annotation; ``path`` grows while unwinding."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path: list[str] = []


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """What the registry knows about one registered type (``type_id`` is None for embedded)."""

    cls: type
    name: str
    type_id: int | None
    max_size: int | None
    extensible: bool
    max_items: int


# --- field validators (value from msgpack -> value for the dataclass, or Mismatch) -----------


def _got(value: Any) -> str:
    return type(value).__name__


def scalar_check(expected: type) -> Check:
    def check(value: Any) -> Any:
        if type(value) is expected:
            return value
        raise Mismatch(f"expected {expected.__name__}, got {_got(value)}")

    return check


def check_float(value: Any) -> float:
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        return float(value)
    raise Mismatch(f"expected float, got {_got(value)}")


def enum_check(enum_cls: type[enum.IntEnum]) -> Check:
    def check(value: Any) -> Any:
        if type(value) is not int:
            raise Mismatch(f"expected {enum_cls.__name__} (int), got {_got(value)}")
        try:
            return enum_cls(value)
        except ValueError:
            raise Mismatch(f"{value} is not a {enum_cls.__name__}") from None

    return check


def optional_check(inner: Check) -> Check:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def tuple_of_check(inner: Check) -> Check:
    def check(value: Any) -> tuple[Any, ...]:
        if type(value) is not tuple:
            raise Mismatch(f"expected array, got {_got(value)}")
        out = []
        try:
            for item in value:
                out.append(inner(item))
        except Mismatch as exc:
            exc.path.append(f"[{len(out)}]")
            raise
        return tuple(out)

    return check


def fixed_tuple_check(inners: tuple[Check, ...]) -> Check:
    def check(value: Any) -> tuple[Any, ...]:
        if type(value) is not tuple or len(value) != len(inners):
            raise Mismatch(f"expected array of {len(inners)}, got {_got(value)}")
        out = []
        try:
            for inner, item in zip(inners, value, strict=True):
                out.append(inner(item))
        except Mismatch as exc:
            exc.path.append(f"[{len(out)}]")
            raise
        return tuple(out)

    return check


def dict_check(inner: Check) -> Check:
    def check(value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise Mismatch(f"expected map, got {_got(value)}")
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise Mismatch(f"expected str map key, got {_got(key)}")
            try:
                out[key] = inner(item)
            except Mismatch as exc:
                exc.path.append(f"[{key!r}]")
                raise
        return out

    return check


# --- per-type codec, compiled once at registration --------------------------------------------


class TypeCodec:
    """Everything needed to encode/decode one registered type, precomputed."""

    __slots__ = (
        "arity",
        "checks",
        "cls",
        "container_limit",
        "containers",
        "extensible",
        "fast_build",
        "fast_build_top",
        "field_names",
        "fields_to_wire",
        "fixed_len",
        "has_validate",
        "hints",
        "max_items",
        "max_size",
        "name",
        "required",
        "scalar_types",
        "to_wire",
        "type_id",
        "unpack_kwargs",
        "value_limit",
        "variable",
    )

    def count_ok(self, count: int) -> bool:
        """Whether ``count`` fields are acceptable (see the forward-compatibility rule)."""
        return count == self.arity or (self.extensible and count >= self.required)

    def build(self, items: tuple[Any, ...]) -> Any:
        """Check ``items`` (this type's fields, already unpacked) and build the dataclass."""
        if not self.count_ok(len(items)):
            raise Mismatch(f"expected {self.arity} fields, got {len(items)}")
        try:
            # map() stops at the shorter input: an extensible type may get more or fewer items
            values = tuple(map(operator.call, self.checks, items))
        except Mismatch as exc:
            exc.path.append(f".{self._failing_field(items)}")
            raise
        msg = self.cls(*values)
        if self.has_validate:
            msg.validate()
        return msg

    def _failing_field(self, items: tuple[Any, ...]) -> str:
        """Name of the first field whose check fails (only run on the error path)."""
        for name, check, value in zip(self.field_names, self.checks, items, strict=False):
            try:
                check(value)
            except Mismatch:
                return name
        return "?"

    def nested_check(self, value: Any) -> Any:
        """Validator for a field whose annotation is this type."""
        if type(value) is not tuple:
            raise Mismatch(f"expected {self.name} array, got {_got(value)}")
        return self.fast_build(value)

    def spec(self) -> MessageSpec:
        return MessageSpec(
            self.cls, self.name, self.type_id, self.max_size, self.extensible, self.max_items
        )


def no_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack ext type {code} is not allowed")


#: Frames longer than this count the arrays and maps they unpack, and the values in them
#: (:func:`counting_hook`); a shorter one unpacks to at most ~70 times its size (~280 KiB).
COUNTED_SIZE = 4096
#: The values (items of arrays, entries of maps) an extensible type's extra fields, from a
#: newer peer, may hold beyond what a valid encoding of the fields it knows holds, per
#: ``max_items``.
EXTENSION_VALUES = 4


def counting_hook(name: str, limit: int, values: int) -> Callable[[Any], Any]:
    """A msgpack ``list_hook``/``object_hook`` that refuses the array or map past ``limit``, or
    the one that brings the items and entries unpacked past ``values``: one byte of msgpack
    unpacks to a 64-byte dict or tuple, and three to a 50-byte string, so a frame of nested
    containers, or of maps and arrays of short strings, would otherwise grow up to ~70-fold in
    memory, in fields that are checked only after unpacking (or, extra fields of an extensible
    type, never)."""
    left, values_left = limit, values

    def hook(obj: Any) -> Any:
        nonlocal left, values_left
        left -= 1
        values_left -= len(obj)
        if left < 0:
            raise RemoteProtocolError(f"{name} message holds more than {limit} arrays and maps")
        if values_left < 0:
            raise RemoteProtocolError(f"{name} message holds more than {values} values")
        return obj

    return hook


def generate_to_wire(names: tuple[str, ...], converts: list[Convert], type_id: int | None):
    """Generate a straight-line ``obj -> tuple of msgpack-ready field values`` (nested
    dataclasses become arrays), led by ``type_id`` unless it is None: one tuple display, no
    generator or zip per message."""
    parts = [str(type_id)] if type_id is not None else []
    namespace: dict[str, Any] = {}
    for i, (name, convert) in enumerate(zip(names, converts, strict=True)):
        if convert is None:
            parts.append(f"obj.{name}")
        else:
            namespace[f"c{i}"] = convert
            parts.append(f"c{i}(obj.{name})")
    exec(f"def to_wire(obj):\n    return ({', '.join(parts)}{',' if parts else ''})", namespace)
    return namespace["to_wire"]


def generate_fast_build(codec: TypeCodec, skip: int) -> Callable[[tuple[Any, ...]], Any]:
    """Generate a straight-line ``build`` for the common case, as dataclasses generates
    ``__init__``: exact field count, scalar fields checked inline, the instance filled through
    its slots. Anything unusual (wrong count or type) is handed to :meth:`TypeCodec.build`,
    which raises the precise error or handles an extensible type's other field counts.
    ``skip`` leading items (the type id) are ignored."""
    names = [f"v{i}" for i in range(codec.arity)]
    scalar = [f"type({n}) is not t{i}" for i, n in enumerate(names) if codec.scalar_types[i]]
    other = [f"        {n} = c{i}({n})" for i, n in enumerate(names) if not codec.scalar_types[i]]
    fallback = f"return slow(items[{skip}:])" if skip else "return slow(items)"
    targets = ", ".join(["_"] * skip + names)
    lines = [
        "def fast_build(items):",
        f"    if len(items) != {codec.arity + skip}:",
        f"        {fallback}",
        f"    {targets}, = items" if targets else "",
        f"    if {' or '.join(scalar)}:" if scalar else "",
        f"        {fallback}" if scalar else "",
        *(["    try:", *other, "    except Mismatch:", f"        {fallback}"] if other else []),
        "    obj = new(cls)",
        *(f"    s{i}(obj, {n})" for i, n in enumerate(names)),
        "    obj.validate()" if codec.has_validate else "",
        "    return obj",
    ]
    namespace: dict[str, Any] = {
        "slow": codec.build,
        "new": object.__new__,
        "cls": codec.cls,
        "Mismatch": Mismatch,
    }
    for i, name in enumerate(codec.field_names):
        namespace[f"t{i}"], namespace[f"c{i}"] = codec.scalar_types[i], codec.checks[i]
        namespace[f"s{i}"] = _slot_setter(codec.cls, name)
    exec("\n".join(line for line in lines if line), namespace)
    return namespace["fast_build"]


def _slot_setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    """The slot descriptor's setter: fills a frozen instance without its __setattr__ guard."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name].__set__
    raise LocalProtocolError(f"{cls.__name__}.{name} has no slot")


_WIDE_ARRAY_HEADER_SIZE = {0xDC: 3, 0xDD: 5}  # array 16, array 32


def peek_header(data: bytes) -> tuple[int, int]:
    """Read (type id, array length) from the raw bytes, without unpacking."""
    if len(data) >= 2 and 0x91 <= data[0] <= 0x9F and data[1] <= 0x7F:
        return data[1], data[0] & 0x0F  # fast path: fixarray, fixint type id
    return _peek_header_slow(data)


def _peek_header_slow(data: bytes) -> tuple[int, int]:
    size = len(data)
    head = data[0] if size else -1
    pos, count = 1, 0
    if 0x90 <= head <= 0x9F:  # fixarray
        count = head & 0x0F
    elif head in _WIDE_ARRAY_HEADER_SIZE and size > _WIDE_ARRAY_HEADER_SIZE[head]:
        pos = _WIDE_ARRAY_HEADER_SIZE[head]
        count = int.from_bytes(data[1:pos], "big")
    if count == 0:
        raise RemoteProtocolError("message is not a non-empty msgpack array")
    tag = data[pos] if size > pos else -1
    if 0 <= tag <= 0x7F:
        return tag, count
    if tag == 0xCC and size > pos + 1:
        return data[pos + 1], count
    if tag == 0xCD and size > pos + 2:
        return (data[pos + 1] << 8) | data[pos + 2], count
    raise RemoteProtocolError("message type id is missing or not a small unsigned integer")
