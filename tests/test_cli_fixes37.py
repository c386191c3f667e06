"""``meshinfer-coord`` task commands, session 37: a submission has its task id before it is sent
(``--task-id`` or one made by the CLI), so a submission whose answer never came names the task
and the same submit with that ``--task-id`` cannot run it twice; ``--task-id`` and
``--priority`` are checked before any input is read or uploaded, in a short error line; and a
server's task id is shown escaped in the line Ctrl-C prints during ``submit --wait``.

A recording HTTP server on loopback stands in for a coordinator where its answers are the
point; a real coordinator behind a relay that holds its answers back (tests/test_api_fixes28.py)
where what is tested is what the coordinator accepted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from coordinator.cli import main
from meshinfer.proto.tasks import NAME_PATTERN
from tests.helpers import until
from tests.test_api_fixes28 import CLI, Relay, known_ids, new_task, served, until_value

__all__ = ["served"]  # (the real coordinator's fixture, module-scoped there and here)

TOKEN = "fixes37-token"


class Recording:
    """An HTTP server on loopback: POST /v1/tasks is answered 202 with the body's task id (or
    ``answer_id``); GET .../wait is held until :attr:`release` is set. ``bodies`` holds each
    POST body, ``requests`` each ``METHOD path``."""

    def __init__(self, answer_id: str | None = None) -> None:
        self.requests: list[str] = []
        self.bodies: list[dict] = []
        self.release = threading.Event()
        self.waiting = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append(f"POST {self.path}")
                doc = json.loads(body)
                outer.bodies.append(doc)
                task_id = answer_id or doc.get("task_id") or "made-by-server"
                answer = {"task_id": task_id, "state": "pending", "items_total": 1,
                          "location": "/v1/tasks/x"}  # fmt: skip
                self._send(202, answer)

            def do_GET(self) -> None:
                outer.requests.append(f"GET {self.path}")
                if "/wait" in self.path:
                    outer.waiting.set()
                    outer.release.wait(30)
                self._send(404, {"error": {"status": 404, "code": "not_found", "message": "-"}})

            def _send(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Recording:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def recording() -> Iterator[Recording]:
    with Recording() as server:
        yield server


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((1, 64), np.float32))
    return path


def submit_argv(url: str, rows: Path, *more: str) -> list[str]:
    return ["submit", "--url", url, "--model", "digits-mlp", "--input", str(rows), *more]


# --- 1. the task id is made before the submission is sent -------------------------------------


def test_a_submit_without_task_id_sends_an_id_made_here(recording, rows, capsys, monkeypatch):
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    assert main(submit_argv(recording.url, rows)) == 0
    assert main(submit_argv(recording.url, rows)) == 0
    first, second = (body.get("task_id") for body in recording.bodies)
    assert first and second and first != second, recording.bodies
    assert re.fullmatch(NAME_PATTERN, first) and re.fullmatch("[0-9a-f]{32}", first), first
    out = capsys.readouterr().out
    assert f"submitted task {first}: pending" in out, out
    assert main(submit_argv(recording.url, rows, "--task-id", "mine-1")) == 0
    assert recording.bodies[-1]["task_id"] == "mine-1"


@pytest.mark.asyncio(loop_scope="module")
async def test_a_dropped_submission_names_its_id_and_its_retry_runs_nothing_twice(
    served, rows, capsys
):
    """No --task-id: the coordinator accepts the task, the answer never comes. The error names
    the task the CLI made the id of; the same submit with that --task-id gets that task, and
    the coordinator holds one new task, not two (it said `meshinfer-coord tasks` before, and a
    retry of the same command submitted the task again)."""
    before = await known_ids(served)
    async with Relay(served.port) as relay:
        argv = [*submit_argv(relay.url, rows), "--token-file", served.token_file]
        cli = asyncio.ensure_future(asyncio.to_thread(main, argv))
        try:
            accepted = await until_value(lambda: new_task(served, before))
            await until(lambda: relay.answered == 1)
        finally:
            relay.drop(reset=True)
        assert await cli == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"to see whether it accepted task {accepted}: `meshinfer-coord status {accepted}`" in err
    assert err.endswith(f"the same submit with --task-id {accepted} cannot run it twice"), err
    again = [*submit_argv(served.api.url, rows), "--token-file", served.token_file]
    assert await asyncio.to_thread(main, [*again, "--task-id", accepted]) == 0
    assert f"submitted task {accepted}: pending" in capsys.readouterr().out
    assert await known_ids(served) - before == {accepted}


# --- 2. --task-id and --priority are checked before anything is read or sent -------------------


@pytest.mark.parametrize(
    "task_id",
    ["", "a\x1b[2Jb", "x" * 65, "-lead", "caf\u00e9", "a/b", "x" * 100_000],
    ids=["empty", "escape", "65", "dash", "unicode", "slash", "huge"],
)
def test_a_task_id_the_coordinator_refuses_is_a_usage_error_and_nothing_is_sent(
    recording, rows, capsys, monkeypatch, task_id
):
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    assert main(submit_argv(recording.url, rows, f"--task-id={task_id}")) == 2
    err = capsys.readouterr().err
    assert "argument --task-id: task id" in err and "\x1b" not in err, err
    assert len(err) < 400, len(err)  # (not the 100,000 characters echoed)
    assert recording.requests == []


@pytest.mark.parametrize(
    "text",
    ["2147483648", "-2147483649", "9" * 5000, "1_000", " 5", "nan", "1e3", ""],
    ids=["2**31", "-2**31-1", "5000-digits", "underscore", "space", "nan", "float", "empty"],
)
def test_a_priority_outside_32_bits_is_a_usage_error_and_nothing_is_sent(
    recording, rows, capsys, monkeypatch, text
):
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    assert main(submit_argv(recording.url, rows, f"--priority={text}")) == 2
    err = capsys.readouterr().err
    assert "argument --priority: priority" in err and "-2147483648..2147483647" in err, err
    assert len(err) < 300, len(err)
    assert recording.requests == []


@pytest.mark.parametrize("text", ["-2147483648", "2147483647", "0", "-7"])
def test_a_priority_within_32_bits_is_sent(recording, rows, monkeypatch, text):
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)
    assert main(submit_argv(recording.url, rows, "--priority", text)) == 0
    assert recording.bodies[-1]["priority"] == int(text)


# --- 3. Ctrl-C during submit --wait shows the server's task id escaped --------------------------


def test_ctrl_c_during_the_wait_shows_the_servers_task_id_escaped(rows):
    with Recording(answer_id="t\x1b]0;owned\x07\x1b[2J") as server:
        argv = [*submit_argv(server.url, rows), "--wait", "--no-progress"]
        env = {**os.environ, "MESHINFER_COORD_TOKEN": TOKEN}
        cli = subprocess.Popen(
            [sys.executable, "-c", CLI, *argv], env=env, cwd=Path(__file__).parents[1],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert server.waiting.wait(30), "the CLI never asked to wait"
            cli.send_signal(signal.SIGINT)
            out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
    text = err.decode()
    assert cli.returncode == 130 and out == b"", (cli.returncode, out, text)
    assert "\x1b" not in text and "\x07" not in text, repr(text)
    assert "interrupted: task t\\x1b]0;owned\\x07\\x1b[2J was accepted" in text, text
