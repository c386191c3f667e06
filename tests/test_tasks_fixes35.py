"""Session 35 review of the task model and its codecs (tasks*.py): what a submitted spec may
carry to a node, the size of a batch's plan, a pipeline join's memory, the spec's types, and
property tests of the decoders of client and journal data."""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.journal import UnknownTaskError
from meshinfer.errors import ConfigError, RemoteProtocolError
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.messages import decode, encode
from meshinfer.proto.models import ModelRef
from meshinfer.proto.tasks import (
    MAX_BATCH_ITEMS,
    MAX_DEADLINE_S,
    TERMINAL_STATES,
    TRANSITIONS,
    InvalidTaskError,
    InvalidTransition,
    Pattern,
    Stage,
    TaskEvent,
    TaskSpec,
    TaskState,
    check_sendable,
    outline,
    plan,
    transition,
)
from meshinfer.proto.tasks_codec import decode_spec, encode_spec, spec_from_dict, spec_to_dict
from meshinfer.proto.tasks_pipeline import PipelinePlan, StageInputError
from meshinfer.proto.tasks_wire import (
    MAX_PARAMS,
    MAX_PARAMS_BYTES,
    MAX_TENSOR_BYTES,
    TaskAssign,
    Tensor,
)
from tests.test_coordinator_service import Mesh
from tests.test_coordinator_service import spec as service_spec

_INPUT = {"data": b"\x00" * 8, "dtype": "float32", "shape": [2]}


def _doc(**fields):
    return {"task_id": "t", "pattern": "single", "inputs": _INPUT,
            "models": [{"model_id": "m", "version": "1"}], **fields}  # fmt: skip


def _pipeline_doc(task_params, stage_params):
    stage = {"name": "a", "model": {"model_id": "m"}, "params": stage_params}
    return _doc(pattern="pipeline", models=[], stages=[stage], params=task_params)


def _messages(spec: TaskSpec) -> list[TaskAssign]:
    if spec.pattern == Pattern.PIPELINE:
        return [i.to_message() for i in PipelinePlan(spec).ready_items({})]
    return [i.to_message() for i in plan(spec)]


# --- params an item carries -----------------------------------------------------------------


def test_a_pipeline_stage_merging_past_max_params_is_refused_at_submit():
    task = {f"t{i}": 1 for i in range(MAX_PARAMS)}
    stage = {f"s{i}": 1 for i in range(MAX_PARAMS)}
    with pytest.raises(InvalidTaskError, match=r"stage 'a': params: .* 128 params, at most 64"):
        spec_from_dict(_pipeline_doc(task, stage))
    # (a stage overriding the task's keys carries no more than the task's)
    spec = spec_from_dict(_pipeline_doc(task, {"t0": 2}))
    (msg,) = _messages(spec)
    assert decode(encode(msg)) == msg


def test_params_a_node_would_refuse_as_too_long_are_refused_at_submit():
    params = {f"k{i}": "x" * 1024 for i in range(20)}  # 20 KiB: each value within its cap
    with pytest.raises(InvalidTaskError, match=f"params: .* at most {MAX_PARAMS_BYTES} per item"):
        spec_from_dict(_doc(params=params))


def test_a_journaled_spec_past_the_submit_checks_still_reads_back():
    spec = TaskSpec("t", Pattern.SINGLE, Tensor(b"\x00" * 8, "float32", (2,)), (ModelRef("m"),),
                    params={f"k{i}": "x" * 1024 for i in range(20)})  # fmt: skip
    with pytest.raises(InvalidTaskError):
        check_sendable(spec)
    assert decode_spec(encode_spec(spec)) == spec  # recovery reads it as it was


_PARAM_VALUES = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=1024)
)  # fmt: skip
_PARAMS = st.dictionaries(st.text(min_size=1, max_size=64), _PARAM_VALUES, max_size=MAX_PARAMS)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(task=_PARAMS, stage=_PARAMS, pipeline=st.booleans())
def test_every_accepted_spec_sends_items_a_node_decodes(task, stage, pipeline):
    doc = _pipeline_doc(task, stage) if pipeline else _doc(params=task)
    try:
        spec = spec_from_dict(doc)
    except InvalidTaskError:
        return
    for msg in _messages(spec):
        assert decode(encode(msg)) == msg


# --- batch size -----------------------------------------------------------------------------


