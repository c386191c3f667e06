"""MeshNode's lifecycle at its edges (real TCP on loopback): a close during the start, a start
after the close, a cancelled or failed start, a close step that fails, closes that overlap."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from meshinfer.proto.membership import MembershipConfig
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import make_fleet
from meshinfer.transport.base import Address


@pytest.fixture(scope="module")
def fleet():
    return make_fleet(None, ["car-a"])


class Outbound:
    """The node's look-up of its outbound address (run in a worker thread), held until let go:
    a start that waits there is a start under way."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.go = threading.Event()

    def __call__(self) -> str:
        self.asked.set()
        self.go.wait(10)
        return "127.0.0.1"


def node_for(fleet, outbound=None, host: str = "127.0.0.1") -> MeshNode:
    options = MeshNodeOptions(
        listen=Address(host, 0), mdns=None, membership=MembershipConfig.test()
    )
    kw = {"outbound": outbound} if outbound is not None else {}
    identity = fleet.identities["car-a"]
    return MeshNode(identity, fleet.revocations, options, rng=random.Random(1), **kw)


async def refused(address: Address) -> bool:
    """Whether nothing accepts connections at ``address`` any more."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", address.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def started_to_outbound(fleet, outbound: Outbound) -> tuple[MeshNode, asyncio.Task[None]]:
    """A node whose start listens on every interface and then waits in the outbound look-up."""
    node = node_for(fleet, outbound, host="0.0.0.0")
    start = asyncio.create_task(node.start())
    await asyncio.to_thread(outbound.asked.wait, 10)
    return node, start


async def test_a_close_during_the_start_stops_it_and_nothing_it_would_start_runs_after(fleet):
    outbound = Outbound()
    node, start = await started_to_outbound(fleet, outbound)
    address = node.address
    assert address is not None
    await node.aclose()
    outbound.go.set()
    with pytest.raises(RuntimeError, match="closed during its start"):
        await start
    assert node.membership is None and node.revocation_sync is None  # never made
    assert not node.ready.is_set()
    assert await refused(address)


async def test_a_start_after_the_close_is_refused_and_listens_nowhere(fleet):
    node = node_for(fleet)
    await node.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await node.start()
    assert node.address is None and node.membership is None


async def test_a_start_whose_caller_is_cancelled_closes_its_listener(fleet):
    outbound = Outbound()
    node, start = await started_to_outbound(fleet, outbound)
    address = node.address
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    outbound.go.set()
    assert await refused(address)
    assert node.membership is None


async def test_a_start_that_fails_closes_its_listener(fleet):
    def broken() -> str:
        raise OSError("no interface")

    node = node_for(fleet, broken, host="0.0.0.0")
    with pytest.raises(OSError, match="no interface"):
        await node.start()
    assert node.address is not None and await refused(node.address)


async def test_a_close_step_that_fails_is_logged_and_the_others_still_close(fleet, caplog):
    node = node_for(fleet)
    await node.start()
    assert node.membership is not None and node.address is not None
    closed = node.membership.aclose

    async def broken() -> None:
        await closed()
        raise RuntimeError("membership close broke")

    node.membership.aclose = broken  # type: ignore[method-assign]
    await node.aclose()
    assert await refused(node.address)
    assert "closing its membership failed" in caplog.text


async def test_a_second_close_waits_for_the_first_to_end(fleet):
    node = node_for(fleet)
    await node.start()
    assert node.membership is not None
    entered, go = asyncio.Event(), asyncio.Event()
    closed = node.membership.aclose

    async def slow() -> None:
        entered.set()
        await go.wait()
        await closed()

    node.membership.aclose = slow  # type: ignore[method-assign]
    first = asyncio.create_task(node.aclose())
    await entered.wait()
    second = asyncio.create_task(node.aclose())
    done, _ = await asyncio.wait({second}, timeout=0.2)
    assert not done  # the listener is still open: the second close is not over
    go.set()
    await asyncio.gather(first, second)
    assert await refused(node.address)


async def test_a_second_start_while_the_first_is_under_way_waits_for_it(fleet):
    outbound = Outbound()
    node, first = await started_to_outbound(fleet, outbound)
    address, membership_made = node.address, []
    second = asyncio.create_task(node.start())
    outbound.go.set()
    try:
        await asyncio.gather(first, second)
        membership_made.append(node.membership)
    finally:
        await node.aclose()
    assert node.address == address  # one listener: the second start bound none of its own
    assert membership_made[0] is not None


def test_no_temporary_data_dir_to_be_had_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    import tempfile

    from meshinfer.errors import ConfigError
    from meshinfer.runtime.data_dir import DataDir

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))  # TMPDIR: a file
    with pytest.raises(ConfigError, match=r"\[node\] data_dir .*cannot create a directory in"):
        DataDir("", "[node] data_dir", "meshinfer-node-", "node.lock")
