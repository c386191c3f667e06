"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

import numpy as np
import psutil
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from coordinator.client import CoordinatorClient
from meshinfer.discovery.static import StaticSeed
from meshinfer.inference.base import ModelRef
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.runtime.endpoint import dial
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.peers import PeerTable
from meshinfer.runtime.session import Session
from meshinfer.testing.cluster import LocalCluster
from meshinfer.transport.base import Address


async def until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a cheap read of state the test cannot be told about) until it holds;
    TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def dial_again(peers: PeerTable, node: str, via: Address | None = None) -> Session:
    """``peers`` dials ``node`` once more (through ``via``, a relay, if given), whatever
    sessions they already have (as after roaming), and adopts the new session."""
    to = peers.addresses[node]
    session = await dial(
        peers.transport, via or to.address, peers.admission, config=peers.config,
        expected_static=to.static_key, expected_node_id=node,
    )  # fmt: skip
    peers.adopt(session)
    return session


def api_client(cluster: LocalCluster, name: str = "coord") -> CoordinatorClient:
    """An HTTP client of the coordinator ``name`` a :class:`LocalCluster` started."""
    return CoordinatorClient(cluster.processes[name].facts["api"], cluster.token, timeout=10)


def nodes_ready(client: CoordinatorClient, names: Iterable[str]) -> bool:
    """Whether the coordinator sees every node of ``names`` alive and serving models."""
    nodes = {n["node_id"]: n for n in client.nodes()["nodes"]}
    return all(nodes.get(n, {}).get("status") == "alive" and nodes[n]["models"] for n in names)


def labels_reference(rows: np.ndarray) -> list[int]:
    """The labels the shipped digits model gives ``rows``, computed here with the NumPy
    engine (for a test's own loop-free thread: it runs a loop of its own)."""

    async def infer() -> list[int]:
        engine = NumpyEngine()
        ref = ModelRef("digits-mlp", "1")
        await engine.load(ref)
        try:
            out = await engine.infer(ref, rows)
        finally:
            await engine.aclose()
        return [int(v) for v in np.argmax(out, axis=1)]

    return asyncio.run(infer())


def still_running(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that have not exited; one that has (a zombie not yet reaped by its
    new parent, or one gone meanwhile) is left out."""
    running = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
    return running


def kill_all(procs: Iterable[psutil.Process]) -> None:
    """SIGKILL each of ``procs`` still there (psutil makes sure a reused pid is not hit)."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def seed_of(node: MeshNode) -> StaticSeed:
    """A static seed that dials ``node`` on loopback with its key (it must be listening)."""
    assert node.address is not None
    return StaticSeed(
        node_id=node.node_id,
        host="127.0.0.1",
        port=node.address.port,
        static_key=node.identity.static_public,
        fleet_id=node.identity.trust.fleet_id,
    )


async def announce_once(zc: AsyncZeroconf, info: AsyncServiceInfo, *, update: bool = False) -> None:
    """Register (or ``update``) ``info`` on a test's own zeroconf, without probing, and multicast
    its records once. zeroconf's own announcements (three, 225 ms apart) are cancelled: a test
    that left them running left their task pending when its loop closed, and loopback multicast
    loses nothing that a repeat would make up for."""
    if update:
        repeats = await zc.async_update_service(info)
    else:
        repeats = await zc.async_register_service(info, cooperating_responders=True)
    future = asyncio.ensure_future(repeats)
    future.cancel()
    await asyncio.gather(future, return_exceptions=True)
    zc.zeroconf.async_send(zc.zeroconf.generate_service_broadcast(info, None))
