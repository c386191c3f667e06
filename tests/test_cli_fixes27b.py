"""``submit --wait`` interrupted by Ctrl-C names the accepted task; requests aiohttp cannot
parse are counted in the API's request counter.

The CLI runs as a real subprocess against a real coordinator and API on loopback (in this
test's loop); SIGINT is sent once the CLI is past the submission (a condition, not a sleep).
"""

from __future__ import annotations

import asyncio
import signal
import sys

import numpy as np
import pytest
import pytest_asyncio

from coordinator.api import CoordinatorApi
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_api_fixes27 import MALFORMED, Lone, exchange, strict_exposition

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The CLI as a user's terminal runs it: SIGINT raises KeyboardInterrupt even where this test
#: runs with SIGINT ignored (a background job inherits SIG_IGN, and Python keeps it).
CLI = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from coordinator.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lone(tmp_path_factory):
    async with Lone(tmp_path_factory.mktemp("cli27b")) as lone:
        yield lone


def serving(lone: Lone) -> CoordinatorApi:
    """An API of the test's own: closing it ends the /wait its killed client left open."""
    return CoordinatorApi(lone.coordinator, Address("127.0.0.1", 0), lone.cluster.token)


async def start_cli(lone, api, tmp_path, task_id: str, *extra: str):
    rows = tmp_path / "x.npy"
    np.save(rows, np.zeros((2, 64), np.float32))
    argv = [
        "submit", "--url", api.url, "--token-file", str(lone.cluster.fleet.api_token_file),
        "--model", "nobody-serves-this", "--input", str(rows), "--task-id", task_id,
        "--wait", "--wait-timeout", "600", *extra,
    ]  # fmt: skip
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLI, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def interrupted(cli) -> tuple[int, str, str]:
    cli.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(cli.communicate(), 30)
    return cli.returncode, out.decode(), err.decode()


def names_the_task(err: str, task_id: str) -> None:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"meshinfer-coord: interrupted: task {task_id} was accepted")
    assert f"meshinfer-coord status {task_id}" in lines[0]


async def test_ctrl_c_while_waiting_names_the_accepted_task(lone, tmp_path):
    async with serving(lone) as api:
        cli = await start_cli(lone, api, tmp_path, "ctrl-c-1", "--no-progress")
        try:  # in GET .../wait: the answer to the submission was read
            await until(lambda: "ctrl-c-1" in lone.coordinator._waiters, timeout=30)
        except BaseException:
            cli.kill()
            await cli.wait()
            raise
        code, out, err = await interrupted(cli)
    assert code == 130 and out == "", (code, out, err)
    names_the_task(err, "ctrl-c-1")
    assert len(err.strip().splitlines()) == 1, err
    assert (await lone.coordinator.get("ctrl-c-1")).state.value == "pending"  # kept


async def test_ctrl_c_while_drawing_progress_names_the_accepted_task(lone, tmp_path):
    async with serving(lone) as api:
        cli = await start_cli(lone, api, tmp_path, "ctrl-c-2", "--progress", "--shard-size", "1")
        seen = b""
        try:  # the first progress line: drawn from the task the submission created
            async with asyncio.timeout(30):
                while b"0/2 items" not in seen:
                    chunk = await cli.stderr.read(256)
                    assert chunk, seen
                    seen += chunk
        except BaseException:
            cli.kill()
            await cli.wait()
            raise
        code, out, err = await interrupted(cli)
    assert code == 130 and out == "", (code, out, err)
    names_the_task(seen.decode() + err, "ctrl-c-2")


# --- requests aiohttp cannot parse are counted ------------------------------------------------


async def counted(api: CoordinatorApi, token: str) -> tuple[float, float]:
    """The requests counted under route ``unparsed``, status 400, whatever their method; and
    all the requests counted."""
    scrape = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    status, _, body = await exchange(_port(api), scrape.encode() + b"Connection: close\r\n\r\n")
    assert status == 200, body
    series = strict_exposition(body.decode())
    requests = {
        labels: value
        for (name, labels), value in series.items()
        if name == "meshinfer_coord_api_requests_total"
    }
    unparsed = sum(
        v for k, v in requests.items() if ("route", "unparsed") in k and ("status", "400") in k
    )
    return unparsed, sum(requests.values())


def _port(api: CoordinatorApi) -> int:
    return int(api.url.rsplit(":", 1)[1])


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_request_aiohttp_cannot_parse_is_counted(lone, request_bytes):
    token = lone.cluster.token
    if b"Content-Encoding" in request_bytes:  # past the token check: the body is what fails
        auth = f"Authorization: Bearer {token}\r\n".encode()
        request_bytes = request_bytes.replace(b"Host: x\r\n", b"Host: x\r\n" + auth)
    async with serving(lone) as api:
        unparsed, total = await counted(api, token)
        status, _, _ = await exchange(_port(api), request_bytes)
        assert status == 400
        # once: under unparsed, and nowhere else (the first scrape counts itself too)
        assert await counted(api, token) == (unparsed + 1, total + 2)
