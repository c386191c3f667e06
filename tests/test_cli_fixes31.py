"""Session 31, ``meshinfer-coord`` task commands: who is at fault for a stray error follows from
where it was raised (a command's local step, before any request: the input; its request step:
the coordinator's answer), and PNG/JPEG are opened by ``PIL.Image.open`` restricted to those
formats, an image too large still refused from its header without any Pillow warning.

The CLI runs in process (``main(argv)``) against the scripted HTTP server of
:mod:`tests.test_client_config_hunt` on loopback.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import cli_tasks, digit_images
from coordinator.cli import main as coord_main
from coordinator.input_files import load_inputs
from coordinator.task_arguments import budget_seconds
from meshinfer.errors import ConfigError
from meshinfer.proto.tasks import MAX_DEADLINE_S
from tests.test_client_config_hunt import TOKEN, ScriptedServer, one_line_error
from tests.test_inputs_fixes29 import _chunk

Image = pytest.importorskip("PIL.Image")


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as scripted:
        yield scripted


def _submit(server: ScriptedServer, tmp_path: Path) -> int:
    rows = tmp_path / "rows.json"
    rows.write_text("[[1, 2], [3, 4]]")
    argv = ["submit", "--url", server.url, "--timeout", "5", "--model", "m@1"]
    return coord_main([*argv, "--input", str(rows)])


# --- local step or request step ----------------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError, KeyError, OverflowError])
def test_a_stray_error_of_a_local_step_is_bad_input_and_nothing_is_sent(
    server, tmp_path, capsys, monkeypatch, error
):
    """A new local step of ``submit`` (a stand-in for the task document) raising an error that
    names no file: it read as "unexpected answer from the coordinator" (an OverflowError: a
    traceback), though nothing had been sent."""

    def task_document(args: object, inputs: np.ndarray) -> dict[str, object]:
        raise error("rows and models disagree")

    monkeypatch.setattr(cli_tasks, "task_document", task_document)
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    assert _submit(server, tmp_path) == 2
    err = one_line_error(capsys, "meshinfer-coord")
    assert "submit: bad input, nothing was sent to the coordinator" in err, err
    assert f"{error.__name__}: " in err and "rows and models disagree" in err, err
    assert "unexpected answer" not in err, err
    assert server.requests == []


def test_a_stray_error_reading_the_answer_is_still_the_coordinators(
    server, tmp_path, capsys, monkeypatch
):
    server.script("POST", "/v1/tasks", {"state": "queued"}, status=201)  # no task_id
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    assert _submit(server, tmp_path) == 2
    err = one_line_error(capsys, "meshinfer-coord")
    assert "unexpected answer from the coordinator (KeyError: 'task_id')" in err, err
    assert server.requests == ["POST /v1/tasks"]


# --- PNG and JPEG through Image.open ------------------------------------------------------------


def _jpeg(width: int = 40, height: int = 40) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 255).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its baseline frame header (SOF0) declaring ``width`` x ``height``."""
    sof = jpeg.index(b"\xff\xc0")
    size = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return jpeg[: sof + 5] + size + jpeg[sof + 9 :]


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("width", "height"), [(65000, 65000), (16385, 8), (8192, 8192)])
def test_a_jpeg_too_large_is_refused_from_its_header_without_a_warning(tmp_path, width, height):
    """4.2G pixels (Pillow's own bomb error), one pixel over the side limit, and 67M pixels
    (under Pillow's limits, over ours): each refused with our message, no warning raised."""
    path = _written(tmp_path / "big.jpg", _with_frame_size(_jpeg(), width, height))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning included
        with pytest.raises(ConfigError, match=rf"big\.jpg: image of {width}x{height} .*large"):
            load_inputs([path])


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_another_format_under_an_image_name_is_refused(tmp_path, fmt, suffix):
    out = io.BytesIO()
    Image.new("L", (8, 8), 255).save(out, format=fmt)
    path = _written(tmp_path / f"d{suffix}", out.getvalue())
    with pytest.raises(ConfigError, match=rf"d\{suffix}: not a readable image \(neither PNG nor"):
        load_inputs([path])


#: A PNG whose IHDR names an unknown filter method (Pillow's reader refuses it).
BAD_FILTER_PNG = b"\x89PNG\r\n\x1a\n" + _chunk(
    b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 1, 0)
)


@pytest.mark.parametrize(
    ("suffix", "data", "kind"),
    [(".png", BAD_FILTER_PNG, "PNG"), (".jpg", b"\xff\xd8\xff nope", "JPEG")],
)
def test_a_malformed_header_names_the_format(tmp_path, suffix, data, kind):
    path = _written(tmp_path / f"bad{suffix}", data)
    with pytest.raises(ConfigError, match=rf"bad\{suffix}: not a readable image .*{kind}"):
        load_inputs([path])


def test_a_png_and_a_jpeg_still_read_under_either_name(tmp_path):
    """A file's content decides between PNG and JPEG (as documented), not its name."""
    png = io.BytesIO()
    Image.new("L", (16, 16), 255).save(png, format="PNG")
    for name, data in [("a.png", png.getvalue()), ("b.jpg", _jpeg()), ("c.png", _jpeg())]:
        assert load_inputs([_written(tmp_path / name, data)]).shape == (1, 64)


@pytest.mark.parametrize("option", ["--deadline", "--aggregation-timeout"])
@pytest.mark.parametrize("value", ["2592001", "1e12", "1e308"])
def test_a_task_budget_past_the_coordinators_bound_is_a_usage_error(capsys, option, value):
    """The coordinator refuses a ``deadline_s``/``aggregation_timeout_s`` past MAX_DEADLINE_S
    (30 days): ``submit`` says so before reading any input or sending anything (exit 2)."""
    offline = ("--url", "http://127.0.0.1:9", "--timeout", "1")  # never contacted
    argv = ["submit", *offline, "--model", "x", "--input", "f.npy", option, value]
    assert coord_main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "30 days" in err and "Traceback" not in err, err


def test_a_task_budget_at_the_bound_is_taken():
    assert budget_seconds(str(MAX_DEADLINE_S)) == MAX_DEADLINE_S


# --- the image header walkers: any bytes end in an image or a clear error ----------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([_PNG_SIGNATURE, b"\xff\xd8\xff", b"\xff\xd8\xff\xc0\x00\x11\x08"]),
    body=st.binary(max_size=512),
)
def test_arbitrary_bytes_after_an_image_signature_are_read_or_refused_clearly(prefix, body):
    """The header walkers (sizes checked before Pillow opens the file) and Pillow's readers
    behind them: whatever follows the signature, the reader returns the model's row or raises
    the ConfigError naming the file, never another exception."""
    data = prefix + body
    try:
        row = digit_images.read_image("fuzz.png", data, None)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.png: ")
    else:
        assert row.shape == (1, 64) and np.isfinite(row).all()
    assert isinstance(digit_images._png_sizes(data), list)
    assert isinstance(digit_images._jpeg_sizes(data), list)
