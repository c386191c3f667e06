"""The task model: tensors on the wire, task messages, planning, pipelines, states, spec codec."""

import graphlib
import itertools
import math
import random
import re
from dataclasses import replace

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshinfer.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from meshinfer.inference.base import ModelRef
from meshinfer.inference.cache import content_digest
from meshinfer.proto.messages import decode, decode_as, encode, spec_of
from meshinfer.proto.tasks import (
    MAX_BATCH_INPUT_BYTES,
    TERMINAL_STATES,
    TRANSITIONS,
    InvalidTaskError,
    InvalidTransition,
    Pattern,
    Stage,
    TaskEvent,
    TaskSpec,
    TaskState,
    WorkItem,
    check_aggregation_mode,
    models_named,
    new_task_id,
    outline,
    plan,
    stage_order,
    transition,
    with_aggregation_mode,
)
from meshinfer.proto.tasks_codec import decode_spec, encode_spec, spec_from_dict, spec_to_dict
from meshinfer.proto.tasks_pipeline import PipelinePlan
from meshinfer.proto.tasks_wire import (
    DTYPES,
    MAX_NDIM,
    MAX_TENSOR_BYTES,
    FailureKind,
    TaskAccepted,
    TaskAssign,
    TaskCancel,
    TaskFailed,
    TaskResult,
    Tensor,
    TensorRef,
    by_reference,
    decode_params,
    encode_params,
    failure_kind,
    pack_array,
    unpack_array,
)

# --- strategies (also used by test_journal) ------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_-]{0,7}", fullmatch=True)
models = st.builds(ModelRef, names, st.sampled_from(["1", "2"]))
param_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=8),
    st.floats(allow_nan=False),
)  # fmt: skip
params = st.dictionaries(names, param_values, max_size=4)


def arrays(dtypes=sorted(DTYPES), max_dims=3, min_side=0, max_side=5):
    """NumPy arrays of whitelisted dtypes (NaN-free, so == compares values)."""
    dtype = st.sampled_from(dtypes).map(np.dtype)
    shape = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=min_side, max_side=max_side)
    return dtype.flatmap(
        lambda d: hnp.arrays(d, shape, elements=hnp.from_dtype(d, allow_nan=False))
    )


def tensors(min_dims=0, min_side=0):
    shapes = hnp.array_shapes(min_dims=min_dims, max_dims=3, min_side=min_side, max_side=5)
    return st.builds(
        lambda shape: Tensor.from_array(
            np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
        ),
        shapes,
    )


@st.composite
def dags(draw, max_stages=6):
    """Stages of a random DAG (dependencies on earlier stages), in a shuffled declaration order."""
    count = draw(st.integers(1, max_stages))
    stages = []
    for i in range(count):
        after = draw(st.lists(st.sampled_from(range(i)), unique=True, max_size=3)) if i else []
        stages.append(Stage(f"s{i}", ModelRef(f"m{i}"), tuple(f"s{a}" for a in after)))
    return tuple(draw(st.permutations(stages)))


@st.composite
def aggregation_options(draw, refs, mode, deadline_s):
    """Valid aggregation options of a parallel task of ``refs`` aggregated by ``mode``."""
    count = len(refs)
    options = {
        "min_responses": draw(st.none() | st.integers(1, count)),
        "aggregation_timeout_s": draw(st.none() | st.floats(0.001, deadline_s or 1e6)),
    }
    if mode == "ensemble":
        options["quorum"] = draw(st.none() | st.integers(1, count))
        weighted = draw(st.lists(st.sampled_from(refs), unique=True))
        weights = st.floats(1e-300, 1e300) | st.integers(1, 10**6)
        options["weights"] = {ref: draw(weights) for ref in weighted}
    return options


@st.composite
def specs(draw, patterns=tuple(Pattern)):
    """Valid task specs of every pattern (inputs are never empty: that is refused)."""
    pattern = draw(st.sampled_from(patterns))
    kwargs = dict(
        params=draw(params),
        deadline_s=draw(st.none() | st.floats(0.001, 1e6)),
        priority=draw(st.integers(-(2**31), 2**31 - 1)),
        policy=draw(st.none() | st.sampled_from(["round_robin", "latency"])),
        aggregation=draw(st.none() | st.sampled_from(["all", "majority", "ensemble"])),
    )
    task_id = draw(names)
    if pattern == Pattern.PIPELINE:
        # stages concatenate along the last axis: keep inputs at least 1-D
        inputs = draw(tensors(min_dims=1, min_side=1))
        return TaskSpec(task_id, pattern, inputs, stages=draw(dags()), **kwargs)
    if pattern == Pattern.PARALLEL:
        refs = tuple(draw(st.lists(models, min_size=1, max_size=4, unique=True)))
        kwargs.update(draw(aggregation_options(refs, kwargs["aggregation"], kwargs["deadline_s"])))
        return TaskSpec(task_id, pattern, draw(tensors(min_side=1)), refs, **kwargs)
    if pattern == Pattern.BATCH:
        shard = draw(st.none() | st.integers(1, 6))
        spec_input = draw(tensors(min_dims=1, min_side=1))
        return TaskSpec(task_id, pattern, spec_input, (draw(models),), shard_size=shard, **kwargs)
    return TaskSpec(task_id, pattern, draw(tensors(min_side=1)), (draw(models),), **kwargs)


