"""The peer table (session 28b): a per-peer sender that fails (a bug) is logged once, what is
queued for its peer is dropped with its requesters told, and the next send starts a new sender.

Real Noise sessions over TCP on loopback (and the in-memory transport).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from meshinfer.errors import TransportError
from meshinfer.proto.messages import AppData
from tests.test_peers import Pair


async def test_a_failed_sender_fails_what_is_queued_and_the_next_send_works(
    transport_and_addr, caplog
):
    async with Pair(*transport_and_addr) as pair:
        await pair.alpha.request("bravo", AppData("t", b"first"))
        session = pair.alpha.session("bravo")
        bug = RuntimeError("a bug in the write path")

        async def broken(*_args, **_kwargs):
            raise bug

        session.send_many = broken  # not a MeshInferError: nothing in the sender expects it
        with caplog.at_level(logging.ERROR, logger="meshinfer.runtime.peers"):
            futures = [pair.alpha.send_tracked("bravo", AppData("t", b"x%d" % i)) for i in (0, 1)]
            for fut in futures:
                with pytest.raises(TransportError, match="sender for bravo failed") as caught:
                    async with asyncio.timeout(10):  # the old sender left them waiting forever
                        await fut
                assert caught.value.__cause__ is bug
        failures = [r for r in caplog.records if "sender for bravo failed" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info[1] is bug
        assert pair.alpha.stats.dropped["sender-failed"] == 2
        del session.send_many  # the bug fixed: a later send starts a new sender
        await pair.alpha.request("bravo", AppData("t", b"after"))
        assert await pair.received(2) == [b"first", b"after"]
