"""The message registry: round trips, validation rules, registry rules and decoder fuzzing."""

import dataclasses
import enum
import importlib
import pkgutil
import types
import typing
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import meshinfer
from meshinfer.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from meshinfer.proto import messages
from meshinfer.proto.messages import (
    MAX_MESSAGE_SIZE,
    REGISTRY,
    AppData,
    Close,
    CloseCode,
    Gossip,
    Hello,
    MessageRegistry,
    Ping,
    Pong,
    decode,
    decode_as,
    encode,
    spec_of,
)


def _import_all_meshinfer_modules() -> dict[str, str]:
    """Load every module of the package, so that message types registered anywhere get
    round-trip and fuzz coverage here. Returns {module: error} for modules that failed."""
    failures = {}
    for info in pkgutil.walk_packages(meshinfer.__path__, "meshinfer.", onerror=lambda name: None):
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # reported by test_every_meshinfer_module_imports
            failures[info.name] = f"{type(exc).__name__}: {exc}"
    return failures


_IMPORT_FAILURES = _import_all_meshinfer_modules()


def test_every_meshinfer_module_imports():
    # A module that fails to import hides its message types from the round-trip tests below.
    assert _IMPORT_FAILURES == {}


# --- a private registry exercising every supported annotation ---------------------------------

TEST = MessageRegistry()


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


@TEST.embedded()
@dataclass(frozen=True, slots=True)
class Point:
    x: float
    label: str

    def validate(self) -> None:
        if len(self.label) > 8:
            raise RemoteProtocolError("invalid Point: label too long")


@TEST.message(type_id=60001, max_size=4096)
@dataclass(frozen=True, slots=True)
class Sample:
    count: int
    ratio: float
    name: str
    blob: bytes
    flag: bool
    tags: tuple[str, ...]
    pair: tuple[int, str]
    attrs: dict[str, int]
    note: str | None
    color: Color
    origin: Point
    path: tuple[Point, ...]
    parent: typing.Optional[Point]  # noqa: UP045 -- the typing.Optional spelling must work too


@TEST.message(type_id=60002, max_size=32)
@dataclass(frozen=True, slots=True)
class Small:
    text: str


@TEST.message(type_id=60003, max_size=256, extensible=True)
@dataclass(frozen=True, slots=True)
class Growing:
    a: int
    b: str = "default"


@TEST.message(type_id=60004, max_size=1024, max_items=4)
@dataclass(frozen=True, slots=True)
class Bounded:
    items: tuple[int, ...]


@TEST.message(type_id=60005, max_size=256)
@dataclass(frozen=True, slots=True)
class Wrapper:
    inner: Small
    n: int


@TEST.message(type_id=60006, max_size=64)
@dataclass(frozen=True, slots=True)
class Empty:
    pass


# --- strategies generated from the annotations ------------------------------------------------

_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