def _tensor(array) -> Tensor:
    array = np.asarray(array)
    return Tensor.from_array(array.astype(np.float32) if array.dtype == np.float64 else array)


# --- task states -------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "event"), itertools.product(TaskState, TaskEvent))
def test_transition_follows_the_table_for_every_pair(state, event):
    if (state, event) in TRANSITIONS:
        assert transition(state, event) == TRANSITIONS[(state, event)]
    else:
        with pytest.raises(InvalidTransition) as caught:
            transition(state, event)
        assert (caught.value.state, caught.value.event) == (state, event)
        assert isinstance(caught.value, LocalProtocolError)


def _reachable(start: TaskState) -> set[TaskState]:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for (state, _), target in TRANSITIONS.items():
            if state == here and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_state_is_reachable_and_every_live_state_can_end():
    assert _reachable(TaskState.PENDING) == set(TaskState)
    for state in TaskState:
        assert _reachable(state) & TERMINAL_STATES, state
        assert TaskEvent.CANCEL in {e for (s, e) in TRANSITIONS if s == state} or (
            state in TERMINAL_STATES
        )


def test_terminal_states_have_no_way_out():
    assert {s for (s, _) in TRANSITIONS} == set(TaskState) - TERMINAL_STATES


@pytest.mark.parametrize(
    "path",
    [
        ["dispatch", "accept", "succeed"],
        ["dispatch", "succeed"],  # the result overtook the accept
        ["dispatch", "accept", "retry", "dispatch", "accept", "succeed"],
        ["dispatch", "requeue", "dispatch", "fail"],
        ["dispatch", "accept", "requeue", "cancel"],
    ],
)
def test_lifecycles_walk_through(path):
    state = TaskState.PENDING
    for event in path:
        state = transition(state, TaskEvent(event))
    assert state in TERMINAL_STATES


# --- tensors -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(array=arrays(), big_endian=st.booleans())
def test_pack_unpack_round_trips(array, big_endian):
    if big_endian:
        array = array.astype(array.dtype.newbyteorder(">"))
    data, dtype, shape = pack_array(array)
    assert dtype == array.dtype.name and shape == array.shape
    assert len(data) == array.nbytes
    back = unpack_array(data, dtype, shape)
    assert back.dtype.name == dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back.tobytes() == array.astype(array.dtype.newbyteorder("<")).tobytes()


def test_wire_bytes_are_little_endian():
    data, _, _ = pack_array(np.array([1], dtype=">i4"))
    assert data == b"\x01\x00\x00\x00"


@pytest.mark.parametrize("dtype", ["float64", "complex64", "int8", "object"])
def test_pack_refuses_dtypes_off_the_whitelist(dtype):
    with pytest.raises(LocalProtocolError, match=dtype):
        pack_array(np.zeros(2, dtype=dtype))


@pytest.mark.parametrize(
    ("data", "dtype", "shape", "match"),
    [
        (b"\x00" * 8, "float64", (1,), "dtype"),
        (b"\x00" * 7, "float32", (2,), "needs 8 bytes, got 7"),
        (b"\x00" * 9, "float32", (2,), "needs 8 bytes, got 9"),
        (b"", "uint8", (-1,), "outside"),
        (b"", "uint8", (2**31,), "outside"),
        (b"", "uint8", (0,) * (MAX_NDIM + 1), "dimensions"),
        (b"", "float32", (2**20, 2**20), "over the cap"),
        (b"", "uint8", (True,), "outside"),
        ("abc", "uint8", (3,), "must be bytes"),
        (b"\x00", "uint8", [1], "must be bytes"),
    ],
)
def test_unpack_refuses_inconsistent_tensors(data, dtype, shape, match):
    with pytest.raises(RemoteProtocolError, match=match):
        unpack_array(data, dtype, shape)


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=64),
    dtype=st.sampled_from(sorted(DTYPES)) | st.text(max_size=8),
    shape=st.lists(st.integers(-3, 2**33), max_size=10).map(tuple),
)
def test_unpack_fuzz_gives_a_matching_array_or_a_remote_error(data, dtype, shape):
    try:
        array = unpack_array(data, dtype, shape)
    except RemoteProtocolError:
        return
    assert array.shape == shape and array.dtype.name == dtype
    assert array.nbytes == len(data)
    assert not array.flags.writeable


# --- parameters ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(values=params)
def test_params_round_trip(values):
    assert decode_params(encode_params(values)) == values


@settings(max_examples=400, deadline=None)
@given(blob=st.binary(max_size=64) | st.builds(msgpack.packb, st.recursive(
    st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=4) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)))  # fmt: skip
def test_decode_params_fuzz_only_raises_remote_errors(blob):
    try:
        decoded = decode_params(blob)
    except RemoteProtocolError:
        return
    assert isinstance(decoded, dict) and encode_params(decoded)


def test_params_refuse_nested_values():
    with pytest.raises(RemoteProtocolError, match="not str, int"):
        decode_params(msgpack.packb({"a": {"b": 1}}))
    with pytest.raises(RemoteProtocolError, match="max_array_len"):
        decode_params(msgpack.packb({"a": [1, 2]}))
    with pytest.raises(LocalProtocolError):
        encode_params({"a": {"b": 1}})


# --- wire messages -------------------------------------------------------------------------------


def test_task_message_type_ids_are_pinned():
    pinned = {TaskAssign: 32, TaskAccepted: 33, TaskResult: 34, TaskFailed: 35, TaskCancel: 36}
    for cls, type_id in pinned.items():
        assert spec_of(cls).type_id == type_id
        assert spec_of(cls).extensible


