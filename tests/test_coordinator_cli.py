"""The task commands of ``meshinfer-coord`` and the HTTP client behind them.

Input files are real files in ``tmp_path``; tables are rendered from API documents; the client's
error mapping runs against real sockets; the end-to-end tests start a real coordinator, a real
node daemon (TCP, Noise, mDNS, SQLite) and the real :class:`CoordinatorApi` in this process and
run ``coordinator.cli.main`` in a worker thread, the way an operator's shell would.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import coordinator.daemon as coordinator_daemon
from coordinator import config as coord_config
from coordinator.api import CoordinatorApi
from coordinator.cli import main
from coordinator.client import (
    ENV_TOKEN,
    ENV_URL,
    ApiError,
    CoordinatorClient,
    array_from_json,
    resolve_endpoint,
    tensor_json,
)
from coordinator.daemon import CoordinatorDaemon
from coordinator.digit_images import image_row
from coordinator.input_files import load_inputs, parse_input
from coordinator.journal import Journal
from coordinator.journal_files import JournalFileError
from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.task_arguments import parse_since
from coordinator.task_views import (
    format_table,
    progress_line,
    render_nodes,
    render_result,
    render_stats,
    render_task,
    render_tasks,
    utc_iso,
)
from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.errors import ConfigError, InferenceError, MeshInferError, RemoteProtocolError
from meshinfer.identity_files import NodeDirectory
from meshinfer.inference.base import ModelRef
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.proto.membership import MembershipConfig
from meshinfer.proto.tasks import Pattern, TaskSpec, TaskState
from meshinfer.proto.tasks_wire import Tensor
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.cluster import LocalCluster
from meshinfer.transport.base import Address
from node.config import load_config
from node.daemon import NodeDaemon
from tests.helpers import until
from tests.test_coordinator_service import hold_inference

DIGITS = ModelRef("digits-mlp", "1")
OFFLINE = ("--url", "http://127.0.0.1:9", "--timeout", "1")  # never contacted by these tests


def digit(index: int) -> tuple[np.ndarray, int]:
    """Raw 8x8 holdout digit (0..16 counts) and its label."""
    x, y = load_digits_holdout()
    return np.rint(x[index] * 16).reshape(8, 8), int(y[index])


def full_range_digit() -> tuple[np.ndarray, int]:
    """A holdout digit whose pixels span 0..16 (contrast stretching leaves it unchanged)."""
    x, _ = load_digits_holdout()
    index = next(i for i in range(len(x)) if x[i].min() == 0 and x[i].max() == 1)
    return digit(index)[0], index


def dark_on_light(raw: np.ndarray, scale: int = 4) -> np.ndarray:
    """A digit as a photographer would give it: dark ink on white, ``scale`` times larger."""
    return np.kron(16 - raw, np.ones((scale, scale)))


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("meshinfer-coord: error:"), err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- input files -----------------------------------------------------------------------------


def test_npy_rows_are_cast_to_float32(tmp_path):
    rows = np.arange(6 * 64, dtype=np.float64).reshape(6, 64) / 7
    np.save(tmp_path / "x.npy", rows)
    got = load_inputs([tmp_path / "x.npy"])
    assert got.dtype == np.float32 and got.shape == (6, 64)
    np.testing.assert_array_equal(got, rows.astype(np.float32))


def test_one_dimensional_input_is_one_row(tmp_path):
    np.save(tmp_path / "row.npy", np.arange(64, dtype=np.int64))
    got = load_inputs([tmp_path / "row.npy"], dtype="int64")
    assert got.shape == (1, 64) and got.dtype == np.int64 and got[0, 63] == 63


def test_npz_takes_the_first_array_or_the_named_one(tmp_path):
    first, second = np.ones((2, 64)), np.zeros((3, 64))
    np.savez(tmp_path / "a.npz", first=first, second=second)
    assert load_inputs([tmp_path / "a.npz"]).shape == (2, 64)
    assert load_inputs([tmp_path / "a.npz"], key="second").shape == (3, 64)
    with pytest.raises(ConfigError, match="no array 'third'; it holds first, second"):
        load_inputs([tmp_path / "a.npz"], key="third")


def test_key_applies_to_npz_inputs_only(tmp_path):
    np.savez(tmp_path / "a.npz", first=np.ones((1, 2)), second=np.zeros((1, 2)))
    (tmp_path / "b.csv").write_text("5,6\n")
    got = load_inputs([tmp_path / "a.npz", tmp_path / "b.csv"], key="second")
    np.testing.assert_array_equal(got, [[0, 0], [5, 6]])
    with pytest.raises(ConfigError, match="no input is one"):
        load_inputs([tmp_path / "b.csv"], key="second")


def test_npy_header_claiming_a_huge_array_is_refused():
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    )
    data = b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + bytes(64)
    with pytest.raises(ConfigError, match=r"huge\.npy: not a readable \.npy file"):
        parse_input("huge.npy", data)


def test_json_rows_one_row_and_tensor_documents(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([[1, 2.5], [3, 4]]))
    (tmp_path / "row.json").write_text(json.dumps([1, 2, 3]))
    array = np.arange(8, dtype=np.float32).reshape(2, 4)
    (tmp_path / "tensor.json").write_text(json.dumps(tensor_json(array)))
    np.testing.assert_array_equal(load_inputs([tmp_path / "rows.json"]), [[1, 2.5], [3, 4]])
    assert load_inputs([tmp_path / "row.json"]).shape == (1, 3)
    np.testing.assert_array_equal(load_inputs([tmp_path / "tensor.json"]), array)


def test_csv_with_and_without_a_header(tmp_path):
    (tmp_path / "plain.csv").write_text("1,2,3\n4,5,6\n\n")
    (tmp_path / "header.csv").write_text("a,b,c\n1,2,3\n")
    np.testing.assert_array_equal(load_inputs([tmp_path / "plain.csv"]), [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(load_inputs([tmp_path / "header.csv"]), [[1, 2, 3]])


def test_several_inputs_are_concatenated(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((2, 3)))
    (tmp_path / "b.csv").write_text("7,8,9\n")
    got = load_inputs([tmp_path / "a.npy", tmp_path / "b.csv"])
    np.testing.assert_array_equal(got, [[1, 1, 1], [1, 1, 1], [7, 8, 9]])
    (tmp_path / "c.csv").write_text("1,2\n")
    with pytest.raises(ConfigError, match="disagree on the row shape"):
        load_inputs([tmp_path / "a.npy", tmp_path / "c.csv"])


@pytest.mark.parametrize("magic", ["P5", "P2"])
def test_pgm_digit_becomes_the_models_row(tmp_path, magic):
    raw, _ = full_range_digit()
    image = dark_on_light(raw).astype(np.uint8)  # maxval 16: exact pixel counts
    header = f"{magic}\n# a comment\n{image.shape[1]} {image.shape[0]}\n16\n".encode()
    body = image.tobytes() if magic == "P5" else " ".join(map(str, image.ravel())).encode()
    (tmp_path / "d.pgm").write_bytes(header + body)
    row = load_inputs([tmp_path / "d.pgm"])
    assert row.shape == (1, 64) and row.dtype == np.float32
    np.testing.assert_array_equal(row[0], (raw / 16).ravel().astype(np.float32))


def test_sixteen_bit_pgm(tmp_path):
    raw, _ = full_range_digit()
    image = (dark_on_light(raw, 2) * 4095).astype(">u2")
    header = f"P5 {image.shape[1]} {image.shape[0]} 65520\n".encode()
    (tmp_path / "d.pgm").write_bytes(header + image.tobytes())
    np.testing.assert_array_equal(load_inputs([tmp_path / "d.pgm"])[0], (raw / 16).ravel())


def test_png_digit_becomes_the_models_row(tmp_path):
    raw, _ = full_range_digit()
    pixels = np.rint(dark_on_light(raw, 3) * 255 / 16).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "d.png")
    Image.fromarray(np.stack([pixels] * 3, axis=-1), mode="RGB").save(tmp_path / "rgb.png")
    expected = (raw / 16).ravel().astype(np.float32)
    np.testing.assert_array_equal(load_inputs([tmp_path / "d.png"])[0], expected)
    np.testing.assert_array_equal(load_inputs([tmp_path / "rgb.png"])[0], expected)


def test_jpeg_digit_is_close_to_the_models_row(tmp_path):
    raw, _ = full_range_digit()
    pixels = np.rint(dark_on_light(raw, 8) * 255 / 16).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "d.jpg", quality=95)
    row = load_inputs([tmp_path / "d.jpg"])[0]
    assert np.abs(row - (raw / 16).ravel()).max() <= 2 / 16


def test_light_ink_on_dark_is_not_inverted():
    raw, _ = full_range_digit()
    row = image_row(np.kron(raw / 16, np.ones((5, 5))))
    np.testing.assert_array_equal(row[0], (raw / 16).ravel())


def test_small_images_are_enlarged():
    row = image_row(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert row.shape == (1, 64)
    assert row[0, 0] == 0 and row[0, 7] == 1 and row[0, 63] == 0


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40),
                  elements=st.floats(0, 1)))  # fmt: skip
def test_image_row_is_always_64_digit_levels(gray):
    row = image_row(gray)
    assert row.shape == (1, 64)
    levels = row * 16
    assert np.array_equal(levels, np.rint(levels)) and levels.min() >= 0 and levels.max() <= 16


def test_png_without_pillow_says_to_install_it(tmp_path, monkeypatch):
    Image.new("L", (8, 8)).save(tmp_path / "d.png")
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails
    with pytest.raises(ConfigError, match=r"needs Pillow \(pip install pillow\)"):
        load_inputs([tmp_path / "d.png"])


BAD_FILES = {
    "bad.npy": b"\x93NUMPY garbage",
    "bad.npz": b"PK\x03\x04 not really a zip",
    "bad.json": b"[[1, 2], [3]]",
    "text.json": b'[["a", "b"]]',
    "broken.json": b"[1, 2",
    "bad.csv": b"1,2\n3,x\n",
    "ragged.csv": b"1,2\n3\n",
    "bad.pgm": b"P5\n4 4\n255\n\x00\x01",
    "notpgm.pgm": b"P6\n4 4\n255\n",
    "bad.png": b"\x89PNG\r\n\x1a\n truncated",
    "bad.jpg": b"\xff\xd8\xff nope",
    "empty.json": b"[]",
    "x.bmp": b"BM",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_malformed_input_is_one_clear_line_and_exit_2(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setenv(ENV_TOKEN, "t" * 32)
    (tmp_path / name).write_bytes(BAD_FILES[name])
    code = main(["submit", *OFFLINE, "--model", "digits-mlp", "--input", str(tmp_path / name)])
    assert code == 2
    one_line_error(capsys, name)


def test_missing_input_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV_TOKEN, "t" * 32)
    code = main(["submit", *OFFLINE, "--model", "m", "--input", str(tmp_path / "none.npy")])
    assert code == 2
    one_line_error(capsys, "input not found", "none.npy")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([".npy", ".npz", ".json", ".csv", ".pgm", ".png", ".jpg"]),
       st.binary(max_size=300))  # fmt: skip
def test_parse_input_fuzz_raises_only_config_errors(suffix, data):
    try:
        array = parse_input("fuzz" + suffix, data)
    except ConfigError:
        return
    assert isinstance(array, np.ndarray)


# --- tensors ---------------------------------------------------------------------------------

WIRE = st.sampled_from(["float32", "float16", "int64", "int32", "uint8", "bool"])


@settings(max_examples=200, deadline=None)
@given(WIRE.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=4))))
def test_tensor_json_round_trips(array):
    doc = json.loads(json.dumps(tensor_json(array)))
    back = array_from_json(doc)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=20,
)  # fmt: skip
TENSORISH = st.fixed_dictionaries(
    {},
    optional={"dtype": WIRE | st.text(max_size=6), "shape": st.lists(st.integers(-2, 9)) | JSON,
              "data_b64": st.text(max_size=24) | JSON, "values": JSON},
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(JSON | TENSORISH)
def test_array_from_json_fuzz_raises_only_remote_protocol_errors(doc):
    try:
        array = array_from_json(doc)
    except RemoteProtocolError:
        return
    assert isinstance(array, np.ndarray)


def test_array_from_json_values_form():
    np.testing.assert_array_equal(array_from_json({"values": [[1, 2]]}), [[1.0, 2.0]])
    assert array_from_json({"values": [1, 2], "dtype": "int32"}).dtype == np.int32
    with pytest.raises(RemoteProtocolError, match="different lengths"):
        array_from_json({"values": [[1, 2], [3]]})
    with pytest.raises(RemoteProtocolError, match="whole numbers in the uint8 range"):
        array_from_json({"values": [256], "dtype": "uint8"})
    with pytest.raises(RemoteProtocolError, match="whole numbers in the int32 range"):
        array_from_json({"values": [1.5], "dtype": "int32"})
    with pytest.raises(RemoteProtocolError, match="out of the float16 range"):
        array_from_json({"values": [1e6], "dtype": "float16"})


def test_array_from_json_integers_are_exact_or_refused():
    exact = array_from_json({"values": [[2**53 + 1, -(2**63)]], "dtype": "int64"})
    assert exact.tolist() == [[2**53 + 1, -(2**63)]]  # not rounded through float64
    for beyond in (2**63, -(2**63) - 1, 1e19):
        with pytest.raises(RemoteProtocolError, match="whole numbers in the int64 range"):
            array_from_json({"values": [beyond], "dtype": "int64"})
    with pytest.raises(RemoteProtocolError, match="out of the float32 range"):
        array_from_json({"values": [[10**400]]})  # not "rows have different lengths"


def test_tensor_json_refuses_float64():
    with pytest.raises(MeshInferError, match="float64 cannot be sent"):
        tensor_json(np.zeros(3))


# --- arguments -------------------------------------------------------------------------------


def test_parse_since_forms():
    now = 1_700_000_000.0
    assert parse_since("90s", now) == now - 90
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1.5d", now) == now - 1.5 * 86400
    assert parse_since("1699999000", now) == 1_699_999_000
    assert parse_since("2023-11-14T22:13:20Z", now) == 1_700_000_000
    assert parse_since("2023-11-14T22:13:20", now) == 1_700_000_000  # naive: UTC
    for text in ("nan", "inf", "1e999"):
        with pytest.raises(ConfigError, match="not a finite number"):
            parse_since(text, now)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["tasks", "--since", "yesterday"], "--since 'yesterday'"),
        (["tasks", "--limit", "0"], "not a positive integer"),
        (["tasks", "--limit", "1001"], "over 1000"),
        (["submit", "--model", "x@", "--input", "f.npy"], "ID@VERSION"),
        (["submit", "--model", "x", "--input", "f.npy", "--policy", "fastest"], "--policy"),
        (["submit", "--model", "x", "--input", "f.npy", "--deadline", "-1"], "seconds"),
        (["status"], "TASK_ID"),
        (["submit", "--model", "x", "--input", "f.npy", "--quorum", "0"],
         "argument --quorum: '0' is not a positive integer"),
        (["submit", "--model", "x", "--input", "f.npy", "--quorum", "2.5"],
         "argument --quorum: '2.5' is not a positive integer"),
        (["submit", "--model", "x", "--input", "f.npy", "--min-responses", "-1"],
         "argument --min-responses: '-1' is not a positive integer"),
        (["submit", "--model", "x", "--input", "f.npy", "--aggregation-timeout", "nan"],
         "argument --aggregation-timeout: 'nan' is not a positive number of seconds"),
        (["submit", "--model", "x", "--input", "f.npy", "--aggregation-timeout", "0"],
         "argument --aggregation-timeout: '0' is not a positive number of seconds"),
        (["submit", "--model", "x", "--input", "f.npy", "--weight", "x"],
         "argument --weight: weight 'x' must look like ID[@VER]=WEIGHT"),
        (["submit", "--model", "x", "--input", "f.npy", "--weight", "x=0"],
         "argument --weight: weight '0' is not a positive, finite number"),
        (["submit", "--model", "x", "--input", "f.npy", "--weight", "x=inf"],
         "argument --weight: weight 'inf' is not a positive, finite number"),
        (["submit", "--model", "x", "--input", "f.npy", "--weight", "x=heavy"],
         "argument --weight: weight 'heavy' is not a positive, finite number"),
        (["submit", "--model", "x", "--input", "f.npy", "--weight", "x@=2"],
         "argument --weight: model 'x@' must look like ID or ID@VERSION"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2(capsys, argv, fragment):
    assert main([argv[0], *OFFLINE, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("timeout", ["1e308", "1e10", "86401"])
def test_a_request_timeout_over_a_day_is_a_usage_error(capsys, monkeypatch, timeout):
    monkeypatch.setenv(ENV_TOKEN, "t" * 32)  # else the missing token is the error
    assert main(["nodes", *OFFLINE, "--timeout", timeout]) == 2
    err = capsys.readouterr().err
    assert "argument --timeout" in err and "Traceback" not in err, err


def test_config_check_refuses_what_serve_would_refuse(tmp_path, capsys):
    path = tmp_path / "coordinator.toml"
    path.write_text("[coordinator]\nretention_days = 1e304\n")  # 8.64e308 s: inf
    assert main(["config", "--check", str(path)]) == 2
    one_line_error(capsys, "[coordinator] retention_days")


def test_no_coordinator_given_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV_URL, raising=False)
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    assert main(["nodes"]) == 2
    one_line_error(capsys, "--url", "--data-dir", ENV_URL)
    assert main(["nodes", "--url", "http://127.0.0.1:9"]) == 2
    one_line_error(capsys, "--token-file", ENV_TOKEN)
    assert main(["nodes", "--data-dir", str(tmp_path)]) == 2
    one_line_error(capsys, "runtime.json", "no running coordinator")


def test_endpoint_resolution_order(tmp_path):
    token_file = tmp_path / "api-token"
    token_file.write_text("from-file-token\n")
    (tmp_path / "runtime.json").write_text(
        json.dumps({"api": "http://10.0.0.1:1/", "token_file": "api-token", "pid": 1})
    )
    env = {ENV_URL: "http://env:2", ENV_TOKEN: "env-token"}
    found = resolve_endpoint(environ=env)
    assert (found.url, found.token) == ("http://env:2", "env-token")
    found = resolve_endpoint(data_dir=tmp_path, environ=env)
    assert (found.url, found.token) == ("http://10.0.0.1:1", "from-file-token")
    found = resolve_endpoint(url="http://cli:3", data_dir=tmp_path, environ=env)
    assert found.url == "http://cli:3" and found.token == "from-file-token"
    with pytest.raises(ConfigError, match="must look like http://HOST:PORT"):
        resolve_endpoint(url="10.0.0.1:7950", environ=env)
    with pytest.raises(ConfigError, match="one line of printable characters"):
        resolve_endpoint(environ={ENV_URL: "http://x:1", ENV_TOKEN: "two words"})
    (tmp_path / "runtime.json").write_text(json.dumps({"api": None, "token_file": None}))
    with pytest.raises(ConfigError, match="without its HTTP API"):
        resolve_endpoint(data_dir=tmp_path, environ={})
    for url in ("http://[::1", "http://host:port", "http://:80"):
        with pytest.raises(ConfigError, match="must look like http://HOST:PORT"):
            resolve_endpoint(url=url, environ=env)
    for facts in ({"api": 5, "token_file": None}, {"api": "http://a:1", "token_file": 5}):
        (tmp_path / "runtime.json").write_text(json.dumps(facts))
        with pytest.raises(ConfigError, match="must be a string or null"):
            resolve_endpoint(data_dir=tmp_path, environ={})


def test_submit_document_and_default_patterns(tmp_path):
    from coordinator.cli import build_parser
    from coordinator.task_arguments import task_document

    (tmp_path / "stages.json").write_text(json.dumps({"stages": [
        {"name": "a", "model": "digits-mlp@1"},
        {"name": "b", "model": {"model_id": "synthetic-mlp", "version": "w10-d1"},
         "after": ["a"]},
    ]}))  # fmt: skip
    parse = build_parser().parse_args
    rows = np.zeros((3, 64), np.float32)
    many = np.zeros((300, 64), np.float32)

    def doc(*argv, x=rows):
        return task_document(parse(["submit", *argv, "--input", "unused.npy"]), x)

    single = doc("--model", "digits-mlp", "--priority", "3", "--deadline", "2.5")
    assert single["pattern"] == "single" and single["priority"] == 3
    assert single["models"] == [{"model_id": "digits-mlp", "version": "1"}]
    assert single["deadline_s"] == 2.5 and "policy" not in single
    np.testing.assert_array_equal(array_from_json(single["inputs"]), rows)
    assert doc("--model", "a@1", "--model", "b@2")["pattern"] == "parallel"
    assert doc("--model", "a@1", x=many)["pattern"] == "batch"
    assert doc("--model", "a@1", "--shard-size", "2")["shard_size"] == 2
    assert doc("--model", "a@1", "--pattern", "batch")["pattern"] == "batch"
    pipeline = doc("--stages", str(tmp_path / "stages.json"), "--task-id", "p1")
    assert pipeline["pattern"] == "pipeline" and pipeline["task_id"] == "p1"
    assert pipeline["stages"][0]["model"] == {"model_id": "digits-mlp", "version": "1"}
    assert "models" not in pipeline
    with pytest.raises(ConfigError, match="not both or neither"):
        doc()


def test_submit_aggregation_flags_become_the_documents_options():
    from coordinator.cli import build_parser
    from coordinator.task_arguments import task_document

    def doc(*argv):
        args = build_parser().parse_args(["submit", "--model", "a", "--model", "b@2", *argv,
                                          "--input", "unused.npy"])  # fmt: skip
        return task_document(args, np.zeros((1, 4), np.float32))

    plain = doc()
    assert not {"quorum", "min_responses", "aggregation_timeout_s", "weights"} & set(plain)
    full = doc("--aggregation", "ensemble", "--quorum", "2", "--min-responses", "1",
               "--aggregation-timeout", "1.5", "--weight", "a=2",
               "--weight", "b@2=0.25")  # fmt: skip
    assert full["aggregation"] == "ensemble" and full["quorum"] == 2
    assert full["min_responses"] == 1 and full["aggregation_timeout_s"] == 1.5
    assert full["weights"] == {"a": 2.0, "b@2": 0.25}
    with pytest.raises(ConfigError, match="--weight: model 'a' is weighted twice"):
        doc("--weight", "a=2", "--weight", "a=3")


# --- rendering -------------------------------------------------------------------------------

SUMMARY = {
    "task_id": "t-1", "state": "succeeded", "pattern": "batch", "priority": 2,
    "policy": "round_robin", "created_at": 1_700_000_000.0, "updated_at": 1_700_000_001.5,
    "error": None, "items_total": 3, "items_done": 3,
}  # fmt: skip


def columns_line_up(text: str, header: str, column: str, values: list[str]) -> None:
    """``values`` start exactly below ``column`` in the table beginning at ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    at = lines[start].index(column)
    for line, value in zip(lines[start + 1 :], values, strict=False):
        assert line[at:].startswith(value), (line, value)


