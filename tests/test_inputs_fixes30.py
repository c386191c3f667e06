"""Input files of ``meshinfer-coord submit`` after session 30: one net for a reader's unforeseen
error (in :mod:`coordinator.input_files`, naming the file), comments between the pixel values of
an ASCII PGM, and PNG/JPEG headers read without the (process-wide) warnings machinery.

The CLI runs in process (``main(argv)``) against the scripted HTTP server of
:mod:`tests.test_client_config_hunt` on loopback.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator import input_files
from coordinator.cli import main as coord_main
from coordinator.input_files import load_inputs
from meshinfer.errors import ConfigError
from tests.test_client_config_hunt import TOKEN, ScriptedServer, one_line_error
from tests.test_inputs_fixes29 import LARGE_PNGS, bilevel_png

Image = pytest.importorskip("PIL.Image")


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as scripted:
        yield scripted


def submit(server: ScriptedServer, *argv: str) -> int:
    return coord_main(["submit", "--url", server.url, "--timeout", "5", *argv])


# --- one net for a reader's unforeseen error ---------------------------------------------------


def test_an_unforeseen_attribute_error_names_the_file(server, tmp_path, capsys, monkeypatch):
    """The CLI's net (removed) caught an AttributeError as "reading the task's input or stages
    files", naming no file; load_inputs let it out bare. Now the reader's net names the file."""

    def reader(name: str, data: bytes, key: str | None) -> None:
        raise AttributeError("unforeseen")

    monkeypatch.setitem(input_files._READERS, ".csv", reader)
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    path = tmp_path / "rows.csv"
    path.write_text("1,2\n")
    with pytest.raises(ConfigError, match=r"rows\.csv: .*AttributeError: unforeseen"):
        load_inputs([path])
    assert submit(server, "--model", "m@1", "--input", str(path)) == 2
    err = one_line_error(capsys, "meshinfer-coord")
    assert "rows.csv" in err and "unexpected answer" not in err, err
    assert not server.requests


STAGES = {
    "not-json.json": b"[{",
    "not-objects.json": b'["m@1"]',
    "bad-model.json": b'[{"model": "m@"}]',
    "not-utf8.json": b"\xff\xfe[",
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_bad_stages_file_is_one_line_naming_it(server, tmp_path, capsys, monkeypatch, name):
    """Without the CLI's net, the stages reader still names its file and nothing is sent."""
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    (tmp_path / "rows.csv").write_text("1,2\n")
    (tmp_path / name).write_bytes(STAGES[name])
    argv = ["--stages", str(tmp_path / name), "--input", str(tmp_path / "rows.csv")]
    assert submit(server, *argv) == 2
    err = one_line_error(capsys, "meshinfer-coord")
    assert name in err and "unexpected answer" not in err, err
    assert not server.requests


@pytest.mark.parametrize("where", ["missing.bin", "a-directory"])
def test_a_revocation_list_not_read_is_one_line_naming_it(server, tmp_path, capsys, where):
    (tmp_path / "a-directory").mkdir()
    argv = ["--url", server.url, "--token-file", str(tmp_path / "token"), "--timeout", "5"]
    (tmp_path / "token").write_text(TOKEN)
    assert coord_main(["revocations", *argv, "--push", str(tmp_path / where)]) == 2
    err = one_line_error(capsys, "meshinfer-coord")
    assert where in err and "unexpected answer" not in err, err
    assert not server.requests


def test_nan_in_a_later_file_names_that_file(tmp_path):
    """Each file is checked for NaN/infinity as it is read (the pass over all rows is gone)."""
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.ones((2, 3)))
    np.save(bad, np.array([[1.0, 2.0, np.inf]]))
    with pytest.raises(ConfigError, match=r"bad\.npy: holds NaN or infinite values"):
        load_inputs([good, bad])
    assert load_inputs([good, good], dtype="float16").shape == (4, 3)


# --- ASCII PGM: comments between pixel values --------------------------------------------------

DIGIT = np.zeros((8, 8), dtype=np.uint8)
DIGIT[2:6, 3:5] = 16  # maxval 16: the row is the pixel counts / 16, exactly


def p2(rows: list[bytes]) -> bytes:
    return b"P2\n# header comment\n8 8\n16\n" + b"".join(rows)


def plain_rows() -> list[bytes]:
    return [b" ".join(b"%d" % v for v in row) + b"\n" for row in DIGIT]