def _sample_item(**changes) -> WorkItem:
    base = dict(
        item_id="t1/0", task_id="t1", model=ModelRef("digits-mlp", "1"),
        input=_tensor(np.ones((4, 64), np.float32)), params={"requires_gpu": True, "k": 3},
        deadline_s=2.5, priority=7, attempt=2,
    )  # fmt: skip
    return WorkItem(**{**base, **changes})


def test_work_item_travels_as_task_assign():
    item = _sample_item()
    msg = decode_as(encode(item.to_message()), TaskAssign)
    assert WorkItem.from_message(msg) == item
    np.testing.assert_array_equal(msg.input.to_array(), np.ones((4, 64), np.float32))


def test_a_16_mib_input_fits_one_task_assign():
    rows = MAX_TENSOR_BYTES // (4 * 1024)
    item = _sample_item(input=_tensor(np.zeros((rows, 1024), np.float32)))
    assert len(decode(encode(item.to_message())).input.data) == rows * 4096


VALID = [
    TaskAccepted("t1/0", 1, "veh-7", 3),
    TaskResult("t1/0", 2, _tensor(np.eye(3, dtype=np.float16)), "veh-7", "cupy", "cuda:0",
               {"queue_s": 0.01, "infer_s": 0.002}),
    TaskFailed("t1/0", 1, FailureKind.OVERLOADED, "queue full", True),
    TaskFailed("t1/0", 1, 999, "from a newer peer", False),
    TaskCancel("t1/0", "deadline passed"),
]  # fmt: skip


@pytest.mark.parametrize("msg", VALID, ids=lambda m: type(m).__name__)
def test_task_messages_round_trip(msg):
    assert decode(encode(msg)) == msg


def test_unknown_failure_codes_map_to_unknown():
    assert failure_kind(2) is FailureKind.OVERLOADED
    assert failure_kind(999) is FailureKind.UNKNOWN


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (TaskAccepted("t1/0", 0, "veh-7"), "attempt"),
        (TaskAccepted("", 1, "veh-7"), "item_id"),
        (TaskResult("t1/0", 1, Tensor(b"\x00", "float32", (1,)), "n", "e", "d", {}), "bytes"),
        (TaskResult("t1/0", 1, _tensor([1]), "n", "e", "d", {"x": -1.0}), "timings"),
        (TaskResult("t1/0", 1, _tensor([1]), "n", "e", "d", {"x": math.inf}), "timings"),
        (TaskFailed("t1/0", 1, 70000, "", False), "code"),
        (TaskCancel("", ""), "item_id"),
    ],
)
def test_task_messages_refuse_invalid_fields(msg, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode(encode(msg))


def test_task_assign_refuses_bad_params_and_deadline():
    good = _sample_item().to_message()
    fields = [getattr(good, f) for f in TaskAssign.__dataclass_fields__]
    bad_params = TaskAssign(*fields[:5], b"\xc1", *fields[6:])
    with pytest.raises(RemoteProtocolError, match="params"):
        decode(encode(bad_params))
    bad_deadline = TaskAssign(*fields[:6], -1.0, *fields[7:])
    with pytest.raises(RemoteProtocolError, match="deadline"):
        decode(encode(bad_deadline))


def _by_reference() -> TaskAssign:
    msg = _sample_item().to_message()
    return by_reference(msg, content_digest(msg.input.data))


def test_an_input_travels_by_reference_and_resolves_from_the_cached_bytes():
    msg = _sample_item().to_message()
    ref_msg = decode_as(encode(_by_reference()), TaskAssign)
    assert ref_msg.input.data == b"" and not ref_msg.keep_input
    assert ref_msg.input_ref == TensorRef(content_digest(msg.input.data), "float32", (4, 64))
    assert len(encode(ref_msg)) < len(encode(msg)) - len(msg.input.data) + 100
    assert ref_msg.input_ref.resolve(msg.input.data) == msg.input
    with pytest.raises(RemoteProtocolError, match="needs 1024 bytes, got 1020"):
        ref_msg.input_ref.resolve(msg.input.data[:-4])  # bytes that do not fit the shape
    kept = decode_as(encode(replace(msg, keep_input=True)), TaskAssign)
    assert kept.keep_input and kept.input == msg.input


def test_an_older_peers_task_assign_decodes_with_the_input_inline():
    wire = msgpack.packb(msgpack.unpackb(encode(_sample_item().to_message()))[:10])
    assert len(msgpack.unpackb(wire)) == 10  # type id + the 9 original fields
    old = decode_as(wire, TaskAssign)
    assert old.input_ref is None and old.keep_input is False


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"input": _tensor(np.ones(2, np.uint8))}, "empty input"),  # a ref and bytes
        ({"keep_input": True}, "not kept"),
        ({"input_ref": TensorRef("AB" * 32, "float32", (4, 64))}, "lowercase hex"),
        ({"input_ref": TensorRef("ab" * 31, "float32", (4, 64))}, "64 lowercase hex"),
        ({"input_ref": TensorRef("ab" * 32, "float64", (4, 64))}, "dtype"),
        ({"input_ref": TensorRef("ab" * 32, "uint8", (2**30, 2**30))}, "cap"),
    ],
)
def test_task_assign_refuses_bad_references(change, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode(encode(replace(_by_reference(), **change)))


@settings(max_examples=400, deadline=None)
@given(
    which=st.sampled_from(
        [*VALID, _sample_item(input=_tensor(np.ones(3, np.uint8))).to_message(), _by_reference()]
    ),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10_000),
)
def test_mutated_task_messages_decode_or_raise_remote_errors(which, flips, cut):
    wire = bytearray(encode(which))
    for pos, value in flips:
        wire[pos % len(wire)] = value
    wire = bytes(wire[: max(1, cut % (len(wire) + 1))])
    try:
        msg = decode(wire)
    except RemoteProtocolError:
        return
    assert decode(encode(msg)) == msg  # whatever decodes is a valid, re-encodable message


