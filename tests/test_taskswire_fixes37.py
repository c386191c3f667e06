"""Session 37: hostile input to the task wire format (tasks_wire), the spec codec (tasks_codec)
and the pipeline plan (tasks_pipeline).

Refusals name the offending value, but only its first few dozen characters: a peer's 16 MiB
dtype string or an HTTP body's 64 MiB key must not come back as a message (and a log line) of
the same size (also the spec checks of tasks.py). The journal took a spec whose params differed
only in a value's type (``True`` for ``1``) for a retry of the one it held: ``==`` over the
decoded specs. Property tests: every decoder raises only the project's protocol errors, and a
valid spec survives encode/decode unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.journal import Journal, TaskConflictError
from meshinfer.errors import RemoteProtocolError
from meshinfer.proto import messages
from meshinfer.proto.models import ModelRef
from meshinfer.proto.tasks import InvalidTaskError, Pattern, Stage, TaskSpec
from meshinfer.proto.tasks_codec import decode_spec, encode_spec, spec_from_dict, spec_to_dict
from meshinfer.proto.tasks_pipeline import PipelinePlan, StageInputError
from meshinfer.proto.tasks_wire import (
    TaskAccepted,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskResult,
    Tensor,
    decode_params,
    encode_params,
)

#: No refusal message may be longer than this, however long the value it names.
BOUNDED = 1000
_T = Tensor(b"\0" * 4, "float32", (1,))


def _assign_frame(**fields: Any) -> bytes:
    """A raw TaskAssign frame (msgpack array), any field replaced by a hostile value."""
    values = {
        "item_id": "i", "task_id": "t", "model_id": "m", "model_version": "1",
        "input": [_T.data, _T.dtype, list(_T.shape)], "params": encode_params({}),
        "deadline_s": 1.0, "priority": 0, "attempt": 1,
    }  # fmt: skip
    values.update(fields)
    return msgpack.packb([32, *values.values()], use_bin_type=True)


def _pipeline_doc() -> dict[str, Any]:
    return {
        "task_id": "t",
        "pattern": "pipeline",
        "inputs": {"data": b"\0" * 4, "dtype": "float32", "shape": [1]},
        "stages": [{"name": "a", "model": {"model_id": "m"}}],
    }


# --- refusals name a bounded prefix of the value --------------------------------------------


def test_peer_dtype_of_a_megabyte_is_refused_with_a_short_message():
    frame = _assign_frame(input=[b"", "x" * 1_000_000, [0]])
    with pytest.raises(RemoteProtocolError, match="dtype 'xxx") as caught:
        messages.decode(frame)
    assert len(str(caught.value)) < BOUNDED


def test_params_key_past_the_cap_is_refused_with_a_short_message():
    blob = msgpack.packb({"k" * 10_000: 1})  # under MAX_PARAMS_BYTES: refused by key length
    with pytest.raises(RemoteProtocolError, match="key 'kkk") as caught:
        decode_params(blob)
    assert len(str(caught.value)) < BOUNDED


@pytest.mark.parametrize(
    "where",
    ["top key", "stage key", "model key", "pattern", "stage params key", "inputs dtype"],
)
def test_spec_refusal_names_a_bounded_prefix(where):
    doc, long = _pipeline_doc(), "x" * 100_000
    stage = doc["stages"][0]
    if where == "top key":
        doc[long] = 1
    elif where == "stage key":
        stage[long] = 1
    elif where == "model key":
        stage["model"][long] = 1
    elif where == "pattern":
        doc["pattern"] = long
    elif where == "stage params key":
        stage["params"] = {long: 1}
    else:
        doc["inputs"]["dtype"] = long
    with pytest.raises(InvalidTaskError, match="xxx") as caught:
        spec_from_dict(doc)
    assert len(str(caught.value)) < BOUNDED


@pytest.mark.parametrize(
    "where", ["task_id", "stage name", "after", "after twice", "model_id", "policy", "aggregation"]
)
def test_spec_refusal_in_tasks_names_a_bounded_prefix(where):
    doc, long = _pipeline_doc(), "x" * 100_000
    stage = doc["stages"][0]
    if where == "task_id":
        doc["task_id"] = long
    elif where == "stage name":
        stage["name"] = long
    elif where == "after":
        stage["after"] = [long]
    elif where == "after twice":
        stage["after"] = ["a"] * 2 + [f"s{n}" for n in range(20_000)]
    elif where == "model_id":
        stage["model"] = {"model_id": long}
    else:
        doc[where] = long
    with pytest.raises(InvalidTaskError) as caught:
        spec_from_dict(doc)
    assert len(str(caught.value)) < BOUNDED


def test_a_spec_differing_only_in_a_param_type_is_a_conflict(tmp_path):
    model = (ModelRef("m", "1"),)
    first = TaskSpec("t1", Pattern.SINGLE, _T, model, params={"x": 1})
    other = TaskSpec("t1", Pattern.SINGLE, _T, model, params={"x": True})
    with Journal(tmp_path / "journal.db") as journal:
        assert journal.accept(first)
        with pytest.raises(TaskConflictError):
            journal.accept(other)


def test_the_same_spec_with_its_params_in_another_order_is_a_retry(tmp_path):
    """(The journal's fault above was ``==`` over the decoded spec; the same params in another
    key order are still the same task: accept says "known".)"""
    model = (ModelRef("m", "1"),)
    params = {"a": 1, "b": 2.5, "c": "s", "d": True, "e": None}
    first = TaskSpec("t1", Pattern.SINGLE, _T, model, params=params)
    again = TaskSpec("t1", Pattern.SINGLE, _T, model, params=dict(reversed(params.items())))
    widened = TaskSpec("t1", Pattern.SINGLE, _T, model, params={**params, "a": 1.0})
    with Journal(tmp_path / "journal.db") as journal:
        assert journal.accept(first)
        assert journal.accept(again) is False
        with pytest.raises(TaskConflictError):
            journal.accept(widened)


# --- properties: only protocol errors, round trips ---------------------------------------------

_FRAMES = [
    messages.encode(TaskAssign("i", "t", "m", "1", _T, encode_params({"a": 1}), 1.0, 0, 1)),
    messages.encode(TaskResult("i", 1, _T, "n", "numpy", "cpu", {"infer_s": 0.5})),
    messages.encode(TaskFailed("i", 1, 4, "boom", True)),
    messages.encode(TaskCancel("i", "why")),
    messages.encode(TaskAccepted("i", 1, "n", 0)),
]
_QUICK = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@_QUICK
@given(
    st.sampled_from(_FRAMES),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 8),
)
def test_mutated_task_frames_raise_only_protocol_errors(frame, changes, cut):
    data = bytearray(frame)
    for at, byte in changes:
        data[at % len(data)] = byte
    try:
        messages.decode(bytes(data[: len(data) - cut]))
    except RemoteProtocolError:
        pass


@_QUICK
@given(st.binary(max_size=64))
def test_params_blobs_raise_only_protocol_errors(blob):
    try:
        params = decode_params(blob)
    except RemoteProtocolError:
        return
    assert decode_params(encode_params(params)).keys() == params.keys()


_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
    st.text(max_size=5), st.binary(max_size=8),
)  # fmt: skip
_KEYS = st.text(max_size=4) | st.sampled_from(
    ["data", "dtype", "shape", "model_id", "version", "name", "model", "after", "params"]
)
_TREE = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=20,
)
_TOP = ["task_id", "pattern", "inputs", "models", "stages", "params", "deadline_s", "priority"]
_TOP += ["policy", "aggregation", "shard_size", "quorum", "weights", "aggregation_timeout_s"]


def _journaled(doc: dict[str, Any]) -> TaskSpec:
    """``doc`` read back as a journaled blob (an int past msgpack's 64 bits: as refused)."""
    try:
        blob = msgpack.packb(doc, use_bin_type=True)
    except OverflowError:
        raise InvalidTaskError("not encodable") from None
    return decode_spec(blob)


@_QUICK
@given(st.sampled_from(_TOP), _TREE)
def test_hostile_spec_documents_raise_only_invalid_task(key, value):
    doc = _pipeline_doc()
    doc[key] = value
    for read in (spec_from_dict, _journaled):
        try:
            spec = read(copy.deepcopy(doc))
        except InvalidTaskError:
            continue
        blob = encode_spec(spec)
        assert encode_spec(decode_spec(blob)) == blob  # one encoding per spec
        if all(v == v for v in spec.params.values()):  # (NaN is never equal to itself)
            assert decode_spec(blob) == spec


def test_decode_spec_refuses_non_msgpack_as_invalid_task():
    for blob in (b"", b"\xc1", b"\x91" * 5000 + b"\xc0", msgpack.packb([1, 2]), b"\x80\x00"):
        with pytest.raises(InvalidTaskError):
            decode_spec(blob)


@_QUICK
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["float32", "int32", "uint8", "bool"]),
            st.lists(st.integers(0, 3), max_size=3),
        ),
        min_size=2,
        max_size=3,
    )
)
def test_joining_stage_outputs_raises_only_stage_input_errors(feeds):
    """A stage after several: whatever their outputs, it is fed, or StageInputError names them."""
    names = [f"s{i}" for i in range(len(feeds))]
    stages = [Stage(n, ModelRef("m", "1")) for n in names]
    stages.append(Stage("join", ModelRef("m", "1"), tuple(names)))
    spec = TaskSpec("t", Pattern.PIPELINE, _T, stages=tuple(stages))
    plan = PipelinePlan(spec)
    results = {
        plan.item_id(n): Tensor.from_array(np.zeros(shape, dtype=dtype))
        for n, (dtype, shape) in zip(names, feeds, strict=True)
    }
    try:
        (item,) = plan.ready_items(results)
    except StageInputError as exc:
        assert set(exc.feeds) == set(results)
        return
    item.input.validate()
    assert item.input.shape[-1] == sum(s[-1] for _, s in feeds)


def test_spec_to_dict_round_trips_through_msgpack_and_back():
    stages = (
        Stage("a", ModelRef("m", "2"), (), {"k": 1.5}),
        Stage("b", ModelRef("m", "1"), ("a",), {"z": None}),
    )
    spec = TaskSpec("t", Pattern.PIPELINE, _T, stages=stages, params={"x": "y"}, priority=-3)
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert decode_spec(encode_spec(spec)) == spec
