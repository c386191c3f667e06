"""What both daemons (``meshinfer-node run``, ``meshinfer-coord serve``) do alike at start-up.

:func:`load_identity` reads the node identity made by ``fleet enroll`` and refuses an expired
certificate (:func:`check_validity`); :func:`mesh_options` turns the mesh sections their files
share (``[network]``, ``[discovery]``, ``[membership]``, ``[session]``) into
:class:`~meshinfer.runtime.node.MeshNodeOptions`; :func:`start_mesh` starts the mesh, naming the
setting when the listener cannot bind.

This module imports only light modules at its top: the mesh's own (sessions, discovery,
membership) are imported by :func:`mesh_options`, which only a starting daemon calls.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshinfer.errors import ConfigError, IdentityError, TransportError
from meshinfer.identity_files import NodeDirectory
from meshinfer.proto.identity import NodeIdentity, RevocationList, utc_text
from meshinfer.tomlconfig import listen_failure, parse_address
from meshinfer.transport.base import LinkKind

if TYPE_CHECKING:
    from meshinfer.runtime.node import MeshNode, MeshNodeOptions

log = logging.getLogger(__name__)


def load_identity(directory: str, where: str) -> NodeIdentity:
    """The identity in ``directory`` (made by ``fleet enroll``), or ConfigError naming ``where``."""
    if not directory:
        raise ConfigError(f"{where} is required (made by `fleet enroll`)")
    try:
        identity = NodeDirectory(Path(directory)).load()
    except IdentityError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    check_validity(identity, where, now=time.time())
    return identity


def check_validity(identity: NodeIdentity, where: str, *, now: float) -> None:
    """An expired certificate is a ConfigError (every peer refuses it: the daemon could only
    sit alone); one not valid yet is a warning (this host's clock may be behind its peers')."""
    cert = identity.certificate
    problem = cert.validity_problem(now, 0.0)  # (this host's clock: no skew to allow for)
    if problem == "expired":
        raise ConfigError(
            f"{where}: the certificate of {cert.node_id!r} (serial {cert.serial}) expired at"
            f" {utc_text(cert.not_after)} UTC; enrol the node again (fleet enroll --force)"
        )
    if problem == "not-yet-valid":
        log.warning(
            "%s: the certificate of %r is valid only from %s UTC (is this host's clock behind?):"
            " peers refuse it until then",
            where, cert.node_id, utc_text(cert.not_before),
        )  # fmt: skip


def check_not_revoked(
    identity: NodeIdentity, revocations: RevocationList, where: str, listed_in: Path
) -> None:
    """A certificate that the identity directory's revocation list (``listed_in``) revokes is
    a ConfigError: every peer's handshake refuses it, so the daemon could only sit alone (as
    with an expired one, :func:`check_validity`)."""
    cert = identity.certificate
    if revocations.is_revoked(cert):
        raise ConfigError(
            f"{where}: the certificate of {cert.node_id!r} (serial {cert.serial}) is revoked by"
            f" {listed_in}, so every peer refuses it; enrol the node again (fleet enroll --force)"
        )


async def until_self_revoked(mesh: MeshNode) -> str:
    """Return (why) once a revocation list that revokes ``mesh``'s own certificate comes in
    force while it runs (gossiped by a peer, copied into its identity directory, or pushed):
    every peer refuses it from then on, and a restart is refused until the node is enrolled
    again (:func:`check_not_revoked`). For a daemon's fatal watch: it stops as on SIGTERM and
    exits 1, rather than serve on cut off from the fleet."""
    sync = mesh.revocation_sync
    assert sync is not None, "the mesh is not started"
    entry = await sync.self_revoked()
    cert = mesh.identity.certificate
    reason = f", reason {entry.reason!r}" if entry.reason else ""
    return (
        f"the certificate of {cert.node_id!r} (serial {cert.serial}) is revoked (revocation"
        f" entry {entry.sequence}{reason}): every peer refuses it; enrol the node again"
        " (fleet enroll --force)"
    )


def mesh_options(config: Any, fleet_id: str, identity_dir: str) -> MeshNodeOptions:
    """The mesh sections of a node's or coordinator's file as :class:`MeshNodeOptions`.

    ``config`` has ``network``, ``discovery``, ``membership`` and ``session`` sections (both
    :class:`~node.config.NodeConfig` and the coordinator's file do); ``[session] outbox_mib``
    is the peer table's byte bound per peer (``outbox_bytes``; 0: :data:`OUTBOX_BYTES`, or the
    largest message if larger). The revocation list file watched and kept current is
    ``identity_dir``'s ``revocations.bin``. ``[session] clock_skew``
    judges both session handshakes and membership records' certificates; ``[discovery]
    address_check_interval`` paces both mDNS's and the node's looks at the host's addresses.
    """
    from meshinfer.discovery.mdns import MdnsConfig
    from meshinfer.discovery.static import parse_seeds
    from meshinfer.proto.membership_config import MembershipConfig
    from meshinfer.runtime.node import MeshNodeOptions
    from meshinfer.runtime.outbox_size import OUTBOX_BYTES
    from meshinfer.runtime.session import SessionConfig

    presets = {
        "lan": MembershipConfig.lan,
        "v2v": MembershipConfig.v2v,
        "test": MembershipConfig.test,
    }
    d, s, m = config.discovery, config.session, config.membership
    interval = d.address_check_interval or None  # 0: look at the addresses only at start
    mdns = None
    if d.mdns:
        interfaces = "all" if d.interfaces == ("all",) else tuple(d.interfaces)
        mdns = MdnsConfig(interfaces=interfaces) if interfaces != ("127.0.0.1",) else None
        mdns = dataclasses.replace(mdns or MdnsConfig.loopback(), address_check_interval=interval)
    return MeshNodeOptions(
        listen=parse_address(config.network.listen, "[network] listen"),
        advertise_host=config.network.advertise_host,
        link=LinkKind(config.network.link),
        mdns=mdns,
        seeds=tuple(parse_seeds(list(d.seeds), fleet_id=fleet_id)),
        membership=dataclasses.replace(
            presets[m.preset](), push_pull_digests=m.push_pull_digests, max_members=m.max_members
        ),
        session=SessionConfig(
            handshake_timeout=s.handshake_timeout,
            idle_timeout=s.idle_timeout,
            keepalive_interval=s.keepalive_interval,
            rekey_after=s.rekey_after,
            max_message_size=s.max_message_mib * 1024 * 1024,
            verify_timeout=s.verify_timeout,
            clock_skew=s.clock_skew,  # also the record checks' (MeshNode._record_authenticator)
        ),
        outbox_bytes=(s.outbox_mib or max(OUTBOX_BYTES >> 20, s.max_message_mib)) << 20,
        revocations_file=NodeDirectory(Path(identity_dir)).revocations_bin,
        address_check_interval=interval,
    )


async def start_mesh(mesh: MeshNode, config: Any) -> None:
    """Start ``mesh``; a ``[network] listen`` that cannot be bound is a ConfigError naming it."""
    try:
        await mesh.start()
    except TransportError as exc:
        if mesh.address is not None:  # listening: something after the bind failed
            raise
        raise listen_failure("[network] listen", config.network.listen, exc) from None