# --- planning ------------------------------------------------------------------------------------


def test_single_plans_one_item_with_the_spec_fields():
    spec = TaskSpec("t", Pattern.SINGLE, _tensor([1.0, 2.0]), (ModelRef("m", "3"),),
                    params={"a": 1}, deadline_s=5.0, priority=2)  # fmt: skip
    (item,) = plan(spec)
    assert item == WorkItem("t/0", "t", ModelRef("m", "3"), spec.inputs, {"a": 1}, 5.0, 2, 1)


def test_parallel_sends_the_same_input_to_every_model():
    refs = (ModelRef("a"), ModelRef("b"), ModelRef("c", "2"))
    spec = TaskSpec("t", Pattern.PARALLEL, _tensor(np.ones((2, 3), np.float32)), refs)
    items = plan(spec)
    assert [i.model for i in items] == list(refs)
    assert [i.item_id for i in items] == ["t/0", "t/1", "t/2"]
    assert all(i.input == spec.inputs for i in items)


@settings(max_examples=200, deadline=None)
@given(
    array=arrays(dtypes=["float32", "uint8", "bool"], max_dims=3, min_side=1),
    shard=st.none() | st.integers(1, 7),
)
def test_batch_shards_cover_every_row_once_in_order(array, shard):
    if array.ndim == 0:
        array = array.reshape(1)
    spec = TaskSpec("b", Pattern.BATCH, _tensor(array), (ModelRef("m"),), shard_size=shard)
    items = plan(spec)
    size = shard or 256
    assert len(items) == math.ceil(array.shape[0] / size)
    assert all(0 < i.input.rows <= size for i in items)
    assert [i.index for i in items] == list(range(len(items)))
    assert len({i.item_id for i in items}) == len(items)
    joined = np.concatenate([i.input.to_array() for i in items])
    np.testing.assert_array_equal(joined, array)
    assert [o.item_id for o in outline(spec)] == [i.item_id for i in items]


def test_batch_default_shards_of_large_rows_fit_one_message():
    rows = np.zeros((40, 256 * 1024), np.float32)  # 1 MiB per row
    spec = TaskSpec("b", Pattern.BATCH, _tensor(rows[:1]), (ModelRef("m"),))
    big = TaskSpec("b", Pattern.BATCH, Tensor(b"\x00" * rows.nbytes, "float32", rows.shape),
                   (ModelRef("m"),))  # fmt: skip
    assert len(plan(spec)) == 1
    items = plan(big)
    assert all(len(i.input.data) <= MAX_TENSOR_BYTES for i in items)
    assert sum(i.input.rows for i in items) == 40


def test_plan_refuses_pipelines():
    spec = TaskSpec("p", Pattern.PIPELINE, _tensor([1.0]), stages=(Stage("a", ModelRef("m")),))
    with pytest.raises(LocalProtocolError, match="PipelinePlan"):
        plan(spec)


_IN = _tensor(np.ones((3, 2), np.float32))
_ROW = MAX_TENSOR_BYTES // 2 + 1
_TWO_BIG_ROWS = Tensor(bytes(2 * _ROW), "uint8", (2, _ROW))
#: a batch row no shard can carry (each item is one message)
_ONE_HUGE_ROW = Tensor(bytes(MAX_TENSOR_BYTES + 1), "uint8", (1, MAX_TENSOR_BYTES + 1))
_M = (ModelRef("m"),)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (TaskSpec("bad id!", Pattern.SINGLE, _IN, _M), "task_id"),
        (TaskSpec("t", "sideways", _IN, _M), "pattern"),
        (TaskSpec("t", Pattern.SINGLE, _IN, ()), "needs 1..1 models"),
        (TaskSpec("t", Pattern.BATCH, _IN, _M * 2), "needs 1..1 models"),
        (TaskSpec("t", Pattern.PARALLEL, _IN, _M * 2), "listed twice"),
        (TaskSpec("t", Pattern.SINGLE, _IN, (ModelRef(""),)), "id and version"),
        (TaskSpec("t", Pattern.SINGLE, Tensor(b"\x00", "float32", (1,)), _M), "inputs"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, deadline_s=0.0), "deadline_s"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, deadline_s=math.nan), "deadline_s"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, priority=2**31), "priority"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, policy="fastest"), "policy"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, aggregation="median"), "aggregation"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, shard_size=2), "only a batch"),
        (TaskSpec("t", Pattern.BATCH, _IN, _M, shard_size=0), "shard_size"),
        (TaskSpec("t", Pattern.BATCH, _tensor(np.float32(1)), _M), "at least one row"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, params={"x": [1]}), "params"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, stages=(Stage("a", _M[0]),)), "only a pipeline"),
        (TaskSpec("t", Pattern.PIPELINE, _IN, _M), "needs 0..0 models"),
        (TaskSpec("t", Pattern.PIPELINE, _IN), "1..64 stages"),
        (TaskSpec("t", Pattern.SINGLE, Tensor(b"", "uint8", (MAX_TENSOR_BYTES + 1,)), _M),
         "over the cap"),
        (TaskSpec("t", Pattern.BATCH, Tensor(b"", "uint8", (MAX_BATCH_INPUT_BYTES + 1,)), _M),
         "over the cap"),
        (TaskSpec("t", Pattern.BATCH, _TWO_BIG_ROWS, _M, shard_size=2), "bytes per item"),
        (TaskSpec("t", Pattern.BATCH, _ONE_HUGE_ROW, _M), "a row of .* bytes exceeds"),
    ],
)  # fmt: skip
def test_invalid_specs_are_refused_naming_the_field(spec, match):
    with pytest.raises(InvalidTaskError, match=match) as caught:
        spec.validate()
    assert isinstance(caught.value, ConfigError)


