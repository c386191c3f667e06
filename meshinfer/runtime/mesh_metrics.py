"""The Prometheus families of a :class:`~meshinfer.runtime.node.MeshNode`: handshakes, sessions,
membership and revocations. Every daemon that runs one (a node, a coordinator) serves them on
its ``/metrics`` under the same names.
"""

from __future__ import annotations

from meshinfer.proto.membership_member import MemberStatus
from meshinfer.runtime.metrics import MetricFamily, family
from meshinfer.runtime.node import MeshNode

__all__ = ["mesh_families"]


def mesh_families(mesh: MeshNode) -> list[MetricFamily]:
    """The families of ``mesh``'s handshakes, sessions, membership and revocation list."""
    m = mesh.metrics
    refused = [({"reason": r}, n) for r, n in sorted(m.handshake_failures.items())]
    out = [
        family(
            "meshinfer_handshakes_total",
            "counter",
            "Completed handshakes.",
            [({}, m.handshakes_ok)],
        ),
        family(
            "meshinfer_handshakes_refused_total",
            "counter",
            "Refused handshakes by reason.",
            refused,
        ),
        family(
            "meshinfer_protocol_errors_total",
            "counter",
            "Sessions dropped for peer errors.",
            [({}, m.protocol_errors)],
        ),
        family(
            "meshinfer_session_messages_total",
            "counter",
            "Messages over encrypted sessions (application and session control), by direction.",
            [
                ({"direction": "received"}, m.messages_received),
                ({"direction": "sent"}, m.messages_sent),
            ],
        ),
        family(
            "meshinfer_session_records_total",
            "counter",
            "Noise messages (records) written and read on encrypted sessions, by direction:"
            " fewer than the messages when small ones are packed.",
            [
                ({"direction": "received"}, m.records_received),
                ({"direction": "sent"}, m.records_sent),
            ],
        ),
        family(
            "meshinfer_peer_messages_dropped_total",
            "counter",
            "Messages for peers dropped unsent, by reason (unknown-peer, outbox-full,"
            " outbox-bytes, revoked: queued for a session whose peer certificate was revoked,"
            " ...).",
            [({"reason": r}, n) for r, n in sorted(mesh.peers.stats.dropped.items())],
        ),
        family(
            "meshinfer_messages_from_revoked_total",
            "counter",
            "Messages received over a session whose peer certificate the list in force revokes"
            " (before its cut-off): dropped before any handler, by message type.",
            [({"type": t}, n) for t, n in sorted(mesh.peers.stats.from_revoked.items())],
        ),
        family(
            "meshinfer_sessions_open",
            "gauge",
            "Peers with an open session.",
            [({}, len(mesh.peers.connected))],
        ),
        family(
            "meshinfer_older_sessions_checked_total",
            "counter",
            "Older sessions with a peer pinged when it opened another: answered (kept), or"
            " silent (abandoned as lost).",
            [
                ({"outcome": "answered"}, mesh.peers.stats.verified),
                ({"outcome": "silent"}, mesh.peers.stats.abandoned),
            ],
        ),
    ]
    if mesh.membership is not None:
        # every status, at 0 when none: a series that vanished read as no data, not 0 (a query
        # for the suspect or dead went empty, its alert never fired or resolved)
        counts = {status.value: 0 for status in MemberStatus}
        for member in mesh.membership.core.members():
            counts[member.status.value] += 1
        out.append(
            family(
                "meshinfer_members",
                "gauge",
                "Known members by status (every status, 0 when none).",
                [({"status": s}, n) for s, n in sorted(counts.items())],
            )
        )
        counters = mesh.membership.core.counters
        out.append(
            family(
                "meshinfer_members_refused_total",
                "counter",
                "ALIVE records about unknown node ids refused because the member table was full"
                " (membership max_members): a member invents nodes, or the fleet outgrew the cap.",
                [({}, counters.members_refused)],
            )
        )
        refusals = getattr(mesh.membership.core.table.authenticator, "refusals", None)
        if refusals is not None:  # signed records (the daemons')
            out.append(
                family(
                    "meshinfer_membership_records_refused_total",
                    "counter",
                    "Membership records refused by their proof, by reason: malformed, untrusted,"
                    " wrong-node, revoked, not-yet-valid, expired, key-mismatch, bad-signature"
                    " (the sender of one is taken as its forger); expired also counts members"
                    " held whose certificate has expired since, revoked those revoked since (each"
                    " declared dead once).",
                    [({"reason": r}, n) for r, n in sorted(refusals.items())],
                )
            )
        out.append(
            family(
                "meshinfer_membership_packets_truncated_total",
                "counter",
                "Membership packets that carried more records than a whole table of max_members"
                " (the rest was dropped unread).",
                [({}, counters.packets_truncated)],
            )
        )
    sync = mesh.revocation_sync
    if sync is not None:
        out.append(
            family(
                "meshinfer_revocation_list_version",
                "gauge",
                "Highest sequence number in the revocation list in force.",
                [({}, sync.version)],
            )
        )
        out.append(
            family(
                "meshinfer_revocation_answers_refused_total",
                "counter",
                "Revocation answers from peers refused at an entry that failed verification.",
                [({}, sync.stats.bad_entries)],
            )
        )
        out.append(
            family(
                "meshinfer_revocation_answers_cut_total",
                "counter",
                "Revocation lists not merged whole: a peer's answer cut at a gap in sequence"
                " numbers, or a list over the entry limit.",
                [
                    ({"reason": "gap"}, sync.stats.gaps),
                    ({"reason": "over_limit"}, sync.stats.over_limit),
                ],
            )
        )
        out.append(
            family(
                "meshinfer_revocation_notices_total",
                "counter",
                "Revocation notices (the entry that revokes a peer, told it as its session is"
                " cut or its handshake refused): sent as a session was cut (a refused handshake's"
                " is not counted), taken (this node's own revocation), refused (not verified, or"
                " not about this node), dropped unread (too soon after the peer's last, or"
                " needless).",
                [
                    ({"outcome": "sent"}, sync.stats.notices_sent),
                    ({"outcome": "taken"}, sync.stats.notices),
                    ({"outcome": "refused"}, sync.stats.notices_refused),
                    ({"outcome": "dropped"}, sync.stats.notices_dropped),
                ],
            )
        )
    return out
