"""Task inputs read from files: the rows that ``meshinfer-coord submit --input`` sends.

Formats, by suffix: ``.npy``, ``.npz`` (its first array, or ``key``), ``.json`` (a list of rows,
one row, or a tensor document of the API), ``.csv`` (rows of numbers, an optional header line)
and images ``.pgm`` / ``.png`` / ``.jpg`` (one row each: :mod:`coordinator.digit_images`).
A file over :data:`MAX_INPUT_FILE_BYTES` is refused before it is read, a ``.npz`` array whose
header claims more than :data:`MAX_ARRAY_BYTES` (the largest input a task takes) from that
header, unread (a compressed member can inflate a thousandfold), and rows that take more than
that as ``dtype``, all files together, as each file is read. Each file is cast to ``dtype`` on
its own (a value out of its range is named with the file); whole numbers in JSON and CSV reach
an integer ``dtype`` exactly (never rounded through float32 or float64).
Anything unreadable, malformed or mismatched is a ConfigError naming the file; so is a name of
no known format (told before reading) and anything but a regular file (a FIFO, a device such as
/dev/zero: read without waiting for a writer, refused by what it is).
"""

from __future__ import annotations

import csv
import io
import json
import math
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from coordinator.client import array_from_json
from coordinator.digit_images import read_image, read_pgm
from meshinfer.atomic_files import read_limited
from meshinfer.errors import ConfigError, RemoteProtocolError
from meshinfer.proto.tasks import MAX_BATCH_INPUT_BYTES

__all__ = ["MAX_ARRAY_BYTES", "MAX_INPUT_FILE_BYTES", "load_inputs", "parse_input"]

#: The most bytes a ``.npz`` array may claim in its header (shape times item size): no task
#: takes a larger input (a batch task's whole input, ``MAX_BATCH_INPUT_BYTES``: 256 MiB).
MAX_ARRAY_BYTES = MAX_BATCH_INPUT_BYTES
#: The largest input file read (1 GiB): four times the largest input, room for a CSV or JSON
#: text of it, or a .npy of wider numbers than ``dtype``; a larger one is refused unread.
MAX_INPUT_FILE_BYTES = 4 * MAX_ARRAY_BYTES
#: The dtypes a JSON list of numbers is read as directly (those of the API's ``values``).
_JSON_VALUE_DTYPES = frozenset({"float32", "float16", "int64", "int32", "uint8"})


def load_inputs(
    paths: Sequence[Path], key: str | None = None, dtype: str = "float32"
) -> np.ndarray:
    """The rows of every file in ``paths``, concatenated, as a ``dtype`` array of >= 2 dims.

    ConfigError naming the file for anything unreadable, malformed or mismatched.
    """
    paths = [Path(p) for p in paths]
    if key is not None and not any(p.suffix.lower() == ".npz" for p in paths):
        raise ConfigError("--key picks an array of a .npz input, and no input is one")
    for path in paths:  # every name and size checked before any file is read
        _reader(str(path))
        _check_file_size(path)
    arrays, total = [], 0
    for path in paths:
        data = read_limited(path, "input", limit=MAX_INPUT_FILE_BYTES, error=ConfigError)
        file_key = key if path.suffix.lower() == ".npz" else None
        rows = _cast(path, _as_rows(path, _parsed(path, data, file_key, dtype)), dtype)
        del data
        total += rows.nbytes
        if total > MAX_ARRAY_BYTES:
            raise ConfigError(
                f"{path}: the inputs take {total:,} bytes as {dtype} up to this file;"
                f" a task takes at most {MAX_ARRAY_BYTES:,}"
            )
        arrays.append(rows)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(f"input files disagree on the row shape: {sorted(shapes)}")
    return np.concatenate(arrays)


def _check_file_size(path: Path) -> None:
    """ConfigError for a regular file over :data:`MAX_INPUT_FILE_BYTES`, told by its size (its
    read stops past the limit too, should it grow); anything else is for the read to judge."""
    try:
        status = path.stat()
    except (OSError, ValueError):
        return
    if stat.S_ISREG(status.st_mode) and status.st_size > MAX_INPUT_FILE_BYTES:
        raise ConfigError(
            f"{path}: input file of {status.st_size:,} bytes is over the"
            f" {MAX_INPUT_FILE_BYTES:,}-byte limit (not read)"
        )


def parse_input(
    name: str, data: bytes, key: str | None = None, dtype: str = "float32"
) -> np.ndarray:
    """The array in one input file (format from ``name``'s suffix); ConfigError if malformed.

    A JSON list of numbers is read as ``dtype`` (when the API takes it: whole numbers exactly)."""
    reader = _reader(name)
    if key is not None and Path(name).suffix.lower() != ".npz":
        raise ConfigError(f"{name}: --key picks an array of a .npz file only")
    if reader is _json:
        return _json(name, data, key, dtype)
    return reader(name, data, key)


def _reader(name: str) -> Callable[[str, bytes, str | None], np.ndarray]:
    """The reader of a file called ``name`` (by its suffix); ConfigError for an unknown one."""
    suffix = Path(name).suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        known = ", ".join(sorted(_READERS))
        raise ConfigError(f"{name}: unknown input format {suffix or '(no suffix)'!r}; use {known}")
    return reader


#: What a reader raises where it did not foresee a malformed file (its data is in memory).
_UNFORESEEN = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError, RecursionError)