_A, _B, _C = ModelRef("a"), ModelRef("b", "2"), ModelRef("c")


def _parallel(aggregation="ensemble", **options) -> TaskSpec:
    return TaskSpec("t", Pattern.PARALLEL, _IN, (_A, _B, _C), aggregation=aggregation, **options)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, quorum=1), "quorum: only a parallel task"),
        (TaskSpec("t", Pattern.BATCH, _IN, _M, min_responses=1), "min_responses: only a par"),
        (TaskSpec("t", Pattern.SINGLE, _IN, _M, aggregation_timeout_s=1.0),
         "aggregation_timeout_s: only a parallel task"),
        (TaskSpec("t", Pattern.PIPELINE, _IN, stages=(Stage("s", _A),), weights={_A: 2.0}),
         "weights: only a parallel task"),
        (_parallel(quorum=0), r"quorum 0 must be an integer in 1\.\.3"),
        (_parallel(quorum=4), r"quorum 4 must be an integer in 1\.\.3"),
        (_parallel(quorum=True), "quorum True"),
        (_parallel(quorum=2.0), "quorum 2.0"),
        (_parallel(min_responses=0), "min_responses 0"),
        (_parallel(min_responses=4), "min_responses 4"),
        (_parallel(min_responses=False), "min_responses False"),
        (_parallel(aggregation_timeout_s=0.0), "aggregation_timeout_s 0.0"),
        (_parallel(aggregation_timeout_s=-1), "aggregation_timeout_s -1"),
        (_parallel(aggregation_timeout_s=math.nan), "aggregation_timeout_s nan"),
        (_parallel(aggregation_timeout_s=math.inf), "aggregation_timeout_s inf"),
        (_parallel(aggregation_timeout_s=True), "aggregation_timeout_s True"),
        (_parallel(aggregation_timeout_s=10**400), "aggregation_timeout_s 1000"),
        (_parallel(aggregation_timeout_s="1"), "aggregation_timeout_s '1'"),
        (_parallel(aggregation_timeout_s=5.0, deadline_s=2.0),
         "aggregation_timeout_s 5 exceeds deadline_s 2"),
        (_parallel(weights={ModelRef("d"): 2.0}), "weights: d@1 is not one of the task's models"),
        (_parallel(weights={"a@1": 2.0}), "weights: a@1 is not one of the task's models"),
        (_parallel(weights={_A: 0.0}), "weights: a@1 has weight 0.0"),
        (_parallel(weights={_A: -1.0}), "weights: a@1 has weight -1.0"),
        (_parallel(weights={_A: math.nan}), "weights: a@1 has weight nan"),
        (_parallel(weights={_A: math.inf}), "weights: a@1 has weight inf"),
        (_parallel(weights={_A: True}), "weights: a@1 has weight True"),
        (_parallel(weights={_A: 10**400}), "weights: a@1 has weight 1000"),
        (_parallel(weights=[(_A, 2.0)]), "weights must map"),
        (_parallel("majority", quorum=2), "quorum: only an ensemble"),
        (_parallel("weighted", quorum=2), "quorum: only an ensemble"),
        (_parallel("all", weights={_A: 2.0}), "weights: only weighted and ensemble"),
        (_parallel("first", weights={_A: 2.0}), "weights: only weighted and ensemble"),
        # two models one name could mean: weights could not be written down and read back
        (TaskSpec("t", Pattern.PARALLEL, _IN, (ModelRef("a@b"), ModelRef("a", "b@1")),
                  aggregation="weighted", weights={ModelRef("a@b"): 2.0}),
         "cannot be named apart"),
    ],
)  # fmt: skip
def test_invalid_aggregation_options_are_refused_naming_the_key(spec, match):
    with pytest.raises(InvalidTaskError, match=match):
        spec.validate()


