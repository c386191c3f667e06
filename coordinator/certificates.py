"""Which nodes the scheduler refuses for a revoked certificate, whatever membership remembers.

:class:`~coordinator.failover.Reachability` keeps a node cut off for a revoked certificate out
of scheduling only while membership knows it: once membership forgets the node (FORGOTTEN), a
record of it that comes back (relayed where membership records are not signed, or one verified
before the list in force revoked it) made it schedulable again, and so did a node whose
certificate was revoked while no session with it was open (no cut-off came). Every item sent
there was then refused by the handshake and retried elsewhere, as a refusal.

:class:`NodeCertificates` keeps, per node, the newest certificate (by ``not_before``, then
serial) that a session with it was opened under, and calls a node *revoked here* while no
session with it is open and the revocation list in force revokes that certificate. A session
that opens again (a handshake refuses a revoked certificate) ends that: a re-enrolled node's new
certificate is newer than the revoked one. While a session is open, the sessions decide
(:meth:`~meshinfer.runtime.peers.PeerTable.carrier_revoked`, judged by ``Reachability``).

Bounded: at most ``max_nodes`` nodes are kept, the one whose last session opened longest ago
dropped first (a node dropped is judged by its dial alone, as before).

Concurrency: every method runs on the coordinator's event loop.
"""

from __future__ import annotations

from collections import OrderedDict

from meshinfer.proto.identity import NodeCertificate
from meshinfer.runtime.node import MeshNode
from meshinfer.runtime.session import Session

__all__ = ["MAX_NODES", "NodeCertificates"]

#: How many nodes' certificates are kept (see the module docstring).
MAX_NODES = 4096


class NodeCertificates:
    """The newest certificate each node's sessions with ``mesh`` proved (module docstring).
    :meth:`start` hooks into the mesh's sessions (those open now and those to come)."""

    def __init__(self, mesh: MeshNode, *, max_nodes: int = MAX_NODES) -> None:
        self.mesh = mesh
        self.max_nodes = max_nodes
        self._newest: OrderedDict[str, NodeCertificate] = OrderedDict()

    def start(self) -> None:
        peers = self.mesh.peers
        peers.on_session(self._on_session)
        for session in peers.open_sessions():
            self._on_session(session.peer_id, session)

    def __len__(self) -> int:
        return len(self._newest)

    def revoked(self, node: str) -> bool:
        """Whether ``node`` has no session open and the list in force revokes the newest
        certificate a session with it was opened under (False for a node never met)."""
        cert = self._newest.get(node)
        if cert is None:
            return False
        revocations = self.mesh.admission.revocations
        if not revocations.entries or self.mesh.peers.session(node) is not None:
            return False
        return revocations.is_revoked(cert)

    def _on_session(self, node: str, session: Session) -> None:
        cert = session.peer
        known = self._newest.get(node)
        if known is None or (cert.not_before, cert.serial) >= (known.not_before, known.serial):
            self._newest[node] = cert
        self._newest.move_to_end(node)
        while len(self._newest) > self.max_nodes:
            self._newest.popitem(last=False)
