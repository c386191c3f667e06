"""Task wire codecs and node identity (session 34): ids holding control characters, bool tensors
holding bytes other than 0 and 1, frames that unpack to far more memory than their size, and
certificates for Noise keys no handshake can complete with."""

import contextlib
import dataclasses
import gc
import itertools
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshinfer.proto.tasks_wire as tw
from meshinfer.errors import ConfigError, RemoteProtocolError
from meshinfer.proto import identity
from meshinfer.proto import messages as m
from meshinfer.proto.identity import FleetAuthority, generate_static_keypair
from meshinfer.proto.messages import decode, encode
from meshinfer.proto.tasks import InvalidTaskError
from meshinfer.proto.tasks_codec import decode_spec, encode_spec, spec_from_dict

_TENSOR = tw.Tensor.from_array(np.ones((2, 3), np.float32))
_ASSIGN = tw.TaskAssign("t/0", "t", "digits", "1", _TENSOR, tw.encode_params({}), 1.0, 0, 1)
_RESULT = tw.TaskResult("t/0", 1, _TENSOR, "car-1", "numpy", "cpu", {"infer_s": 0.5})
_CONTROL = st.sampled_from(["\x00", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029"])


def _pack(items) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


def _wire_items(msg) -> list:
    return msgpack.unpackb(encode(msg), use_list=True, raw=False)


# --- ids ---------------------------------------------------------------------------------------

_ID_FIELDS = [
    (_ASSIGN, "item_id"),
    (_ASSIGN, "task_id"),
    (_ASSIGN, "model_id"),
    (_ASSIGN, "model_version"),
    (tw.TaskAccepted("t/0", 1, "car-1"), "item_id"),
    (tw.TaskAccepted("t/0", 1, "car-1"), "node_id"),
    (_RESULT, "item_id"),
    (_RESULT, "node_id"),
    (_RESULT, "engine"),
    (_RESULT, "device"),
    (tw.TaskFailed("t/0", 1, 4, "boom", False), "item_id"),
    (tw.TaskCancel("t/0"), "item_id"),
    (m.Hello(1, "car-1", b"", ("vehicle",), (), 1024), "node_id"),
]


@pytest.mark.parametrize(("msg", "field"), _ID_FIELDS, ids=lambda v: getattr(v, "__name__", v))
@settings(max_examples=20, deadline=None)
@given(before=st.text(max_size=5), control=_CONTROL, after=st.text(max_size=5))
def test_an_id_holding_a_control_character_is_refused_at_decode(msg, field, before, control, after):
    # was taken: a NUL or a newline in an id went on into logs, file names and HTTP answers
    data = encode(dataclasses.replace(msg, **{field: before + control + after}))
    with pytest.raises(RemoteProtocolError, match="control character"):
        decode(data)


@pytest.mark.parametrize(("msg", "field"), _ID_FIELDS, ids=lambda v: getattr(v, "__name__", v))
@settings(max_examples=20, deadline=None)
@given(name=st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1))
def test_an_id_of_plain_text_still_round_trips(msg, field, name):
    sent = dataclasses.replace(msg, **{field: name[:64]})
    assert decode(encode(sent)) == sent


def test_a_role_or_timing_name_holding_a_control_character_is_refused():
    hello = m.Hello(1, "car-1", b"", ("vehicle\n",), (), 1024)
    with pytest.raises(RemoteProtocolError, match="control characters"):
        decode(encode(hello))
    result = dataclasses.replace(_RESULT, timings={"infer_s\x00": 0.5})
    with pytest.raises(RemoteProtocolError, match="plain names"):
        decode(encode(result))


@pytest.mark.parametrize("model", [{"model_id": "digits\x00"}, {"model_id": "d", "version": "1\n"}])
def test_a_submitted_model_name_holding_a_control_character_is_refused(model):
    # was accepted, journaled and sent: every node then refused the TaskAssign naming it
    raw = {"task_id": "t", "pattern": "single", "models": [model]}
    raw["inputs"] = {"data": bytes(4), "dtype": "float32", "shape": [1, 1]}
    with pytest.raises(InvalidTaskError, match="control character"):
        spec_from_dict(raw)


# --- bool tensors ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=16))
def test_a_bool_tensor_decodes_only_when_every_byte_is_0_or_1(data):
    # was taken: NumPy then held bools that are neither False nor True (2 == True is False)
    tensor = tw.Tensor(data, "bool", (len(data),))
    wire = encode(dataclasses.replace(_RESULT, output=tensor))
    if set(data) <= {0, 1}:
        assert decode(wire).output.to_array().tolist() == [bool(b) for b in data]
    else:
        with pytest.raises(RemoteProtocolError, match="bool tensor"):
            decode(wire)
        with pytest.raises(RemoteProtocolError, match="bool tensor"):
            tw.unpack_array(data, "bool", (len(data),))


def test_pack_array_sends_canonical_bools_from_an_odd_bool_view():
    odd = np.array([0, 2, 1, 255], np.uint8).view(np.bool_)
    data, dtype, shape = tw.pack_array(odd)
    assert (data, dtype, shape) == (b"\x00\x01\x01\x01", "bool", (4,))
    sent = dataclasses.replace(_RESULT, output=tw.Tensor.from_array(odd))
    assert decode(encode(sent)).output.to_array().tolist() == [False, True, True, True]


def test_a_journaled_bool_input_with_odd_bytes_still_recovers():
    raw = {"task_id": "t", "pattern": "single", "models": [{"model_id": "d"}]}
    raw["inputs"] = {"data": b"\x00\x01", "dtype": "bool", "shape": [1, 2]}
    blob = encode_spec(spec_from_dict(raw))
    odd = blob.replace(b"\xc4\x02\x00\x01", b"\xc4\x02\x00\x07")
    assert odd != blob
    with pytest.raises(InvalidTaskError, match="bool tensor"):  # a new submission: refused
        spec_from_dict({**raw, "inputs": {**raw["inputs"], "data": b"\x00\x07"}})
    assert decode_spec(odd).inputs.data == b"\x00\x01"


# --- memory a frame unpacks to -----------------------------------------------------------------


def _peak(data: bytes) -> int:
    """The peak of memory allocated while ``data`` decodes (or is refused), after one decode
    untraced: what a first call allocates once in the process (lazily built codecs, an
    exception's traceback machinery) is not the frame's doing."""
    with contextlib.suppress(RemoteProtocolError):
        decode(data)
    gc.collect()
    tracemalloc.start()
    try:
        try:
            decode(data)
        except RemoteProtocolError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


_KEYS = ["".join(p) for p in itertools.product("abcdefghijklmnopqrstuvwxyzABCDEF", repeat=2)]


def test_extra_fields_of_maps_of_short_strings_do_not_blow_up_memory():
    # 1.2 MB of maps of 2-character strings unpacked to ~15 MB (a 16 MiB frame: ~150 MB)
    maps = [dict.fromkeys(_KEYS[:1024], "xy")] * 200
    data = _pack([*_wire_items(_ASSIGN), *maps])
    assert len(data) > 1_000_000
    with pytest.raises(RemoteProtocolError, match="values"):
        decode(data)
    assert _peak(data) < len(data) * 4  # (~2x: unpacking is refused part-way; it was ~12x)


def test_a_small_types_frame_of_nested_maps_does_not_blow_up_memory():
    # a type capped at 64 KiB was not counted: 60 KB of arrays of empty maps unpacked to 4 MB
    extra = [[{}] * 1000] * 60
    data = _pack([*_wire_items(tw.TaskFailed("t/0", 1, 4, "boom", False)), *extra])
    assert 50_000 < len(data) <= 64 * 1024
    with pytest.raises(RemoteProtocolError, match="arrays and maps"):
        decode(data)
    assert _peak(data) < len(data) * 2


def test_the_widest_valid_messages_still_decode_when_counted():
    tensor = tw.Tensor.from_array(np.zeros((1,) * 7 + (2048,), np.float32))
    timings = {f"phase_{i}": float(i) for i in range(tw.MAX_TIMINGS)}
    result = dataclasses.replace(_RESULT, output=tensor, timings=timings)
    extra = [[str(i) for i in range(1000)]] * 3 + [{str(i): [i] for i in range(300)}]  # newer
    data = _pack([*_wire_items(result), *extra])
    assert len(data) > 4096 and decode(data) == result


# --- identity ----------------------------------------------------------------------------------

_SMALL_ORDER = [
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
    "00" * 31 + "80",  # zero with the ignored top bit set
]


@pytest.mark.parametrize("key", _SMALL_ORDER)
def test_a_static_key_of_small_order_is_not_certified(key):
    # was certified: a node holding it could never complete a handshake (all-zero DH)
    authority = FleetAuthority.create("fleet-a", seed=bytes(range(32)))
    with pytest.raises(ConfigError, match="small order"):
        authority.sign(
            node_id="car-1",
            static_public=bytes.fromhex(key),
            roles={"vehicle"},
            not_before=0.0,
            not_after=1.0,
            serial=1,
        )


def test_a_real_static_key_is_certified():
    public = generate_static_keypair()[1]
    assert identity.check_static_public(public) == public
    node = FleetAuthority.create("fleet-a").enroll(
        "car-1", {"vehicle"}, now=0, lifetime_s=9, serial=1
    )
    assert node.certificate.static_public == node.static_public