def test_valid_aggregation_options_and_the_mode_they_need():
    for spec in (
        _parallel(quorum=3, min_responses=3, aggregation_timeout_s=2, deadline_s=2.0),
        _parallel(quorum=1, weights={_A: 0.5, _C: 1e300}),
        _parallel("weighted", weights={_B: 3}),
        _parallel("majority", min_responses=2, aggregation_timeout_s=1e-3),
        _parallel(None, quorum=2, weights={_B: 3}),  # the mode comes from the coordinator
    ):
        assert spec.validate() is None
    pinned = _parallel(None, quorum=2)
    assert with_aggregation_mode(pinned, "ensemble").aggregation == "ensemble"
    with pytest.raises(InvalidTaskError, match="quorum: only an ensemble"):
        with_aggregation_mode(pinned, "all").validate()
    with pytest.raises(InvalidTaskError, match="weights: only weighted"):
        check_aggregation_mode(_parallel(None, weights={_A: 2.0}), "majority")
    check_aggregation_mode(_parallel(None, weights={_A: 2.0}), "weighted")
    # options every mode takes, or none: the spec is left as it is (no mode written in)
    for spec in (_parallel(None, min_responses=2), _parallel(None), _parallel("all", quorum=None)):
        assert with_aggregation_mode(spec, "ensemble") is spec


def test_models_are_named_as_submissions_name_them():
    refs = (_A, _B, ModelRef("a@b"), ModelRef("a", "b@1"))
    assert models_named("a", refs) == (_A,)  # no version: version "1"
    assert models_named("a@1", refs) == (_A,)
    assert models_named("b@2", refs) == (_B,)
    assert models_named("b", refs) == ()  # b@1 is not one of them
    assert models_named("a@b@1", refs) == (ModelRef("a@b"), ModelRef("a", "b@1"))


NOW = 1_795_000_000.25  # 2026-11-18, in seconds since the epoch


def test_new_task_ids_come_from_the_rng_after_the_time():
    one, two = new_task_id(random.Random(7), NOW), new_task_id(random.Random(7), NOW)
    assert one == two and len(one) == 32 and int(one, 16) >= 0
    assert one[:12] == f"{int(NOW * 1000):012x}"
    other = new_task_id(random.Random(8), NOW)
    assert other != one and other[:12] == one[:12]


@settings(max_examples=300)
@given(
    st.integers(0, (1 << 48) - 2),
    st.integers(1, 10**9),
    st.integers(0, 2**32),
    st.integers(0, 2**32),
)
def test_new_task_ids_sort_by_creation_time(millis, later_by, seed_a, seed_b):
    at = (millis + 0.5) / 1000  # mid-millisecond: no float rounding across a boundary
    later_at = (min(millis + later_by, (1 << 48) - 1) + 0.5) / 1000
    earlier, later = (
        new_task_id(random.Random(seed_a), at),
        new_task_id(random.Random(seed_b), later_at),
    )
    assert earlier < later and len(earlier) == len(later) == 32


def test_new_task_ids_clamp_a_time_outside_48_bits():
    assert new_task_id(random.Random(1), -5.0)[:12] == "0" * 12
    assert new_task_id(random.Random(1), 1e30)[:12] == "f" * 12


# --- pipelines -----------------------------------------------------------------------------------


def _pipeline(*stages: Stage, inputs: Tensor = _IN) -> TaskSpec:
    return TaskSpec("p", Pattern.PIPELINE, inputs, stages=stages)


