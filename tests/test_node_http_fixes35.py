"""Faults found in the node daemon's HTTP endpoint (session 35): ``POST /position`` read a body in
an unknown Content-Encoding as it came (``gzip, identity``: the gzip bytes as JSON), a client
closing mid-body logged an ERROR with a traceback, one failing metrics family hid the batchers'
and the host's from ``/metrics``, and a refused request's text reached the log with its control
characters (ESC, CR) as the client sent them.

Real daemons in this process, asked over real HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import gzip
import logging

import aiohttp
import pytest
from aiohttp.http_exceptions import InvalidURLError

from meshinfer.runtime import http_log
from meshinfer.runtime.log_lines import printable
from tests.helpers import until
from tests.test_node_surface_hunt import http_port, node

BODY = b'{"position": [1, 2]}'


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def raw_request(port: int, request: bytes) -> bytes:
    """``request`` sent on a fresh loopback connection; all that came back before the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def post(body: bytes, *headers: str) -> bytes:
    lines = ["POST /position HTTP/1.1", "Host: node", "Connection: close", *headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- POST /position: Content-Encoding ----------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        (["Content-Encoding: snappy"], BODY),  # was 200: read as it came
        (["Content-Encoding: gzip, identity"], gzip.compress(BODY)),  # was 400 "must be JSON"
        (["Content-Encoding: gzip", "Content-Encoding: gzip"], gzip.compress(BODY)),
    ],
)
async def test_a_body_in_a_coding_not_decoded_here_is_a_415_naming_those_that_are(
    tmp_path, caplog, headers, body
):
    async with node(tmp_path) as daemon:
        answer = await raw_request(http_port(daemon), post(body, *headers))
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 415 "), answer
        accept = [line for line in head.split(b"\r\n") if line.startswith(b"Accept-Encoding: ")]
        assert accept == [b"Accept-Encoding: " + ", ".join(http_log.BODY_CODINGS).encode()]
        assert b"is not supported here: send the body uncompressed" in payload
        assert daemon.mesh.membership.state.position is None  # nothing was taken
    assert errors(caplog) == []


async def test_a_body_in_a_coding_decoded_here_is_still_taken(tmp_path):
    async with node(tmp_path) as daemon, aiohttp.ClientSession() as http:
        headers = {"Content-Encoding": " GZIP ", "Content-Type": "application/json"}
        url = daemon.http.url + "/position"
        async with http.post(url, data=gzip.compress(BODY), headers=headers) as response:
            assert response.status == 200, await response.text()
        assert daemon.mesh.membership.state.position == (1.0, 2.0)


def test_refused_coding_reads_the_header_as_aiohttp_does() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    def sent(*values: str) -> str | None:
        return http_log.refused_coding(
            CIMultiDictProxy(CIMultiDict(("Content-Encoding", v) for v in values))
        )

    assert sent() is None and sent("identity") is None and sent("") is None
    assert sent(" Deflate ") is None and sent("gzip") is None
    assert sent("x-gzip") == "x-gzip" and sent("gzip, identity") == "gzip, identity"
    assert sent("identity", "identity") == "identity, identity"


# --- POST /position: a client that closes mid-body ---------------------------------------------


async def test_a_client_closing_mid_body_is_no_error_line(tmp_path, caplog):
    async with node(tmp_path) as daemon:
        server = daemon.http._runner.server
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port(daemon))
        writer.write(
            b"POST /position HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 100\r\n\r\n{"
        )
        # the handler is reading the body now
        assert (await reader.readline()).startswith(b"HTTP/1.1 100 Continue")
        writer.close()
        await until(lambda: not server.connections)  # (once the handler has returned)
        assert daemon.mesh.membership.state.position is None
    assert errors(caplog) == []  # was "Error handling request" and a ConnectionResetError


# --- /metrics: one collector per group of families --------------------------------------------


async def test_a_failing_metrics_family_leaves_the_others_on_the_page(tmp_path, caplog):
    async with node(tmp_path) as daemon, aiohttp.ClientSession() as http:
        await until(lambda: daemon.snapshot is not None)
        daemon.executor.inputs = None  # the mesh's and executor's families now raise
        async with http.get(daemon.http.url + "/metrics") as response:
            assert response.status == 200
            page = await response.text()
    assert "\nmeshinfer_batcher_queue_depth{" in page  # was: left out with the failing one
    assert "\nmeshinfer_node_memory_available_bytes " in page
    assert "meshinfer_items_total" not in page
    assert any("metrics collector" in line for line in errors(caplog))


# --- the log of requests aiohttp refuses -------------------------------------------------------


def test_a_refused_request_is_logged_on_one_line_with_its_control_characters_escaped(caplog):
    logger = logging.getLogger("tests.node_http_fixes35")
    # as aiohttp's pure-Python parser refuses a target holding controls: quoted as it came
    exc = InvalidURLError("/\x1b[2J\rFAKE ERROR line\x85\u2028x")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        http_log.ClientErrorLog(logger).log(
            logging.ERROR, "Error handling request from %s", "127.0.0.1", exc_info=exc
        )
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.DEBUG and message.isprintable(), repr(message)
    assert r"/\x1b[2J\r" in message and r"FAKE ERROR line\x85\u2028" in message


def test_printable_leaves_printable_text_alone() -> None:
    assert printable("Invalid HTTP header: 'é ü'") == "Invalid HTTP header: 'é ü'"
    assert printable("a\tb\nc\x00") == r"a\tb\nc\x00"
