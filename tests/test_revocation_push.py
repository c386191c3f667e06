"""Pushing a revocation through the coordinator's API (``POST /v1/revocations``, the
``revocations`` command): a real coordinator and node daemons in this process, real HTTP.

The operator revokes a node with the fleet tools and pushes the fleet's list to the
coordinator instead of copying the file onto a host: the coordinator verifies and merges it,
cuts the revoked node off (its items move), and gossip carries the list to the other nodes.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from coordinator import api as api_module
from coordinator.api import CoordinatorApi
from coordinator.cli import main as coord_main
from coordinator.client import ApiError, CoordinatorClient
from meshinfer.inference.registry import load_digits_holdout
from meshinfer.runtime import revocations as revocations_module
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address
from tests.helpers import until
from tests.test_coordinator_api import call
from tests.test_coordinator_service import Mesh, hold_inference, spec

TOKEN = "revocation-push-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OCTETS = {**AUTH, "Content-Type": "application/octet-stream"}


async def test_a_pushed_revocation_cuts_the_node_off_and_reaches_the_fleet(tmp_path):
    x, _ = load_digits_holdout()
    async with Mesh(tmp_path, n=2) as mesh:
        c = mesh.coordinator
        api = CoordinatorApi(c, Address("127.0.0.1", 0), TOKEN)
        async with api, aiohttp.ClientSession(base_url=api.url) as http:
            empty = await call(http, "GET", "/v1/revocations", headers=AUTH, schema="Revocations")
            assert empty == {"version": 0, "entries": []}
            never = hold_inference(mesh.daemons["node-0"])  # node-0 keeps what it gets
            ids = [
                await c.submit(spec(f"p{i}", "single", x[i : i + 1], policy="round_robin"))
                for i in range(4)
            ]
            await until(lambda: any(n["node_id"] == "node-0" and n["in_flight"] for n in c.nodes()))
            fleet = mesh.cluster.fleet
            fleet.revoke(now=time.time(), node_id="node-0", reason="stolen")
            body = fleet.revocations_bin.read_bytes()
            try:
                doc = await call(
                    http, "POST", "/v1/revocations", data=body, headers=OCTETS,
                    schema="RevocationsMerged",
                )  # fmt: skip
                assert doc["merged"] and doc["version"] == 1
                assert [(e["node_id"], e["reason"]) for e in doc["entries"]] == [
                    ("node-0", "stolen")
                ]
                for task_id in ids:  # node-0's items moved: the coordinator cut it off
                    record = await c.wait(task_id, timeout=15)
                    assert record.state.value == "succeeded", record.summary.error
                    assert {item.node for item in record.items} == {"node-1"}
                assert mesh.mesh.revocation_sync.stats.disconnected >= 1
                node_1 = mesh.daemons["node-1"].mesh.revocation_sync
                await until(lambda: node_1.version == 1)  # by gossip
                again = await call(http, "POST", "/v1/revocations", data=body, headers=OCTETS)
                assert not again["merged"] and again["version"] == 1
            finally:
                never.set()


async def test_a_bad_push_is_refused_with_a_clear_error(tmp_path, monkeypatch):
    async with Mesh(tmp_path, n=1) as mesh:
        api = CoordinatorApi(mesh.coordinator, Address("127.0.0.1", 0), TOKEN)
        async with api, aiohttp.ClientSession(base_url=api.url) as http:

            async def refused(status: int, code: str, **kw) -> str:
                doc = await call(http, "POST", "/v1/revocations", status=status, **kw)
                assert doc["error"]["code"] == code
                return doc["error"]["message"]

            assert "revocation list" in await refused(
                400, "invalid_revocations", data=b"\x93\x01junk", headers=OCTETS
            )
            other = make_fleet(None, ("node-0",))  # another fleet's authority
            other.revoke("node-0", reason="not yours")
            foreign = other.revocations.to_bytes()
            assert "fleet" in await refused(
                400, "invalid_revocations", data=foreign, headers=OCTETS
            )
            json_type = {**AUTH, "Content-Type": "application/json"}
            await refused(415, "unsupported_media_type", data=b"{}", headers=json_type)
            await refused(401, "unauthorized", data=foreign, headers={"Content-Type": "x/y"})
            await refused(400, "bad_parameter", data=foreign, headers=OCTETS, params={"x": "1"})
            mesh.cluster.enroll("veh-9")
            mesh.cluster.fleet.revoke(now=time.time(), node_id="veh-9")
            ours = mesh.cluster.fleet.revocations_bin.read_bytes()
            monkeypatch.setattr(revocations_module, "MAX_REVOCATION_ENTRIES", 0)
            assert "over 0 entries" in await refused(
                400, "invalid_revocations", data=ours, headers=OCTETS
            )
            assert mesh.mesh.revocation_sync.version == 0  # nothing was merged
            listed = await call(http, "GET", "/v1/revocations", headers=AUTH)
            assert listed["version"] == 0


async def test_a_chunked_push_is_read_no_further_than_the_list_limit(tmp_path, monkeypatch):
    """A body with no length (chunked) that goes past the limit is refused as soon as it does:
    this one never ends, and gets its 413 all the same."""
    monkeypatch.setattr(api_module, "MAX_REVOCATION_LIST_BYTES", 4096)
    monkeypatch.setattr(api_module, "LINGER_S", 0.0)  # (no handler left reading at the end)
    async with Mesh(tmp_path, n=1) as mesh:
        api = CoordinatorApi(mesh.coordinator, Address("127.0.0.1", 0), TOKEN)
        async with api, aiohttp.ClientSession(base_url=api.url) as http:
            endless = asyncio.Event()

            async def body():
                for _ in range(3):
                    yield b"x" * 2048
                await endless.wait()  # the rest never comes
                yield b""

            try:
                async with asyncio.timeout(10):
                    doc = await call(http, "POST", "/v1/revocations", status=413, data=body(),
                                     headers=OCTETS)  # fmt: skip
                assert doc["error"]["code"] == "too_large" and "4096" in doc["error"]["message"]
            finally:
                endless.set()
            assert mesh.mesh.revocation_sync.version == 0


async def test_the_revocations_command_shows_and_pushes_the_list(tmp_path, capsys):
    async with Mesh(tmp_path, n=1) as mesh:
        api = CoordinatorApi(mesh.coordinator, Address("127.0.0.1", 0), TOKEN)
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        where = ["--url", "", "--token-file", str(token_file)]
        async with api:
            where[1] = api.url

            def run(*args: str) -> int:
                return coord_main(["revocations", *where, *args])

            assert await asyncio.to_thread(run) == 0
            assert "version 0: no certificate revoked" in capsys.readouterr().out
            mesh.cluster.enroll("veh-9")  # issued, never started
            fleet = mesh.cluster.fleet
            fleet.revoke(now=time.time(), node_id="veh-9", reason="lost")
            assert await asyncio.to_thread(run, "--push", str(fleet.path)) == 0  # the directory
            out = capsys.readouterr().out
            assert "version 1 (merged)" in out and "node veh-9" in out and "lost" in out
            assert await asyncio.to_thread(run, "--push", str(fleet.revocations_bin)) == 0
            assert "(nothing new)" in capsys.readouterr().out
            assert await asyncio.to_thread(run, "--push", str(tmp_path / "missing.bin")) == 2
            assert "missing.bin" in capsys.readouterr().err
            client = CoordinatorClient(api.url, TOKEN)
            with pytest.raises(ApiError, match="revocation list"):
                await asyncio.to_thread(client.push_revocations, b"not a list")