def _stage(name: str, *after: str) -> Stage:
    return Stage(name, ModelRef(f"model-{name}"), after)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ((_stage("a"), _stage("a")), "stage 'a': duplicate stage name"),
        ((_stage("a"), _stage("b", "x")), "stage 'b' depends on unknown stage 'x'"),
        ((_stage("a", "a"),), r"stage 'a' is in a dependency cycle: a -> a"),
        ((_stage("a"), _stage("b", "c"), _stage("c", "b")), "stage 'b' is in a dependency cycle"),
        ((_stage("a"), _stage("b", "a", "a")), "stage 'b': lists a dependency twice"),
        ((_stage("no spaces"),), "stage name"),
    ],
)
def test_invalid_dags_name_the_stage(stages, match):
    with pytest.raises(InvalidTaskError, match=match):
        PipelinePlan(_pipeline(*stages))


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 7),
    edges=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=12, unique=True),
)
def test_stage_order_accepts_exactly_the_acyclic_graphs(count, edges):
    deps = {f"s{i}": [f"s{b}" for a, b in edges if a == i and b < count] for i in range(count)}
    spec = _pipeline(*(Stage(n, ModelRef("m"), tuple(after)) for n, after in deps.items()))
    try:
        expected = list(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError:
        with pytest.raises(InvalidTaskError, match="dependency cycle"):
            stage_order(spec)
        return
    order = [s.name for s in stage_order(spec)]
    assert sorted(order) == sorted(expected)
    position = {name: i for i, name in enumerate(order)}
    assert all(position[d] < position[n] for n, after in deps.items() for d in after)


@settings(max_examples=200, deadline=None)
@given(stages=dags(), width=st.integers(1, 3))
def test_pipeline_runs_each_stage_once_after_its_dependencies(stages, width):
    spec = _pipeline(*stages, inputs=_tensor(np.ones((2, width), np.float32)))
    pipeline = PipelinePlan(spec)
    results: dict[str, Tensor] = {}
    issued: list[str] = []
    for _ in range(len(stages)):
        ready = pipeline.ready_items(results)
        if not ready:
            break
        for item in ready:
            stage = pipeline.stage_of(item.item_id)
            assert all(pipeline.item_id(d) in results for d in stage.after)
            assert item.model == stage.model and item.stage == stage.name
            # the stage's input width is the sum of what feeds it
            assert item.input.shape[-1] == _width(pipeline, stage, results, width)
            issued.append(item.item_id)
            results[item.item_id] = item.input  # echo: output = input
    assert sorted(issued) == sorted(pipeline.item_ids)
    assert pipeline.is_complete(results) and pipeline.ready_items(results) == []
    assert set(pipeline.sinks) <= set(pipeline.item_ids) and pipeline.sinks
    fed = {d for s in stages for d in s.after}
    assert {pipeline.stage_of(i).name for i in pipeline.sinks} == {s.name for s in stages} - fed


def _width(pipeline, stage, results, width) -> int:
    if not stage.after:
        return width
    return sum(results[pipeline.item_id(d)].shape[-1] for d in stage.after)


def test_pipeline_skips_started_items_and_merges_params():
    spec = TaskSpec("p", Pattern.PIPELINE, _IN, params={"a": 1, "b": 2},
                    stages=(Stage("x", ModelRef("m"), (), {"b": 3}), _stage("y", "x")))  # fmt: skip
    pipeline = PipelinePlan(spec)
    (first,) = pipeline.ready_items({})
    assert first.params == {"a": 1, "b": 3}
    assert pipeline.ready_items({}, started={first.item_id}) == []
    (second,) = pipeline.ready_items({first.item_id: _tensor([[5.0]])})
    assert second.item_id == "p/y" and second.input == _tensor([[5.0]])
    assert second.index == 1 and pipeline.stage_of("other/y") is None


def test_pipeline_refuses_outputs_that_cannot_be_joined():
    pipeline = PipelinePlan(_pipeline(_stage("a"), _stage("b"), _stage("c", "a", "b")))
    mixed = {"p/a": _tensor(np.ones((2, 1), np.float32)), "p/b": _tensor(np.ones((2, 1), np.int32))}
    with pytest.raises(RemoteProtocolError, match=r"stage 'c'.*mixed dtypes"):
        pipeline.ready_items(mixed)
    ragged = {
        "p/a": _tensor(np.ones((2, 1), np.float32)),
        "p/b": _tensor(np.ones((3, 1), np.float32)),
    }
    with pytest.raises(RemoteProtocolError, match=r"stage 'c'.*cannot join"):
        pipeline.ready_items(ragged)


def test_pipeline_plan_refuses_other_patterns():
    with pytest.raises(LocalProtocolError):
        PipelinePlan(TaskSpec("t", Pattern.SINGLE, _IN, _M))


# --- spec codec ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(spec=specs())
def test_specs_round_trip_through_dicts_and_blobs(spec):
    spec.validate()
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert decode_spec(encode_spec(spec)) == spec
    assert len(outline(spec)) >= 1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.pop("task_id"), "task_id: missing"),
        (lambda d: d.update(colour="red"), "unknown key 'colour'"),
        (lambda d: d.update(priority="high"), "priority: expected int, got str"),
        (lambda d: d.update(priority=True), "priority: expected int, got bool"),
        (lambda d: d.update(pattern="sideways"), "pattern: 'sideways' is not one of"),
        (lambda d: d["inputs"].update(shape=["2"]), "inputs.shape"),
        (lambda d: d.update(models=[{"model_id": 3}]), r"models\[0\].model_id"),
        (lambda d: d.update(stages=[{"name": "a"}]), r"stages\[0\].model: missing"),
        (lambda d: d.update(deadline_s=-1), "deadline_s"),
        (lambda d: d.update(deadline_s=10**400), "deadline_s: too large"),
        (lambda d: d.update(models=[{"model_id": "m\ud800"}]), "lone surrogate"),
        (lambda d: d.update(models=[{"model_id": "m", "version": "\udfff"}]), "lone surrogate"),
        (lambda d: d.update(params={"k\ud83d": 1}), "params: key .* lone surrogate"),
        (lambda d: d.update(params={"k": "v\udc00"}), "params: k: .* lone surrogate"),
    ],
)
def test_spec_from_dict_names_the_bad_key(change, match):
    raw = spec_to_dict(TaskSpec("t", Pattern.SINGLE, _IN, _M))
    change(raw)
    with pytest.raises(InvalidTaskError, match=match):
        spec_from_dict(raw)


_OPTIONS = {"quorum": 2, "min_responses": 1, "aggregation_timeout_s": 1.5,
            "weights": {"a": 2, "b@2": 0.5}}  # fmt: skip


def _parallel_dict(**changes) -> dict:
    raw = spec_to_dict(_parallel())
    raw.update(changes)
    return raw


def test_aggregation_options_travel_in_dicts_and_blobs():
    spec = spec_from_dict(_parallel_dict(**_OPTIONS))
    assert (spec.quorum, spec.min_responses, spec.aggregation_timeout_s) == (2, 1, 1.5)
    assert spec.weights == {_A: 2.0, _B: 0.5} and type(spec.weights[_A]) is float
    raw = spec_to_dict(spec)
    assert raw["weights"] == {"a@1": 2.0, "b@2": 0.5}  # written as "id@version"
    assert spec_from_dict(raw) == spec
    assert decode_spec(encode_spec(spec)) == spec
    unset = spec_to_dict(_parallel())
    assert not set(unset) & {"quorum", "min_responses", "aggregation_timeout_s", "weights"}