def strategy_for(hint: typing.Any, registry: MessageRegistry) -> st.SearchStrategy:
    """A Hypothesis strategy for values of one supported field annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    simple = {
        int: st.integers(_INT64_MIN, _UINT64_MAX),
        float: st.floats(allow_nan=False),
        str: st.text(max_size=12),
        bytes: st.binary(max_size=48),
        bool: st.booleans(),
    }
    if hint in simple:
        return simple[hint]
    if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
        return st.sampled_from(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return instances_of(hint, registry)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(
            [st.none() if a is type(None) else strategy_for(a, registry) for a in args]
        )
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(strategy_for(args[0], registry), max_size=4).map(tuple)
    if origin is tuple:
        return st.tuples(*[strategy_for(a, registry) for a in args])
    if origin is dict:
        return st.dictionaries(st.text(max_size=6), strategy_for(args[1], registry), max_size=4)
    raise AssertionError(f"no strategy for {hint!r}: extend strategy_for with the new annotation")


def instances_of(cls: type, registry: MessageRegistry) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    fields = [strategy_for(hints[f.name], registry) for f in dataclasses.fields(cls)]
    return st.tuples(*fields).map(lambda values: cls(*values))


def _all_types() -> list[tuple[MessageRegistry, type]]:
    pairs = [(REGISTRY, cls) for cls in REGISTRY.message_types().values()]
    return pairs + [(TEST, cls) for cls in TEST.message_types().values()]


def _is_valid(value: object) -> bool:
    """Whether ``value`` and every dataclass nested in it passes its validate() hook."""
    if isinstance(value, tuple | list):
        return all(_is_valid(v) for v in value)
    if isinstance(value, dict):
        return all(_is_valid(v) for v in value.values())
    if not dataclasses.is_dataclass(value):
        return True
    if not all(_is_valid(getattr(value, f.name)) for f in dataclasses.fields(value)):
        return False
    try:
        getattr(value, "validate", lambda: None)()
    except RemoteProtocolError:
        return False
    return True


@pytest.mark.parametrize(
    ("registry", "cls"),
    [pytest.param(r, c, id=("test-" if r is TEST else "") + c.__name__) for r, c in _all_types()],
)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_registered_type_round_trips(registry, cls, data):
    msg = data.draw(instances_of(cls, registry))
    try:
        wire = registry.encode(msg)
    except LocalProtocolError as exc:
        assume("over its cap" not in str(exc))
        raise
    if _is_valid(msg):
        decoded = registry.decode(wire)
        assert decoded == msg
        assert type(decoded) is cls
        assert registry.encode(decoded) == wire
    else:
        with pytest.raises(RemoteProtocolError):
            registry.decode(wire)


VALID_MESSAGES = [
    Hello(1, "veh-0042", b"\x01" * 280, ("vehicle", "gpu"), ("chunking",), 16 << 20),
    Ping(0),
    Pong(_UINT64_MAX),
    Close(CloseCode.ADMISSION_REFUSED, "certificate expired"),
    Close(999, "code from a newer peer"),
    AppData("bench", bytes(range(256)) * 4),
    Gossip(b"\x00" * 100_000),
]


@pytest.mark.parametrize("msg", VALID_MESSAGES, ids=lambda m: type(m).__name__)
def test_session_control_messages_round_trip(msg):
    wire = encode(msg)
    assert wire[1] == spec_of(type(msg)).type_id  # [type_id, ...] with a one-byte fixint id
    assert decode(wire) == msg


def test_wire_form_is_type_id_then_fields_in_order():
    assert msgpack.unpackb(encode(Close(2, "bye"))) == [4, 2, "bye"]
    assert msgpack.unpackb(TEST.encode(Wrapper(Small("hi"), 3))) == [60005, ["hi"], 3]


def test_decode_as_refuses_another_type_before_unpacking():
    assert decode_as(encode(Ping(7)), Ping) == Ping(7)
    with pytest.raises(RemoteProtocolError, match="expected a Hello message, got Ping"):
        decode_as(encode(Ping(7)), Hello)


# --- append-only registry -----------------------------------------------------------------------

PINNED_IDS = {"Hello": 1, "Ping": 2, "Pong": 3, "Close": 4, "AppData": 5, "Gossip": 16}
PINNED_FIELDS = {
    "Hello": (
        "protocol_version",
        "node_id",
        "certificate",
        "roles",
        "features",
        "max_message_size",
    ),
    "Ping": ("nonce",),
    "Pong": ("nonce",),
    "Close": ("code", "reason"),
    "AppData": ("topic", "payload"),
    "Gossip": ("payload",),
}
PINNED_CLOSE_CODES = {
    "NORMAL": 0,
    "GOING_AWAY": 1,
    "PROTOCOL_ERROR": 2,
    "IDLE_TIMEOUT": 3,
    "ADMISSION_REFUSED": 4,
    "OVERLOADED": 5,
    "CERTIFICATE_EXPIRED": 6,
}


@pytest.mark.parametrize(("name", "type_id"), PINNED_IDS.items())
def test_type_ids_are_pinned(name, type_id):
    cls = getattr(messages, name)
    assert spec_of(cls).type_id == type_id
    assert REGISTRY.message_types()[type_id] is cls


@pytest.mark.parametrize(("name", "fields"), PINNED_FIELDS.items())
def test_field_order_is_pinned(name, fields):
    assert tuple(f.name for f in dataclasses.fields(getattr(messages, name))) == fields


def test_close_codes_are_pinned():
    assert {c.name: c.value for c in CloseCode} == PINNED_CLOSE_CODES


def test_registered_ids_are_unique_and_consistent():
    table = REGISTRY.message_types()
    assert len(set(table.values())) == len(table)
    for type_id, cls in table.items():
        assert spec_of(cls).type_id == type_id
        assert spec_of(type_id).cls is cls


def test_duplicate_type_id_is_rejected_and_registry_unchanged():
    with pytest.raises(LocalProtocolError, match="already taken by Hello"):

        @messages.message(type_id=1, max_size=64)
        @dataclass(frozen=True, slots=True)
        class Impostor:
            x: int

    assert REGISTRY.message_types()[1] is Hello


def test_registering_a_class_twice_is_rejected():
    with pytest.raises(LocalProtocolError, match="already registered"):
        TEST.message(type_id=60100, max_size=64)(Small)


def _frozen(cls):
    return dataclass(frozen=True, slots=True)(cls)


def _list_field():
    class ListField:
        items: list[int]

    return _frozen(ListField)


def _union_field():
    class UnionField:
        x: int | str

    return _frozen(UnionField)


def _post_init():
    class PostInit:
        x: int

        def __post_init__(self):
            pass

    return _frozen(PostInit)


def _plain(decorate=lambda cls: cls):
    class Plain:
        x: int

    return decorate(Plain)


@pytest.mark.parametrize(
    ("make_class", "match"),
    [
        (_list_field, "unsupported field annotation"),
        (_union_field, "unsupported field annotation"),
        (_post_init, "__post_init__"),
        (lambda: _plain(dataclass(slots=True)), r"frozen=True, slots=True"),
        (lambda: _plain(dataclass(frozen=True)), r"frozen=True, slots=True"),
        (_plain, "must be a dataclass"),
    ],
)
def test_registration_rejects_unsupported_classes(make_class, match):
    with pytest.raises(LocalProtocolError, match=match):
        MessageRegistry().message(type_id=60200, max_size=64)(make_class())


@pytest.mark.parametrize(
    ("type_id", "max_size"),
    [(0, 64), (65536, 64), (True, 64), (60300, 0), (60300, MAX_MESSAGE_SIZE + 1)],
)
def test_registration_rejects_bad_ids_and_caps(type_id, max_size):
    with pytest.raises(LocalProtocolError):
        MessageRegistry().message(type_id=type_id, max_size=max_size)


# --- one test per validation rule ---------------------------------------------------------------


def _sample_fields(**changes):
    """A valid Sample as its wire list (no type id), with some fields replaced."""
    fields = {
        "count": 3,
        "ratio": 0.5,
        "name": "n",
        "blob": b"b",
        "flag": True,
        "tags": ["t"],
        "pair": [1, "one"],
        "attrs": {"k": 1},
        "note": None,
        "color": 2,
        "origin": [1.5, "o"],
        "path": [[0.0, "p"]],
        "parent": None,
    }
    fields.update(changes)
    return [60001, *fields.values()]


def test_valid_sample_wire_form_decodes():
    msg = TEST.decode(msgpack.packb(_sample_fields()))
    assert msg.color is Color.GREEN
    assert msg.tags == ("t",) and msg.path == (Point(0.0, "p"),)


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"count": "3"}, "Sample.count: expected int, got str"),
        ({"count": True}, "Sample.count: expected int, got bool"),
        ({"count": 1.0}, "Sample.count: expected int, got float"),
        ({"ratio": "0.5"}, "Sample.ratio: expected float"),
        ({"name": b"n"}, "Sample.name: expected str, got bytes"),
        ({"blob": "b"}, "Sample.blob: expected bytes, got str"),
        ({"flag": 1}, "Sample.flag: expected bool, got int"),
        ({"tags": "t"}, "Sample.tags: expected array"),
        ({"tags": ["a", 5]}, r"Sample.tags\[1\]: expected str, got int"),
        ({"pair": [1]}, "Sample.pair: expected array of 2"),
        ({"pair": [1, 2]}, r"Sample.pair\[1\]: expected str"),
        ({"attrs": [1]}, "Sample.attrs: expected map"),
        ({"attrs": {b"k": 1}}, "Sample.attrs: expected str map key, got bytes"),
        ({"attrs": {"k": "v"}}, r"Sample.attrs\['k'\]: expected int"),
        ({"note": 5}, "Sample.note: expected str, got int"),
        ({"color": 7}, "Sample.color: 7 is not a Color"),
        ({"color": "RED"}, "Sample.color: expected Color"),
        ({"origin": {"x": 1.0}}, "Sample.origin: expected Point array, got dict"),
        ({"origin": [1.0]}, "Sample.origin: expected 2 fields, got 1"),
        ({"origin": [1.0, 2]}, "Sample.origin.label: expected str, got int"),
        ({"path": [[0.0, "p"], [0.0, None]]}, r"Sample.path\[1\].label: expected str"),
        ({"parent": [True, "p"]}, "Sample.parent.x: expected float, got bool"),
    ],
)
def test_wrong_field_types_are_refused_naming_the_field(changes, where):
    with pytest.raises(RemoteProtocolError, match=where):
        TEST.decode(msgpack.packb(_sample_fields(**changes)))


def test_float_field_accepts_an_int_and_stores_a_float():
    msg = TEST.decode(msgpack.packb(_sample_fields(ratio=2)))
    assert msg.ratio == 2.0 and type(msg.ratio) is float


def test_validate_hooks_run_on_top_level_and_nested_types():
    with pytest.raises(RemoteProtocolError, match="invalid Ping"):
        decode(msgpack.packb([2, -1]))
    with pytest.raises(RemoteProtocolError, match="invalid Point"):
        TEST.decode(msgpack.packb(_sample_fields(origin=[1.0, "much too long"])))


@pytest.mark.parametrize(
    "wire",
    [
        [1, 1, "", b"", [], [], 1024],  # empty node id
        [1, 0, "n", b"", [], [], 1024],  # protocol version 0
        [1, 1, "n", b"c" * 5000, [], [], 1024],  # certificate too long
        [1, 1, "n", b"", ["r"] * 17, [], 1024],  # too many roles
        [1, 1, "n", b"", [""], [], 1024],  # empty role
        [1, 1, "n", b"", [], [], 0],  # max_message_size 0
        [4, 70000, "bye"],  # close code out of range
        [5, "", b"x"],  # empty topic
    ],
)
def test_semantic_checks_of_session_control_messages(wire):
    with pytest.raises(RemoteProtocolError, match="invalid"):
        decode(msgpack.packb(wire))


def test_unknown_type_id_is_refused():
    with pytest.raises(RemoteProtocolError, match="unknown message type id 200"):
        decode(msgpack.packb([200, 1]))


@pytest.mark.parametrize("extra", [b"\x00", msgpack.packb([2, 1])])
def test_trailing_bytes_are_refused(extra):
    with pytest.raises(RemoteProtocolError, match="trailing bytes after Ping"):
        decode(msgpack.packb([2, 1]) + extra)


@pytest.mark.parametrize("wire", [[2], [2, 1, 2], [4, 0]])
def test_wrong_arity_is_refused(wire):
    with pytest.raises(RemoteProtocolError, match=r"expected \d fields"):
        decode(msgpack.packb(wire))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x90",
        b"\x02",
        msgpack.packb({"t": 2}),
        b"\x91",
        b"\xdc\x00\x00\x02",
        b"\xdd\x00\x00",
        b"\x92\xa1x",
        b"\x92\xce\x00\x00\x00\x02\x01",
    ],
)
def test_non_messages_are_refused(data):
    with pytest.raises(RemoteProtocolError):
        decode(data)


def test_over_cap_input_is_refused_before_unpacking():
    # Not even valid msgpack after the header: the cap check must come first.
    data = b"\x92\xcd\xea\x62" + b"\xc1" * 40  # [60002, <garbage>], 44 bytes > cap 32
    with pytest.raises(FrameTooLarge, match="Small message of 44 bytes exceeds its cap of 32"):
        TEST.decode(data)


def test_at_cap_input_is_accepted():
    wire = msgpack.packb([60002, "x" * 27])
    assert len(wire) == 32
    assert TEST.decode(wire) == Small("x" * 27)


def test_ext_types_are_refused_even_in_ignored_fields():
    ext = msgpack.ExtType(1, b"zz")
    with pytest.raises(RemoteProtocolError, match="ext"):
        TEST.decode(msgpack.packb([60003, 1, "b", ext]))
    with pytest.raises(RemoteProtocolError, match="ext type 3 is not allowed"):
        TEST.decode(msgpack.packb([60003, 1, "b", msgpack.ExtType(3, b"")]))
    with pytest.raises(RemoteProtocolError):
        decode(msgpack.packb([5, "t", msgpack.ExtType(2, b"")]))
    timestamp = b"\xd6\xff\x00\x00\x00\x01"  # ext -1: msgpack decodes it without ext_hook
    with pytest.raises(RemoteProtocolError, match="ext"):
        TEST.decode(b"\x94\xcd\xea\x63\x01\xa1b" + timestamp)  # [60003, 1, "b", <timestamp>]


def test_extensible_type_ignores_extra_and_fills_missing_trailing_fields():
    assert TEST.decode(msgpack.packb([60003, 1, "b", [1, 2], {"new": 3}])) == Growing(1, "b")
    assert TEST.decode(msgpack.packb([60003, 1])) == Growing(1, "default")
    with pytest.raises(RemoteProtocolError, match="expected 2 fields, got 0"):
        TEST.decode(msgpack.packb([60003]))


def test_non_extensible_type_refuses_extra_fields():
    with pytest.raises(RemoteProtocolError, match="Small: expected 1 fields, got 2"):
        TEST.decode(msgpack.packb([60002, "a", "b"]))


def test_arrays_longer_than_max_items_are_refused():
    assert TEST.decode(msgpack.packb([60004, [1, 2, 3, 4]])) == Bounded((1, 2, 3, 4))
    with pytest.raises(RemoteProtocolError, match="malformed Bounded"):
        TEST.decode(msgpack.packb([60004, [1, 2, 3, 4, 5]]))


def test_types_without_containers_refuse_any_long_array_or_map():
    with pytest.raises(RemoteProtocolError, match="malformed AppData"):
        decode(msgpack.packb([5, "t", [0, 0, 0, 0]]))
    with pytest.raises(RemoteProtocolError, match="malformed AppData"):
        decode(msgpack.packb([5, "t", {"a": 1}]))


def test_deeply_nested_array_bomb_is_refused():
    # 1 MiB of array32 headers each claiming 3 elements: must fail fast, not allocate.
    data = b"\x93\x05\xa1t" + b"\xdd\x00\x00\x00\x03" * 200_000
    with pytest.raises(RemoteProtocolError):
        decode(data)


def test_encode_refuses_unregistered_embedded_and_over_cap_messages():
    with pytest.raises(LocalProtocolError, match="not a registered message type"):
        encode(object())
    with pytest.raises(LocalProtocolError, match="not a registered message type"):
        TEST.encode(Point(1.0, "p"))
    with pytest.raises(LocalProtocolError, match="over its cap of 32"):
        TEST.encode(Small("y" * 40))


def test_encode_refuses_unencodable_values_and_stays_usable():
    with pytest.raises(LocalProtocolError, match="cannot encode AppData"):
        encode(AppData("t", {1, 2}))  # type: ignore[arg-type]
    assert decode(encode(Ping(1))) == Ping(1)


def test_spec_of_unknown_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        spec_of(Point)
    with pytest.raises(LocalProtocolError):
        spec_of(59999)


# --- fuzzing: only RemoteProtocolError may escape decode ----------------------------------------

_ALL_IDS = list(REGISTRY.message_types()) + list(TEST.message_types())
_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(_INT64_MIN, _UINT64_MAX)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def _decode_or_refuse(registry: MessageRegistry, data: bytes) -> object | None:
    """Decode; a RemoteProtocolError is an accepted outcome, any other exception fails the test."""
    try:
        msg = registry.decode(data)
    except RemoteProtocolError:
        return None
    assert type(msg) in registry.message_types().values()
    wire = registry.encode(msg)  # compare encodings: a float field may hold NaN
    assert registry.encode(registry.decode(wire)) == wire
    return msg


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=64))
def test_fuzz_random_bytes(data):
    _decode_or_refuse(REGISTRY, data)
    _decode_or_refuse(TEST, data)


@settings(max_examples=400, deadline=None)
@given(type_id=st.sampled_from(_ALL_IDS), fields=st.lists(_msgpack_values, max_size=14))
def test_fuzz_random_msgpack_arrays(type_id, fields):
    data = msgpack.packb([type_id, *fields])
    _decode_or_refuse(REGISTRY, data)
    _decode_or_refuse(TEST, data)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        pos %= len(buf) + 1
        if kind == 0 and pos < len(buf):
            buf[pos] = value  # overwrite
        elif kind == 1:
            buf.insert(pos, value)
        elif kind == 2:
            del buf[pos:]  # truncate
        else:
            del buf[pos : pos + 1]
    return bytes(buf)


@settings(max_examples=400, deadline=None)
@given(
    pair=st.sampled_from(_all_types()).flatmap(
        lambda rc: st.tuples(st.just(rc[0]), instances_of(rc[1], rc[0]))
    ),
    edits=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_fuzz_mutated_valid_encodings(pair, edits):
    registry, msg = pair
    try:
        wire = registry.encode(msg)
    except LocalProtocolError:
        assume(False)
    _decode_or_refuse(registry, _mutate(wire, edits))
