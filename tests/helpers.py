"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

import numpy as np
import psutil

from coordinator.client import CoordinatorClient
from meshinfer.inference.base import ModelRef
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.testing.cluster import LocalCluster


async def until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a cheap read of state the test cannot be told about) until it holds;
    TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


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