def _old_encoder_blob(spec: TaskSpec) -> bytes:
    """A spec as the encoder before the aggregation options wrote it (those 11 keys only)."""
    tensor = spec.inputs
    return msgpack.packb(
        {
            "task_id": spec.task_id, "pattern": str(spec.pattern),
            "inputs": {"data": tensor.data, "dtype": tensor.dtype, "shape": list(tensor.shape)},
            "models": [{"model_id": m.model_id, "version": m.version} for m in spec.models],
            "stages": [], "params": dict(spec.params), "deadline_s": spec.deadline_s,
            "priority": spec.priority, "policy": spec.policy, "aggregation": spec.aggregation,
            "shard_size": spec.shard_size,
        },
        use_bin_type=True,
    )  # fmt: skip


def test_a_spec_journaled_before_the_aggregation_options_decodes_with_their_defaults():
    old = _old_encoder_blob(_parallel(deadline_s=3.0))
    spec = decode_spec(old)
    assert spec == _parallel(deadline_s=3.0)
    assert (spec.quorum, spec.min_responses, spec.aggregation_timeout_s) == (None, None, None)
    assert spec.weights == {}
    assert encode_spec(spec) == old  # unchanged: a retry of it matches the journaled blob


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"quorum": "2"}, "quorum: expected int or NoneType, got str"),
        ({"quorum": True}, "quorum: expected int or NoneType, got bool"),
        ({"quorum": 1.0}, "quorum: expected int or NoneType, got float"),
        ({"min_responses": [1]}, "min_responses: expected int"),
        ({"aggregation_timeout_s": "1"}, "aggregation_timeout_s: expected int or float"),
        ({"aggregation_timeout_s": False}, "aggregation_timeout_s: expected int or float"),
        ({"aggregation_timeout_s": 10**400}, "aggregation_timeout_s: too large"),
        ({"weights": [["a", 1]]}, "weights: expected Mapping, got list"),
        ({"weights": None}, "weights: expected Mapping, got null"),
        ({"weights": {"a": "2"}}, "weights['a']: expected a number, got str"),
        ({"weights": {"a": True}}, "weights['a']: expected a number, got bool"),
        ({"weights": {"a": 10**400}}, "weights['a']: too large"),
        ({"weights": {"a": 1, "a@1": 2}}, "weights['a@1']: names a@1 a second time"),
        ({"weights": {"d@1": 2}}, "weights: d@1 is not one of the task's models"),
        ({"weights": {"b": 2}}, "weights: b@1 is not one of the task's models"),
        ({"weights": {"a": 0}}, "weights: a@1 has weight 0.0"),
        ({"quorum": 4}, "quorum 4 must be an integer in 1..3"),
        ({"aggregation": "all", "quorum": 2}, "quorum: only an ensemble"),
        ({"aggregation": "majority", "weights": {"c": 2}}, "weights: only weighted"),
        ({"pattern": "single", "models": [{"model_id": "a"}], "weights": {"a": 2}},
         "weights: only a parallel task"),
        ({"deadline_s": 1, "aggregation_timeout_s": 1.5}, "aggregation_timeout_s 1.5 exceeds"),
    ],
)  # fmt: skip
def test_spec_from_dict_names_the_bad_aggregation_option(changes, match):
    with pytest.raises(InvalidTaskError, match=re.escape(match)):
        spec_from_dict(_parallel_dict(**changes))


def test_models_whose_ids_or_versions_hold_at_signs_are_refused_by_name():
    """``"a@b@c"`` would name both ``a@b`` version ``c`` and ``a`` version ``b@c``: a model's id
    or version holding ``@`` is refused, naming its key (weights keyed by such names could
    not say which model they weigh)."""
    refs = ({"model_id": "x", "version": "1"}, {"model_id": "a@b", "version": "1"})
    raw = _parallel_dict(models=list(refs), weights={"a@b": 2}, quorum=None)
    with pytest.raises(InvalidTaskError, match=r"models\[1\]: id 'a@b' holds \"@\""):
        spec_from_dict(raw)
    refs = ({"model_id": "x", "version": "y@z"},)
    with pytest.raises(InvalidTaskError, match=r"models\[0\]: version 'y@z' holds"):
        spec_from_dict(_parallel_dict(models=list(refs), quorum=None))


#: any code point, surrogates included (Hypothesis leaves them out unless told)
ANY_CHAR = st.characters(exclude_categories=()) | st.sampled_from("\ud800\udbff\udc00\udfff")


@settings(max_examples=300, deadline=None)
@given(
    model=st.text(ANY_CHAR, min_size=1, max_size=8),
    key=st.text(ANY_CHAR, min_size=1, max_size=8),
    value=st.text(ANY_CHAR),
)
def test_a_spec_that_validates_can_be_journaled(model, key, value):
    """Any text (lone surrogates included) in a model id or a parameter: the spec is refused
    with InvalidTaskError, or it is written and read back as it was."""
    raw = spec_to_dict(TaskSpec("t", Pattern.SINGLE, _IN, _M))
    raw.update(models=[{"model_id": model}], params={key: value})
    try:
        spec = spec_from_dict(raw)
    except InvalidTaskError:
        return
    assert decode_spec(encode_spec(spec)) == spec
    assert decode_params(encode_params(spec.params)) == spec.params


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=80), flips=st.lists(st.integers(0, 10_000), max_size=3))
def test_decode_spec_fuzz_only_raises_invalid_task(blob, flips):
    good = bytearray(encode_spec(TaskSpec("t", Pattern.SINGLE, _IN, _M)))
    for pos in flips:
        good[pos % len(good)] ^= 0x5A
    for candidate in (blob, bytes(good)):
        try:
            spec = decode_spec(candidate)
        except InvalidTaskError:
            continue
        spec.validate()