def test_a_batch_of_more_than_max_batch_items_is_refused_with_the_shard_size_it_needs():
    rows = MAX_BATCH_ITEMS + 1
    doc = _doc(pattern="batch", inputs={"data": b"\x00" * rows, "dtype": "uint8",
                                        "shape": [rows]}, shard_size=1)  # fmt: skip
    with pytest.raises(InvalidTaskError, match=f"{rows} items, at most .* at least 2$"):
        spec_from_dict(doc)
    assert len(outline(spec_from_dict({**doc, "shard_size": 2}))) == rows // 2 + 1


def test_a_default_sharded_batch_keeps_within_the_item_cap_until_its_rows_do_not():
    rows = 256 * MAX_BATCH_ITEMS  # the default: 256 rows a shard
    tensor = {"data": b"\x00" * rows, "dtype": "uint8", "shape": [rows]}
    assert len(outline(spec_from_dict(_doc(pattern="batch", inputs=tensor)))) == MAX_BATCH_ITEMS
    more = {"data": b"\x00" * (rows + 1), "dtype": "uint8", "shape": [rows + 1]}
    with pytest.raises(InvalidTaskError, match=r"at least 257$"):
        spec_from_dict(_doc(pattern="batch", inputs=more))


# --- spec types -----------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", ["5", True, [1.0], float("nan"), -1.0, 0, 10**400])
def test_validate_refuses_a_deadline_that_is_not_a_positive_number(deadline):
    spec = TaskSpec("t", Pattern.SINGLE, Tensor(b"\x00" * 8, "float32", (2,)), (ModelRef("m"),),
                    deadline_s=deadline)  # fmt: skip
    with pytest.raises(InvalidTaskError, match=r"deadline_s .* must be a positive number"):
        spec.validate()


def test_the_deadline_bound_is_the_thirty_days_the_docs_name():
    assert MAX_DEADLINE_S == 30 * 24 * 3600
    spec = spec_from_dict(_doc(deadline_s=MAX_DEADLINE_S))
    assert spec.deadline_s == MAX_DEADLINE_S
    with pytest.raises(InvalidTaskError, match="30 days"):
        spec_from_dict(_doc(deadline_s=MAX_DEADLINE_S * 1.0001))


# --- pipeline join --------------------------------------------------------------------------


def test_a_join_past_the_tensor_cap_is_refused_before_numpy_allocates_it():
    stages = (Stage("a", ModelRef("m")), Stage("b", ModelRef("m")),
              Stage("c", ModelRef("m"), ("a", "b")))  # fmt: skip
    spec = TaskSpec("p", Pattern.PIPELINE, Tensor(b"\x00" * 4, "float32", (1,)), stages=stages)
    half = MAX_TENSOR_BYTES // 2 + 4096  # each feed fits a message; the two joined do not
    feed = Tensor(b"\x00" * half, "uint8", (half,))
    results = {"p/a": feed, "p/b": feed}
    tracemalloc.start()
    try:
        with pytest.raises(StageInputError, match="bytes, over the cap of") as caught:
            PipelinePlan(spec).ready_items(results)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_TENSOR_BYTES // 4  # (the join would have been 2 * half)
    assert caught.value.feeds == ("p/a", "p/b")


# --- state machine --------------------------------------------------------------------------


def test_terminal_states_have_no_way_out():
    for state in TERMINAL_STATES:
        for event in TaskEvent:
            with pytest.raises(InvalidTransition):
                transition(state, event)
    assert not any(state in TERMINAL_STATES for state, _ in TRANSITIONS)


@pytest.mark.parametrize("state", sorted(set(TaskState) - TERMINAL_STATES))
@pytest.mark.parametrize("finish", [TaskEvent.SUCCEED, TaskEvent.FAIL])
def test_cancel_and_finish_race_the_first_wins(state, finish):
    if (state, finish) not in TRANSITIONS:
        pytest.skip(f"{finish} does not apply to {state}")
    cancelled = transition(state, TaskEvent.CANCEL)
    with pytest.raises(InvalidTransition):
        transition(cancelled, finish)
    finished = transition(state, finish)
    with pytest.raises(InvalidTransition):
        transition(finished, TaskEvent.CANCEL)


# --- decoders of client and journal data ----------------------------------------------------

