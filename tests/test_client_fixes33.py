"""Faults of the coordinator's HTTP client, the CLI's views, input files and task runs (session
33 review, second pass).

Servers are real HTTP on loopback: :class:`ScriptedServer` (test_client_config_hunt) for whole
answers, :class:`TrickleServer` (a raw socket) for answers sent a few bytes at a time or never
ending. A call that never ended on the old code runs in a thread joined with a deadline.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import zipfile
from collections.abc import Iterator

import numpy as np
import pytest

from coordinator.client import ApiError, CoordinatorClient
from coordinator.input_files import MAX_ARRAY_BYTES, parse_input
from coordinator.runs import ItemRun, TaskRun
from coordinator.task_views import ID_WIDTH, render_nodes, render_task, render_tasks
from meshinfer.errors import ConfigError
from meshinfer.inference.base import ModelRef
from meshinfer.proto.tasks import Pattern, Stage, TaskSpec
from meshinfer.proto.tasks_wire import Tensor
from tests.test_cli_fixes33 import in_thread
from tests.test_client_config_hunt import TOKEN, ScriptedServer, coord, task

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"


class TrickleServer:
    """A loopback server that answers every request with ``head`` at once (or, ``trickle_head``,
    a byte at a time too), then ``body`` one piece every ``pace`` seconds, repeating the last
    piece until the client goes or the server closes."""

    def __init__(self, head: bytes, pieces: list[bytes], pace: float = 0.1, *, trickle_head=False):
        self.head, self.pieces, self.pace, self.trickle_head = head, pieces, pace, trickle_head
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TrickleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.recv(65536)  # (the request: small, one read)
                if self.trickle_head:
                    for byte in self.head:
                        conn.sendall(bytes([byte]))
                        if self.stop.wait(self.pace):
                            return
                else:
                    conn.sendall(self.head)
                index = 0
                while not self.stop.is_set():
                    conn.sendall(self.pieces[min(index, len(self.pieces) - 1)])
                    index += 1
                    if self.pace:
                        self.stop.wait(self.pace)
            except OSError:  # the client went
                return


@pytest.fixture
def canned() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHINFER_COORD_TOKEN", TOKEN)


def _error_of(outcome: list[object]) -> ApiError:
    assert outcome, "the request never ended"
    assert isinstance(outcome[0], ApiError), outcome
    return outcome[0]


# --- 1. the request's timeout bounds the whole request ----------------------------------------


def test_a_body_sent_a_byte_at_a_time_times_out_as_a_whole():
    """``timeout`` bounded each socket read alone: a server sending one byte every 0.1 s (well
    within a 1 s timeout) held the request for ever ("per-request seconds", said the help)."""
    head = HEAD + b"Content-Length: 1000000\r\n\r\n"
    with TrickleServer(head, [b" "]) as server:
        client = CoordinatorClient(server.url, TOKEN, timeout=1.0)
        error = _error_of(in_thread(client.stats, limit_s=10))
    assert error.code == "timeout", error


def test_headers_sent_a_byte_at_a_time_time_out_as_a_whole():
    head = HEAD + b"X-Slow: " + b"a" * 5000 + b"\r\n\r\n"
    with TrickleServer(head, [b"{}"], trickle_head=True) as server:
        client = CoordinatorClient(server.url, TOKEN, timeout=1.0)
        error = _error_of(in_thread(client.stats, limit_s=10))
    assert error.code == "timeout", error


def test_a_prompt_answer_still_comes_whole(canned):
    canned.answer("/v1/stats", {"tasks": {"running": 1}})
    assert CoordinatorClient(canned.url, TOKEN, timeout=5).stats() == {"tasks": {"running": 1}}


# --- 2. the answer's size is capped ------------------------------------------------------------


def test_an_answer_declaring_more_than_the_cap_is_refused_unread():
    """``response.read()`` took an answer of any size into memory; one declaring 2 GiB is now
    refused from its Content-Length (the old code read on, then called the close a drop)."""
    head = HEAD + b"Content-Length: 2147483648\r\n\r\n"
    with TrickleServer(head, [b"{" * 4096], pace=0.01) as server:
        client = CoordinatorClient(server.url, TOKEN, timeout=5)
        error = _error_of(in_thread(client.stats, limit_s=10))
    assert error.code == "bad_response", error
    assert "larger than 1 GiB" in error.message


def test_an_endless_chunked_answer_is_cut_at_the_cap():
    head = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
    with TrickleServer(head, [chunk], pace=0) as server:
        client = CoordinatorClient(server.url, TOKEN, timeout=5, max_response_bytes=1 << 20)
        error = _error_of(in_thread(client.stats, limit_s=10))
    assert error.code == "bad_response" and "larger than 1 MiB" in error.message, error


def test_an_answer_at_the_cap_is_read(canned):
    body = json.dumps({"pad": "x" * 1000}).encode()
    canned.answer("/v1/stats", body)
    client = CoordinatorClient(canned.url, TOKEN, timeout=5, max_response_bytes=len(body))
    assert client.stats()["pad"] == "x" * 1000


# --- 3. a reverse proxy's 502/504 while the coordinator restarts -------------------------------

RUNNING = task(state="running")
DONE = task(state="succeeded", items_done=1, result={"labels": [3]})


@pytest.mark.parametrize("status", [502, 503, 504])
def test_wait_waits_through_a_proxys_gateway_errors(canned, status):
    """A reverse proxy answers 502/504 (or 503 without the API's JSON) while the coordinator
    behind it restarts; ``wait`` took that for the coordinator's final answer."""
    page = b"<html><body>Bad Gateway</body></html>"
    canned.script("GET", "/v1/tasks/t-1/wait", RUNNING)
    canned.script("GET", "/v1/tasks/t-1/wait", page, page, status=status)
    canned.script("GET", "/v1/tasks/t-1/wait", DONE)
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    outcome = in_thread(lambda: client.wait("t-1", timeout=20), limit_s=20)
    assert outcome and outcome[0] == DONE, outcome
    assert len(canned.requests) == 4


def test_a_proxy_error_before_the_coordinator_ever_answered_is_final_at_once(canned):
    canned.answer("/v1/tasks/t-1/wait", b"<html>502 Bad Gateway</html>", status=502)
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    with pytest.raises(ApiError) as caught:
        client.wait("t-1", timeout=20)
    assert (caught.value.status, caught.value.code) == (502, "unavailable")
    assert "not the coordinator" in caught.value.message
    assert len(canned.requests) == 1


def test_the_coordinators_own_json_errors_keep_their_codes(canned):
    error = {"error": {"code": "not_found", "message": "no task t-1"}}
    canned.answer("/v1/tasks/t-1/wait", error, status=404)
    canned.answer("/v1/stats", {"error": {"code": "internal", "message": "x"}}, status=502)
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    with pytest.raises(ApiError) as caught:
        client.wait("t-1", timeout=5)
    assert caught.value.code == "not_found"
    with pytest.raises(ApiError) as caught:
        client.stats()
    assert caught.value.code == "internal"


def test_submit_wait_progress_waits_through_a_proxys_502(canned, capsys, tmp_path):
    canned.script("POST", "/v1/tasks", {"task_id": "t-1", "state": "queued", "items_total": 2})
    canned.script("GET", "/v1/tasks/t-1", b"<html>Bad Gateway</html>", status=502)
    canned.script("GET", "/v1/tasks/t-1", task(items_total=2))
    done = task(state="succeeded", items_total=2, items_done=2, result={"labels": [1, 2]})
    canned.answer("/v1/tasks/t-1/wait", done)
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    rc = coord(
        canned, "submit", "--model", "m", "--input", str(tmp_path / "x.npy"), "--wait",
        "--progress",
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err


# --- 4. a .npz member that inflates past any input ---------------------------------------------


def _npz_claiming(shape: tuple[int, ...], data: bytes = b"") -> bytes:
    """A .npz whose one member's .npy header claims ``shape`` of float32, followed by ``data``
    (compressed: a real bomb would be zeros compressed a thousandfold)."""
    header = io.BytesIO()
    fields = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(header, fields)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue() + data)
    return out.getvalue()


def test_an_npz_member_claiming_more_than_any_input_is_refused_from_its_header():
    """A member's array was allocated at the size its header claimed (and, compressed,
    inflated to it) before anything looked at that size."""
    rows = MAX_ARRAY_BYTES // (4 * 64) + 1
    data = _npz_claiming((rows, 64), bytes(4096))
    with pytest.raises(ConfigError) as caught:
        parse_input("bomb.npz", data)
    message = str(caught.value)
    assert message.startswith("bomb.npz:") and "once decompressed" in message, message
    assert f"{rows * 64 * 4:,}" in message


def test_an_npz_member_within_the_limit_still_loads():
    out = io.BytesIO()
    np.savez_compressed(out, rows=np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(parse_input("ok.npz", out.getvalue()), np.ones((3, 4)))


# --- 5. long names in the tables ----------------------------------------------------------------


def test_a_very_long_task_id_does_not_widen_the_tasks_table(canned, capsys):
    """One task id of 300 characters (a coordinator breaking the API's 64) widened every row
    of ``tasks``; ``--json`` still shows it whole."""
    long_id = "t" * 300
    page = {"tasks": [task(task_id=long_id), task(task_id="short")], "next_cursor": None}
    for row in page["tasks"]:
        row.update(items_done=0, items_total=1)
    text = render_tasks(page)
    assert max(map(len, text.splitlines())) < 200, text
    assert "t" * (ID_WIDTH - 3) + "..." in text and long_id not in text
    canned.answer("/v1/tasks", page)
    assert coord(canned, "tasks", "--json") == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["task_id"] == long_id


def test_long_model_and_node_names_are_cut_in_the_status_and_nodes_tables():
    model = "m" * 200 + "@1"
    item = {"item_id": "t-1/0", "state": "running", "model": model, "node": "n" * 200,
            "attempt": 1, "error": None}  # fmt: skip
    text = render_task(task(items=[item]))
    assert max(map(len, text.splitlines())) < 200, text
    assert model not in text and "m" * 40 in text and "..." in text
    node = {"node_id": "n" * 200, "status": "alive", "roles": ["worker"], "address": "a:1",
            "queue_depth": 0, "in_flight": 0, "done": 0, "models": [model]}  # fmt: skip
    text = render_nodes({"nodes": [node]})
    assert max(map(len, text.splitlines())) < 200, text


# --- 6. task runs --------------------------------------------------------------------------------


def _pipeline_run() -> TaskRun:
    stages = (Stage("a", ModelRef("m", "1")), Stage("b", ModelRef("m", "1"), after=("a",)))
    spec = TaskSpec("p", Pattern.PIPELINE, Tensor.from_array(np.ones((2, 3), np.float32)),
                    stages=stages)  # fmt: skip
    return TaskRun(spec, default_aggregation="all", now=0.0)


def _start(run: TaskRun) -> ItemRun:
    (item,) = run.ready()
    entry = run.items[item.item_id] = ItemRun(item)
    run.digest_of(item.input.data)
    return entry


def test_a_finished_pipeline_stages_input_is_not_kept_for_its_digest():
    """A later stage's input (built from earlier outputs) stayed in the run's digest memo
    after its item finished, until the whole task ended: one copy per stage."""
    run = _pipeline_run()
    first = _start(run)
    run.record_result(first.item.item_id, Tensor.from_array(np.ones((2, 5), np.float32)), "n", 1)
    second = _start(run)
    data = second.item.input.data
    assert data is not run.spec.inputs.data and run.known_digest(data) is not None
    run.record_result(second.item.item_id, Tensor.from_array(np.ones((2, 2), np.float32)), "n", 2)
    assert run.done and run.outcome.succeeded
    assert run.known_digest(data) is None
    assert run.known_digest(run.spec.inputs.data) is not None  # (the task's own input is shared)


def test_a_failed_stage_ends_the_pipeline_and_lets_its_input_go():
    run = _pipeline_run()
    first = _start(run)
    data = first.item.input.data
    run.record_failure(first.item.item_id, "boom", 1)
    assert run.done and not run.outcome.succeeded and "boom" in run.outcome.error
    assert run.ready() == [] and run.unstarted() == []
    assert run.known_digest(data) is not None  # (the task's own input: kept)
