"""Reading an API request: its headers, query parameters and body (the JSON of a task).

Query parameters are read strictly (:func:`strict_query`): an unknown, repeated or malformed one
is a 400 ``bad_parameter`` naming it. A body is JSON only as RFC 8259 has it (:func:`parse_json`:
UTF-8, no NaN or Infinity, nor a number past the float range, no key twice, no lone surrogate)
and a task only once :func:`body_to_spec` and the spec's own checks accept every key; tensors
come as ``{"dtype", "shape", "data_b64"}`` or ``{"values", "dtype"?}`` (:func:`tensor_from_json`).
Each check raises :class:`~coordinator.api_errors.ApiError` with a message naming what is wrong.

Pure functions but :func:`read_body`, a coroutine that runs on the coordinator's event loop.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import web

from coordinator.api_errors import ApiError, unsupported_coding
from coordinator.journal import MAX_PAGE
from meshinfer.errors import ConfigError
from meshinfer.proto.tasks import TaskSpec, TaskState
from meshinfer.proto.tasks_codec import spec_from_dict
from meshinfer.proto.tasks_wire import DTYPES, MAX_NDIM
from meshinfer.runtime.http_log import refused_coding

__all__ = [
    "DEFAULT_PAGE",
    "bad_parameter",
    "body_to_spec",
    "bool_param",
    "check_expect",
    "defer_expect",
    "expects_continue",
    "int_param",
    "list_filters",
    "number_param",
    "parse_json",
    "read_body",
    "require_coding",
    "require_type",
    "require_utf8",
    "strict_query",
    "tensor_from_json",
    "too_large",
    "upload_size",
]

#: A listing page holds this many tasks when no ``limit`` is given (at most MAX_PAGE, 1000).
DEFAULT_PAGE = 100
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_STATES = tuple(s.value for s in TaskState)


# --- headers and the body's bytes ------------------------------------------------------------


def too_large(cap: int) -> ApiError:
    """413 for a body over ``cap`` bytes: as sent (its Content-Length) or as read (decoded)."""
    return ApiError(413, "too_large", f"request body over the limit of {cap} bytes")


def require_coding(request: web.Request) -> None:
    """415 for a body in a Content-Encoding aiohttp would not decode: it would be read as it
    came, compressed or not (an unknown coding, a list such as ``gzip, identity``, or the
    header twice: aiohttp reads the first one only)."""
    if (coding := refused_coding(request.headers)) is not None:
        raise unsupported_coding(coding)


def require_type(request: web.Request, media_type: str, what: str = "") -> None:
    """415 unless the body is ``media_type`` (``what``: how the message names that body)."""
    if request.content_type == media_type:  # (none sent reads as application/octet-stream)
        return
    sent = request.headers.get("Content-Type")
    problem = "the request has none" if sent is None else f"not {request.content_type!r}"
    raise ApiError(
        415, "unsupported_media_type", f"Content-Type must be {media_type}{what}, {problem}"
    )


def require_utf8(request: web.Request) -> None:
    """415 for a JSON body declared in another charset than UTF-8: JSON exchanged between
    systems is UTF-8 (RFC 8259 8.1), and the body is read as such, never as declared."""
    charset = request.charset  # (the Content-Type's charset parameter; None: not given)
    if charset is None or _codec_name(charset) == "utf-8":
        return
    raise ApiError(
        415, "unsupported_media_type",
        f"the JSON body must be UTF-8 (RFC 8259), not charset={charset[:40]!r}: send it"
        " encoded as UTF-8 with Content-Type application/json (or charset=utf-8)",
    )  # fmt: skip


def _codec_name(charset: str) -> str | None:
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None


async def read_body(request: web.Request, max_body_bytes: int, cap: int | None = None) -> bytes:
    """The request's body, 413 past ``cap`` (at most, and by default, ``max_body_bytes``, the
    application's ``client_max_size``): a chunked body is read no further than that."""
    cap = max_body_bytes if cap is None else min(cap, max_body_bytes)
    require_coding(request)
    length = request.content_length
    if length is not None and length > cap:
        raise too_large(cap)
    await _continue(request)
    try:
        if cap == max_body_bytes:
            return await request.read()  # HTTPRequestEntityTooLarge past client_max_size
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > cap:
                raise too_large(cap)
        return bytes(body)
    except web.RequestPayloadError:  # e.g. bytes that do not decode as their encoding
        encoding = request.headers.get("Content-Encoding", "identity")[:40]
        message = f"the body cannot be read as sent (Content-Encoding {encoding!r})"
        raise ApiError(400, "bad_request", message) from None
    except ConnectionResetError:  # the client went away mid-body: its fault, not a bug
        message = "the connection closed before the whole body arrived"
        raise ApiError(400, "bad_request", message) from None