def test_utc_iso():
    assert utc_iso(0) == "1970-01-01T00:00:00Z"
    assert utc_iso(1_700_000_000.9) == "2023-11-14T22:13:20Z"
    assert utc_iso(None) == "-"


def test_format_table_aligns_columns():
    text = format_table(("NAME", "N"), [("a", 1), ("longer-name", 100)], right={"N"})
    assert text.splitlines() == ["NAME           N", "a              1", "longer-name  100"]


def test_render_tasks_table_and_next_cursor():
    other = {**SUMMARY, "task_id": "t-22", "state": "failed", "error": "boom\nagain",
             "items_done": 1, "created_at": 0.0}  # fmt: skip
    text = render_tasks({"tasks": [SUMMARY, other], "next_cursor": "17"})
    assert "2023-11-14T22:13:20Z" in text and "1970-01-01T00:00:00Z" in text
    columns_line_up(text, "TASK", "STATE", ["succeeded", "failed"])
    columns_line_up(text, "TASK", "CREATED (UTC)", ["2023-11-14T22:13:20Z", "1970-01-01"])
    assert "boom again" in text and "3/3" in text and "1/3" in text
    assert text.splitlines()[-1] == "(more: --cursor 17, or --all)"
    assert render_tasks({"tasks": [], "next_cursor": None}) == "no tasks"


