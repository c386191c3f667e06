"""``meshinfer-coord submit``, session 38: ``--wait-timeout``, ``--progress`` and ``--show``
without ``--wait`` are a usage error and nothing is sent (they were ignored: a user who forgot
``--wait`` thought the timeout applied); ``--show`` takes an integer >= 0 (a negative count
printed no labels), and the integer arguments' errors quote a long value cut short.
A recording HTTP server on loopback stands in for the coordinator (tests/test_cli_fixes37.py).
"""

from __future__ import annotations

import pytest

from coordinator.cli import main
from tests.test_cli_fixes37 import TOKEN, recording, rows, submit_argv

__all__ = ["recording", "rows"]  # (fixtures)


@pytest.mark.parametrize(
    "options",
    [
        ["--wait-timeout", "5"],
        ["--progress"],
        ["--no-progress"],
        ["--show", "3"],
        ["--show", "0", "--wait-timeout", "1"],
    ],
)
def test_a_wait_option_without_wait_is_a_usage_error_and_nothing_is_sent(
    recording, rows, capsys, monkeypatch, options
):
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    assert main(submit_argv(recording.url, rows, *options)) == 2
    err = capsys.readouterr().err
    given = {o.replace("--no-", "--") for o in options if o.startswith("--")}
    flags = [f for f in ("--wait-timeout", "--progress", "--show") if f in given]
    assert f"{', '.join(flags)}: only with --wait (nothing was sent)" in err, err
    assert recording.requests == []


def test_the_wait_options_with_wait_are_taken(recording, rows, capsys, monkeypatch):
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    recording.release.set()  # the server answers the wait at once (a 404: exit 2)
    argv = submit_argv(recording.url, rows, "--wait", "--wait-timeout", "5", "--no-progress")
    assert main([*argv, "--show", "0"]) == 2
    assert "(HTTP 404 not_found)" in capsys.readouterr().err
    assert recording.requests[0] == "POST /v1/tasks"
    assert "/wait" in recording.requests[1], recording.requests


@pytest.mark.parametrize(
    "text", ["-1", "x", "1.5", "9" * 5000 + "x"], ids=["negative", "word", "float", "long"]
)
def test_show_takes_an_integer_of_zero_or_more(recording, rows, capsys, monkeypatch, text):
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    assert main(submit_argv(recording.url, rows, "--wait", f"--show={text}")) == 2
    err = capsys.readouterr().err
    assert "argument --show:" in err and "is not an integer >= 0" in err, err
    assert len(err) < 400, len(err)
    assert recording.requests == []
