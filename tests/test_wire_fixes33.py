"""Adversarial review of the decoders of peers' messages (session 33): every registered message
type and the task wire types. A peer's bytes decode to a message that re-encodes to itself, or
raise RemoteProtocolError; nothing else escapes, and no frame makes the decoder allocate far
more than its own size."""

import copy
import math
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import meshinfer.proto.revocation_wire as rw
import meshinfer.proto.tasks_wire as tw
from meshinfer.errors import LocalProtocolError, RemoteProtocolError
from meshinfer.proto import messages as m
from meshinfer.proto.messages import REGISTRY, decode, encode
from meshinfer.proto.tasks import InvalidTaskError
from meshinfer.proto.tasks_codec import spec_from_dict

_UINT64_MAX = 2**64 - 1
_WIDE = (0, *(tw.MAX_DIM,) * 7)  # no bytes, but 2**217 elements outside its zero

# --- valid messages of every registered type -----------------------------------------------

_plain = st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"))  # (ids refuse controls)
_ids = st.text(_plain, min_size=1, max_size=tw.MAX_ID_LEN // 10)
_names = st.text(_plain, min_size=1, max_size=m.MAX_NAME_LEN)
_tensors = hnp.arrays(
    st.sampled_from(sorted(tw.DTYPES)),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
).map(tw.Tensor.from_array)
_params = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.none()
    | st.booleans()
    | st.integers(-(2**63), _UINT64_MAX)
    | st.floats()
    | st.text(max_size=10),
    max_size=4,
).map(tw.encode_params)
_refs = st.builds(tw.TensorRef.of, _tensors, st.text("0123456789abcdef", min_size=64, max_size=64))
_seconds = st.floats(0, 1e300)


def _assign(ref: tw.TensorRef | None, tensor: tw.Tensor, keep: bool, **fields) -> tw.TaskAssign:
    if ref is not None:
        tensor, keep = tw.NO_INPUT, False
    return tw.TaskAssign(input=tensor, input_ref=ref, keep_input=keep, **fields)


VALID = {
    m.Hello: st.builds(
        m.Hello,
        st.integers(1, _UINT64_MAX),
        st.text(_plain, min_size=1, max_size=m.MAX_NODE_ID_LEN),
        st.binary(max_size=64),
        st.lists(_names, max_size=4).map(tuple),
        st.lists(_names, max_size=4).map(tuple),
        st.integers(1, _UINT64_MAX),
    ),
    m.Ping: st.builds(m.Ping, st.integers(0, _UINT64_MAX)),
    m.Pong: st.builds(m.Pong, st.integers(0, _UINT64_MAX)),
    m.Close: st.builds(m.Close, st.integers(0, 0xFFFF), st.text(max_size=40)),
    m.AppData: st.builds(m.AppData, st.text(min_size=1, max_size=40), st.binary(max_size=64)),
    m.Gossip: st.builds(m.Gossip, st.binary(max_size=64)),
    rw.RevocationsWanted: st.builds(rw.RevocationsWanted, st.integers(0, rw.MAX_VERSION)),
    rw.RevocationsOffer: st.builds(
        rw.RevocationsOffer, st.lists(st.binary(max_size=16), max_size=4).map(tuple)
    ),
    rw.RevocationNotice: st.builds(rw.RevocationNotice, st.binary(max_size=64)),
    tw.TaskAssign: st.builds(
        _assign,
        st.none() | _refs,
        _tensors,
        st.booleans(),
        item_id=_ids,
        task_id=_ids,
        model_id=_ids,
        model_version=_ids,
        params=_params,
        deadline_s=st.none() | _seconds,
        priority=st.integers(tw.MIN_PRIORITY, tw.MAX_PRIORITY),
        attempt=st.integers(1, 2**32 - 1),
    ),
    tw.TaskAccepted: st.builds(
        tw.TaskAccepted, _ids, st.integers(1, 2**32 - 1), _ids, st.integers(0, 2**32 - 1)
    ),
    tw.TaskResult: st.builds(
        tw.TaskResult,
        _ids,
        st.integers(1, 2**32 - 1),
        _tensors,
        _ids,
        st.text(_plain, max_size=20),
        st.text(_plain, max_size=20),
        st.dictionaries(st.text(_plain, max_size=64), _seconds, max_size=tw.MAX_TIMINGS),
    ),
    tw.TaskFailed: st.builds(
        tw.TaskFailed,
        _ids,
        st.integers(1, 2**32 - 1),
        st.integers(0, 0xFFFF),
        st.text(max_size=60),
        st.booleans(),
    ),
    tw.TaskCancel: st.builds(tw.TaskCancel, _ids, st.text(max_size=60)),
}
_TYPES = [c for c in REGISTRY.message_types().values() if c.__module__.startswith("meshinfer.")]
_any_valid = st.sampled_from(_TYPES).flatmap(lambda cls: VALID[cls])


