"""A :class:`~meshinfer.proto.tasks.TaskSpec` as plain data: a dict for APIs, msgpack for storage.

:func:`spec_to_dict` gives a dict of str/int/float/bool/None/bytes/lists/dicts (JSON-ready except
the tensor ``data`` bytes, which an HTTP layer base64-encodes); :func:`spec_from_dict` reads one
back, checking every key's type, refusing unknown keys (typos) and validating the spec. Every
problem raises :class:`~meshinfer.proto.tasks.InvalidTaskError` naming the key.
:func:`encode_spec`/:func:`decode_spec` are the msgpack blob the coordinator journals.

Dict layout::

    {"task_id": str, "pattern": "single"|"parallel"|"batch"|"pipeline",
     "inputs": {"data": bytes, "dtype": str, "shape": [int, ...]},
     "models": [{"model_id": str, "version": str}, ...],          # optional
     "stages": [{"name": str, "model": {...}, "after": [str, ...], "params": {...}}, ...],
     "params": {str: scalar}, "deadline_s": float|None, "priority": int,
     "policy": str|None, "aggregation": str|None, "shard_size": int|None,
     "quorum": int|None, "min_responses": int|None,             # parallel tasks only;
     "aggregation_timeout_s": float|None,                      # written only when set
     "weights": {"model_id@version": float, ...}}

``weights`` keys name models as submissions do (``"id@version"``, or ``"id"`` for version
``"1"``); :func:`spec_to_dict` writes ``"id@version"``. The aggregation options are left out of
the dict when unset, so a spec without them encodes as it did before they existed, and a blob
journaled then decodes with their defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import msgpack

from meshinfer.proto.models import ModelRef, model_name_problem, models_named
from meshinfer.proto.tasks import (
    MAX_DEADLINE_S,
    InvalidTaskError,
    Pattern,
    Stage,
    TaskSpec,
    check_sendable,
)
from meshinfer.proto.tasks_wire import Tensor, canonical_bools

__all__ = ["check_model_names", "decode_spec", "encode_spec", "spec_from_dict", "spec_to_dict"]

_REQUIRED = object()
_NUMBER = (int, float)
_TOP_KEYS = frozenset(
    {"task_id", "pattern", "inputs", "models", "stages", "params", "deadline_s", "priority"}
    | {"policy", "aggregation", "shard_size"}
    | {"quorum", "min_responses", "aggregation_timeout_s", "weights"}
)


def _model_dict(ref: ModelRef) -> dict[str, str]:
    return {"model_id": ref.model_id, "version": ref.version}


def _stage_dict(stage: Stage) -> dict[str, Any]:
    return {
        "name": stage.name,
        "model": _model_dict(stage.model),
        "after": list(stage.after),
        "params": dict(stage.params),
    }


def spec_to_dict(spec: TaskSpec) -> dict[str, Any]:
    """``spec`` as plain data (module docstring for the layout)."""
    tensor = spec.inputs
    return {
        "task_id": spec.task_id,
        "pattern": str(spec.pattern),
        "inputs": {"data": tensor.data, "dtype": tensor.dtype, "shape": list(tensor.shape)},
        "models": [_model_dict(m) for m in spec.models],
        "stages": [_stage_dict(s) for s in spec.stages],
        "params": dict(spec.params),
        "deadline_s": spec.deadline_s,
        "priority": spec.priority,
        "policy": spec.policy,
        "aggregation": spec.aggregation,
        "shard_size": spec.shard_size,
        **_aggregation_options(spec),
    }


def _aggregation_options(spec: TaskSpec) -> dict[str, Any]:
    """The aggregation options that are set (weights sorted by model, floats)."""
    options = {
        "quorum": spec.quorum,
        "min_responses": spec.min_responses,
        "aggregation_timeout_s": spec.aggregation_timeout_s,
    }
    doc: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if spec.weights:
        pairs = sorted(spec.weights.items(), key=lambda p: (p[0].model_id, p[0].version))
        doc["weights"] = {str(ref): float(weight) for ref, weight in pairs}
    return doc


class _Reader:
    """Typed access to one dict of the layout; errors name the key path."""

    def __init__(self, raw: Any, path: str, keys: frozenset[str]) -> None:
        if not isinstance(raw, Mapping):
            raise InvalidTaskError(f"{path or 'task'}: expected a map, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in keys)
        if unknown:
            raise InvalidTaskError(f"{path or 'task'}: unknown key {unknown[0]!r:.80}")
        self.raw, self.path = raw, path

    def take(self, key: str, kinds: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        """The value at ``key``, which must be one of ``kinds`` (bool is never an int here)."""
        if key not in self.raw:
            if default is _REQUIRED:
                raise InvalidTaskError(f"{self.path}{key}: missing")
            return default
        value = self.raw[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if (type(value) is bool and bool not in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            raise InvalidTaskError(f"{self.path}{key}: expected {wanted}, got {_kind(value)}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        items = self.take(key, (list, tuple), ())
        if not all(type(item) is str for item in items):
            raise InvalidTaskError(f"{self.path}{key}: expected a list of strings")
        return tuple(items)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _model(raw: Any, path: str) -> ModelRef:
    reader = _Reader(raw, path, frozenset({"model_id", "version"}))
    return ModelRef(reader.take("model_id", str), reader.take("version", str, "1"))


def _tensor(raw: Any) -> Tensor:
    reader = _Reader(raw, "inputs.", frozenset({"data", "dtype", "shape"}))
    shape = reader.take("shape", (list, tuple))
    if not all(type(d) is int for d in shape):
        raise InvalidTaskError("inputs.shape: expected a list of integers")
    return Tensor(
        bytes(reader.take("data", (bytes, bytearray))), reader.take("dtype", str), tuple(shape)
    )


def _stage(raw: Any, index: int) -> Stage:
    path = f"stages[{index}]."
    reader = _Reader(raw, path, frozenset({"name", "model", "after", "params"}))
    model = _model(reader.take("model", Mapping), f"{path}model.")
    params = dict(reader.take("params", Mapping, {}))
    return Stage(reader.take("name", str), model, reader.strings("after"), params)


def spec_from_dict(raw: Any) -> TaskSpec:
    """Read a spec from plain data and validate it; InvalidTaskError naming the bad key. A
    model's id or version may not hold ``@`` (:func:`~meshinfer.proto.models.model_name_problem`:
    written ``"id@version"`` it would name another model), and its items must be sendable
    (:func:`~meshinfer.proto.tasks.check_sendable`: params within a node's caps, a batch of at
    most ``MAX_BATCH_ITEMS`` items)."""
    return _spec_from_dict(raw, names_checked=True)


def _spec_from_dict(raw: Any, *, names_checked: bool) -> TaskSpec:
    """:func:`spec_from_dict`; without ``names_checked`` (a journaled spec: it may predate the
    rules, and its task must still recover) a model name holding ``@`` is let through, and
    :func:`~meshinfer.proto.tasks.check_sendable` is not applied."""
    reader = _Reader(raw, "", _TOP_KEYS)
    models = reader.take("models", (list, tuple), ())
    stages = reader.take("stages", (list, tuple), ())
    spec = TaskSpec(
        task_id=reader.take("task_id", str),
        pattern=_pattern(reader.take("pattern", str)),
        inputs=_tensor(reader.take("inputs", Mapping)),
        models=tuple(_model(m, f"models[{i}].") for i, m in enumerate(models)),
        stages=tuple(_stage(s, i) for i, s in enumerate(stages)),
        params=dict(reader.take("params", Mapping, {})),
        deadline_s=_seconds(reader, "deadline_s"),
        priority=reader.take("priority", int, 0),
        policy=reader.take("policy", (str, type(None)), None),
        aggregation=reader.take("aggregation", (str, type(None)), None),
        shard_size=reader.take("shard_size", (int, type(None)), None),
        quorum=reader.take("quorum", (int, type(None)), None),
        min_responses=reader.take("min_responses", (int, type(None)), None),
        aggregation_timeout_s=_seconds(reader, "aggregation_timeout_s"),
    )
    if names_checked:
        check_model_names(spec)
    weights = _weights(reader.take("weights", Mapping, {}), spec.models)
    spec = replace(spec, weights=weights) if weights else spec
    spec.validate()
    if names_checked:
        check_sendable(spec)
    return spec


def check_model_names(spec: TaskSpec) -> None:
    """InvalidTaskError naming the first model, by its key, whose name holds ``@`` (a new
    task's: :func:`spec_from_dict` and ``Coordinator.submit`` check it; a journaled spec, which
    may predate the rule, is not)."""
    named = [(f"models[{i}]", ref) for i, ref in enumerate(spec.models)]
    named += [(f"stages[{i}].model", stage.model) for i, stage in enumerate(spec.stages)]
    for path, ref in named:
        if (problem := model_name_problem(ref.model_id, ref.version)) is not None:
            raise InvalidTaskError(f"{path}: {problem}")


def _weights(raw: Mapping[Any, Any], models: tuple[ModelRef, ...]) -> dict[ModelRef, float]:
    """``{"id@version" | "id": weight}`` keyed by the models named; a name that is none of
    them becomes the model it spells, for :meth:`TaskSpec.validate` to refuse."""
    weights: dict[ModelRef, float] = {}
    for name, value in raw.items():
        if type(name) is not str:
            raise InvalidTaskError(f"weights: key {name!r:.80} is not a model name")
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            raise InvalidTaskError(f"weights[{name!r:.80}]: expected a number, got {_kind(value)}")
        named = models_named(name, models)
        if len(named) > 1:
            raise InvalidTaskError(f"weights[{name!r:.80}]: names {len(named)} of the models")
        model_id, at, version = name.partition("@")
        ref = named[0] if named else ModelRef(model_id, version if at else "1")
        if ref in weights:
            raise InvalidTaskError(f"weights[{name!r:.80}]: names {ref} a second time")
        weights[ref] = _float(value, f"weights[{name!r:.80}]")
    return weights


def _pattern(value: str) -> Pattern:
    try:
        return Pattern(value)
    except ValueError:
        names = [p.value for p in Pattern]
        raise InvalidTaskError(f"pattern: {value!r:.80} is not one of {names}") from None


def _seconds(reader: _Reader, key: str) -> float | None:
    value = reader.take(key, (*_NUMBER, type(None)), None)
    return None if value is None else _float(value, key)


def _float(value: int | float, key: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an int past the float range
        raise InvalidTaskError(f"{key}: too large a number") from None


def encode_spec(spec: TaskSpec) -> bytes:
    """The msgpack blob of a spec (as journaled)."""
    return msgpack.packb(spec_to_dict(spec), use_bin_type=True)


def decode_spec(blob: bytes) -> TaskSpec:
    """A spec from its blob; InvalidTaskError for a malformed or invalid one. A time budget
    journaled before :data:`~meshinfer.proto.tasks.MAX_DEADLINE_S` bounded it reads back as
    that bound (the task still recovers, with the budget it runs under now), a model name
    holding ``@`` journaled before :func:`spec_from_dict` refused it reads back as it was, and
    a bool input journaled before bytes other than 0 and 1 were refused reads back with them
    as 1 (:func:`~meshinfer.proto.tasks_wire.canonical_bools`)."""
    try:
        raw = msgpack.unpackb(blob, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        detail = str(exc) or type(exc).__name__
        raise InvalidTaskError(f"task blob: malformed msgpack: {detail}") from None
    if isinstance(raw, dict):
        _bound_budgets(raw)
        _canonical_bool_input(raw)
    return _spec_from_dict(raw, names_checked=False)


def _canonical_bool_input(raw: dict[Any, Any]) -> None:
    """Read a journaled bool input's bytes other than 0 and 1 as 1, as NumPy did."""
    inputs = raw.get("inputs")
    if type(inputs) is dict and inputs.get("dtype") == "bool" and type(inputs.get("data")) is bytes:
        inputs["data"] = canonical_bools(inputs["data"])


def _bound_budgets(raw: dict[Any, Any]) -> None:
    """Lower a journaled ``deadline_s`` or ``aggregation_timeout_s`` past the bound to it."""
    for key in ("deadline_s", "aggregation_timeout_s"):
        value = raw.get(key)
        if type(value) in _NUMBER and value > MAX_DEADLINE_S:
            raw[key] = MAX_DEADLINE_S
