"""The coordinator's HTTP API and its client, session 28: HEAD on the GET routes, a JSON body
declared in a charset other than UTF-8, a connection that was made and then dropped (not
"cannot reach"), Ctrl-C during the submission itself, and each node's contact time.

A real coordinator (no nodes: accepted tasks wait) and API on loopback; requests go over real
TCP. A relay on loopback in front of the API passes each request on and holds its answer back,
so the coordinator accepts a submission whose answer never reaches the client (a network that
fails mid-request); the CLI runs in a subprocess where what is tested is the process's own
(Ctrl-C).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from coordinator.api import CoordinatorApi
from coordinator.cli import main
from coordinator.client import ApiError, CoordinatorClient
from coordinator.openapi import openapi_document
from coordinator.task_views import render_nodes
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_api_fixes27 import Lone, is_api_error
from tests.test_contact_aware import STAYING, contact_of, road

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOC = openapi_document()
TASK = {"pattern": "single", "model": "digits-mlp", "inputs": {"values": [[0.5] * 64]}}
#: The CLI as a user's terminal runs it (see tests/test_cli_fixes27b.py).
CLI = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from coordinator.cli import main; sys.exit(main(sys.argv[1:]))"
)


class Served:
    def __init__(self, lone: Lone, api: CoordinatorApi) -> None:
        self.lone, self.api = lone, api
        self.coordinator = lone.coordinator
        self.token = lone.cluster.token
        self.token_file = str(lone.cluster.fleet.api_token_file)
        self.port = int(api.url.rsplit(":", 1)[1])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("api28")) as lone:
        api = CoordinatorApi(lone.coordinator, Address("127.0.0.1", 0), lone.cluster.token)
        async with api:
            yield Served(lone, api)


def session(served: Served, token: bool = True) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {served.token}"} if token else {}
    no_pool = aiohttp.TCPConnector(force_close=True)
    return aiohttp.ClientSession(served.api.url, headers=headers, connector=no_pool)


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` (which asks the server to close), read to the end: status, headers and
    whatever came after them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)  # to EOF
    finally:
        writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    return int(lines[0].split()[1]), headers, rest


# --- 1. HEAD on the GET routes ---------------------------------------------------------------


async def test_head_healthz_answers_without_a_token_and_without_a_body(served):
    request = b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, headers, rest = await raw(served.port, request)
    assert status == 200 and rest == b""
    assert headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/nodes", 200), ("/v1/stats", 200), ("/v1/tasks", 200), ("/metrics", 200),
        ("/openapi.json", 200), ("/v1/revocations", 200), ("/v1/tasks/no-such", 404),
        ("/v1/tasks?colour=blue", 400),
    ],
)  # fmt: skip
async def test_head_on_a_get_route_answers_as_get_does_without_the_body(served, path, status):
    async with session(served) as http:
        async with http.get(path) as got:
            assert got.status == status
        async with http.head(path) as head:
            assert head.status == status
            assert head.headers["Content-Type"] == got.headers["Content-Type"]
            assert await head.read() == b""
    assert path.split("?")[0].replace("no-such", "{id}") in DOC["paths"]


async def test_head_needs_the_token_where_get_does(served):
    async with session(served, token=False) as anonymous:
        async with anonymous.head("/v1/nodes") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_head_is_not_allowed_where_get_is_not(served):
    async with session(served) as http:
        async with http.head("/v1/tasks/x/cancel") as response:
            assert response.status == 405 and response.headers["Allow"] == "POST"


# --- 2. a JSON body in a charset other than UTF-8 --------------------------------------------


@pytest.mark.parametrize("charset", ["latin-1", "ISO-8859-1", "utf-16", "no-such-charset"])
async def test_a_json_body_declared_in_another_charset_is_refused_naming_it(served, charset):
    task_id = f"charset-{charset}"
    body = json.dumps({**TASK, "task_id": task_id}).encode("utf-8")
    headers = {"Content-Type": f"application/json; charset={charset}"}
    async with session(served) as http:
        async with http.post("/v1/tasks", data=body, headers=headers) as response:
            assert response.status == 415
            doc = await response.json()
    is_api_error(doc, 415)
    assert doc["error"]["code"] == "unsupported_media_type"
    assert charset in doc["error"]["message"] and "UTF-8" in doc["error"]["message"]
    async with session(served) as http:
        async with http.get(f"/v1/tasks/{task_id}") as response:
            assert response.status == 404  # nothing was accepted


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", "utf8", None])
async def test_a_json_body_in_utf8_is_accepted(served, charset):
    task_id = f"utf8-{charset}"
    body = json.dumps({**TASK, "task_id": task_id, "params": {"note": "Ünïcödé"}},
                      ensure_ascii=False).encode("utf-8")  # fmt: skip
    kind = "application/json" + (f"; charset={charset}" if charset else "")
    async with session(served) as http:
        async with http.post("/v1/tasks", data=body, headers={"Content-Type": kind}) as answer:
            assert answer.status == 202, await answer.text()
    record = await served.coordinator.get(task_id)
    assert record.spec.params["note"] == "Ünïcödé"


# --- 3. a connection that was made and then dropped ------------------------------------------


class Relay:
    """A TCP relay on loopback in front of the API: it passes each request on and reads the
    answer to its end (the server is done with the request: ``answered`` counts them), but
    holds it back from the client, until :meth:`drop` closes (or resets) the clients'
    connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received = 0  # bytes the clients sent
        self.answered = 0  # answers the server sent whole (and closed its connection)
        self.url = ""
        self._clients: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        self.drop(reset=False)
        await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait_for(asyncio.gather(*self._handlers), 10)

    def drop(self, *, reset: bool) -> None:
        for writer in self._clients:
            if reset:
                writer.transport.abort()
            else:
                writer.close()
        self._clients.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        self._clients.append(writer)
        up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.port)
        pump = asyncio.ensure_future(self._pump(reader, upstream))
        try:
            await up_reader.read()  # the answer, to its end: never passed on
            self.answered += 1
            await pump  # until the client's connection closes
        finally:
            pump.cancel()
            upstream.close()

    async def _pump(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                upstream.write(data)
                await upstream.drain()
        except ConnectionError:
            pass


async def new_task(served: Served, before: set[str]) -> str | None:
    page = await served.coordinator.list_tasks(limit=1000)
    fresh = {t.task_id for t in page.tasks} - before
    return fresh.pop() if fresh else None


async def known_ids(served: Served) -> set[str]:
    return {t.task_id for t in (await served.coordinator.list_tasks(limit=1000)).tasks}


@pytest.mark.parametrize(("task_id", "reset"), [("dropped-1", False), (None, True)])
async def test_a_submission_whose_connection_drops_says_the_task_may_be_accepted(
    served, tmp_path, capsys, task_id, reset
):
    np.save(tmp_path / "x.npy", np.zeros((1, 64), np.float32))
    before = await known_ids(served)
    async with Relay(served.port) as relay:
        argv = [
            "submit", "--url", relay.url, "--token-file", served.token_file,
            "--model", "digits-mlp", "--input", str(tmp_path / "x.npy"),
            *(["--task-id", task_id] if task_id else []),
        ]  # fmt: skip
        cli = asyncio.ensure_future(asyncio.to_thread(main, argv))
        try:  # accepted and answered; the relay holds the answer back
            accepted = await until_value(lambda: new_task(served, before))
            await until(lambda: relay.answered == 1)
        finally:
            relay.drop(reset=reset)
        assert await cli == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot reach" not in err, err
    dropped = f"meshinfer-coord: error: the connection to the coordinator at {relay.url} closed"
    assert err.startswith(dropped + " before its answer came"), err
    assert "it may or may not have carried out POST /v1/tasks" in err
    assert accepted == (task_id or accepted)  # (no --task-id: the CLI made the id it sent)
    assert err.endswith(f"to see whether it accepted task {accepted}: `meshinfer-coord status"
                        f" {accepted}`; the same submit with --task-id {accepted} cannot run"
                        " it twice"), err  # fmt: skip
    assert (await served.coordinator.get(accepted)).state.value == "pending"  # kept


async def until_value(probe, timeout: float = 20.0):
    """The first truthy value of the coroutine function ``probe``, polled until ``timeout``."""
    async with asyncio.timeout(timeout):
        while not (value := await probe()):
            await asyncio.sleep(0.01)
    return value


async def test_a_get_whose_connection_drops_is_disconnected_and_safe_to_ask_again(served):
    async with Relay(served.port) as relay:
        client = CoordinatorClient(relay.url, served.token, timeout=20)
        call = asyncio.ensure_future(asyncio.to_thread(client.nodes))
        try:
            await until(lambda: relay.answered == 1)
        finally:
            relay.drop(reset=True)
        with pytest.raises(ApiError) as caught:
            await call
    assert caught.value.code == "disconnected" and caught.value.status is None
    assert "asking again is safe (GET /v1/nodes changes nothing)" in caught.value.message


async def test_a_coordinator_not_listening_is_still_cannot_reach(served):
    async with Relay(served.port) as relay:
        url = relay.url
    client = CoordinatorClient(url, served.token, timeout=5)
    with pytest.raises(ApiError, match=f"cannot reach the coordinator at {url}") as caught:
        await asyncio.to_thread(client.stats)
    assert caught.value.code == "unreachable"


# --- 4. Ctrl-C during the submission itself --------------------------------------------------


@pytest.mark.parametrize("task_id", ["ctrl-c-28", None])
async def test_ctrl_c_during_the_submission_says_it_may_have_been_accepted(
    served, tmp_path, task_id
):
    rows = tmp_path / "x.npy"
    np.save(rows, np.zeros((1, 64), np.float32))
    before = await known_ids(served)
    async with Relay(served.port) as relay:
        argv = [
            "submit", "--url", relay.url, "--token-file", served.token_file,
            "--model", "digits-mlp", "--input", str(rows),
            *(["--task-id", task_id] if task_id else []),
        ]  # fmt: skip
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLI, *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:  # in the submission: accepted and answered, the answer held back by the relay
            accepted = await until_value(lambda: new_task(served, before))
            await until(lambda: relay.answered == 1)
            cli.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(cli.communicate(), 30)
        except BaseException:
            cli.kill()
            await cli.wait()
            raise
    err = err.decode()
    assert cli.returncode == 130 and out == b"", (cli.returncode, out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    what, look = f"task {accepted}", f"`meshinfer-coord status {accepted}`"
    assert err.startswith(
        f"meshinfer-coord: interrupted: the submission of {what} was cut short; the coordinator"
        " may or may not have accepted it: look with"
    ), err
    assert look in err
    assert (await served.coordinator.get(accepted)).state.value == "pending"


# --- 5. each node's contact time --------------------------------------------------------------


async def test_the_nodes_table_shows_each_nodes_contact_time():
    node = {"node_id": "car", "status": "alive", "roles": ["vehicle"], "models": [],
            "queue_depth": 0, "address": "127.0.0.1:1", "in_flight": 0, "done": 0,
            "rtt_ms": 1.0}  # fmt: skip
    nodes = [{**node, "contact_s": 39.5}, {**node, "node_id": "rsu", "contact_s": None}, node]
    lines = render_nodes({"nodes": nodes}).splitlines()
    column = lines[0].index("CONTACT S") + len("CONTACT S")  # right-aligned
    assert [line[:column].split()[-1] for line in lines[1:]] == ["39.5", "-", "-"]
    schema = DOC["components"]["schemas"]["Node"]["properties"]["contact_s"]
    assert schema["type"] == ["number", "null"]


async def test_get_nodes_and_the_nodes_command_show_the_contact_time_the_scheduler_uses(
    tmp_path, capsys
):
    async with road(tmp_path, STAYING, STAYING) as mesh:
        await until(lambda: contact_of(mesh, "staying") is not None)
        token = mesh.cluster.token
        async with CoordinatorApi(mesh.coordinator, Address("127.0.0.1", 0), token) as api:
            client = CoordinatorClient(api.url, token)
            nodes = {n["node_id"]: n for n in (await asyncio.to_thread(client.nodes))["nodes"]}
            token_file = str(mesh.cluster.fleet.api_token_file)
            argv = ["nodes", "--url", api.url, "--token-file", token_file]
            assert await asyncio.to_thread(main, argv) == 0
    assert nodes["rsu"]["contact_s"] is None  # infrastructure: unknown, long enough
    assert 0.0 < nodes["staying"]["contact_s"] <= 40.0  # (300 + 100) / 10 s, aged since
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].index("CONTACT S") + len("CONTACT S")  # right-aligned
    cells = {line.split()[0]: line[:column].split()[-1] for line in lines[1:]}
    assert cells["rsu"] == "-" and 0.0 < float(cells["staying"]) <= 40.0