def test_render_task_with_items_and_result():
    items = [
        {"item_id": "t-1/0", "state": "succeeded", "node": "node-0", "attempt": 1,
         "error": None, "model": "digits-mlp@1"},
        {"item_id": "t-1/1", "state": "succeeded", "node": "node-1", "attempt": 2,
         "refused": 1, "error": "node-0: overloaded", "model": "digits-mlp@1"},
    ]  # fmt: skip
    result = {
        "labels": [3, 1, 3],
        "nodes": {"t-1/0": "node-0", "t-1/1": "node-1"},
        "aggregation": {"mode": "majority", "sources": ["a", "b"], "partial": True},
    }
    text = render_task({**SUMMARY, "items": items, "result": result})
    assert "state     succeeded" in text and "(1.50 s later)" in text
    columns_line_up(text, "ITEM", "NODE", ["node-0", "node-1"])
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("ITEM"))
    end = lines[header].index("ATTEMPT") + len("ATTEMPT")  # a right-aligned column
    first, second = (line[:end] for line in lines[header + 1 : header + 3])
    assert first.endswith("node-0              1") and second.endswith("  2 (1 refused)")
    assert "node-0: overloaded" in text
    assert "labels: 3 rows; first 3: 3 1 3" in text and "counts: 1:1  3:2" in text
    assert "nodes: node-0 (1 item), node-1 (1 item)" in text
    assert "aggregation: majority of a, b (partial)" in text