def upload_size(request: web.Request, max_body_bytes: int) -> int:
    """The most bytes reading the body may take: its Content-Length, or ``max_body_bytes`` (all
    :func:`read_body` allows) for a body that is chunked or compressed (it may inflate)."""
    size = request.content_length
    encoded = request.headers.get("Content-Encoding", "identity").strip().lower() != "identity"
    if size is None or size > max_body_bytes or encoded:
        return max_body_bytes
    return size


# --- Expect: 100-continue --------------------------------------------------------------------
#
# aiohttp answers an ``Expect`` header before any middleware runs: ``100 Continue`` (the client
# then sends its body) even to a request its checks will refuse (no token, too large), and a
# plain-text 417 to any other expectation. The routes' expect handler (:func:`defer_expect`, on
# every route, the API's catch-all of paths no other route serves too) answers nothing;
# :func:`check_expect` refuses an unknown expectation with the JSON error, and :func:`read_body`
# sends the ``100 Continue`` once every check has passed (RFC 9110 10.1.1).


async def defer_expect(request: web.Request) -> None:
    """The routes' expect handler: nothing is answered before the middlewares have run."""
    return None


def check_expect(request: web.Request) -> None:
    """417 ``expectation_failed`` for an ``Expect`` other than ``100-continue`` (HTTP/1.1)."""
    expects_continue(request)


def expects_continue(request: web.Request) -> bool:
    """True when the client waits for ``100 Continue`` before sending its body (HTTP/1.1 and
    ``Expect: 100-continue``, any case); 417 ``expectation_failed`` for any other ``Expect``
    (an HTTP/1.0 request's is ignored, as RFC 9110 10.1.1 has it)."""
    expect = request.headers.get("Expect")
    if expect is None or request.version < (1, 1):
        return False
    if expect.lower() == "100-continue":
        return True
    message = f"Expect {expect[:40]!r} cannot be met: only 100-continue is understood"
    raise ApiError(417, "expectation_failed", message)


async def _continue(request: web.Request) -> None:
    """Send ``100 Continue`` if the client waits for it before sending the body."""
    if expects_continue(request):  # (an unknown expectation was refused before: check_expect)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # (as aiohttp's own handler: not the answer's bytes)


# --- query parameters ------------------------------------------------------------------------


def strict_query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    """The query as a dict; 400 for a parameter that is unknown or given twice."""
    out: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise bad_parameter(name, f"unknown query parameter (known: {known})")
        if name in out:
            raise bad_parameter(name, "given more than once")
        out[name] = value
    return out


def bad_parameter(name: str, problem: str) -> ApiError:
    return ApiError(400, "bad_parameter", f"{name[:64]}: {problem}")


def number_param(
    query: dict[str, str], name: str, default: float | None, lo: float, hi: float
) -> float | None:
    raw = query.get(name)
    if raw is None:
        return default
    value = float(raw) if _NUMBER.fullmatch(raw) else math.nan
    if not (math.isfinite(value) and lo <= value <= hi):
        raise bad_parameter(name, f"{raw[:40]!r} is not a number in {lo:g}..{hi:g}")
    return value


