"""Input files of ``meshinfer-coord submit``: images too large refused from the header, PGM
rasters after a comment, pixels over maxval, and NaN/infinity in CSV named with the file."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest

from coordinator.digit_images import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, image_row
from coordinator.input_files import load_inputs
from meshinfer.errors import ConfigError

pytest.importorskip("PIL")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bilevel_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit grayscale PNG of ``width`` x ``height`` white pixels whose IDAT holds the first
    ``rows`` rows (all of them by default; fewer: a truncated file): a few KiB on disk."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter byte "none", then the bits
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raster = zlib.compress(row * (height if rows is None else rows), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", raster)
        + _chunk(b"IEND", b"")
    )


# (width, height, rows in the file): a whole 1-row image one pixel wider than the side limit
# (read, 20000 pixels in all, before the fix); a 100M-pixel one, where Pillow only warned and
# went on to decode; a 400M-pixel one, where Pillow refused with its own bomb message.
LARGE_PNGS = {
    "wide": (MAX_IMAGE_SIDE + 1, 1, None),
    "warned": (10_000, 10_000, 1),
    "bomb": (20_000, 20_000, 1),
}


@pytest.mark.parametrize("which", sorted(LARGE_PNGS))
def test_a_png_too_large_is_refused_from_its_header(tmp_path, which):
    width, height, rows = LARGE_PNGS[which]
    path = tmp_path / f"{which}.png"
    path.write_bytes(bilevel_png(width, height, rows))
    assert path.stat().st_size < 64 * 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning included
        with pytest.raises(ConfigError, match=rf"^\S*{which}\.png: image .*too large") as info:
            load_inputs([path])
    assert "\n" not in str(info.value)


def test_a_png_within_the_limits_still_reads(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(bilevel_png(64, 48))
    assert load_inputs([path]).shape == (1, 64)


def test_a_pgm_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    side = MAX_IMAGE_SIDE  # both sides allowed, but side * side is over MAX_IMAGE_PIXELS
    assert side * side > MAX_IMAGE_PIXELS
    path = tmp_path / "big.pgm"
    path.write_bytes(b"P5\n%d %d\n255\n" % (side, side))  # the header only: no pixel read
    with pytest.raises(ConfigError, match=r"big\.pgm: image of 16384x16384 .*too large"):
        load_inputs([path])


DIGIT = np.zeros((8, 8), dtype=np.uint8)
DIGIT[2:6, 3:5] = 16  # maxval 16: the row is the pixel counts / 16, exactly


@pytest.mark.parametrize("after_maxval", [b"#c\n", b"# a comment\r", b"\n", b" ", b"\t"], ids=repr)
def test_p5_raster_starts_after_the_one_whitespace_or_a_comment(tmp_path, after_maxval):
    path = tmp_path / "d.pgm"
    path.write_bytes(b"P5 8 8 16" + after_maxval + DIGIT.tobytes())
    np.testing.assert_array_equal(load_inputs([path])[0], DIGIT.ravel() / 16)


def test_p2_with_a_comment_straight_after_maxval_reads(tmp_path):
    path = tmp_path / "d.pgm"
    pixels = b" ".join(b"%d" % v for v in DIGIT.ravel())
    path.write_bytes(b"P2 8 8 16#c\n" + pixels + b"\n")
    np.testing.assert_array_equal(load_inputs([path])[0], DIGIT.ravel() / 16)


def test_a_comment_after_the_delimiting_whitespace_is_raster(tmp_path):
    """Netpbm: comments end with the whitespace after maxval; then come the bytes of pixels."""
    path = tmp_path / "d.pgm"
    raster = b"#" + DIGIT.tobytes()[1:]  # a first pixel of 35 ("#"), under maxval 40
    path.write_bytes(b"P5 8 8 40\n" + raster)
    gray = np.frombuffer(raster, dtype=np.uint8).reshape(8, 8) / 40
    np.testing.assert_array_equal(load_inputs([path]), image_row(gray).astype(np.float32))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("p5.pgm", b"P5 2 2 15\n\x00\x10\x00\x00"),
        ("p5wide.pgm", b"P5 2 2 300\n" + np.array([0, 301, 0, 0], dtype=">u2").tobytes()),
        ("p2.pgm", b"P2 2 2 15\n0 16 0 0\n"),
    ],
)
def test_a_pgm_pixel_over_maxval_is_refused_naming_the_file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(
        ConfigError, match=rf"{name.replace('.', '[.]')}: PGM pixel value \d+ is over"
    ):
        load_inputs([path])


@pytest.mark.parametrize(
    ("cells", "column"), [("1,inf,3", 2), ("nan,2,3", 1), ("1,2,-Infinity", 3), ("1e999,0,0", 1)]
)
def test_csv_nan_or_infinity_is_refused_naming_file_line_and_column(tmp_path, cells, column):
    path = tmp_path / "rows.csv"
    path.write_text(f"a,b,c\n1,2,3\n{cells}\n")
    with pytest.raises(ConfigError, match=rf"rows\.csv: line 3, column {column} is '"):
        load_inputs([path])


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_nan_in_numpy_files_is_refused_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    with path.open("wb") as out:  # (np.save and np.savez would add a suffix to a bare name)
        (np.save if suffix == ".npy" else np.savez)(out, np.array([[1.0, np.nan], [np.inf, 0]]))
    with pytest.raises(ConfigError, match=rf"rows\{suffix}: holds NaN or infinite values"):
        load_inputs([path])