def test_render_result_of_a_failed_and_a_running_task():
    failed = render_result({**SUMMARY, "state": "failed", "error": "no node", "result": None})
    assert failed.splitlines()[0] == "task t-1: failed (batch, 3/3 items, 1.50 s)"
    assert "error: no node" in failed
    running = render_result({**SUMMARY, "state": "running", "result": None})
    assert "still running" in running
    outputs = {"labels": None, "outputs": [{"dtype": "float32", "shape": [4, 20]}]}
    assert "output 0: float32 [4, 20]" in render_result({**SUMMARY, "result": outputs})
    labels = render_result({**SUMMARY, "result": {"labels": list(range(50))}}, show=5)
    assert "labels: 50 rows; first 5: 0 1 2 3 4" in labels


def test_render_nodes_and_stats():
    nodes = {"nodes": [
        {"node_id": "node-0", "status": "alive", "roles": ["vehicle"], "models": ["m@1", "n@2"],
         "queue_depth": 0, "address": "127.0.0.1:4000", "in_flight": 2, "done": 10,
         "rtt_ms": 0.4321},
        {"node_id": "coord", "status": "suspect", "roles": [], "models": [],
         "queue_depth": 12, "address": "127.0.0.1:4001", "in_flight": 0, "done": 0,
         "rtt_ms": 81.25},
    ]}  # fmt: skip
    gone = {"node_id": "gone", "status": "left", "queue_depth": None, "rtt_ms": None}
    nodes["nodes"].append({**nodes["nodes"][0], **gone})
    text = render_nodes(nodes)
    columns_line_up(text, "NODE", "STATUS", ["alive", "suspect", "left"])
    columns_line_up(text, "NODE", "QUEUE", ["    0", "   12", "    -"])
    columns_line_up(text, "NODE", "RTT MS", ["   0.4", "  81.2", "     -"])
    older = {"nodes": [{k: v for k, v in nodes["nodes"][0].items() if k != "rtt_ms"}]}
    assert render_nodes(older).splitlines()[1].split()[4] == "-"  # a coordinator without it
    assert "m@1,n@2" in text
    assert render_nodes({"nodes": []}) == "no nodes"
    stats = {"tasks": {"succeeded": 4, "failed": 1}, "items": {"succeeded": 9},
             "journal_counters": {"late_result": 2}, "dispatched": 11, "retries": 2, "refusals": 1,
             "redispatched_after_death": 1, "duplicates": 0,
             "completed_by_node": {"node-0": 9}, "live_tasks": 0, "parked_items": 0,
             "inputs_by_reference": 3, "input_bytes_saved": 3 << 19,
             "input_cache_misses": 1}  # fmt: skip
    text = render_stats(stats)
    assert "inputs by ref      3, 1.5 MiB not sent, 1 sent again" in text
    assert "tasks              failed 1, succeeded 4" in text
    assert "dispatched         11, retries 2 (1 refused), redispatched after a node death 1" in text
    assert "done by node       node-0 9" in text and "late_result 2" in text