_KEYS = sorted(
    ["task_id", "pattern", "inputs", "models", "stages", "params", "deadline_s", "priority",
     "policy", "aggregation", "shard_size", "quorum", "min_responses",
     "aggregation_timeout_s", "weights", "data", "dtype", "shape", "model_id", "version",
     "name", "model", "after"]
)  # fmt: skip
_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=6) | st.binary(max_size=8)
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
_PACKABLE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=6) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_BASE = _doc(pattern="parallel", models=[{"model_id": "a"}, {"model_id": "b", "version": "2"}])


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(st.sampled_from(_KEYS[:15]), _VALUES, max_size=6), over=st.booleans())
def test_arbitrary_dicts_give_a_spec_or_an_invalid_task_error(fields, over):
    try:
        spec = spec_from_dict({**_BASE, **fields} if over else fields)
    except InvalidTaskError:
        return
    assert spec_from_dict(spec_to_dict(spec)) == spec


_MODELS = st.lists(
    st.builds(ModelRef, st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
              st.sampled_from(["1", "2", "v3"])),
    min_size=1, max_size=4, unique=True,
)  # fmt: skip


@st.composite
def _specs(draw):
    pattern = draw(st.sampled_from(list(Pattern)))
    rows = draw(st.integers(1, 40))
    array = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    fields = {
        "params": draw(st.dictionaries(st.text(min_size=1, max_size=8), _PARAM_VALUES, max_size=3)),
        "priority": draw(st.integers(-(2**31), 2**31 - 1)),
        "deadline_s": draw(st.none() | st.floats(0.001, MAX_DEADLINE_S)),
    }
    models = draw(_MODELS)
    if pattern == Pattern.PIPELINE:
        names = [f"s{i}" for i in range(len(models))]
        stages = tuple(
            Stage(n, m, tuple(draw(st.lists(st.sampled_from(names[:i]), unique=True)))
                  if i else ())
            for i, (n, m) in enumerate(zip(names, models, strict=True))
        )  # fmt: skip
        return TaskSpec("p", pattern, Tensor.from_array(array), stages=stages, **fields)
    if pattern == Pattern.PARALLEL:
        return TaskSpec("p", pattern, Tensor.from_array(array), tuple(models), **fields)
    shard = draw(st.none() | st.integers(1, 50)) if pattern == Pattern.BATCH else None
    return TaskSpec("p", pattern, Tensor.from_array(array), tuple(models[:1]),
                    shard_size=shard, **fields)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=_specs())
def test_valid_specs_round_trip_through_the_dict_and_the_journal_blob(spec):
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert decode_spec(encode_spec(spec)) == spec


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    spec=_specs(),
    flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 4096),
)
def test_mutated_journal_blobs_decode_or_raise_invalid_task_errors(spec, flips, cut):
    blob = bytearray(encode_spec(spec))
    for pos, value in flips:
        blob[pos % len(blob)] = value
    try:
        back = decode_spec(bytes(blob[: max(1, cut % (len(blob) + 1))]))
    except ConfigError:  # InvalidTaskError
        return
    assert decode_spec(encode_spec(back)) == back


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.binary(max_size=64) | st.builds(msgpack.packb, _PACKABLE))
def test_arbitrary_journal_blobs_raise_only_invalid_task_errors(blob):
    try:
        decode_spec(blob)
    except InvalidTaskError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    spec=_specs(),
    flips=st.lists(st.tuples(st.integers(0, 1024), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_mutated_task_assigns_of_planned_items_decode_or_raise_remote_errors(spec, flips):
    for msg in _messages(spec):
        wire = bytearray(encode(msg))
        for pos, value in flips:
            wire[pos % len(wire)] = value
        try:
            back = decode(bytes(wire))
        except RemoteProtocolError:
            continue
        assert decode(encode(back)) == back


async def test_the_coordinators_own_submit_refuses_what_no_node_would_take(tmp_path) -> None:
    # the HTTP path's spec_from_dict checks this; Coordinator.submit (in-process callers,
    # the bench) planned it and sent items every node refused
    x, _ = load_digits_holdout()
    params = {f"p{i}": "x" * 1000 for i in range(20)}  # each within its cap, 20 KB in all
    async with Mesh(tmp_path, n=0) as mesh:
        with pytest.raises(InvalidTaskError, match="bytes encoded"):
            await mesh.coordinator.submit(service_spec("heavy", "single", x[:1], params=params))
        with pytest.raises(UnknownTaskError):  # never journaled
            await mesh.coordinator.get("heavy")
