"""The coordinator's API and client, review of session 32.

Part 1, the client across a coordinator restart: ``CoordinatorClient.wait`` keeps waiting
through a 503 ``shutting_down`` and the refused connections of a restart (the coordinator keeps
its tasks in its journal), within its timeout; a coordinator never reached is an error at once;
the other GETs say in one line that the coordinator is shutting down. A stand-in HTTP server on
loopback (``ScriptedServer`` of test_client_config_hunt) plays the coordinator, a second one
bound to the same port after the first closed plays the restarted one.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from coordinator.cli import main as coord_main
from coordinator.client import ApiError, CoordinatorClient
from tests.test_client_config_hunt import TOKEN, ScriptedServer

RUNNING = {"task_id": "t1", "state": "running", "items_total": 1, "items": []}
DONE = {"task_id": "t1", "state": "succeeded", "items_total": 1, "items": []}
SHUTTING = {"error": {"code": "shutting_down", "message": "the coordinator is shutting down"}}


def _until(check, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _restart_after_503(first: ScriptedServer, port: int, box: list) -> None:
    """Close ``first`` once it gave its 503, leave the port closed a moment (refused
    connections), then serve the finished task from a new server on the same port."""
    _until(lambda: len(first.requests) >= 3, "the 503 shutting_down")
    first.__exit__(None, None, None)
    time.sleep(0.6)  # (not a timed assertion: the client meets a refused connection meanwhile)
    second = _bound(port)
    second.answer("/v1/tasks/t1/wait", DONE)
    box.append(second.__enter__())


def _bound(port: int) -> ScriptedServer:
    """A ScriptedServer listening on ``port`` (the coordinator's, back after its restart)."""
    import http.server

    original = http.server.ThreadingHTTPServer.__init__

    def init(self, address, handler, *args, **kwargs):
        original(self, ("127.0.0.1", port), handler, *args, **kwargs)

    http.server.ThreadingHTTPServer.__init__ = init
    try:
        return ScriptedServer()
    finally:
        http.server.ThreadingHTTPServer.__init__ = original


def test_wait_outlasts_a_coordinator_restart_within_its_timeout() -> None:
    first = ScriptedServer()
    port = first.server.server_address[1]
    # the wait answered early by the closing coordinator, then its 503 shutting_down
    first.script("GET", "/v1/tasks/t1/wait", RUNNING, RUNNING, status=200)
    first.script("GET", "/v1/tasks/t1/wait", SHUTTING, status=503, Retry_After="0")
    box: list[ScriptedServer] = []
    with first:
        restarter = threading.Thread(target=_restart_after_503, args=(first, port, box))
        restarter.start()
        try:
            doc = CoordinatorClient(first.url, TOKEN).wait("t1", timeout=20)
        finally:
            restarter.join()
            for second in box:
                second.__exit__(None, None, None)
    assert doc["state"] == "succeeded"
    assert box and box[0].requests  # (the restarted coordinator answered it)


def test_wait_gives_up_on_a_coordinator_gone_for_its_whole_timeout() -> None:
    server = ScriptedServer()
    server.answer("/v1/tasks/t1", RUNNING)
    with server:
        client = CoordinatorClient(server.url, TOKEN)
        client.get("t1")  # (reached: a later outage is a restart)
    with pytest.raises(ApiError) as caught:
        client.wait("t1", timeout=0.6)
    assert caught.value.code == "unreachable"
    assert "went away; waited" in caught.value.message


def test_wait_on_a_coordinator_never_reached_fails_at_once() -> None:
    server = ScriptedServer()
    url = server.url
    server.server.server_close()  # (nothing listens there)
    started = time.monotonic()
    with pytest.raises(ApiError) as caught:
        CoordinatorClient(url, TOKEN).wait("t1", timeout=600)
    assert caught.value.code == "unreachable"
    assert "went away" not in caught.value.message
    assert time.monotonic() - started < 60  # (not the 600 s asked, nor the restart grace)


def test_wait_does_not_retry_a_task_the_coordinator_does_not_know() -> None:
    server = ScriptedServer()
    missing = {"error": {"code": "not_found", "message": "no task t1"}}
    server.script("GET", "/v1/tasks/t1/wait", missing, status=404)
    with server:
        with pytest.raises(ApiError) as caught:
            CoordinatorClient(server.url, TOKEN).wait("t1", timeout=30)
    assert caught.value.code == "not_found"
    assert len(server.requests) == 1


def test_status_during_a_shutdown_is_one_line_naming_it(capsys, tmp_path) -> None:
    server = ScriptedServer()
    message = "the coordinator is shutting down: this request was not served; retry later"
    doc = {"error": {"code": "shutting_down", "message": message}}
    server.script("GET", "/v1/tasks/t1", doc, status=503, Retry_After="5")
    with server:
        token_file = tmp_path / "api-token"
        token_file.write_text(TOKEN)
        code = coord_main(["status", "t1", "--url", server.url, "--token-file", str(token_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert "shutting down" in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_submit_wait_progress_outlasts_a_shutdown_seen_by_its_progress_poll(
    capsys, tmp_path
) -> None:
    """The progress bar's poll meets the 503 ``shutting_down``: the wait after it waits for
    the coordinator (it was an error naming the accepted task, exit 2)."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([[0.5] * 64, [0.25] * 64]))
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN)
    server = ScriptedServer()
    accepted = {"task_id": "t1", "state": "pending", "items_total": 2, "location": "/v1/tasks/t1"}
    server.script("POST", "/v1/tasks", accepted, status=202)
    server.script("GET", "/v1/tasks/t1", SHUTTING, status=503, Retry_After="0")
    server.answer("/v1/tasks/t1/wait", {**DONE, "items_total": 2, "result": {"labels": [1, 2]}})
    argv = ["submit", "--model", "digits-mlp", "--input", str(rows), "--wait", "--progress"]
    with server:
        code = coord_main([*argv, "--json", "--url", server.url, "--token-file", str(token_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads(out)["state"] == "succeeded"