@pytest.mark.parametrize(
    "commented",
    [
        pytest.param(lambda rows: [b"# row %d\n" % i + r for i, r in enumerate(rows)], id="lines"),
        pytest.param(lambda rows: [r.replace(b"\n", b" # end\r\n") for r in rows], id="trailing"),
        pytest.param(lambda rows: [r.replace(b"\n", b"#touching\n") for r in rows], id="touching"),
        pytest.param(lambda rows: [*rows, b"# the end, no newline"], id="last"),
    ],
)
def test_p2_comments_between_pixel_values_are_ignored(tmp_path, commented):
    """pbmplus' pgm(5): characters from a '#' to the next end-of-line are ignored (libnetpbm's
    plain reader skips them in the raster too); they were refused as "not numbers"."""
    path = tmp_path / "d.pgm"
    path.write_bytes(p2(commented(plain_rows())))
    np.testing.assert_array_equal(load_inputs([path])[0], DIGIT.ravel() / 16)


def test_a_comment_ends_a_p2_number_and_hides_what_follows_on_its_line(tmp_path):
    """As libnetpbm reads it: "1#6 7\\n6" is the values 1 and 6 (the 6 7 are the comment's)."""
    path = tmp_path / "d.pgm"
    path.write_bytes(b"P2 2 1 16\n1#6 7\n6\n")
    assert path.read_bytes().count(b"#") == 1
    expected = load_inputs([_written(tmp_path / "plain.pgm", b"P2 2 1 16\n1 6\n")])
    np.testing.assert_array_equal(load_inputs([path]), expected)


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"P2 2 x 16\n1 2 3 4\n", r"not a PGM image \(P2 or P5 header expected\)"),
        (b"P5 2 2 -1\n\x00\x00\x00\x00", r"not a PGM image"),
        (b"P2 2 2 16\n1 2 x 4\n", r"PGM pixel data is truncated or not numbers"),
        (b"P2 2 2 16\n1 2 3 # 4\n", r"PGM pixel data is truncated or not numbers"),
        (b"P2 2 2 16\n1 2 3 \xd9\xa3\n", r"PGM pixel data is truncated or not numbers"),
        (b"P2 2 2 16\n1 2 3 " + b"1" * 10 + b"\n", r"PGM pixel value out of range"),
        (b"P2 2 2 " + b"1" * 10 + b"\n1 2 3 4\n", r"PGM size or maxval out of range"),
    ],
    ids=["header-letter", "header-sign", "pixel-letter", "commented-out", "non-ascii", "pixel-10",
         "maxval-10"],
)  # fmt: skip
def test_pgm_numbers_are_checked_in_one_way(tmp_path, data, message):
    path = tmp_path / "d.pgm"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=rf"d\.pgm: {message}"):
        load_inputs([path])


# --- PNG and JPEG: headers read without the warnings machinery ---------------------------------


class CountedCatchWarnings(warnings.catch_warnings):
    """``warnings.catch_warnings`` counting its uses (process-wide state, unsafe in threads)."""

    entered = 0

    def __enter__(self):  # type: ignore[no-untyped-def]
        type(self).entered += 1
        return super().__enter__()


@pytest.mark.parametrize("which", ["ok", *sorted(LARGE_PNGS)])
def test_a_png_is_read_without_touching_the_warnings_filters(tmp_path, monkeypatch, which):
    """``warnings.catch_warnings`` swaps the process's filter list: a thread changing a filter
    meanwhile lost its change. An image is now refused from Pillow's header read alone."""
    width, height, rows = LARGE_PNGS.get(which, (64, 48, None))
    path = tmp_path / f"{which}.png"
    path.write_bytes(bilevel_png(width, height, rows))
    monkeypatch.setattr(warnings, "catch_warnings", CountedCatchWarnings)
    CountedCatchWarnings.entered = 0
    pixel_limit = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    if which == "ok":
        assert load_inputs([path]).shape == (1, 64)
    else:
        with pytest.raises(ConfigError, match=rf"{which}\.png: image of {width}x{height} .*large"):
            load_inputs([path])
    assert CountedCatchWarnings.entered == 0
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == pixel_limit


def test_a_jpeg_still_reads(tmp_path):
    pixels = np.full((40, 40), 255, dtype=np.uint8)
    pixels[10:30, 15:25] = 0
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="JPEG", quality=95)
    path = _written(tmp_path / "d.jpg", out.getvalue())
    assert load_inputs([path]).shape == (1, 64)


def test_an_image_neither_png_nor_jpeg_is_refused_naming_the_file(tmp_path):
    """Image.open read any format Pillow knows under a .png or .jpg name (a GIF, whose reader
    runs its own bomb checks); the readers now are PNG's and JPEG's only, as documented."""
    out = io.BytesIO()
    Image.new("L", (8, 8), 255).save(out, format="GIF")
    path = _written(tmp_path / "d.png", out.getvalue())
    with pytest.raises(ConfigError, match=r"d\.png: not a readable image \(neither PNG nor JPEG"):
        load_inputs([path])
