"""The node daemon's HTTP endpoint (aiohttp, loopback by default).

``GET /healthz``  200 while the process is alive and its loop answers.
``GET /readyz``   200 when able to infer (listening, engine ready, models loaded), else 503
                  with the reasons.
``GET /metrics``  Prometheus text: sessions, membership, peers, executor, batchers, host and GPU.
``GET /status``   JSON for people and ``meshinfer-node status``: members, sessions, models, load.
``POST /position`` from the vehicle's positioning, loopback only: JSON ``{"position": [x, y(, z)],
                  "velocity": [vx, vy(, vz)]}`` (metres, metres/second; a key left out, null or
                  ``[]``: unknown, not moving), gossiped for the ``contact_aware`` policy
                  (``[mobility]``). 200 with what is published; 400 for a bad body (one
                  that does not decode as its Content-Encoding too, or cut short by the
                  client's close); 403 from another host; 415 for a body in a
                  Content-Encoding not decoded here (``Accept-Encoding`` names those that
                  are); 503 once a drain has left the mesh (nothing is gossiped).

``/metrics`` gathers the host's, the batchers' and the mesh's families with one collector each:
one that fails is left out, the others still render.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshinfer.proto.contact import check_vector
from meshinfer.runtime.http_log import (
    CLIENT_ERRORS,
    LINGER_S,
    ClientErrorLog,
    refused_coding,
    unsupported_coding,
)
from meshinfer.runtime.mesh_metrics import mesh_families
from meshinfer.runtime.metrics import MetricFamily, MetricsRegistry, family
from meshinfer.runtime.telemetry import batcher_families, snapshot_families
from meshinfer.transport.base import Address

if TYPE_CHECKING:
    from node.daemon import NodeDaemon


log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 1.0
"""How long ``aclose`` lets requests in progress finish: every handler answers at once, so only
a client still sending its request is waited for (aiohttp's own default, 60 s, let one local
client hold a SIGTERM's stop for a minute)."""


class NodeHttp:
    """Serves the daemon's health, readiness, metrics and status. ``start`` / ``aclose``."""

    def __init__(self, daemon: NodeDaemon, address: Address) -> None:
        self.daemon = daemon
        self.address = address
        self.registry = MetricsRegistry()
        for collect in (self._host_families, self._batcher_families, self._node_families):
            self.registry.add_collector(collect)
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                web.get("/status", self.status),
                web.post("/position", self.position),
            ]
        )
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app, access_log=None, logger=ClientErrorLog(log),
            shutdown_timeout=SHUTDOWN_GRACE_S, lingering_time=LINGER_S,
        )  # fmt: skip
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address.host, self.address.port)
        await site.start()
        port = self._runner.addresses[0][1]
        host = self.address.host
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "node_id": self.daemon.node_id})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, problems = self.daemon.readiness()
        body = {"ready": ready, "problems": problems}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.registry.render().encode(),
            headers={"Content-Type": self.registry.content_type},
        )

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(node_status(self.daemon))

    async def position(self, request: web.Request) -> web.Response:
        if not _is_loopback(request.remote):
            return _refuse(403, "POST /position is accepted from this host (loopback) only")
        if (coding := refused_coding(request.headers)) is not None:  # (else read as it came)
            return _refuse(415, *unsupported_coding(coding))
        try:
            body = await request.json()
        except ConnectionResetError:  # the client closed mid-body: its fault, not our ERROR
            return _refuse(400, "the connection closed before the whole body arrived")
        except CLIENT_ERRORS as exc:  # a body that does not decode as its Content-Encoding
            why = getattr(exc, "message", "") or str(exc)  # (the HttpProcessingErrors' text)
            return _refuse(400, f"the body cannot be read: {why}")
        # (nested past the parser's limit; a charset Python has no codec for)
        except (ValueError, RecursionError, LookupError):
            return _refuse(400, "the body must be JSON")
        if not isinstance(body, dict) or not set(body) <= {"position", "velocity"}:
            return _refuse(400, 'expected a JSON object with "position" and "velocity"')
        try:
            where = check_vector(body.get("position"), "position") or ()
            motion = check_vector(body.get("velocity"), "velocity") or ()
        except ValueError as exc:
            return _refuse(400, str(exc))
        if motion and len(motion) != len(where):
            return _refuse(400, "velocity needs a position of as many numbers")
        if not self.daemon.set_mobility(where, motion):
            return _refuse(503, "this node has left the mesh (draining): nothing is gossiped")
        published = {"position": list(where) or None, "velocity": list(motion) or None}
        return web.json_response(published)

    def _host_families(self) -> list[MetricFamily]:
        snapshot = self.daemon.snapshot
        return [] if snapshot is None else snapshot_families(snapshot)

    def _batcher_families(self) -> list[MetricFamily]:
        return batcher_families(b.stats() for b in self.daemon.batchers.values())

    def _node_families(self) -> list[MetricFamily]:
        return node_families(self.daemon)


