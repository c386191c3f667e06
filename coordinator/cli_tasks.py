"""``meshinfer-coord`` task commands: talk to a running coordinator over its HTTP API.

::

    submit  --model ID[@VER] ... --input FILE ... [--pattern P] [--stages FILE.json]
            [--policy P] [--aggregation A] [--priority N] [--deadline S] [--shard-size N]
            [--quorum N] [--min-responses N] [--aggregation-timeout S] [--weight ID[@VER]=W ...]
            [--task-id ID] [--wait [--wait-timeout S] [--progress]] [--json]
    status  TASK_ID [--json [--outputs]]
    tasks   [--state S] [--model ID] [--since WHEN] [--limit N] [--cursor C | --all] [--json]
    cancel  TASK_ID [--json]
    nodes   [--json]
    stats   [--json]
    revocations [--push FLEET_DIR | FILE] [--json]

Every command takes ``--url``/``--token-file`` or ``--data-dir`` (the coordinator's data
directory, whose ``runtime.json`` names both), else ``MESHINFER_COORD_URL`` and
``MESHINFER_COORD_TOKEN`` (see :func:`coordinator.client.resolve_endpoint`).

Input files (``--input``, repeatable: the rows of all files are concatenated): ``.npy``,
``.npz`` (its first array, or ``--key``), ``.json`` (a list of rows, one row, or a tensor
document of the API), ``.csv`` (rows of numbers, an optional header line) and images
``.pgm`` / ``.png`` / ``.jpg`` (PNG and JPEG need Pillow), each becoming one 64-feature row the
way the digit classifiers were trained: light background inverted to dark, shrunk to 8x8 by
area averaging, contrast-stretched to the 0..16 pixel counts of the digits data set, divided by
16 (the models' ``input_scaling``). Rows are cast to ``--dtype`` (float32).

Exit codes: 0 done (a waited task succeeded), 1 a waited task failed or was cancelled, 2 an
error (bad argument or input file, coordinator unreachable or refusing; a coordinator lost
during ``submit --wait`` too, in one line naming the accepted task; a submission whose
connection dropped or timed out before the answer, in one line saying the task may or may not
have been accepted and how to look), 3 ``--wait`` ran out of time while the task still runs,
130 interrupted (Ctrl-C; during the submission, after one line on stderr saying the task may or
may not have been accepted; during ``submit --wait``, after one naming the accepted task).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import re
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from coordinator.client import (
    TERMINAL_STATES,
    ApiError,
    CoordinatorClient,
    array_from_json,
    resolve_endpoint,
    tensor_json,
)
from meshinfer.errors import ConfigError, MeshInferError, RemoteProtocolError
from meshinfer.identity_files import read_file
from meshinfer.proto.aggregation import Mode
from meshinfer.proto.scheduling import Policy
from meshinfer.proto.tasks import DEFAULT_SHARD_ROWS, Pattern, TaskState
from meshinfer.proto.tasks_wire import DTYPES

__all__ = [
    "EXIT_STILL_RUNNING",
    "EXIT_TASK_FAILED",
    "add_task_commands",
    "format_table",
    "image_row",
    "load_inputs",
    "parse_input",
    "parse_since",
    "progress_line",
    "render_nodes",
    "render_result",
    "render_stats",
    "render_task",
    "render_tasks",
    "task_document",
    "utc_iso",
]

EXIT_TASK_FAILED = 1
EXIT_STILL_RUNNING = 3
DIGIT_SIDE = 8
DIGIT_LEVELS = 16
MAX_IMAGE_SIDE = 16384
POLL_INTERVAL_S = 0.25
#: The longest ``--timeout`` (per request; ``/wait`` adds what it asks the server to wait).
MAX_REQUEST_TIMEOUT_S = 86400.0
PROGRESS_WIDTH = 30

# --- input files -----------------------------------------------------------------------------


def load_inputs(
    paths: Sequence[Path], key: str | None = None, dtype: str = "float32"
) -> np.ndarray:
    """The rows of every file in ``paths``, concatenated, as a ``dtype`` array of >= 2 dims.

    ConfigError naming the file for anything unreadable, malformed or mismatched.
    """
    paths = [Path(p) for p in paths]
    if key is not None and not any(p.suffix.lower() == ".npz" for p in paths):
        raise ConfigError("--key picks an array of a .npz input, and no input is one")
    arrays = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read input {path}: {exc.strerror or exc}") from None
        file_key = key if path.suffix.lower() == ".npz" else None
        arrays.append(_as_rows(path, parse_input(path.name, data, file_key)))
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(f"input files disagree on the row shape: {sorted(shapes)}")
    return _cast(np.concatenate(arrays), dtype)


def parse_input(name: str, data: bytes, key: str | None = None) -> np.ndarray:
    """The array in one input file (format from ``name``'s suffix); ConfigError if malformed."""
    suffix = Path(name).suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        known = ", ".join(sorted(_READERS))
        raise ConfigError(f"{name}: unknown input format {suffix or '(no suffix)'!r}; use {known}")
    if key is not None and suffix != ".npz":
        raise ConfigError(f"{name}: --key picks an array of a .npz file only")
    return reader(name, data, key)


def _as_rows(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise ConfigError(f"{path}: holds {array.dtype} values, not numbers")
    if array.ndim == 0:
        raise ConfigError(f"{path}: holds a single number, not rows")
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    if rows.shape[0] == 0 or rows.size == 0:
        raise ConfigError(f"{path}: holds no values")
    return rows


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ConfigError("input holds NaN or infinite values")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(array, dtype=dtype)
    if cast.dtype.kind == "f" and not np.isfinite(cast).all():
        raise ConfigError(f"input values are out of range for {dtype}")
    if cast.dtype.kind in "iu" and not np.array_equal(cast, array):
        raise ConfigError(f"input values do not fit {dtype} (out of range or not whole numbers)")
    return cast


#: What np.load raises for a malformed file (MemoryError: a header claiming a huge shape).
_NUMPY_ERRORS = (
    ValueError, OSError, EOFError, TypeError, KeyError, MemoryError, zipfile.BadZipFile
)  # fmt: skip


def _npy(name: str, data: bytes, key: str | None) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except _NUMPY_ERRORS as exc:
        raise ConfigError(f"{name}: not a readable .npy file ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise ConfigError(f"{name}: holds several arrays; name it .npz and pick one with --key")
    return array


def _npz(name: str, data: bytes, key: str | None) -> np.ndarray:
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except _NUMPY_ERRORS as exc:
        raise ConfigError(f"{name}: not a readable .npz file ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConfigError(f"{name}: not a .npz archive (a single .npy array?)")
    with archive:
        names = list(archive.files)
        if not names:
            raise ConfigError(f"{name}: the archive holds no arrays")
        if key is not None and key not in names:
            raise ConfigError(f"{name}: no array {key!r}; it holds {', '.join(names)}")
        try:
            return archive[key if key is not None else names[0]]
        except _NUMPY_ERRORS as exc:
            raise ConfigError(f"{name}: not a readable .npz file ({exc})") from None


def _json(name: str, data: bytes, key: str | None) -> np.ndarray:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        doc = {"values": doc, "dtype": "float32"}
    try:
        return array_from_json(doc)
    except RemoteProtocolError as exc:
        raise ConfigError(
            f"{name}: expected a list of rows of numbers or a tensor ({exc})"
        ) from None


def _csv(name: str, data: bytes, key: str | None) -> np.ndarray:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: not UTF-8 text") from None
    try:
        lines = [(n, row) for n, row in enumerate(csv.reader(io.StringIO(text)), 1) if row]
    except csv.Error as exc:
        raise ConfigError(f"{name}: malformed CSV ({exc})") from None
    if lines and not any(_is_number(cell) for cell in lines[0][1]):
        lines = lines[1:]  # a header line
    rows = [_csv_row(name, n, row) for n, row in lines]
    if not rows:
        raise ConfigError(f"{name}: holds no rows")
    if len({len(r) for r in rows}) > 1:
        raise ConfigError(f"{name}: rows have different numbers of columns")
    return np.array(rows, dtype=np.float64)


def _csv_row(name: str, line: int, row: list[str]) -> list[float]:
    if not all(_is_number(cell) for cell in row):
        raise ConfigError(f"{name}: line {line} holds something that is not a number")
    return [float(cell) for cell in row]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# --- images ----------------------------------------------------------------------------------

_PGM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n?)*([^\s#]+)")


def _pgm(name: str, data: bytes, key: str | None) -> np.ndarray:
    """A binary (P5) or ASCII (P2) PGM image as one digit row."""
    fields, pos = [], 0
    for _ in range(4):
        match = _PGM_TOKEN.match(data, pos)
        if match is None:
            raise ConfigError(f"{name}: truncated PGM header")
        fields.append(match.group(1))
        pos = match.end()
    magic, *numbers = fields
    if magic not in (b"P2", b"P5") or not all(n.isdigit() for n in numbers):
        raise ConfigError(f"{name}: not a PGM image (P2 or P5 header expected)")
    width, height, maxval = (int(n) for n in numbers)
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE and 0 < maxval < 65536):
        raise ConfigError(f"{name}: PGM size {width}x{height} or maxval {maxval} out of range")
    body = _pgm_binary if magic == b"P5" else _pgm_ascii
    pixels = body(name, data[pos + 1 :] if magic == b"P5" else data[pos:], width * height, maxval)
    gray = pixels.reshape(height, width).astype(np.float64) / maxval
    return image_row(np.minimum(gray, 1.0))


def _pgm_binary(name: str, body: bytes, count: int, maxval: int) -> np.ndarray:
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype("u1")
    if len(body) < count * dtype.itemsize:
        raise ConfigError(f"{name}: PGM pixel data is truncated")
    return np.frombuffer(body, dtype=dtype, count=count)


def _pgm_ascii(name: str, body: bytes, count: int, maxval: int) -> np.ndarray:
    values = body.split()
    if len(values) < count or not all(v.isdigit() for v in values[:count]):
        raise ConfigError(f"{name}: PGM pixel data is truncated or not numbers")
    return np.array([int(v) for v in values[:count]], dtype=np.int64)


def _pillow(name: str, data: bytes, key: str | None) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(
            f"{name}: reading PNG or JPEG needs Pillow (pip install pillow); "
            "or convert the image to .pgm or .npy"
        ) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    except Exception as exc:  # Pillow's decoders raise many types for a malformed file
        raise ConfigError(f"{name}: not a readable image ({exc or type(exc).__name__})") from None
    return image_row(gray)


def image_row(gray: np.ndarray) -> np.ndarray:
    """A grayscale image (2-D, values 0..1) as one digit-classifier row of 64 (module doc)."""
    if gray.ndim != 2 or 0 in gray.shape:
        raise ConfigError("an image must be a non-empty 2-D grayscale array")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if border.mean() > 0.5 else gray
    small = _area_weights(ink.shape[0]) @ ink @ _area_weights(ink.shape[1]).T
    low, high = small.min(), small.max()
    stretched = (small - low) / (high - low) if high > low else np.zeros_like(small)
    counts = np.rint(stretched * DIGIT_LEVELS)
    return (counts / DIGIT_LEVELS).reshape(1, DIGIT_SIDE * DIGIT_SIDE)


def _area_weights(n: int) -> np.ndarray:
    """(8, n) matrix averaging n input pixels onto 8 by the overlap of their intervals."""
    into, out = np.arange(n + 1) / n, np.arange(DIGIT_SIDE + 1) / DIGIT_SIDE
    low = np.maximum(out[:-1, None], into[None, :-1])
    high = np.minimum(out[1:, None], into[None, 1:])
    overlap = np.clip(high - low, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


_READERS: dict[str, Callable[[str, bytes, str | None], np.ndarray]] = {
    ".npy": _npy,
    ".npz": _npz,
    ".json": _json,
    ".csv": _csv,
    ".pgm": _pgm,
    ".png": _pillow,
    ".jpg": _pillow,
    ".jpeg": _pillow,
}

# --- argument types --------------------------------------------------------------------------


def _model_ref(text: str) -> dict[str, str]:
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
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
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


def _since(text: str) -> float:
    return parse_since(text, time.time())


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _limit(text: str) -> int:
    value = _positive_int(text)
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


def _seconds(text: str) -> float:
    value = _positive_finite(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _weight(text: str) -> tuple[str, float]:
    """``ID[@VER]=W``: a model of the task (named as by --model) and its positive weight."""
    name, equals, number = text.rpartition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"weight {text!r} must look like ID[@VER]=WEIGHT")
    _model_ref(name)  # the same names as --model
    value = _positive_finite(number)
    if value is None:
        raise argparse.ArgumentTypeError(f"weight {number!r} is not a positive, finite number")
    return name, value


def _request_seconds(text: str) -> float:
    """``--timeout``: positive seconds, at most a day (sockets refuse far longer timeouts)."""
    value = _seconds(text)
    if value > MAX_REQUEST_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{text!r} is over {MAX_REQUEST_TIMEOUT_S:g} seconds")
    return value


# --- command wiring --------------------------------------------------------------------------

Command = Callable[[CoordinatorClient, argparse.Namespace], int]


def add_task_commands(commands: Any) -> None:
    """Add ``submit``, ``status``, ``tasks``, ``cancel``, ``nodes``, ``stats`` and
    ``revocations``."""
    for add in (
        _add_submit, _add_status, _add_tasks, _add_cancel, _add_nodes, _add_stats,
        _add_revocations,
    ):  # fmt: skip
        add(commands)


def _command(commands: Any, name: str, help_text: str, run: Command) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    where = parser.add_argument_group("coordinator (else $MESHINFER_COORD_URL / _TOKEN)")
    where.add_argument("--url", help="the API base URL, e.g. http://127.0.0.1:7950")
    where.add_argument("--token-file", type=Path, help="file holding the API token")
    where.add_argument("--data-dir", type=Path, help="the coordinator's data_dir (runtime.json)")
    where.add_argument(
        "--timeout", type=_request_seconds, default=30.0, help="per-request seconds (<= 86400)"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON documents")
    parser.set_defaults(handler=lambda args: _run(run, args))
    return parser


def _run(run: Command, args: argparse.Namespace) -> int:
    endpoint = resolve_endpoint(args.url, args.token_file, args.data_dir)
    client = CoordinatorClient(endpoint.url, endpoint.token, timeout=args.timeout)
    try:
        return run(client, args)
    except MeshInferError:
        raise  # (a ConfigError is a ValueError too: a bad argument, not a bad answer)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        message = f"unexpected answer from the coordinator ({detail})"
        raise ApiError(None, "bad_response", message) from None


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


# --- submit ----------------------------------------------------------------------------------


def _add_submit(commands: Any) -> None:
    parser = _command(commands, "submit", "submit a task (and --wait for its result)", _submit)
    what = parser.add_argument_group("task")
    what.add_argument(
        "--model",
        action="append",
        type=_model_ref,
        default=[],
        metavar="ID@VER",
        help="model to run (repeat for a parallel task)",
    )
    what.add_argument(
        "--input",
        action="append",
        type=Path,
        required=True,
        metavar="FILE",
        help=".npy .npz .json .csv .pgm .png .jpg (repeat to concatenate rows)",
    )
    what.add_argument("--key", help="the array of a .npz input (default: its first)")
    what.add_argument("--dtype", default="float32", choices=sorted(DTYPES - {"bool"}))
    what.add_argument(
        "--pattern",
        choices=[p.value for p in Pattern],
        help="default: pipeline with --stages, parallel with several models, "
        f"batch with --shard-size or over {DEFAULT_SHARD_ROWS} rows, else single",
    )
    what.add_argument("--stages", type=Path, metavar="FILE.json", help="pipeline stages")
    what.add_argument("--policy", choices=[p.value for p in Policy])
    what.add_argument("--priority", type=int, help="larger runs first (default 0)")
    what.add_argument(
        "--deadline", type=_seconds, metavar="S",
        help="time budget in seconds from acceptance; the task fails when it runs out",
    )  # fmt: skip
    what.add_argument("--shard-size", type=_positive_int, metavar="ROWS")
    agg = parser.add_argument_group("aggregation of a parallel task")
    agg.add_argument("--aggregation", choices=[m.value for m in Mode])
    agg.add_argument(
        "--quorum", type=_positive_int, metavar="N",
        help="ensemble: done once N models answered (default: all of them)",
    )  # fmt: skip
    agg.add_argument(
        "--min-responses", type=_positive_int, metavar="N",
        help="outputs a partial result needs at the timeout (default 1)",
    )  # fmt: skip
    agg.add_argument(
        "--aggregation-timeout", type=_seconds, metavar="S",
        help="seconds the aggregation waits (default: --deadline; at most that)",
    )  # fmt: skip
    agg.add_argument(
        "--weight", action="append", type=_weight, default=[], metavar="ID[@VER]=W",
        help="weighted/ensemble: a model's weight (repeat; unnamed models weigh 1)",
    )  # fmt: skip
    what.add_argument("--task-id", help="your own id (a retry with the same spec is idempotent)")
    wait = parser.add_argument_group("waiting")
    wait.add_argument("--wait", action="store_true", help="wait for the result and print it")
    wait.add_argument("--wait-timeout", type=_seconds, default=600.0, metavar="S")
    wait.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    wait.add_argument("--show", type=int, default=20, metavar="N", help="labels to print")


def _submit(client: CoordinatorClient, args: argparse.Namespace) -> int:
    inputs = load_inputs(args.input, args.key, args.dtype)
    answer = _send_submission(client, task_document(args, inputs))
    if not args.wait:
        if args.json:
            _print_json(answer)
        else:
            print(
                f"submitted task {answer['task_id']}: {answer['state']}, "
                f"{_count(answer['items_total'], 'item')}"
            )
        return 0
    doc = _await(client, answer, args)
    if args.json:
        _print_json(doc)
    else:
        print(render_result(doc, args.show))
    return _exit_code(doc)


def _send_submission(client: CoordinatorClient, doc: dict[str, Any]) -> dict[str, Any]:
    """POST the task. When the request went out but no answer came (the connection dropped,
    the time ran out, or Ctrl-C: KeyboardInterrupt, exit 130, after one line on stderr), the
    coordinator may or may not have accepted the task: the error says so and how to look."""
    task_id = doc.get("task_id")
    if task_id:
        what, look = f"task {task_id}", f"`meshinfer-coord status {task_id}`"
    else:
        what, look = "the task", "`meshinfer-coord tasks` (newest first)"
    try:
        return client.submit(doc)
    except ApiError as exc:
        if exc.status is not None or exc.code == "unreachable":  # an answer, or none sent
            raise
        message = f"{exc.message}; to see whether it accepted {what}: {look}"
        raise ApiError(None, exc.code, message) from None
    except KeyboardInterrupt:
        print(
            f"meshinfer-coord: interrupted: the submission of {what} was cut short; the"
            f" coordinator may or may not have accepted it: look with {look}",
            file=sys.stderr,
        )
        raise


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
        return {**stage, "model": _model_ref(model)}
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{path}: stages[{index}].model: {exc}") from None


def _await(client: CoordinatorClient, answer: dict[str, Any], args) -> dict[str, Any]:
    """The task once it ended or ``--wait-timeout`` passed. A coordinator lost meanwhile (it
    stopped, or the network failed) is an ApiError naming the task, which it keeps: the one
    line says how to look at it later. Ctrl-C (KeyboardInterrupt, exit 130) says so too, on
    stderr, before it goes on."""
    deadline = time.monotonic() + args.wait_timeout
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    task_id = answer["task_id"]
    try:
        if show and answer["items_total"] > 1:
            _watch(client, task_id, deadline, sys.stderr)
        return client.wait(task_id, max(0.0, deadline - time.monotonic()))
    except ApiError as exc:
        if exc.status is not None:  # an answer: the coordinator's own error says it all
            raise
        message = (
            f"task {task_id} was accepted, but waiting for it failed: {exc.message}; the"
            f" coordinator keeps the task (see `meshinfer-coord status {task_id}`)"
        )
        raise ApiError(None, exc.code, message) from None
    except KeyboardInterrupt:
        print(
            f"meshinfer-coord: interrupted: task {task_id} was accepted and the coordinator"
            f" keeps running it; follow it with `meshinfer-coord status {task_id}`",
            file=sys.stderr,
        )
        raise


def _watch(client: CoordinatorClient, task_id: str, deadline: float, stream: TextIO) -> None:
    """Draw a progress bar from GET ?outputs=false polls until the task ends or time is up."""
    width = 0
    try:
        while True:
            doc = client.get(task_id, outputs=False)
            line = progress_line(doc)
            stream.write("\r" + line.ljust(width))  # blank what a longer line left
            stream.flush()
            width = len(line)
            if doc["state"] in TERMINAL_STATES or time.monotonic() >= deadline:
                return
            time.sleep(POLL_INTERVAL_S)
    finally:
        stream.write("\n")


def progress_line(doc: dict[str, Any]) -> str:
    """``[#####.....] done/total items  state`` for a task, and why its items wait if they
    do (the most common reason)."""
    total, done = doc["items_total"], doc["items_done"]
    filled = PROGRESS_WIDTH * done // total if total else PROGRESS_WIDTH
    bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
    line = f"[{bar}] {done}/{total} items  {doc['state']:<10}"
    why = waiting_lines(doc, show=1)
    return f"{line}  {_short(why[0], 70)}" if why else line


def _exit_code(doc: dict[str, Any]) -> int:
    state = doc["state"]
    if state == TaskState.SUCCEEDED.value:
        return 0
    return EXIT_TASK_FAILED if state in TERMINAL_STATES else EXIT_STILL_RUNNING


# --- status / tasks / cancel / nodes / stats -------------------------------------------------


def _add_status(commands: Any) -> None:
    parser = _command(commands, "status", "show one task and its work items", _status)
    parser.add_argument("task_id", metavar="TASK_ID")
    parser.add_argument("--outputs", action="store_true", help="with --json: include outputs")


def _status(client: CoordinatorClient, args: argparse.Namespace) -> int:
    if args.outputs and not args.json:  # the table shows no tensors: say so, not ignore it
        raise ConfigError("--outputs adds the output tensors to the --json document; add --json")
    doc = client.get(args.task_id, outputs=args.outputs)
    if args.json:
        _print_json(doc)
    else:
        print(render_task(doc))
    return 0


def _add_tasks(commands: Any) -> None:
    parser = _command(commands, "tasks", "list tasks, newest first", _tasks)
    parser.add_argument("--state", choices=[s.value for s in TaskState])
    parser.add_argument("--model", metavar="ID", help="tasks with an item on this model id")
    parser.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="created since: unix seconds, ISO time, or an age like 10m 2h 7d",
    )
    parser.add_argument("--limit", type=_limit, default=100, help="page size (1..1000)")
    page = parser.add_mutually_exclusive_group()
    page.add_argument("--cursor", help="the next_cursor of a previous page")
    page.add_argument("--all", action="store_true", help="follow cursors to the last page")


def _tasks(client: CoordinatorClient, args: argparse.Namespace) -> int:
    filters = {"state": args.state, "model": args.model, "since": args.since, "limit": args.limit}
    if args.all:
        page = {"tasks": list(client.iter_tasks(**filters)), "next_cursor": None}
    else:
        page = client.list(**filters, cursor=args.cursor)
    if args.json:
        _print_json(page)
    else:
        print(render_tasks(page))
    return 0


def _add_cancel(commands: Any) -> None:
    parser = _command(commands, "cancel", "cancel a task (its running items are stopped)", _cancel)
    parser.add_argument("task_id", metavar="TASK_ID")


def _cancel(client: CoordinatorClient, args: argparse.Namespace) -> int:
    answer = client.cancel(args.task_id)
    if args.json:
        _print_json(answer)
    elif answer["cancelled"]:
        print(f"cancelled task {answer['task_id']}")
    else:
        print(f"task {answer['task_id']} was not cancelled: it already ended ({answer['state']})")
    return 0


def _add_nodes(commands: Any) -> None:
    _command(commands, "nodes", "list the mesh nodes the coordinator sees", _nodes)


def _nodes(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = client.nodes()
    if args.json:
        _print_json(doc)
    else:
        print(render_nodes(doc))
    return 0


def _add_revocations(commands: Any) -> None:
    parser = _command(
        commands,
        "revocations",
        "show the certificate revocation list in force, or --push the fleet's to the coordinator"
        " (gossip then spreads it to every node)",
        _revocations,
    )
    parser.add_argument(
        "--push",
        type=Path,
        metavar="PATH",
        help="a revocations.bin file, or the fleet directory holding one (after fleet revoke)",
    )


def _revocations(client: CoordinatorClient, args: argparse.Namespace) -> int:
    if args.push is None:
        doc = client.revocations()
    else:
        path = args.push / "revocations.bin" if args.push.is_dir() else args.push
        doc = client.push_revocations(read_file(path, "revocation list"))
    if args.json:
        _print_json(doc)
    else:
        print(render_revocations(doc))
    return 0


def render_revocations(doc: dict[str, Any]) -> str:
    """The ``revocations`` view: the list's version and entries (and whether a push merged)."""
    merged = doc.get("merged")
    head = f"revocation list version {doc['version']}" + (
        "" if merged is None else (" (merged)" if merged else " (nothing new)")
    )
    rows = [
        (
            e["sequence"],
            f"serial {e['serial']}" if e["serial"] is not None else f"node {e['node_id']}",
            utc_iso(e["revoked_at"]),
            e["reason"] or "-",
        )
        for e in doc["entries"]
    ]
    if not rows:
        return head + ": no certificate revoked"
    return head + "\n" + format_table(("SEQ", "REVOKES", "AT", "REASON"), rows, right={"SEQ"})


def _add_stats(commands: Any) -> None:
    _command(commands, "stats", "task and item counts, dispatch and retry counters", _stats)


def _stats(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = client.stats()
    if args.json:
        _print_json(doc)
    else:
        print(render_stats(doc))
    return 0


# --- rendering -------------------------------------------------------------------------------


def utc_iso(seconds: float | None) -> str:
    """Unix seconds as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC); ``-`` for None; a moment past what a
    date can show (the end of any positive, finite ``deadline_s`` the API accepts) as
    ``unix SECONDS``."""
    if seconds is None:
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (ValueError, OverflowError, OSError):  # past year 9999, or past the C library's
        return f"unix {seconds:g}"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right=()) -> str:
    """Columns padded to their widest cell; columns named in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(w) if headers[i] in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 3] + "..."


def render_tasks(page: dict[str, Any]) -> str:
    """The ``tasks`` table of a GET /v1/tasks page (and how to get the next one)."""
    tasks = page["tasks"]
    if not tasks:
        return "no tasks"
    rows = [
        (
            t["task_id"],
            t["state"],
            t["pattern"],
            t["priority"],
            f"{t['items_done']}/{t['items_total']}",
            utc_iso(t["created_at"]),
            _short(t.get("error"), 40),
        )
        for t in tasks
    ]
    headers = ("TASK", "STATE", "PATTERN", "PRIO", "ITEMS", "CREATED (UTC)", "ERROR")
    text = format_table(headers, rows, right={"PRIO", "ITEMS"})
    if page.get("next_cursor"):
        text += f"\n(more: --cursor {page['next_cursor']}, or --all)"
    return text


def render_task(doc: dict[str, Any]) -> str:
    """The ``status`` view: the task's fields, its items as a table, and its result."""
    took = doc["updated_at"] - doc["created_at"]
    lines = [
        f"task      {doc['task_id']}",
        f"state     {doc['state']}",
        f"pattern   {doc['pattern']}, priority {doc['priority']}, policy {doc['policy'] or '-'}",
        f"created   {utc_iso(doc['created_at'])}   updated {utc_iso(doc['updated_at'])}"
        f" ({took:.2f} s later)",
        f"items     {doc['items_done']}/{doc['items_total']} done",
    ]
    if doc.get("deadline_s") is not None:
        lines.append(f"deadline  {deadline_text(doc)}")
    if doc.get("aggregation"):
        lines.append(f"aggregate {aggregation_text(doc['aggregation'])}")
    if doc.get("error"):
        lines.append(f"error     {_short(doc['error'], 200)}")
    items = doc.get("items") or []
    if items:
        rows = [
            (i["item_id"], i["state"], i.get("model"), i.get("node"), _attempt_text(i),
             _short(f"waiting: {i['waiting']}" if i.get("waiting") else i.get("error"), 80))
            for i in items
        ]  # fmt: skip
        headers = ("ITEM", "STATE", "MODEL", "NODE", "ATTEMPT", "ERROR / WAITING")
        lines += ["", format_table(headers, rows, right={"ATTEMPT"})]
    if doc.get("result"):
        lines += ["", *_result_lines(doc["result"], 20)]
    return "\n".join(lines)


def _attempt_text(item: dict[str, Any]) -> str:
    """``3``, or ``3 (2 refused)`` for an item whose node refused (or never got) some attempts."""
    refused = item.get("refused") or 0
    return f"{item.get('attempt')}" + (f" ({refused} refused)" if refused else "")


def aggregation_text(aggregation: dict[str, Any]) -> str:
    """``ensemble, quorum 2, timeout 1.5 s, weights a@1=2`` (options left at their default are
    not shown)."""
    parts = [str(aggregation.get("mode") or "-")]
    for key, label in (("quorum", "quorum"), ("min_responses", "min responses")):
        if aggregation.get(key) is not None:
            parts.append(f"{label} {aggregation[key]}")
    if aggregation.get("timeout_s") is not None:
        parts.append(f"timeout {aggregation['timeout_s']:g} s")
    weights = aggregation.get("weights") or {}
    if weights:
        parts.append("weights " + " ".join(f"{m}={w:g}" for m, w in sorted(weights.items())))
    return ", ".join(parts)


def deadline_text(doc: dict[str, Any]) -> str:
    """``30 s, until 2026-11-23T10:00:30Z`` for a task with a deadline."""
    return f"{doc['deadline_s']:g} s, until {utc_iso(doc.get('expires_at'))}"


def waiting_lines(doc: dict[str, Any], show: int = 3) -> list[str]:
    """``waiting: <why> (N items)`` for the most common reasons live items are on no node."""
    reasons = Counter(i["waiting"] for i in doc.get("items") or () if i.get("waiting"))
    lines = [f"waiting: {why} ({_count(n, 'item')})" for why, n in reasons.most_common(show)]
    if len(reasons) > show:
        lines.append(f"waiting: ... and {len(reasons) - show} other reasons")
    return lines


def render_result(doc: dict[str, Any], show: int = 20, *, now: float | None = None) -> str:
    """What ``submit --wait`` prints: the outcome line, then labels, outputs and nodes. A task
    still live shows its age (``now`` - created; ``now`` defaults to the wall clock)."""
    live = doc["state"] not in TERMINAL_STATES
    end = doc["updated_at"] if not live else time.time() if now is None else now
    took = end - doc["created_at"]
    head = (
        f"task {doc['task_id']}: {doc['state']} ({doc['pattern']}, "
        f"{doc['items_done']}/{doc['items_total']} items, {took:.2f} s{' so far' if live else ''})"
    )
    lines = [head]
    if live:
        lines.append("still running: see `meshinfer-coord status " + doc["task_id"] + "`")
        lines += waiting_lines(doc)
    if doc.get("error"):
        lines.append(f"error: {_short(doc['error'], 200)}")
    if doc.get("result"):
        lines += _result_lines(doc["result"], show)
    return "\n".join(lines)


def _result_lines(result: dict[str, Any], show: int) -> list[str]:
    lines = []
    labels = result.get("labels")
    if labels is not None:
        shown = labels[: max(0, show)]
        first = f"; first {len(shown)}: " + " ".join(map(str, shown)) if shown else ""
        lines.append(f"labels: {len(labels)} rows{first}")
        counts = sorted(Counter(labels).items())
        lines.append("counts: " + "  ".join(f"{label}:{n}" for label, n in counts))
    for i, out in enumerate(result.get("outputs") or []):
        lines.append(f"output {i}: {out['dtype']} {out['shape']}")
    nodes = Counter((result.get("nodes") or {}).values())
    if nodes:
        lines.append(
            "nodes: " + ", ".join(f"{n} ({_count(k, 'item')})" for n, k in sorted(nodes.items()))
        )
    aggregation = result.get("aggregation")
    if aggregation:
        sources = ", ".join(map(str, aggregation.get("sources") or [])) or "-"
        lines.append(
            f"aggregation: {aggregation.get('mode')} of {sources}"
            + (" (partial)" if aggregation.get("partial") else "")
            + (f", {aggregation['tied']} tied" if aggregation.get("tied") else "")
            + (f", {aggregation['abstained']} with no vote" if aggregation.get("abstained") else "")
        )
    return lines


def render_nodes(doc: dict[str, Any]) -> str:
    """The ``nodes`` table of a GET /v1/nodes answer (a node that left or died has no queue
    depth: ``-``; nor has one whose round trip was not measured yet, or a coordinator's answer
    from before ``rtt_ms``, an RTT; nor a contact time, ``CONTACT S``, one whose ``contact_s``
    is unknown: see :mod:`meshinfer.proto.contact`)."""
    nodes = doc["nodes"]
    if not nodes:
        return "no nodes"
    rows = [
        (
            n["node_id"],
            n["status"],
            ",".join(n["roles"]) or "-",
            n["address"],
            None if (rtt := n.get("rtt_ms")) is None else f"{rtt:.1f}",
            None if (contact := n.get("contact_s")) is None else f"{contact:.1f}",
            n["queue_depth"],
            n["in_flight"],
            n["done"],
            ",".join(n["models"]) or "-",
        )
        for n in nodes
    ]
    headers = (
        "NODE", "STATUS", "ROLES", "ADDRESS", "RTT MS", "CONTACT S", "QUEUE", "IN FLIGHT",
        "DONE", "MODELS",
    )  # fmt: skip
    right = {"RTT MS", "CONTACT S", "QUEUE", "IN FLIGHT", "DONE"}
    return format_table(headers, rows, right=right)


def render_stats(doc: dict[str, Any]) -> str:
    """The ``stats`` view of a GET /v1/stats answer."""

    def by_key(counts: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"

    return "\n".join(
        [
            f"tasks              {by_key(doc['tasks'])}",
            f"items              {by_key(doc['items'])}",
            f"live tasks         {doc['live_tasks']}, parked items {doc['parked_items']}",
            f"dispatched         {doc['dispatched']}, retries {doc['retries']} "
            f"({doc.get('refusals', 0)} refused), "
            f"redispatched after a node death {doc['redispatched_after_death']}",
            f"duplicate results  {doc['duplicates']}",
            f"inputs by ref      {doc.get('inputs_by_reference', 0)}, "
            f"{doc.get('input_bytes_saved', 0) / 2**20:.1f} MiB not sent, "
            f"{doc.get('input_cache_misses', 0)} sent again",
            f"done by node       {by_key(doc['completed_by_node'])}",
            f"journal counters   {by_key(doc.get('journal_counters') or {})}",
        ]
    )