def test_progress_line():
    line = progress_line({"items_total": 4, "items_done": 1, "state": "running"})
    assert line.rstrip() == "[" + "#" * 7 + "." * 23 + "] 1/4 items  running"
    items = [{"waiting": "no GPU"}, {"waiting": None}, {"waiting": "no GPU"}]
    waiting = progress_line({"items_total": 4, "items_done": 1, "state": "running", "items": items})
    assert waiting.startswith(line) and waiting.endswith("  waiting: no GPU (2 items)")


NOWHERE = "no live, reachable node serves model m@1"


def test_a_waiting_task_shows_why_and_its_deadline():
    items = [
        {"item_id": "t-1/0", "state": "pending", "node": None, "attempt": 1, "error": None,
         "model": "m@1", "waiting": NOWHERE},
        {"item_id": "t-1/1", "state": "retrying", "node": None, "attempt": 2,
         "error": "node-0: overloaded", "model": "m@1", "waiting": "full"},
        {"item_id": "t-1/2", "state": "succeeded", "node": "node-1", "attempt": 1,
         "error": None, "model": "m@1", "waiting": None},
    ]  # fmt: skip
    doc = {**SUMMARY, "state": "dispatched", "items": items, "result": None,
           "deadline_s": 30.0, "expires_at": SUMMARY["created_at"] + 30}  # fmt: skip
    text = render_task(doc)
    assert "deadline  30 s, until 2023-11-14T22:13:50Z" in text
    columns_line_up(text, "ITEM", "ERROR / WAITING", [f"waiting: {NOWHERE}", "waiting: full", "-"])
    assert "deadline" not in render_task({**doc, "deadline_s": None, "expires_at": None})
    assert "aggregate" not in text  # a batch task: no aggregation
    lines = render_result(doc, now=SUMMARY["created_at"] + 4).splitlines()
    assert lines[0] == "task t-1: dispatched (batch, 3/3 items, 4.00 s so far)"
    assert lines[1:] == [
        "still running: see `meshinfer-coord status t-1`",
        f"waiting: {NOWHERE} (1 item)",
        "waiting: full (1 item)",
    ]
    many = [{"waiting": f"reason {i}"} for i in range(5)]
    assert render_result({**doc, "items": many}).splitlines()[-1] == (
        "waiting: ... and 2 other reasons"
    )


# --- client errors ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ApiError, match=f"cannot reach the coordinator at {url}") as caught:
        CoordinatorClient(url, "token", timeout=2).stats()
    assert caught.value.status is None and caught.value.code == "unreachable"


def test_silent_coordinator_times_out():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ApiError, match="no answer from the coordinator") as caught:
            CoordinatorClient(url, "token", timeout=0.3).nodes()
    assert caught.value.code == "timeout"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b'{"error": {"status": 404, "code": "not_found", "message": "no task x"}}',
         "not_found", "no task x (HTTP 404 not_found)"),
        (b"<html>bad gateway</html>", "http_error", "refused the request: <html>bad gateway"),
        (b"", "http_error", "refused the request: no details"),
        (b'{"error": "flat"}', "http_error", 'refused the request: {"error": "flat"}'),
    ],
)  # fmt: skip
def test_error_bodies_become_api_errors(body, code, message):
    from coordinator.client import _error_from_response

    error = _error_from_response(404, body)
    assert isinstance(error, MeshInferError)
    assert (error.status, error.code) == (404, code) and message in str(error)


# --- end to end: CLI -> HTTP -> coordinator -> node daemon -----------------------------------