def _parsed(path: Path, data: bytes, key: str | None, dtype: str) -> np.ndarray:
    """:func:`parse_input`, where an error a reader did not foresee (a ValueError, say) is a
    ConfigError naming the file too: it is the file's, never a bad answer of the coordinator.
    (The CLI tells the two apart by where an error is raised, but could not name the file.)"""
    try:
        return parse_input(path.name, data, key, dtype)
    except ConfigError:
        raise
    except _UNFORESEEN as exc:
        raise ConfigError(f"{path}: not a readable input ({type(exc).__name__}: {exc})") from None


def _as_rows(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise ConfigError(f"{path}: holds {array.dtype} values, not numbers")
    if array.ndim == 0:
        raise ConfigError(f"{path}: holds a single number, not rows")
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    if rows.shape[0] == 0 or rows.size == 0:
        raise ConfigError(f"{path}: holds no values")
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():
        raise ConfigError(f"{path}: holds NaN or infinite values")
    return rows


def _cast(path: Path, array: np.ndarray, dtype: str) -> np.ndarray:
    """``array``, the rows of ``path`` (finite: :func:`_as_rows` refused NaN and infinity), as
    ``dtype``."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(array, dtype=dtype)
    if cast.dtype.kind == "f" and not np.isfinite(cast).all():
        raise ConfigError(f"{path}: values are out of range for {dtype}")
    if cast.dtype.kind in "iu" and not np.array_equal(cast, array):
        raise ConfigError(f"{path}: values do not fit {dtype} (out of range or not whole numbers)")
    return cast


#: What np.load raises for a malformed file: its header parser and zipfile raise many types
#: (MemoryError: a header claiming a huge shape; tokenize.TokenError: a cut .npy header;
#: zlib.error, NotImplementedError: a corrupt .npz member), so any Exception is the file's.
_NUMPY_ERRORS = (Exception,)


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
        member = key if key is not None else names[0]
        try:
            claimed = _claimed_bytes(archive, member)
            array = archive[member] if claimed <= MAX_ARRAY_BYTES else None
        except _NUMPY_ERRORS as exc:
            raise ConfigError(f"{name}: not a readable .npz file ({exc})") from None
    if array is None:
        raise ConfigError(
            f"{name}: array {member!r} would take {claimed:,} bytes once decompressed;"
            f" an input may take at most {MAX_ARRAY_BYTES:,} (not read)"
        )
    return array


def _claimed_bytes(archive: np.lib.npyio.NpzFile, member: str) -> int:
    """The bytes the .npy header of ``member`` says its array holds (shape times item size),
    read from the header alone; 0 for a member that is no .npy (np.load refuses it then)."""
    entry = member if member in archive.zip.namelist() else member + ".npy"
    with archive.zip.open(entry) as file:
        try:
            version = np.lib.format.read_magic(file)
        except ValueError:
            return 0
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
    return math.prod(shape) * dtype.itemsize


def _json(name: str, data: bytes, key: str | None, dtype: str = "float32") -> np.ndarray:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):  # (read as the dtype sent: 16777217 is no float32)
        doc = {"values": doc, "dtype": dtype if dtype in _JSON_VALUE_DTYPES else "float32"}
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
        rows = csv.reader(io.StringIO(text, newline=""))  # (as csv reads: "\r" ends lines too)
        lines = [(n, row) for n, row in enumerate(rows, 1) if row]
    except csv.Error as exc:
        raise ConfigError(f"{name}: malformed CSV ({exc})") from None
    if lines and not any(_is_number(cell) for cell in lines[0][1]):
        lines = lines[1:]  # a header line
    rows = [_csv_row(name, n, row) for n, row in lines]
    if not rows:
        raise ConfigError(f"{name}: holds no rows")
    if len({len(r) for r in rows}) > 1:
        raise ConfigError(f"{name}: rows have different numbers of columns")
    whole = all(type(value) is int for row in rows for value in row)
    return np.array(rows, dtype=np.int64 if whole else np.float64)


def _csv_row(name: str, line: int, row: list[str]) -> list[float | int]:
    if not all(_is_number(cell) for cell in row):
        raise ConfigError(f"{name}: line {line} holds something that is not a number")
    values = [_number(cell) for cell in row]
    for column, value in enumerate(values, 1):
        if not math.isfinite(value):
            raise ConfigError(
                f"{name}: line {line}, column {column} is {row[column - 1]!r}, not a finite number"
            )
    return values


def _number(cell: str) -> float | int:
    """``cell`` (:func:`_is_number`) as an int if it is a whole number within int64 (exact, as
    a float is not past 2**53), else as a float."""
    try:
        value = int(cell)
    except ValueError:  # (a fraction, an exponent, or over 4,300 digits)
        return float(cell)
    return value if -(2**63) <= value < 2**63 else float(cell)


def _is_number(cell: str) -> bool:
    if "_" in cell:  # float() takes "1_0" as 10: a typo, not a number of the file
        return False
    try:
        float(cell)
    except ValueError:
        return False
    return True


_READERS: dict[str, Callable[[str, bytes, str | None], np.ndarray]] = {
    ".npy": _npy,
    ".npz": _npz,
    ".json": _json,
    ".csv": _csv,
    ".pgm": read_pgm,
    ".png": read_image,
    ".jpg": read_image,
    ".jpeg": read_image,
}