def _is_loopback(remote: str | None) -> bool:
    try:
        address = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:  # a Unix socket, or no address
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def _refuse(status: int, error: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error}, status=status, headers=headers)


def node_families(d: NodeDaemon) -> list[MetricFamily]:
    """The Prometheus families of the mesh (see :func:`~meshinfer.runtime.mesh_metrics
    .mesh_families`), the executor and the input cache."""
    if d.mesh is None:
        return []
    out = mesh_families(d.mesh)
    if d.executor is not None:
        st = d.executor.stats
        out.append(
            family(
                "meshinfer_items_total",
                "counter",
                "Work items by outcome.",
                [
                    ({"outcome": "completed"}, st.completed),
                    ({"outcome": "offloaded"}, st.offloaded),
                    ({"outcome": "handed_back"}, st.handed_back),
                    ({"outcome": "taken_back"}, st.taken_back),
                    ({"outcome": "passed_again"}, st.passed_again),
                    ({"outcome": "replayed"}, d.executor.replay.stats.replayed),
                    *(({"outcome": f"failed_{k}"}, v) for k, v in sorted(st.failed.items())),
                ],
            )
        )
        out.append(
            family(
                "meshinfer_cancels_refused_total",
                "counter",
                "TaskCancel messages ignored: for an item here, from a peer that is neither a"
                " coordinator nor the item's sender.",
                [({}, st.cancels_refused)],
            )
        )
        out.append(
            family(
                "meshinfer_reassigns_refused_total",
                "counter",
                "TaskAssign messages ignored: for an item held here, from a peer that is neither"
                " a coordinator nor the item's sender.",
                [({}, st.reassigns_refused)],
            )
        )
        out.append(
            family(
                "meshinfer_items_dropped_total",
                "counter",
                "Work items a node passed here, cancelled because that node died, left or was"
                " revoked (it handed them back to their coordinators).",
                [({}, st.dropped)],
            )
        )
        out.append(
            family(
                "meshinfer_items_running",
                "gauge",
                "Work items running.",
                [({}, d.executor.running)],
            )
        )
        cache = d.executor.inputs.stats
        out += [
            family(
                "meshinfer_input_cache_lookups_total",
                "counter",
                "Inputs named by reference, by whether the input cache held them.",
                [({"result": "hit"}, cache.hits), ({"result": "miss"}, cache.misses)],
            ),
            family(
                "meshinfer_input_cache_evictions_total",
                "counter",
                "Inputs evicted from the input cache to make room.",
                [({}, cache.evictions)],
            ),
            family(
                "meshinfer_input_cache_bytes",
                "gauge",
                "Bytes of inputs held in the input cache.",
                [({}, cache.bytes)],
            ),
        ]
    return out


def node_status(d: NodeDaemon) -> dict[str, Any]:
    """The JSON document of ``/status``."""
    mesh = d.mesh
    members = []
    if mesh is not None and mesh.membership is not None:
        core = mesh.membership.core
        for m in sorted(core.members(), key=lambda m: m.node_id):
            members.append(
                {
                    "node_id": m.node_id,
                    "status": m.status.value,
                    "incarnation": m.incarnation,
                    "address": str(Address(m.state.host, m.state.port)),
                    "roles": list(m.state.roles),
                    "models": [f"{x.model_id}@{x.version}" for x in m.state.models],
                    # a dead or left member's last gossiped queue is stale: none
                    "queue_depth": m.state.queue_depth if m.is_live else None,
                }
            )
    ready, problems = d.readiness()
    ex = d.executor
    return {
        "node_id": d.node_id,
        "fleet_id": d.identity.trust.fleet_id,
        "ready": ready,
        "problems": problems,
        "session_address": str(mesh.address) if mesh and mesh.address else None,
        "incarnation": mesh.membership.core.incarnation if mesh and mesh.membership else None,
        "members": members,
        "sessions": mesh.peers.connected if mesh else [],
        "engine": d.config.inference.engine,
        "models": [str(r) for r in d.batchers],
        "cpu_threads": {"setting": d.config.inference.cpu_threads, "pools": d.cpu_threads},
        "executor": None
        if ex is None
        else {
            "running": ex.running,
            "backlog": ex.backlog,
            "completed": ex.stats.completed,
            "offloaded": ex.stats.offloaded,
            "input_cache": dataclasses.asdict(ex.inputs.stats),
            "result_replay": {
                "results": len(ex.replay),
                "replayed": ex.replay.stats.replayed,
                "bytes": ex.replay.bytes,
                "evicted": ex.replay.stats.evicted,
            },
        },
    }
