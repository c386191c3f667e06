"""MeshNode: its close says what failed to close, its options check their seeds (thirty-fifth
session)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from meshinfer.discovery.mdns import MdnsConfig
from meshinfer.discovery.static import StaticSeed
from meshinfer.errors import ConfigError
from meshinfer.proto.membership import MembershipConfig
from meshinfer.runtime.node import MeshNode, MeshNodeOptions
from meshinfer.testing.fleet import make_fleet


async def test_a_discovery_source_failing_to_close_is_logged_and_the_rest_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = make_fleet(None, ["car-a"])
    opts = MeshNodeOptions(membership=MembershipConfig.test(), mdns=MdnsConfig.loopback())
    node = MeshNode(fleet.identities["car-a"], fleet.revocations, opts, rng=random.Random(1))
    await node.start()
    port = node.address.port
    (source,) = node.discovery
    real_close = source.aclose

    async def failing_close() -> None:
        await real_close()
        raise OSError("the interface went away")

    source.aclose = failing_close  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="meshinfer.runtime.node"):
        await node.aclose()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "closing its discovery (MdnsDiscovery) failed" in m and "interface went away" in m
        for m in warned
    ), warned
    with pytest.raises(OSError):  # the listener closed after it all the same
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()


def test_a_seed_list_naming_a_node_twice_is_refused_when_the_options_are_made() -> None:
    # was: refused only by start(), after the listener was up
    seed = StaticSeed("car-b", "127.0.0.1", 7946, bytes(range(1, 33)), fleet_id="f")
    with pytest.raises(ConfigError, match="node id 'car-b' appears twice"):
        MeshNodeOptions(seeds=[seed, seed])
    assert MeshNodeOptions(seeds=[seed]).seeds == (seed,)
