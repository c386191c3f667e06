"""What the task commands are asked, as API values: the argparse types of ``meshinfer-coord``'s
task commands (each raising ArgumentTypeError with the line argparse prints) and the
POST /v1/tasks body built from the parsed ``submit`` arguments (:func:`task_document`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.client import MAX_REQUEST_TIMEOUT_S, tensor_json
from meshinfer.errors import ConfigError
from meshinfer.proto.tasks import DEFAULT_SHARD_ROWS, MAX_DEADLINE_S, NAME_PATTERN, Pattern
from meshinfer.proto.tasks_wire import MAX_PRIORITY, MIN_PRIORITY

__all__ = [
    "MAX_REQUEST_TIMEOUT_S",
    "chosen_task_id",
    "model_ref",
    "page_limit",
    "parse_since",
    "positive_int",
    "priority",
    "request_seconds",
    "seconds",
    "since",
    "task_document",
    "weight",
]


def model_ref(text: str) -> dict[str, str]:
    """``id@version`` (or ``id``, version "1") as the API's model object."""
    model_id, _, version = text.partition("@")
    if not model_id.strip() or text.endswith("@") or text != text.strip():
        raise argparse.ArgumentTypeError(f"model {text!r} must look like ID or ID@VERSION")
    return {"model_id": model_id, "version": version or "1"}


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """A creation-time bound as unix seconds: a number, an ISO date/time (naive: UTC) or an age
    such as ``90s``, ``10m``, ``2h``, ``7d`` (that long before ``now``)."""
    match = _DURATION.fullmatch(text.strip())
    try:
        value = now - float(match.group(1)) * _UNIT_S[match.group(2)] if match else float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):  # (an age of 1e400 days too)
            raise ConfigError(f"--since: {text!r} is not a finite number")
        return value
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: use unix seconds, an ISO time or an age like 10m, 2h, 7d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def since(text: str) -> float:
    try:
        return parse_since(text, time.time())
    except ConfigError as exc:  # argparse would print "invalid since value" for a ValueError
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # (int("²") fails)
        raise argparse.ArgumentTypeError(f"{_quoted(text)} is not a positive integer")
    return int(text)


def non_negative_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{_quoted(text)} is not an integer >= 0")
    return int(text)


_TASK_ID = re.compile(NAME_PATTERN)
_INTEGER = re.compile(r"-?[0-9]{1,20}")


def _quoted(text: str) -> str:
    """``text`` as a repr cut to 80 characters: an error line does not echo a huge value whole."""
    quoted = repr(text)
    return quoted if len(quoted) <= 80 else f"{quoted[:80]}..."


def chosen_task_id(text: str) -> str:
    """``--task-id``: an id the coordinator takes (1..64 of ``A-Za-z0-9_.:-``, starting with a
    letter or digit), checked before any input file is read or uploaded."""
    if not _TASK_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"task id {_quoted(text)} must be 1..64 characters of A-Z a-z 0-9 _ . : -"
            " starting with a letter or digit"
        )
    return text


def priority(text: str) -> int:
    """``--priority``: a 32-bit integer, as the coordinator takes (checked before any upload)."""
    value = int(text) if _INTEGER.fullmatch(text) else None
    if value is None or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise argparse.ArgumentTypeError(
            f"priority {_quoted(text)} is not an integer of {MIN_PRIORITY}..{MAX_PRIORITY}"
        )
    return value


def page_limit(text: str) -> int:
    value = positive_int(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"limit {value} is over 1000")
    return value


def _positive_finite(text: str) -> float | None:
    """``text`` as a positive, finite number, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < math.inf else None


def seconds(text: str) -> float:
    value = _positive_finite(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def budget_seconds(text: str) -> float:
    """``--deadline``, ``--aggregation-timeout``: positive seconds, at most
    :data:`~meshinfer.proto.tasks.MAX_DEADLINE_S` (30 days: the coordinator refuses longer)."""
    value = seconds(text)
    if value > MAX_DEADLINE_S:
        raise argparse.ArgumentTypeError(f"{text!r} is over {MAX_DEADLINE_S:.0f} seconds (30 days)")
    return value


def weight(text: str) -> tuple[str, float]:
    """``ID[@VER]=W``: a model of the task (named as by --model) and its positive weight."""
    name, equals, number = text.rpartition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"weight {text!r} must look like ID[@VER]=WEIGHT")
    model_ref(name)  # the same names as --model
    value = _positive_finite(number)
    if value is None:
        raise argparse.ArgumentTypeError(f"weight {number!r} is not a positive, finite number")
    return name, value


def request_seconds(text: str) -> float:
    """``--timeout``: positive seconds, at most a day (sockets refuse far longer timeouts)."""
    value = seconds(text)
    if value > MAX_REQUEST_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{text!r} is over {MAX_REQUEST_TIMEOUT_S:g} seconds")
    return value


def task_document(args: argparse.Namespace, inputs: np.ndarray) -> dict[str, Any]:
    """The POST /v1/tasks body for the parsed ``submit`` arguments and the input rows."""
    if bool(args.stages) == bool(args.model):
        raise ConfigError("give --model (one or more) or --stages FILE.json, not both or neither")
    doc: dict[str, Any] = {"pattern": _default_pattern(args, inputs), "inputs": tensor_json(inputs)}
    if args.stages:
        doc["stages"] = _read_stages(args.stages)
    else:
        doc["models"] = list(args.model)
    options = {
        "task_id": args.task_id,
        "policy": args.policy,
        "aggregation": args.aggregation,
        "priority": args.priority,
        "deadline_s": args.deadline,
        "shard_size": args.shard_size,
        "quorum": args.quorum,
        "min_responses": args.min_responses,
        "aggregation_timeout_s": args.aggregation_timeout,
    }
    doc.update({k: v for k, v in options.items() if v is not None})
    if args.weight:
        doc["weights"] = _weights(args.weight)
    return doc


def _weights(pairs: list[tuple[str, float]]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for name, value in pairs:
        if name in weights:
            raise ConfigError(f"--weight: model {name!r} is weighted twice")
        weights[name] = value
    return weights


def _default_pattern(args: argparse.Namespace, inputs: np.ndarray) -> str:
    if args.pattern:
        return args.pattern
    if args.stages:
        return Pattern.PIPELINE.value
    if len(args.model) > 1:
        return Pattern.PARALLEL.value
    if args.shard_size is not None or inputs.shape[0] > DEFAULT_SHARD_ROWS:
        return Pattern.BATCH.value
    return Pattern.SINGLE.value


def _read_stages(path: Path) -> list[dict[str, Any]]:
    """Stages from a JSON list (or ``{"stages": [...]}``); string models become objects."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read stages file {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    stages = doc.get("stages") if isinstance(doc, dict) else doc
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError(f"{path}: expected a non-empty list of stage objects")
    return [_stage_with_model_object(path, i, s) for i, s in enumerate(stages)]


def _stage_with_model_object(path: Path, index: int, stage: dict[str, Any]) -> dict[str, Any]:
    model = stage.get("model")
    if not isinstance(model, str):
        return stage
    try:
        return {**stage, "model": model_ref(model)}
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{path}: stages[{index}].model: {exc}") from None
