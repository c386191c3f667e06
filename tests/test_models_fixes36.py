"""The shipped model's script and the CLI's input readers (session 36 review).

Inputs: whole numbers reach an integer --dtype exactly (a JSON list went through float32, a CSV
through float64); a value out of --dtype's range is named with its file; a file over the size
limit is refused unread; rows over a task's input limit are refused before joining; a CSV with
"\\r" line ends is read. Images: a 16-bit gray PNG, a digit on a transparent canvas and an
EXIF-rotated JPEG read as a viewer shows them (the first two came out blank). The forward pass
overflows without warnings; synthetic specs too large are refused before allocation; the
training script refuses to overwrite without --force.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from coordinator import input_files
from coordinator.digit_images import read_image
from coordinator.input_files import MAX_INPUT_FILE_BYTES, load_inputs
from meshinfer.errors import ConfigError
from meshinfer.inference.mlp import forward
from meshinfer.inference.registry import DIGITS_REF, default_registry
from meshinfer.inference.synthetic import SyntheticSpec, parse_version

ROOT = Path(__file__).resolve().parents[1]


# --- input files --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_json_rows_of_whole_numbers_reach_an_integer_dtype_exactly(tmp_path, dtype):
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([[16777217, 3], [-16777219, 0]]))  # not float32 numbers
    got = load_inputs([path], dtype=dtype)
    assert got.dtype == np.dtype(dtype)
    assert got.tolist() == [[16777217, 3], [-16777219, 0]]


def test_csv_whole_numbers_past_2_53_reach_int64_exactly(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("id,n\n9007199254740993,1\n-9223372036854775808,2\n")
    got = load_inputs([path], dtype="int64")
    assert got.tolist() == [[9007199254740993, 1], [-(2**63), 2]]
    path.write_text("9223372036854775808,1\n")  # over int64: a float, refused as not fitting
    with pytest.raises(ConfigError, match=r"ids\.csv: values do not fit int64"):
        load_inputs([path], dtype="int64")


def test_csv_with_carriage_return_line_ends_is_read(tmp_path):
    path = tmp_path / "mac.csv"
    path.write_bytes(b"a,b\r1,2.5\r3,4\r")
    assert load_inputs([path]).tolist() == [[1.0, 2.5], [3.0, 4.0]]


def test_a_value_out_of_the_dtype_range_is_named_with_its_file(tmp_path):
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.array([[1, 2]], dtype=np.uint64))
    np.save(bad, np.array([[2**64 - 1, 2]], dtype=np.uint64))
    with pytest.raises(ConfigError, match=r"bad\.npy: values do not fit int64"):
        load_inputs([good, bad], dtype="int64")
    np.save(bad, np.array([[1e300, 0.0]]))
    with pytest.raises(ConfigError, match=r"bad\.npy: values are out of range for float32"):
        load_inputs([good, bad])


def test_an_input_file_over_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "huge.npy"
    with path.open("wb") as file:  # sparse: no disk, no memory
        file.truncate(MAX_INPUT_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match=r"huge\.npy: input file of .* bytes is over .*not read"):
        load_inputs([path])


def test_rows_over_a_tasks_input_limit_are_refused_before_joining(tmp_path, monkeypatch):
    monkeypatch.setattr(input_files, "MAX_ARRAY_BYTES", 64)
    first, second = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(first, np.zeros((2, 4)))  # 32 bytes as float32
    np.save(second, np.zeros((3, 4)))  # 48 more
    assert load_inputs([first]).shape == (2, 4)
    with pytest.raises(ConfigError, match=r"b\.npy: the inputs take 80 bytes as float32"):
        load_inputs([first, second])


# --- images -------------------------------------------------------------------------------------


def _digit() -> np.ndarray:
    """A dark vertical bar on a light 32x32 ground (uint8)."""
    gray = np.full((32, 32), 220, np.uint8)
    gray[4:28, 12:17] = 20
    return gray


def _encoded(image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_a_16_bit_gray_png_reads_as_its_8_bit_twin():
    image_module = pytest.importorskip("PIL.Image")
    gray = _digit()
    expected = read_image("a.png", _encoded(image_module.fromarray(gray)), None)
    wide = image_module.fromarray(gray.astype(np.uint16) * 257)
    got = read_image("b.png", _encoded(wide), None)
    assert expected.any()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("ink", [0, 255])
def test_a_digit_on_a_transparent_canvas_is_not_blank(ink):
    image_module = pytest.importorskip("PIL.Image")
    opaque = np.full((32, 32), 255 - ink, np.uint8)
    opaque[4:28, 12:17] = ink
    expected = read_image("a.png", _encoded(image_module.fromarray(opaque)), None)
    rgba = np.zeros((32, 32, 4), np.uint8)  # invisible pixels: black (or white) and alpha 0
    rgba[..., :3] = ink
    rgba[4:28, 12:17, 3] = 255
    got = read_image("b.png", _encoded(image_module.fromarray(rgba, "RGBA")), None)
    assert expected.any()
    np.testing.assert_array_equal(got, expected)


def test_an_exif_rotated_jpeg_is_read_upright():
    image_module = pytest.importorskip("PIL.Image")
    gray = _digit()
    upright = image_module.fromarray(np.rot90(gray, -1).copy())  # as a viewer shows it
    expected = read_image("a.jpg", _encoded(upright, "JPEG", quality=95), None)
    stored = image_module.fromarray(gray)
    exif = stored.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    got = read_image("b.jpg", _encoded(stored, "JPEG", quality=95, exif=exif.tobytes()), None)
    np.testing.assert_array_equal(got, expected)


# --- forward pass and synthetic models ----------------------------------------------------------


def test_forward_overflow_gives_nan_rows_without_warnings():
    weights = default_registry().get(DIGITS_REF).load_weights()
    batch = np.full((2, 64), 0.5, np.float32)
    batch[0] = 3e38  # finite, but its sums overflow float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = forward(weights, batch)
    assert np.isnan(probs[0]).all()
    assert np.isfinite(probs[1]).all() and probs[1].sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("version", ["w999999-d1", "w23171-d1", "w4096-d999"])
def test_synthetic_specs_too_large_are_refused_before_allocation(version):
    with pytest.raises(ValueError, match="bytes of weights, more than a model may"):
        SyntheticSpec(*parse_version(version))


def test_synthetic_specs_within_the_limit_are_made():
    assert (
        SyntheticSpec(*parse_version("w4096-d8")).parameter_count
        == 8 * (4096 * 4096 + 4096) + 4096 * 10 + 10
    )
    assert SyntheticSpec(23000, 1, classes=1).width == 23000


# --- the training script ------------------------------------------------------------------------


def _training_script():
    spec = importlib.util.spec_from_file_location(
        "train_digits36", ROOT / "examples/train_digits.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while defining classes
    spec.loader.exec_module(module)
    return module


def test_training_script_refuses_to_overwrite_without_force(tmp_path, capsys):
    script = _training_script()
    weights = tmp_path / "digits-mlp-wide-1.npz"
    weights.write_bytes(b"mine")
    with pytest.raises(SystemExit) as exited:
        script.main(["--model", "digits-mlp-wide@1", "--epochs", "1", "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert "digits-mlp-wide-1.npz" in capsys.readouterr().err
    assert weights.read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["digits-mlp-wide-1.npz"]  # nothing else written


def test_training_script_replaces_files_with_force(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn (dev extra) re-derives the split")
    script = _training_script()
    weights = tmp_path / "digits-mlp-wide-1.npz"
    weights.write_bytes(b"mine")
    script.main(
        ["--model", "digits-mlp-wide@1", "--epochs", "1", "--out", str(tmp_path), "--force"]
    )
    doc = json.loads((tmp_path / "digits-mlp-wide-1.json").read_text())
    assert doc["sha256"] == script.sha256_hex(weights.read_bytes())