def int_param(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not lo <= int(raw) <= hi:
        raise bad_parameter(name, f"{raw[:40]!r} is not an integer in {lo}..{hi}")
    return int(raw)


def bool_param(query: dict[str, str], name: str, *, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise bad_parameter(name, f"{raw[:40]!r} is not true or false")
    return raw == "true"


def list_filters(query: dict[str, str]) -> dict[str, Any]:
    state = query.get("state")
    if state is not None and state not in _STATES:
        raise bad_parameter("state", f"{state[:40]!r} is not one of {list(_STATES)}")
    model = query.get("model")
    if model is not None and (not model or "@" in model):
        raise bad_parameter("model", "give a model id, without @version")
    cursor = query.get("cursor")
    if cursor is not None and not cursor:
        raise bad_parameter("cursor", "must not be empty")
    return {
        "state": state,
        "model": model,
        "since": number_param(query, "since", None, -math.inf, math.inf),
        "limit": int_param(query, "limit", DEFAULT_PAGE, 1, MAX_PAGE),
        "cursor": cursor,
    }


# --- request bodies --------------------------------------------------------------------------


def parse_json(body: bytes) -> Any:
    """The JSON value of a body: UTF-8, no NaN/Infinity (nor a number past the float range), no
    key twice; 400 bad_json if not."""
    if not body.strip():
        raise ApiError(400, "bad_json", "the request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
        doc = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float,
            object_pairs_hook=_no_duplicates,
        )  # fmt: skip
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not UTF-8 text: {exc.reason}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "the JSON body is nested too deeply to read") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # (Python's int digit limit, not JSON's)
            problem = f"a number with more than {sys.get_int_max_str_digits()} digits"
            raise ApiError(400, "bad_json", f"the JSON body holds {problem}") from None
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text) is not None:  # rare: check the strings only then
        _no_lone_surrogates(doc)
    return doc


#: A ``\uD800``..``\uDFFF`` escape: half of a pair, or a lone surrogate (which is not text).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_lone_surrogates(doc: Any) -> None:
    """Walks ``doc`` with a stack of its own, not by recursion: a document nested as deep as
    ``json.loads`` allows would exceed the recursion limit in any recursive walk."""
    pending = [doc]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str) and not _is_text(value):
            message = "a string holds a lone surrogate escape (\\ud800..\\udfff), which is not text"
            raise ApiError(400, "bad_json", message)


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> Any:
    raise ApiError(400, "bad_json", f"the body holds {name}, which is not JSON; send numbers")


def _finite_float(literal: str) -> float:
    """A JSON number with a fraction or exponent as a float; one past the float range (1e400)
    would read as infinity, which JSON has not (RFC 8259 6)."""
    value = float(literal)
    if not math.isfinite(value):
        raise ApiError(
            400, "bad_json", f"the number {literal[:40]} is out of the range of a float64"
        )
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ApiError(400, "bad_json", f"key {twice[:64]!r} appears twice in one object")
    return doc


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_task", message)


