"""``meshinfer-coord`` task commands after the split of ``coordinator/cli_tasks.py``: the names
other code imports from there, and the faults found while splitting it (a corrupt .npy/.npz
input crashed with a traceback; ``--since nan`` and ``--limit ²`` named a private function
instead of saying what is wrong; an age too long to represent became ``-inf``)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from coordinator import cli_tasks, digit_images, input_files, task_arguments, task_views
from coordinator.cli import main
from coordinator.client import ENV_TOKEN
from meshinfer.errors import ConfigError

OFFLINE = ("--url", "http://127.0.0.1:9", "--timeout", "1")  # never contacted by these tests


@pytest.mark.parametrize(
    "module", [cli_tasks, digit_images, input_files, task_arguments, task_views]
)
def test_the_names_each_module_exports_resolve(module):
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing


# --- corrupt array files ---------------------------------------------------------------------


def _npy_with_cut_header() -> bytes:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, ".ljust(63) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(48)


def _compressed_npz() -> bytearray:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.arange(600).reshape(20, 30))
    return bytearray(buffer.getvalue())


def _npz_with_bad_deflate() -> bytes:
    data = _compressed_npz()
    name_len, extra_len = struct.unpack("<HH", data[26:30])  # the first local file header
    start = 30 + name_len + extra_len
    data[start : start + 4] = b"\xff\xff\xff\xff"
    return bytes(data)


def _npz_with_unknown_compression() -> bytes:
    data = _compressed_npz()
    central = data.index(b"PK\x01\x02")
    data[central + 10 : central + 12] = struct.pack("<H", 99)
    return bytes(data)


def test_a_npy_with_a_cut_header_is_a_config_error():
    with pytest.raises(ConfigError, match=r"a\.npy: not a readable \.npy file"):
        input_files.parse_input("a.npy", _npy_with_cut_header())


@pytest.mark.parametrize("make", [_npz_with_bad_deflate, _npz_with_unknown_compression])
def test_a_corrupt_npz_is_a_config_error(make):
    with pytest.raises(ConfigError, match=r"a\.npz: not a readable \.npz file"):
        input_files.parse_input("a.npz", make())


@pytest.mark.parametrize(
    ("name", "make"),
    [("cut.npy", _npy_with_cut_header), ("bad.npz", _npz_with_bad_deflate)],
)
def test_submit_with_a_corrupt_array_file_exits_2_in_one_line(
    tmp_path, capsys, monkeypatch, name, make
):
    monkeypatch.setenv(ENV_TOKEN, "t" * 32)
    path = tmp_path / name
    path.write_bytes(make())
    assert main(["submit", *OFFLINE, "--model", "m", "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{name}: not a readable" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


# --- argument messages -----------------------------------------------------------------------


@pytest.mark.parametrize("since", ["nan", "inf", "1e999", "1" * 400 + "d"])
def test_a_non_finite_since_says_so(capsys, since):
    assert main(["tasks", *OFFLINE, "--since", since]) == 2
    err = capsys.readouterr().err
    assert "argument --since" in err and "is not a finite number" in err, err
    assert "_since" not in err, err


def test_an_age_too_long_to_represent_is_refused():
    with pytest.raises(ConfigError, match="not a finite number"):
        task_arguments.parse_since("1" * 400 + "d", 1_700_000_000.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["tasks", "--limit", "\u00b2"],
        ["submit", "--model", "m", "--input", "f.npy", "--shard-size", "\u00b2"],
    ],
)
def test_a_non_ascii_digit_is_not_a_positive_integer(capsys, argv):
    assert main([argv[0], *OFFLINE, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert "'\u00b2' is not a positive integer" in err, err
    assert "_positive_int" not in err and "_limit" not in err, err
