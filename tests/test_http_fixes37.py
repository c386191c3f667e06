"""Faults of the HTTP clients against a broken or hostile server (session 37 review).

A negative chunk size in a chunked answer made http.client raise a bare ValueError (it asks its
reader for ``-5`` bytes), which left :class:`CoordinatorClient` as no ApiError, the error
answers' reader included; a ``/wait`` answer whose ``state`` was a list raised TypeError, and
one without a state was asked again for ever (``timeout=None``); a page of ``/v1/tasks`` of
another shape raised KeyError or TypeError, or iterated a string's characters as tasks; a base
URL with a query, a fragment, a user or a blank was taken, and the API's paths appended to it
(another endpoint asked, or a failure blamed on the coordinator).

Servers are real HTTP on loopback: :class:`RawServer` (a socket answering every connection
with the same bytes) and ScriptedServer (test_client_config_hunt).
"""

from __future__ import annotations

import socket
import threading

import pytest

from coordinator.client import ApiError, CoordinatorClient
from meshinfer.errors import ConfigError
from meshinfer.http_url import check_http_url
from tests.test_cli_fixes33 import in_thread
from tests.test_client_config_hunt import TOKEN, ScriptedServer, task


class RawServer:
    """A loopback server answering one connection with ``answer`` (raw bytes), then closing."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.listener.close()
        self.thread.join(5)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # closed: the test is over
            return
        with conn:
            try:
                conn.recv(65536)  # (the request: small, one read)
                conn.sendall(self.answer)
            except OSError:
                pass


NEGATIVE_CHUNK = b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n-5\r\n{}\r\n0\r\n\r\n"


def test_a_negative_chunk_size_is_a_bad_response_not_a_value_error():
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + NEGATIVE_CHUNK
    with RawServer(answer) as server:
        client = CoordinatorClient(server.url, TOKEN, timeout=5)
        with pytest.raises(ApiError) as caught:  # was ValueError: read length must be ...
            client.stats()
    assert caught.value.code == "bad_response"
    assert "not valid HTTP" in caught.value.message


def test_an_error_answer_with_a_negative_chunk_size_is_still_its_http_error():
    answer = b"HTTP/1.1 404 Not Found\r\n" + NEGATIVE_CHUNK
    with RawServer(answer) as server:
        client = CoordinatorClient(server.url, TOKEN, timeout=5)
        with pytest.raises(ApiError) as caught:  # was ValueError, from the error body's read
            client.get("t-1")
    assert (caught.value.status, caught.value.code) == (404, "http_error")


@pytest.mark.parametrize("state", [["succeeded"], {"state": "succeeded"}, 7])
def test_a_wait_answer_whose_state_is_no_string_is_a_bad_response(canned, state):
    canned.script("GET", "/v1/tasks/t-1/wait", task(state=state))
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    with pytest.raises(ApiError) as caught:  # was TypeError: unhashable type (list, dict)
        client.wait("t-1", timeout=5)
    assert caught.value.code == "bad_response"


def test_a_wait_answer_without_a_state_is_not_asked_again_for_ever(canned):
    doc = task()
    del doc["state"]
    canned.script("GET", "/v1/tasks/t-1/wait", doc)
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    outcome = in_thread(lambda: client.wait("t-1", timeout=None), limit_s=5)
    assert outcome, "wait() still asked after 5 s"  # was: asked again every 0.25 s for ever
    assert isinstance(outcome[0], ApiError) and outcome[0].code == "bad_response", outcome


@pytest.fixture
def canned():
    with ScriptedServer() as server:
        yield server


@pytest.mark.parametrize(
    "page",
    [
        {},  # was KeyError
        {"tasks": None},  # was TypeError
        {"tasks": "abc"},  # was three "tasks": "a", "b", "c"
        {"tasks": {"t-1": {}}},  # was one "task": "t-1"
        {"tasks": [task()], "next_cursor": ["c"]},  # was TypeError: unhashable type
        {"tasks": [task()], "next_cursor": 7},  # was asked for the cursor "7"
    ],
)
def test_a_page_of_tasks_of_another_shape_is_a_bad_response(canned, page):
    canned.script("GET", "/v1/tasks", page, {"tasks": [], "next_cursor": None})
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    with pytest.raises(ApiError) as caught:
        list(client.iter_tasks())
    assert caught.value.code == "bad_response"


def test_pages_of_the_documented_shape_are_still_followed(canned):
    first = {"tasks": [task(task_id="t-2")], "next_cursor": "c1"}
    canned.script("GET", "/v1/tasks", first, {"tasks": [task()], "next_cursor": None})
    client = CoordinatorClient(canned.url, TOKEN, timeout=5)
    assert [t["task_id"] for t in client.iter_tasks()] == ["t-2", "t-1"]


# --- for meshinfer/http_url.py (not this helper's file) -----------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:7950?x=1", "http://127.0.0.1:7950#f", "http://u:p@127.0.0.1:7950",
     "http://127.0.0.1:7950/a b"],
)  # fmt: skip
def test_a_base_url_the_api_path_cannot_follow_is_refused(url):
    with pytest.raises(ConfigError):
        check_http_url(url, "coordinator URL")
