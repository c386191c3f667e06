"""Faults of ``meshinfer-coord``'s task commands and views (session 35 review).

The CLI runs in process against the stand-in server of test_client_config_hunt
(:class:`ScriptedServer`: real HTTP on loopback) or against a real coordinator (the ``Stack`` of
test_coordinator_cli); a broken stderr is a real pipe whose reader was closed.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import unicodedata
from collections.abc import Iterator

import numpy as np
import pytest

from coordinator.client import ApiError, CoordinatorClient
from coordinator.task_views import PROGRESS_WIDTH, format_table, progress_line
from tests.test_client_config_hunt import TOKEN, ScriptedServer, coord, one_line_error, task
from tests.test_coordinator_cli import Stack


@pytest.fixture
def canned() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)


def columns_of(text: str) -> int:
    """The terminal columns ``text`` takes (wide characters two, combining marks none)."""
    return sum(
        0
        if unicodedata.category(c) in ("Mn", "Me")
        else 2
        if unicodedata.east_asian_width(c) in "WF"
        else 1
        for c in text
    )


def nested(depth: int) -> object:
    doc: object = []
    for _ in range(depth):
        doc = [doc]
    return doc


# --- an answer nested deeper than the views walk ---------------------------------------------


@pytest.mark.parametrize("command", ["nodes", "status"])
def test_a_deeply_nested_answer_is_a_bad_answer_not_a_traceback(canned, capsys, command):
    """An answer nested some hundreds deep (the JSON parser takes it) raised RecursionError in
    the escaping of what is shown: a traceback, not the one line and exit 2 of a bad answer."""
    canned.answer("/v1/nodes", {"nodes": nested(600)})
    canned.answer("/v1/tasks/t-1", task(items=nested(600)))
    rc = coord(canned, command, *(["t-1"] if command == "status" else []))
    err = one_line_error(capsys, "meshinfer-coord")
    assert rc == 2
    assert "unexpected answer from the coordinator" in err and "RecursionError" in err, err


# --- the progress bar ------------------------------------------------------------------------

WHY = "no live, reachable node serves model " + "m" * 90 + "@1"


def _submit_waiting(canned: ScriptedServer, tmp_path, *polls: dict) -> list[str]:
    """The argv of a ``submit --wait --progress`` whose task's GET polls answer ``polls`` in
    turn (the last repeats) and whose /wait answers it succeeded."""
    done = task(state="succeeded", items_total=3, items_done=3, result={"labels": [1, 2, 3]})
    canned.script("POST", "/v1/tasks", {"task_id": "t-1", "state": "queued", "items_total": 3})
    canned.script("GET", "/v1/tasks/t-1", *polls, done)
    canned.answer("/v1/tasks/t-1/wait", done)
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    return ["submit", "--model", "m", "--input", str(tmp_path / "x.npy"), "--wait", "--progress"]


def waiting_task(done: int = 0) -> dict:
    items = [{"item_id": f"t-1/{i}", "waiting": WHY} for i in range(3)]
    return task(items_total=3, items_done=done, items=items)


@pytest.mark.parametrize(("columns", "widest"), [("60", 59), ("0", 79), ("junk", 79)])
def test_the_progress_line_fits_the_terminal(
    canned, capsys, tmp_path, monkeypatch, columns, widest
):
    """The progress line of a task whose items wait (bar, counts, state and the reason: some
    120 columns) was drawn whole: on an 80-column terminal it wrapped, and each redraw's ``\\r``
    went back to the start of the wrapped line only, adding a line per poll. It is cut to one
    column less than $COLUMNS (else the terminal's width; else, 0 or nonsense, 80)."""
    monkeypatch.setenv("COLUMNS", columns)
    argv = _submit_waiting(canned, tmp_path, waiting_task(0), waiting_task(1))
    rc = coord(canned, *argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    drawn = [s.rstrip("\n") for s in captured.err.split("\r") if s.strip()]
    assert len(drawn) == 3, drawn
    assert all(columns_of(line) <= widest for line in drawn), drawn
    assert drawn[0].startswith("[" + "." * PROGRESS_WIDTH + "] 0/3 items  running")
    assert "labels: 3 rows" in captured.out


def test_an_unchanged_progress_line_is_drawn_once(canned, capsys, tmp_path):
    """Every poll (4 a second) wrote the line again, changed or not: a stderr sent to a file
    with ``--progress`` grew by a line per poll for as long as the task ran."""
    argv = _submit_waiting(canned, tmp_path, *[task(items_total=3)] * 3)
    rc = coord(canned, *argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err.count("\r") == 2, captured.err  # running 0/3, then succeeded 3/3
    assert captured.err.endswith("\n")


def test_a_failing_stderr_ends_the_bar_not_the_wait(canned, capsys, tmp_path, monkeypatch):
    """A stderr whose reader went away (``2> >(head -c 10)``) made the bar's write raise
    BrokenPipeError through the wait: exit 2 (with no line to say why) and no result printed,
    though the task succeeded and stdout was fine. The bar is a view: it stops, the wait goes
    on."""
    argv = _submit_waiting(canned, tmp_path, waiting_task(0), waiting_task(1))
    read_end, write_end = os.pipe()
    os.close(read_end)
    broken = open(write_end, "w", encoding="utf-8")  # (closed below)
    monkeypatch.setattr(sys, "stderr", broken)
    try:
        rc = coord(canned, *argv)
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            broken.close()
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("task t-1: succeeded") and "labels: 3 rows" in out, out


@pytest.mark.parametrize(("done", "total"), [(5, 2), (-3, 4), (1, -2), (0, 0)])
def test_the_bar_keeps_its_width_whatever_counts_came(done, total):
    """A coordinator's counts past its total (or negative) drew a bar of 75 or 45 cells."""
    line = progress_line({"items_total": total, "items_done": done, "state": "running"})
    bar = re.match(r"\[([#.]*)\]", line)
    assert bar is not None and len(bar.group(1)) == PROGRESS_WIDTH, line


async def test_a_real_coordinators_waiting_task_draws_within_a_narrow_terminal(
    tmp_path, capsys, monkeypatch
):
    """Against a real coordinator: a task on a model no node serves waits (and says why) past
    --wait-timeout (exit 3); every drawn line fits a 40-column terminal."""
    monkeypatch.setenv("COLUMNS", "40")
    np.save(tmp_path / "x.npy", np.zeros((4, 64), np.float32))
    async with Stack(tmp_path / "mesh") as stack:
        rc = await stack.cli(
            "submit", "--model", "nobody-serves-this@1", "--input", str(tmp_path / "x.npy"),
            "--shard-size", "1", "--wait", "--wait-timeout", "0.6", "--progress",
        )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 3, captured.err
    drawn = [s.rstrip("\n") for s in captured.err.split("\r") if s.strip()]
    assert drawn and all(columns_of(line) <= 39 for line in drawn), drawn
    assert "waiting: no live, reachable node serves model nobody-serves-this@1" in captured.out


# --- tables ----------------------------------------------------------------------------------


def test_wide_characters_line_up_in_tables():
    """Cells were padded by characters, not terminal columns: a node named in CJK pushed the
    rest of its row one column right per wide character."""
    text = format_table(("NODE", "STATUS"), [("車両-1", "alive"), ("veh-1", "dead"), ("é", "x")])
    starts = [columns_of(line[: line.index(word)]) for line, word in
              zip(text.splitlines(), ("STATUS", "alive", "dead", "x"), strict=True)]  # fmt: skip
    assert len(set(starts)) == 1, text


def test_a_cut_cell_fits_its_width_in_columns():
    from coordinator.task_views import NAME_WIDTH, fit

    text = format_table(("NODE", "S"), [("車" * 40, "a"), ("n", "b")], widest={"NODE": NAME_WIDTH})
    first = text.splitlines()[1]
    assert columns_of(first[: first.index("  a")]) <= NAME_WIDTH, text
    assert fit("車車車車", 5) == "車..." and fit("abc", 3) == "abc" and fit("abcd", 2) == "ab"


# --- for files this review does not own ------------------------------------------------------


def test_tasks_all_stops_at_an_empty_page_that_names_a_next_cursor(canned):
    pages = [{"tasks": [], "next_cursor": f"c{i}"} for i in range(30)]
    canned.script("GET", "/v1/tasks", *pages)
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    with pytest.raises(ApiError) as caught:
        list(client.iter_tasks())
    assert caught.value.code == "bad_response"
    assert len(canned.requests) == 1, canned.requests
