"""One close, whoever asks: :class:`meshinfer.closing.OneClose` and the node daemon's ``aclose``.

A daemon's ``aclose()`` whose caller was cancelled half-way (a second SIGTERM cutting a drain
short, a timeout around it) left it half closed, and a later ``aclose()`` returned at once on
its ``_closed`` flag with the mesh, the batchers and the engine still open.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from coordinator import config as coord_config
from coordinator.daemon import CoordinatorDaemon
from coordinator.journal import Journal
from meshinfer.closing import OneClose
from tests.test_coordinator_cli import serve_config
from tests.test_node_surface_hunt import node


async def test_a_node_close_after_a_cancelled_one_waits_and_closes_everything(tmp_path):
    async with node(tmp_path) as daemon:
        held, release = asyncio.Event(), asyncio.Event()
        close_http = daemon.http.aclose

        async def slow_http_close() -> None:  # the first step of the close takes a while
            held.set()
            await release.wait()
            await close_http()

        daemon.http.aclose = slow_http_close
        first = asyncio.create_task(daemon.aclose())
        await held.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(daemon.aclose())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not second.done()  # it returned at once, nothing after the HTTP server closed
        release.set()
        await asyncio.wait_for(second, 10)
        assert daemon.engine.loaded_models == ()
        assert all(b._closed for b in daemon.batchers.values())


async def test_a_coordinator_daemon_close_after_a_cancelled_one_closes_the_mesh(tmp_path):
    daemon = CoordinatorDaemon(coord_config.load_config(serve_config(tmp_path, tmp_path / "d")))
    await daemon.start()
    held, release, closed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    close_mesh = daemon.mesh.aclose

    async def slow_mesh_close() -> None:  # the last step of the close takes a while
        held.set()
        await release.wait()
        await close_mesh()
        closed.set()

    daemon.mesh.aclose = slow_mesh_close
    first = asyncio.create_task(daemon.aclose())
    await asyncio.wait_for(held.wait(), 10)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    second = asyncio.create_task(daemon.aclose())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not second.done()  # it returned at once, the mesh open and the data dir kept
    release.set()
    await asyncio.wait_for(second, 10)
    assert closed.is_set()
    Journal(daemon.journal_path).close()  # not "in use by another coordinator"


async def test_one_close_runs_once_and_every_caller_gets_its_error(caplog):
    runs = []
    gate = asyncio.Event()

    async def close() -> None:
        runs.append(1)
        await gate.wait()
        raise OSError("disk gone")

    one = OneClose()
    assert not one.started
    callers = [asyncio.create_task(one.run(close)) for _ in range(3)]
    await asyncio.sleep(0)
    assert one.started
    callers[0].cancel()  # a cancelled caller leaves the close running
    gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert [str(o) for o in outcomes[1:]] == ["disk gone", "disk gone"]
    with pytest.raises(OSError, match="disk gone"):
        await one.run(close)  # later: the same outcome, no second run
    assert runs == [1]


async def test_a_failed_close_nobody_waited_for_is_not_logged_as_unretrieved(caplog):
    async def close() -> None:
        await asyncio.sleep(0)
        raise OSError("disk gone")

    one = OneClose()
    caller = asyncio.create_task(one.run(close))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    await asyncio.sleep(0.01)
    del one, caller  # the close's task goes with its owner
    gc.collect()
    await asyncio.sleep(0)
    unseen = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert unseen == []
    assert all(r.levelno < logging.ERROR for r in caplog.records)