def body_to_spec(body: Any, new_id: Callable[[], str]) -> TaskSpec:
    """A validated spec from a submitted JSON document (ApiError 400 naming the bad key).

    Translates the JSON conveniences (``model``, string model refs, ``values`` and
    ``data_b64`` tensors, a missing ``task_id``) into the layout of
    :func:`~meshinfer.proto.tasks_codec.spec_from_dict`, which checks every key.
    """
    if not isinstance(body, dict):
        raise _invalid(f"the body must be a JSON object (a task), not {_kind(body)}")
    raw = dict(body)
    if "model" in raw:
        if "models" in raw:
            raise _invalid("model: give either model or models, not both")
        raw["models"] = [raw.pop("model")]
    if "models" in raw and isinstance(raw["models"], list):
        raw["models"] = [_model_ref(m, f"models[{i}]") for i, m in enumerate(raw["models"])]
    if "stages" in raw and isinstance(raw["stages"], list):
        raw["stages"] = [_stage(s, i) for i, s in enumerate(raw["stages"])]
    if "inputs" in raw:
        raw["inputs"] = tensor_from_json(raw["inputs"])
    raw.setdefault("task_id", new_id())
    try:
        return spec_from_dict(raw)
    except ConfigError as exc:  # InvalidTaskError
        raise _invalid(str(exc)) from None


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _model_ref(raw: Any, path: str) -> Any:
    """``"id@version"`` / ``"id"`` as a model map; a map passes on (spec_from_dict checks it)."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        wanted = '"id@version" or {"model_id", "version"}'
        raise _invalid(f"{path}: expected {wanted}, not {_kind(raw)}")
    model_id, at, version = raw.partition("@")
    return {"model_id": model_id, "version": version if at else "1"}


def _stage(raw: Any, index: int) -> Any:
    if isinstance(raw, dict) and "model" in raw:
        return {**raw, "model": _model_ref(raw["model"], f"stages[{index}].model")}
    return raw


_B64_KEYS = frozenset({"dtype", "shape", "data_b64"})
_VALUES_KEYS = frozenset({"dtype", "values"})


def tensor_from_json(raw: Any) -> dict[str, Any]:
    """``{"dtype", "shape", "data_b64"}`` or ``{"values", "dtype"?}`` as spec_from_dict's
    ``{"data", "dtype", "shape"}`` (ApiError 400 naming the key)."""
    if not isinstance(raw, dict):
        raise _invalid(f"inputs: expected a tensor object, not {_kind(raw)}")
    keys = _VALUES_KEYS if "values" in raw else _B64_KEYS
    unknown = sorted(set(raw) - keys)
    if unknown:
        form = "values" if "values" in raw else "data_b64"
        raise _invalid(f"inputs: unknown key {unknown[0][:64]!r} in a {form} tensor")
    if "values" in raw:
        return _values_tensor(raw["values"], raw.get("dtype", "float32"))
    text = raw.get("data_b64")
    if not isinstance(text, str):
        raise _invalid(f"inputs.data_b64: expected a base64 string, not {_kind(text)}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("inputs.data_b64: not valid base64") from None
    _check_finite_b64(data, raw.get("dtype"))
    return {**{k: v for k, v in raw.items() if k != "data_b64"}, "data": data}


def _check_finite_b64(data: bytes, dtype: Any) -> None:
    """Floats sent as base64 must be finite, as ``values`` must be: NaN or infinity would fail
    on the node after the task was journaled, or poison an average. (A dtype or length that
    does not fit is refused by the spec's own check.)"""
    if dtype not in ("float16", "float32") or len(data) % np.dtype(dtype).itemsize:
        return
    if not np.isfinite(np.frombuffer(data, np.dtype(dtype).newbyteorder("<"))).all():
        raise _invalid(f"inputs.data_b64: holds NaN or infinity ({dtype})")


def _values_tensor(values: Any, dtype: Any) -> dict[str, Any]:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _invalid(f"inputs.dtype: {str(dtype)[:40]!r} is not one of {sorted(DTYPES)}")
    leaf = bool if dtype == "bool" else (int, float)
    if not isinstance(values, list) or not _nested(values, leaf, 0):
        kind = "booleans" if dtype == "bool" else "numbers"
        raise _invalid(f"inputs.values: expected an array of {kind} or nested arrays (<= 8 deep)")
    try:
        with np.errstate(over="raise", invalid="raise"), warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # NumPy 1.x: int out of range
            array = np.array(values, dtype=dtype)
    except (ValueError, OverflowError, TypeError, FloatingPointError, DeprecationWarning) as exc:
        raise _invalid(f"inputs.values: cannot be a {dtype} tensor ({exc})") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _invalid(f"inputs.values: out of range for {dtype}")
    if array.dtype.kind in "iu" and not np.array_equal(array, np.array(values, dtype=object)):
        raise _invalid(f"inputs.values: not whole numbers within the range of {dtype}")
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"data": wire.tobytes(), "dtype": dtype, "shape": list(array.shape)}


def _nested(value: Any, leaf: type | tuple[type, ...], depth: int) -> bool:
    """A rectangular-or-not nest of lists, at most MAX_NDIM deep, of ``leaf`` values."""
    if isinstance(value, list):
        return depth < MAX_NDIM and all(_nested(v, leaf, depth + 1) for v in value)
    if leaf is bool:
        return type(value) is bool
    return type(value) in leaf