def test_every_registered_type_has_a_valid_strategy():
    # a type registered later must get one here, or it escapes the properties below
    assert set(_TYPES) <= set(VALID)


def _check_decoded(msg: object) -> None:
    """What a receiver does next with a decoded message must not raise anything else either."""
    wire = encode(msg)
    again = decode(wire)
    assert again == msg and type(again) is type(msg)
    assert encode(again) == wire
    if isinstance(msg, tw.TaskAssign):
        tw.decode_params(msg.params)
        if msg.input_ref is not None:
            assert msg.input_ref.nbytes >= 0
            _remote_or_ok(lambda: msg.input_ref.resolve(b"\x00" * msg.input_ref.nbytes))
    for tensor in (getattr(msg, "input", None), getattr(msg, "output", None)):
        if tensor is not None:
            assert tensor.to_array().nbytes == len(tensor.data)
            assert tensor.rows >= 0
    if isinstance(msg, tw.TaskFailed):
        tw.failure_kind(msg.code)


def _remote_or_ok(call) -> None:
    try:
        call()
    except RemoteProtocolError:
        pass


def _decode_or_refuse(data: bytes) -> None:
    try:
        msg = decode(data)
    except RemoteProtocolError:
        return
    _check_decoded(msg)


@pytest.mark.parametrize("cls", _TYPES, ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_valid_messages_round_trip(cls, data):
    msg = data.draw(VALID[cls])
    wire = encode(msg)
    decoded = decode(wire)
    assert decoded == msg
    _check_decoded(decoded)


# --- mutations of valid encodings ----------------------------------------------------------


class Raw(bytes):
    """msgpack bytes to splice in verbatim (what msgpack.packb cannot write)."""


def _pack(obj: object) -> bytes:
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, list | tuple):
        n = len(obj)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
        return head + b"".join(_pack(x) for x in obj)
    if isinstance(obj, dict):
        n = len(obj)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
        return head + b"".join(_pack(k) + _pack(v) for k, v in obj.items())
    return msgpack.packb(obj, use_bin_type=True)


NASTY = [
    Raw(b"\xa3\xed\xa0\x80"),  # a UTF-8-encoded lone surrogate
    Raw(b"\xa2\xc3\x28"),  # invalid UTF-8
    "\x00",
    "a\x00b",
    "x" * 300,
    _UINT64_MAX,
    -(2**63),
    2**63,
    2**32,
    -1,
    0,
    True,
    False,
    None,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -0.0,
    Raw(b"\xca\x7f\xc0\x00\x00"),  # float32 NaN
    Raw(b"\xd4\x01\x00"),  # fixext 1
    Raw(b"\xc7\x00\x05"),  # ext 8 of length 0
    Raw(b"\x91" * 3000 + b"\xc0"),  # deep nesting
    Raw(b"\xdd\xff\xff\xff\xff"),  # array 32 of 2**32-1 items (truncated)
    Raw(b"\xdf\xff\xff\xff\xff"),  # map 32, truncated
    Raw(b"\xc6\xff\xff\xff\xff"),  # bin 32 of 4 GiB, truncated
    Raw(b"\xdb\xff\xff\xff\xff"),  # str 32 of 4 GiB, truncated
    Raw(b"\x81\x01\x02"),  # a map with an int key
    Raw(b"\x82\xa1a\x01\xa1a\x02"),  # a map with a repeated key
    Raw(b"\xc1"),  # never used
    Raw(b"\x80" * 16),  # many empty maps (as extra fields)
    {},
    [],
    {"k": 1.5},
    [0, tw.MAX_DIM, tw.MAX_DIM],
    list(_WIDE),
    [2**31, 5],
    [-1],
    [True],
    b"",
    b"\xff" * 3,
    "",
    "float32",
    "float64",
    "0" * 64,
]