class Stack:
    """A coordinator with its HTTP API and ``n`` node daemons, all real, in this process."""

    def __init__(self, tmp: Path, n: int = 1, config: CoordinatorConfig | None = None) -> None:
        self.tmp = tmp
        self.cluster = LocalCluster(tmp, fleet_id="cli-test")
        self.names = [f"node-{i}" for i in range(n)]
        self.node_configs = [
            self.cluster.add_node(name, extra="[http]\nenabled = false\n") for name in self.names
        ]
        self.coord_dir = self.cluster.enroll("coord", roles=("coordinator",))
        self.config = config or CoordinatorConfig(item_timeout_s=10.0)
        self.token_file = self.cluster.fleet.api_token_file
        self.daemons: dict[str, NodeDaemon] = {}

    async def __aenter__(self) -> Stack:
        for name, path in zip(self.names, self.node_configs, strict=True):
            daemon = NodeDaemon(load_config(path), rng=random.Random(name))
            await daemon.start()
            self.daemons[name] = daemon
        ident = NodeDirectory(self.coord_dir).load()
        opts = MeshNodeOptions(mdns=MdnsConfig.loopback(), membership=MembershipConfig.test())
        revocations = NodeDirectory(self.coord_dir).revocations(ident.trust)
        self.mesh = MeshNode(ident, revocations, opts)
        await self.mesh.start()
        self.coordinator = Coordinator(self.mesh, self.tmp / "journal.db", self.config)
        await self.coordinator.start()
        self.api = CoordinatorApi(
            self.coordinator, Address("127.0.0.1", 0), self.cluster.token, rng=random.Random(7)
        )
        await self.api.start()
        await until(
            lambda: sum(bool(n["models"]) for n in self.coordinator.nodes()) == len(self.names)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.api.aclose()
        await self.coordinator.aclose()
        await self.mesh.aclose()
        for daemon in self.daemons.values():
            await daemon.aclose()

    async def cli(self, *argv: str) -> int:
        """``meshinfer-coord ARGV --url ... --token-file ...`` in a worker thread."""
        where = ["--url", self.api.url, "--token-file", str(self.token_file)]
        return await asyncio.to_thread(main, [argv[0], *where, *argv[1:]])


def stdout_of(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return captured.out


async def test_submit_wait_status_tasks_nodes_stats(tmp_path, capsys, monkeypatch):
    x, y = load_digits_holdout()
    np.save(tmp_path / "holdout.npy", x)
    np.save(tmp_path / "five.npy", x[:5])
    raw, index = full_range_digit()
    Image.fromarray(np.rint(dark_on_light(raw) * 255 / 16).astype(np.uint8)).save(
        tmp_path / "d.png"
    )
    async with Stack(tmp_path / "mesh") as stack:
        c = stack.coordinator
        engine = stack.daemons["node-0"].engine
        # a batch, waited for with a progress bar
        holdout = str(tmp_path / "holdout.npy")
        code = await stack.cli("submit", "--model", "digits-mlp@1", "--input", holdout,
                               "--shard-size", "40", "--task-id", "big", "--wait", "--progress",
                               "--show", "10")  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "9/9 items" in captured.err and "[" + "#" * 30 + "]" in captured.err
        record = await c.get("big")
        labels = c.result_of(record)["labels"]
        assert (np.array(labels) == y).mean() >= 0.95
        out = captured.out
        assert out.startswith("task big: succeeded (batch, 9/9 items,")
        assert f"labels: {len(y)} rows; first 10: {' '.join(map(str, labels[:10]))}" in out
        counts = re.search(r"counts: (.*)", out).group(1)
        assert f"0:{labels.count(0)}" in counts.split()
        assert "nodes: node-0 (9 items)" in out

        # a single task, raw JSON, outputs decoded back into the model's answer
        assert await stack.cli("submit", "--model", "digits-mlp", "--input",
                               str(tmp_path / "five.npy"), "--wait", "--json") == 0  # fmt: skip
        doc = json.loads(stdout_of(capsys))
        probabilities = array_from_json(doc["result"]["outputs"][0])
        np.testing.assert_allclose(probabilities, await engine.infer(DIGITS, x[:5]), rtol=1e-5)
        assert doc["result"]["labels"] == np.argmax(probabilities, axis=1).tolist()
        five_id = doc["task_id"]
        assert (await c.get(five_id)).state.value == "succeeded"

        # an image, submitted without waiting, found through --data-dir / runtime.json
        runtime = tmp_path / "coord-data"
        runtime.mkdir()
        (runtime / "runtime.json").write_text(
            json.dumps({"api": stack.api.url, "token_file": str(stack.token_file)})
        )
        args = ["submit", "--data-dir", str(runtime), "--model", "digits-mlp@1", "--input",
                str(tmp_path / "d.png"), "--task-id", "img"]  # fmt: skip
        assert await asyncio.to_thread(main, args) == 0
        # the state as the journal had it when the API answered: the item may be out already
        line = stdout_of(capsys).strip()
        assert re.fullmatch(
            r"submitted task img: (pending|dispatched|running|succeeded), 1 item", line
        )
        image_record = await c.wait("img", timeout=10)
        expected = np.argmax(await engine.infer(DIGITS, x[index : index + 1]), axis=1)
        assert c.result_of(image_record)["labels"] == expected.tolist()

        # status: the task table, and the raw document
        assert await stack.cli("status", "big") == 0
        out = stdout_of(capsys)
        assert "task      big" in out and "items     9/9 done" in out
        assert sum(line.startswith("big/") for line in out.splitlines()) == 9
        assert "digits-mlp@1" in out and "node-0" in out
        assert await stack.cli("status", "big", "--json") == 0
        doc = json.loads(stdout_of(capsys))
        assert doc["items_done"] == 9 and "outputs" not in doc["result"]

        # tasks: newest first, pages, --all, filters, JSON
        assert await stack.cli("tasks", "--limit", "2") == 0
        out = stdout_of(capsys)
        rows = [line.split()[0] for line in out.splitlines()[1:] if not line.startswith("(")]
        assert rows == ["img", five_id]
        assert "(more: --cursor" in out
        assert await stack.cli("tasks", "--limit", "2", "--all") == 0
        out = stdout_of(capsys)
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["img", five_id, "big"]
        assert await stack.cli("tasks", "--state", "succeeded", "--since", "1h", "--json") == 0
        page = json.loads(stdout_of(capsys))
        assert {t["task_id"] for t in page["tasks"]} == {"img", five_id, "big"}
        assert await stack.cli("tasks", "--state", "failed") == 0
        assert stdout_of(capsys).strip() == "no tasks"

        # nodes and stats, as tables and as JSON, through the environment variables
        monkeypatch.setenv(ENV_URL, stack.api.url)
        monkeypatch.setenv(ENV_TOKEN, stack.cluster.token)
        assert await asyncio.to_thread(main, ["nodes"]) == 0
        out = stdout_of(capsys)
        line = next(line for line in out.splitlines() if line.startswith("node-0"))
        assert "alive" in line and "digits-mlp@1" in line
        assert await asyncio.to_thread(main, ["nodes", "--json"]) == 0
        assert json.loads(stdout_of(capsys)) == {"nodes": json.loads(json.dumps(c.nodes()))}
        assert await asyncio.to_thread(main, ["stats"]) == 0
        out = stdout_of(capsys)
        assert "tasks              succeeded 3" in out
        assert f"dispatched         {c.stats_.dispatched}," in out
        assert await asyncio.to_thread(main, ["stats", "--json"]) == 0
        assert json.loads(stdout_of(capsys))["tasks"] == {"succeeded": 3}


async def test_wait_timeout_then_cancel(tmp_path, capsys):
    x, _ = load_digits_holdout()
    np.save(tmp_path / "two.npy", x[:2])
    async with Stack(tmp_path / "mesh", config=CoordinatorConfig(item_timeout_s=30)) as stack:
        daemon = stack.daemons["node-0"]
        gate = hold_inference(daemon)  # the item runs until cancelled
        code = await stack.cli("submit", "--model", "digits-mlp@1", "--input",
                               str(tmp_path / "two.npy"), "--task-id", "slow", "--wait",
                               "--wait-timeout", "0.3")  # fmt: skip
        assert code == 3
        out = stdout_of(capsys)
        assert out.startswith("task slow: ") and "still running" in out
        await until(lambda: daemon.executor.running == 1)

        assert await stack.cli("cancel", "slow") == 0
        assert stdout_of(capsys).strip() == "cancelled task slow"
        assert (await stack.coordinator.get("slow")).state.value == "cancelled"
        await until(lambda: daemon.executor.stats.cancelled == 1)
        assert await stack.cli("cancel", "slow", "--json") == 0
        assert json.loads(stdout_of(capsys)) == {
            "task_id": "slow", "cancelled": False, "state": "cancelled"
        }  # fmt: skip
        assert await stack.cli("cancel", "slow") == 0
        assert "not cancelled: it already ended (cancelled)" in stdout_of(capsys)
        gate.set()


async def test_errors_from_a_real_coordinator(tmp_path, capsys):
    x, _ = load_digits_holdout()
    np.save(tmp_path / "one.npy", x[:1])
    (tmp_path / "wrong-token").write_text("not-the-fleet-token\n")
    one_attempt = CoordinatorConfig(item_timeout_s=10, max_attempts=1)
    async with Stack(tmp_path / "mesh", config=one_attempt) as stack:
        url = stack.api.url

        async def broken(ref, batch):
            raise InferenceError("engine exploded")

        stack.daemons["node-0"].engine.infer = broken
        one = str(tmp_path / "one.npy")
        code = await stack.cli("submit", "--model", "digits-mlp", "--input", one,
                               "--task-id", "doomed", "--wait")  # fmt: skip
        assert code == 1
        out = stdout_of(capsys)
        assert out.startswith("task doomed: failed") and "engine exploded" in out
        assert (await stack.coordinator.get("doomed")).state.value == "failed"

        argv = ["nodes", "--url", url, "--token-file", str(tmp_path / "wrong-token")]
        assert await asyncio.to_thread(main, argv) == 2
        one_line_error(capsys, "bearer token", "(HTTP 401 unauthorized)")

        assert await stack.cli("status", "no-such-task") == 2
        one_line_error(capsys, "no-such-task", "(HTTP 404 not_found)")

        code = await stack.cli("submit", "--model", "digits-mlp", "--pattern", "single",
                               "--model", "digits-mlp-wide", "--input", one)  # fmt: skip
        assert code == 2
        one_line_error(capsys, "(HTTP 400 invalid_task)")

        # the same task id with another spec: 409; with the same spec: idempotent
        base = ["submit", "--model", "digits-mlp", "--input", one]
        assert await stack.cli(*base, "--task-id", "doomed", "--priority", "5") == 2
        one_line_error(capsys, "(HTTP 409 conflict)")

        client = CoordinatorClient(url, stack.cluster.token)
        assert await asyncio.to_thread(client.health) == {"status": "ok"}
        with pytest.raises(ApiError, match="not a JSON object") as caught:
            await asyncio.to_thread(client._request, "GET", "/metrics")  # Prometheus text
        assert caught.value.code == "bad_response" and caught.value.status == 200
        tasks = await asyncio.to_thread(lambda: list(client.iter_tasks(limit=1)))
        assert [t["task_id"] for t in tasks] == ["doomed"]


async def test_submit_aggregation_flags_reach_the_journaled_spec(tmp_path, capsys):
    x, _ = load_digits_holdout()
    np.save(tmp_path / "ten.npy", x[:10])
    ten = str(tmp_path / "ten.npy")
    models = ["--model", "digits-mlp", "--model", "digits-mlp-wide@1", "--model",
              "digits-mlp-deep"]  # fmt: skip
    async with Stack(tmp_path / "mesh") as stack:
        c = stack.coordinator
        code = await stack.cli("submit", *models, "--input", ten, "--task-id", "ens",
                               "--aggregation", "ensemble", "--quorum", "2", "--min-responses",
                               "2", "--aggregation-timeout", "20", "--deadline", "30",
                               "--weight", "digits-mlp=3", "--weight", "digits-mlp-deep@1=0.5",
                               "--wait", "--json")  # fmt: skip
        assert code == 0
        doc = json.loads(stdout_of(capsys))
        spec = (await c.get("ens")).spec
        assert (spec.aggregation, spec.quorum, spec.min_responses) == ("ensemble", 2, 2)
        assert spec.aggregation_timeout_s == 20.0 and spec.deadline_s == 30.0
        assert spec.weights == {DIGITS: 3.0, ModelRef("digits-mlp-deep"): 0.5}
        assert doc["result"]["aggregation"]["mode"] == "ensemble"
        assert len(doc["result"]["aggregation"]["sources"]) == 2  # the quorum, then done

        # no --aggregation: the coordinator's default (all) takes no quorum
        code = await stack.cli("submit", *models, "--input", ten, "--quorum", "2")
        assert code == 2
        one_line_error(capsys, "quorum: only an ensemble", "(HTTP 400 invalid_task)")


@pytest.mark.parametrize(
    ("values", "dtype"),
    [(np.array([[1e300]]), "float32"), (np.array([[300]]), "uint8"), (np.array([[1.5]]), "int32")],
)
def test_inputs_that_do_not_fit_the_dtype_are_refused(tmp_path, values, dtype):
    path = tmp_path / "rows.npy"
    np.save(path, values)
    with pytest.raises(ConfigError, match=r"out of range|do not fit"):
        load_inputs([path], dtype=dtype)


# --- serve: the journal and data_dir as an operator meets them --------------------------------


def serve_config(tmp_path: Path, data_dir: Path, api_listen: str = "127.0.0.1:0") -> Path:
    """A coordinator file for ``serve`` (enrolled identity, token, no mDNS) on ``data_dir``."""
    fleet, identity = tmp_path / "fleet", tmp_path / "coord"
    assert main(["fleet", "init", "--dir", str(fleet), "--fleet-id", "f"]) == 0
    enroll = ["fleet", "enroll", "--dir", str(fleet), "--node-dir", str(identity)]
    assert main([*enroll, "--node-id", "coord", "--roles", "coordinator"]) == 0
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f'[coordinator]\nidentity_dir = "{identity}"\ndata_dir = "{data_dir}"\n'
        '[discovery]\nmdns = false\n[network]\nlisten = "127.0.0.1:0"\n'
        f'[api]\nlisten = "{api_listen}"\ntoken_file = "{fleet / "api-token"}"\n'
    )
    return path


def random_bytes(path: Path) -> None:
    path.parent.mkdir()
    path.write_bytes(random.Random(1).randbytes(8192))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda path: path.mkdir(parents=True), "is a directory"),
        (random_bytes, "not an SQLite database"),
        (lambda path: path.parent.write_text("a file"), "exists and is not a directory"),
    ],
)
def test_serve_on_an_unusable_journal_is_one_clear_line_and_exit_2(
    tmp_path, capsys, make, fragment
):
    journal = tmp_path / "data" / "journal.db"
    config = serve_config(tmp_path, journal.parent)
    make(journal)
    capsys.readouterr()
    assert main(["serve", "--config", str(config)]) == 2
    one_line_error(capsys, fragment)


