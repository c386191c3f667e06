"""Faults of ``meshinfer-coord``'s task commands and their HTTP client (session 33 review).

The CLI runs in process against the stand-in server of test_client_config_hunt
(:class:`ScriptedServer`: real HTTP on loopback); input files are real files in ``tmp_path``.
A command that never ended on the old code runs in a thread joined with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.cli import main as coord_main
from coordinator.client import ApiError, CoordinatorClient, printable
from coordinator.input_files import load_inputs
from meshinfer.errors import ConfigError
from tests.test_client_config_hunt import TOKEN, ScriptedServer, coord, one_line_error, task

ESCAPES = "\x1b[2J\x1b]0;owned\x07\u202e"  # clear screen, set title (OSC ... BEL), RTL override


@pytest.fixture
def canned() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)


def in_thread(run, limit_s: float = 10.0) -> list[object]:
    """``run()``'s outcome (a one-item list: its value or exception), or [] if it still ran
    after ``limit_s`` (the old code's endless loops and blocked reads)."""
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(run())
        except BaseException as exc:  # (handed to the test)
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    return outcome


# --- the client: redirects, non-standard JSON, what reaches the terminal ---------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_with_the_token(canned, tmp_path, capsys, status):
    """urllib followed a redirect anywhere, with the Authorization header (the API token to
    another host), and a 302 turned the POST of ``submit`` into a GET of what it named."""
    with ScriptedServer() as elsewhere:
        elsewhere.script("POST", "/steal", {"task_id": "x", "state": "queued", "items_total": 1})
        elsewhere.answer("/steal", {"tasks": [], "next_cursor": None})
        canned.script("POST", "/v1/tasks", b"", status=status, Location=elsewhere.url + "/steal")
        np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
        rc = coord(canned, "submit", "--model", "m@1", "--input", str(tmp_path / "x.npy"))
        err = one_line_error(capsys, "meshinfer-coord")
        assert rc == 2
        assert "redirect" in err and elsewhere.url in err, err
        assert elsewhere.requests == []
    assert canned.requests == ["POST /v1/tasks"]


def test_a_redirect_of_a_get_is_an_api_error_naming_it(canned):
    canned.script("GET", "/v1/stats", b"", status=307, Location="http://127.0.0.1:9/v1/stats")
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    with pytest.raises(ApiError) as caught:
        client.stats()
    assert (caught.value.status, caught.value.code) == (307, "redirect")
    assert "http://127.0.0.1:9/v1/stats" in caught.value.message


@pytest.mark.parametrize("number", [b"NaN", b"-Infinity", b"1e400"])
def test_json_output_never_holds_nan_or_infinity(canned, capsys, number):
    """The client took NaN, Infinity and 1e400 (a float past the range) in an answer, and
    ``--json`` printed them back as NaN / Infinity, which is no JSON a reader accepts."""
    canned.answer("/v1/stats", b'{"tasks": {}, "value": ' + number + b"}")
    rc = coord(canned, "stats", "--json")
    out = capsys.readouterr().out
    assert (rc, out) == (2, ""), out
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    with pytest.raises(ApiError) as caught:
        client.stats()
    assert caught.value.code == "bad_response"


def test_json_output_of_a_finite_answer_is_still_printed(canned, capsys):
    canned.answer("/v1/stats", {"tasks": {"running": 1}, "value": 1.5e300})
    assert coord(canned, "stats", "--json") == 0
    assert json.loads(capsys.readouterr().out)["value"] == 1.5e300


def test_escape_sequences_in_a_tasks_page_are_shown_escaped(canned, capsys):
    """A task id, state or error holding a terminal escape sequence reached the terminal raw
    (clear the screen, set the window title, reverse the line) through the ``tasks`` table."""
    hostile = task(task_id="t" + ESCAPES, state="running" + ESCAPES, error="boom" + ESCAPES)
    hostile.update(items_done=0, items_total=1)
    canned.answer("/v1/tasks", {"tasks": [hostile], "next_cursor": "c" + ESCAPES})
    assert coord(canned, "tasks") == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\u202e"), repr(out)
    assert "t\\x1b[2J\\x1b]0;owned\\x07\\u202e" in out


def test_escape_sequences_in_status_cancel_and_submit_are_shown_escaped(canned, capsys, tmp_path):
    canned.answer("/v1/tasks/t-1", task(error="x" + ESCAPES, policy="p" + ESCAPES))
    canned.script("POST", "/v1/tasks/t-1/cancel", {"task_id": "t-1" + ESCAPES, "cancelled": True})
    canned.script(
        "POST", "/v1/tasks", {"task_id": ESCAPES, "state": ESCAPES, "items_total": 1}, status=201
    )
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    assert coord(canned, "status", "t-1") == 0
    assert coord(canned, "cancel", "t-1") == 0
    assert coord(canned, "submit", "--model", "m", "--input", str(tmp_path / "x.npy")) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\u202e"), repr(out)
    assert out.count("\\x1b[2J") == 5, out


def test_a_servers_error_message_reaches_stderr_escaped(canned, capsys):
    """The error message (and the body of a non-API error page) went to stderr as sent."""
    error = {"error": {"code": "not_found", "message": "no task" + ESCAPES + "\nsecond line"}}
    canned.answer("/v1/tasks/a", error, status=404)
    canned.answer("/v1/tasks/b", b"<html>\x1b[31mBad Gateway\x1b[0m</html>", status=502)
    for task_id in ("a", "b"):
        assert coord(canned, "status", task_id) == 2
        err = one_line_error(capsys, "meshinfer-coord")  # (the newline escaped: one line)
        assert not any(c in err for c in "\x1b\x07\u202e"), repr(err)
        assert "\\x1b" in err


def test_printable_escapes_only_what_is_not_printable():
    assert printable("digits-mlp@1 é 数字") == "digits-mlp@1 é 数字"
    assert printable("a\x1b[0m\tb\n\u202e\x00") == "a\\x1b[0m\\tb\\n\\u202e\\x00"
    assert printable("\ud800") == "\\ud800"  # (a lone surrogate, as JSON can carry)


# --- the task list ---------------------------------------------------------------------------


def test_tasks_all_stops_when_the_coordinator_hands_out_a_cursor_twice(canned, capsys):
    """``tasks --all`` followed a cursor the coordinator handed out again for ever (growing
    its list of tasks)."""
    canned.answer("/v1/tasks", {"tasks": [task()], "next_cursor": "same"})
    outcome = in_thread(lambda: coord(canned, "tasks", "--all"))
    assert outcome == [2], "tasks --all did not end"
    err = one_line_error(capsys, "meshinfer-coord")
    assert "'same' twice" in err, err
    assert len(canned.requests) == 2


def test_tasks_all_follows_distinct_cursors_to_the_last_page(canned, capsys):
    canned.script(
        "GET",
        "/v1/tasks",
        {"tasks": [task(task_id="a")], "next_cursor": "1"},
        {"tasks": [task(task_id="b")], "next_cursor": "2"},
        {"tasks": [task(task_id="c")], "next_cursor": None},
    )
    assert coord(canned, "tasks", "--all", "--json") == 0
    page = json.loads(capsys.readouterr().out)
    assert [t["task_id"] for t in page["tasks"]] == ["a", "b", "c"]


# --- input files -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rows.npy", "rows.csv", "pipe"])
def test_an_input_fifo_is_refused_without_waiting_for_a_writer(tmp_path, capsys, name):
    """``--input`` on a FIFO waited for a writer for good (a plain open blocks); a name of no
    known format was read (all of /dev/zero, say) before its suffix was looked at."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    try:
        outcome = in_thread(lambda: load_inputs([fifo]), limit_s=5)
    finally:  # (the old code's blocked open: a writer lets it go; none waits: ENXIO)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome, "reading a FIFO blocked"
    assert isinstance(outcome[0], ConfigError), outcome
    expected = "unknown input format" if name == "pipe" else "not a regular file"
    assert expected in str(outcome[0]) and str(fifo) in str(outcome[0])


def test_a_device_with_an_input_name_is_refused_unread(tmp_path, capsys):
    (tmp_path / "zero.npy").symlink_to("/dev/null")
    assert coord_main(["submit", "--url", "http://127.0.0.1:9", "--model", "m", "--input",
                       str(tmp_path / "zero.npy")]) == 2  # fmt: skip
    assert "not a regular file" in one_line_error(capsys, "meshinfer-coord")


def test_a_directory_input_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "dir.npy").mkdir()
    assert coord_main(["submit", "--url", "http://127.0.0.1:9", "--model", "m", "--input",
                       str(tmp_path / "dir.npy")]) == 2  # fmt: skip
    assert "is a directory" in one_line_error(capsys, "meshinfer-coord").lower()


def test_every_input_name_is_checked_before_any_file_is_read(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(ConfigError, match=r"unknown input format '\.txt'"):
        load_inputs([tmp_path / "good.npy", tmp_path / "missing.txt"])


# --- submit --wait ---------------------------------------------------------------------------


def test_submit_wait_with_stderr_closed_prints_the_result(canned, capsys, tmp_path, monkeypatch):
    """Started with its stderr closed (``2>&-``: sys.stderr is None), ``submit --wait`` took the
    AttributeError of ``sys.stderr.isatty()`` for a bad answer of the coordinator and exited 2
    after submitting."""
    done = task(state="succeeded", items_total=3, items_done=3, result={"labels": [7, 7, 1]})
    canned.script("POST", "/v1/tasks", {"task_id": "t-1", "state": "queued", "items_total": 3})
    canned.answer("/v1/tasks/t-1/wait", done)
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    monkeypatch.setattr(sys, "stderr", None)
    rc = coord(canned, "submit", "--model", "m", "--input", str(tmp_path / "x.npy"), "--wait")
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "labels: 3 rows" in out


def test_a_missing_input_still_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"input not found: .*none\.npy"):
        load_inputs([Path(tmp_path / "none.npy")])