def _slots(tree: object, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Paths to every array element (and every map value, by position) in ``tree``."""
    found = []
    if isinstance(tree, list):
        for i, item in enumerate(tree):
            found.append((*path, i))
            found.extend(_slots(item, (*path, i)))
    return found


def _at(tree: list, path: tuple[int, ...]) -> list:
    for i in path:
        tree = tree[i]
    return tree


@settings(max_examples=400, deadline=None)
@given(
    msg=_any_valid,
    edits=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.sampled_from(NASTY)),
        min_size=1,
        max_size=3,
    ),
)
def test_structurally_mutated_messages_decode_or_raise_remote_errors(msg, edits):
    tree = msgpack.unpackb(encode(msg), raw=False, use_list=True, strict_map_key=False)
    for kind, pick, nasty in edits:
        value = copy.deepcopy(nasty)  # a list put twice in the tree would hold itself
        slots = _slots(tree)[1:]  # never the type id
        if not slots:
            break
        path = slots[pick % len(slots)]
        parent, index = _at(tree, path[:-1]), path[-1]
        if not isinstance(parent, list):
            continue
        if kind == 0:
            parent[index] = value  # a field (or an element) of another type
        elif kind == 1:
            parent.insert(index, value)  # an extra field, elsewhere than at the end
        elif kind == 2:
            del parent[index]  # a missing field
        elif kind == 3:
            parent.append(value)  # an extra trailing field
        else:
            j = pick // 7 % len(parent)
            parent[index], parent[j] = parent[j], parent[index]  # two fields swapped
    _decode_or_refuse(_pack(tree))


@settings(max_examples=400, deadline=None)
@given(
    msg=_any_valid,
    edits=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_byte_mutated_messages_decode_or_raise_remote_errors(msg, edits):
    buf = bytearray(encode(msg))
    for kind, pos, value in edits:
        pos %= len(buf) + 1
        if kind == 0 and pos < len(buf):
            buf[pos] ^= 1 << (value % 8)  # a bit flip
        elif kind == 1:
            buf.insert(pos, value)
        elif kind == 2:
            del buf[max(pos, 1) :]  # truncation
        elif pos < len(buf):
            buf[pos] = value
    _decode_or_refuse(bytes(buf))


# --- the faults found ----------------------------------------------------------------------


def _assign_with(tensor: tw.Tensor) -> bytes:
    """A TaskAssign carrying ``tensor`` as encode writes it (encode does not validate)."""
    msg = tw.TaskAssign("i", "t", "m", "1", tensor, tw.encode_params({}), None, 0, 1)
    return encode(msg)


def test_an_empty_tensor_numpy_cannot_shape_is_refused_by_the_decoder():
    # decoded, it made Tensor.to_array() raise numpy's ValueError ("array is too big")
    with pytest.raises(RemoteProtocolError, match="spans more than"):
        decode(_assign_with(tw.Tensor(b"", "float32", _WIDE)))
    with pytest.raises(RemoteProtocolError):
        tw.unpack_array(b"", "float32", _WIDE)
    ref = [("a" * 64), "uint8", list(_WIDE)]
    raw = msgpack.unpackb(_assign_with(tw.NO_INPUT), use_list=True)
    with pytest.raises(RemoteProtocolError, match="tensor ref"):
        decode(_pack([*raw[:10], ref]))


def test_a_submitted_empty_tensor_numpy_cannot_shape_is_an_invalid_task():
    # spec_from_dict let numpy's ValueError out, not InvalidTaskError naming inputs
    raw = {
        "task_id": "t1",
        "pattern": "single",
        "inputs": {"data": b"", "dtype": "float32", "shape": list(_WIDE)},
        "models": [{"model_id": "m"}],
    }
    with pytest.raises(InvalidTaskError, match="inputs"):
        spec_from_dict(raw)


def test_pack_array_refuses_an_empty_array_a_peer_would_refuse():
    wide = np.empty((0, tw.MAX_TENSOR_BYTES), dtype=np.float32)  # rows of 4x the cap
    with pytest.raises(LocalProtocolError):
        tw.pack_array(wide)
    narrow = tw.Tensor.from_array(np.empty((0, 1000), dtype=np.float32))
    assert decode(_assign_with(narrow)).input.to_array().shape == (0, 1000)


def _peak(data: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            decode(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_extra_fields_of_empty_maps_do_not_blow_up_memory():
    # ~1 MiB of empty maps in an extensible type's ignored fields unpacked to ~75 MB and
    # decoded fine; the 16 MiB cap allowed ~1.2 GB
    inner = b"\xdc\x04\x00" + b"\x80" * 1024
    extra = b"\xdc\x04\x00" + inner * 1024
    wire = _assign_with(tw.NO_INPUT)
    data = bytes([wire[0] + 1]) + wire[1:] + extra
    assert len(data) < 1 << 21
    assert _peak(data) < len(data) * 2


@pytest.mark.parametrize("cls", [m.AppData, m.Gossip])
def test_nested_arrays_in_a_scalar_field_do_not_blow_up_memory(cls):
    # a tree of 3-item arrays unpacked to 20x its size before the field check refused it
    def tree(depth: int) -> bytes:
        return b"\xc0" if depth == 0 else b"\x92" + tree(depth - 1) * 2

    fields = [Raw(tree(18))] if cls is m.Gossip else [Raw(tree(18)), b""]
    data = _pack([REGISTRY.spec_of(cls).type_id, *fields])
    assert len(data) > 500_000
    assert _peak(data) < len(data) * 2


def test_a_newer_peers_extra_fields_with_some_arrays_still_decode():
    # the container bound leaves an extensible type room for a newer peer's fields
    result = tw.TaskResult("i", 1, tw.NO_INPUT, "n", "numpy", "cpu", {"infer_s": 0.5})
    extra = [[i, [i, i]] for i in range(300)]
    data = _pack([*msgpack.unpackb(encode(result), use_list=True), extra, {"x": [1]}])
    assert decode(data) == result