@pytest.mark.parametrize("configured", [True, False])
async def test_serve_records_its_runtime_file_while_it_runs_and_not_after(tmp_path, configured):
    """A configured data_dir keeps the journal and loses runtime.json at the stop (the CLI's
    --data-dir then says no coordinator runs there); a temporary one goes whole."""
    data = tmp_path / "data"
    config = coord_config.load_config(serve_config(tmp_path, data if configured else ""))
    daemon = CoordinatorDaemon(config)
    try:
        await daemon.start()
        runtime = daemon.data_dir / "runtime.json"
        assert json.loads(runtime.read_text())["api"] == daemon.api.url
    finally:
        await daemon.stop()
    assert not runtime.exists()
    assert daemon.data_dir.exists() == configured
    if configured:
        assert (data / "journal.db").is_file()


def test_a_second_coordinator_on_one_journal_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    config = serve_config(tmp_path, data)
    data.mkdir()
    with Journal(data / "journal.db") as first:  # as a running coordinator holds it
        rows = Tensor.from_array(np.zeros((1, 64), np.float32))
        first.submit(TaskSpec("t1", Pattern.SINGLE, rows, (DIGITS,)))
        capsys.readouterr()
        assert main(["serve", "--config", str(config)]) == 2
        one_line_error(capsys, "journal.db is in use by another coordinator")
        assert not (data / "runtime.json").exists()  # the first one's stays the one to reach
        assert first.get("t1").state == TaskState.PENDING


