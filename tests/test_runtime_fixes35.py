"""MeshNode's close says what failed to close (thirty-fifth session)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from meshinfer.discovery.mdns import MdnsConfig
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