async def test_the_journal_stays_locked_from_its_check_until_the_coordinator_serves(
    tmp_path, monkeypatch
):
    """Two coordinators started at one instant on one data_dir: the second cannot open the
    journal while the first joins the mesh (it was closed after the check, then reopened)."""
    data = tmp_path / "data"
    joining, go_on = asyncio.Event(), asyncio.Event()
    real_start_mesh = coordinator_daemon.start_mesh

    async def held_start_mesh(mesh, config):
        joining.set()
        await go_on.wait()
        await real_start_mesh(mesh, config)

    monkeypatch.setattr(coordinator_daemon, "start_mesh", held_start_mesh)
    daemon = CoordinatorDaemon(coord_config.load_config(serve_config(tmp_path, data)))
    starting = asyncio.create_task(daemon.start())
    try:
        await asyncio.wait_for(joining.wait(), 10)
        with pytest.raises(JournalFileError, match="in use by another coordinator"):
            Journal(data / "journal.db").close()
        go_on.set()
        await starting
        with pytest.raises(JournalFileError, match="in use by another coordinator"):
            Journal(data / "journal.db").close()
    finally:
        go_on.set()
        await asyncio.gather(starting, return_exceptions=True)
        await daemon.stop()
    Journal(data / "journal.db").close()  # released at the stop


async def test_a_start_that_fails_after_the_journal_check_releases_the_journal(
    tmp_path, monkeypatch
):
    data = tmp_path / "data"

    async def failing_start_mesh(mesh, config):
        raise ConfigError("[network] listen 127.0.0.1:1: address already in use (injected)")

    monkeypatch.setattr(coordinator_daemon, "start_mesh", failing_start_mesh)
    daemon = CoordinatorDaemon(coord_config.load_config(serve_config(tmp_path, data)))
    with pytest.raises(ConfigError, match="injected"):
        await daemon.start()
    await daemon.stop()
    Journal(data / "journal.db").close()  # not held by the failed start


def test_an_api_address_in_use_names_the_key(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        config = serve_config(tmp_path, tmp_path / "data", api_listen=f"{host}:{port}")
        capsys.readouterr()
        assert main(["serve", "--config", str(config)]) == 2
    one_line_error(capsys, f"[api] listen {host}:{port}:", "address already in use")


def test_render_task_shows_a_parallel_tasks_aggregation_options():
    aggregation = {"mode": "ensemble", "quorum": 2, "min_responses": None, "timeout_s": 1.5,
                   "weights": {"wide@1": 2.0, "a@1": 0.5}}  # fmt: skip
    doc = {**SUMMARY, "pattern": "parallel", "items": [], "result": None,
           "aggregation": aggregation}  # fmt: skip
    assert "aggregate ensemble, quorum 2, timeout 1.5 s, weights a@1=0.5 wide@1=2" in (
        render_task(doc).splitlines()
    )
    default = {**aggregation, "mode": "all", "quorum": None, "timeout_s": None, "weights": {}}
    assert "aggregate all" in render_task({**doc, "aggregation": default}).splitlines()
