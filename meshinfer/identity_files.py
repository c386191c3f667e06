"""Node directories on disk, and enrolling a node from a fleet directory: with
:mod:`meshinfer.fleet_dir` (the fleet operator's directory, and the readers of the fleet's
``fleet.json`` and ``revocations.bin``), the only file I/O for identities.

Node directory (one per vehicle, roadside unit or coordinator)::

    node.key         0600  X25519 Noise static private key, hex, one line
    node.pub         0644  the matching public key, hex, one line
    node.cert        0644  NodeCertificate.to_bytes()
    fleet.json       0644  copy of the fleet's trust anchor
    revocations.bin  0644  optional copy of the fleet's revocation list at enrollment

Every file is written whole or not at all by :mod:`meshinfer.atomic_files` (a temporary file
beside it, flushed, then given its name), secret files with mode 0600 from the start, so a crash
never leaves a half-written key; a node refuses to load a ``node.key`` that group or others can
read. Nothing is overwritten unless ``force=True``. Files are read with a size cap. Every
failure raises :class:`IdentityError` naming the file. :func:`enroll` refuses the fleet
directory itself as a node directory, and issues no serial for a node directory it cannot write.

What :mod:`meshinfer.fleet_dir` defines (``FleetDirectory``, ``init_fleet``, ``load_trust``,
``load_revocations``...) and the file helpers of :mod:`meshinfer.atomic_files`
(``write_new_file``, ``replace_file``, ``replace_unchanged``, ``read_file``, ``FileStamp``,
``file_stamp``, the modes) used to live here and are still importable from
here; new code should import them from where they are defined.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

# ``name as name``: re-exported (defined here once, and callers still import them from here)
from meshinfer.atomic_files import MAX_FILE_BYTES as MAX_FILE_BYTES
from meshinfer.atomic_files import (
    PUBLIC_MODE,
    SECRET_MODE,
    make_directory,
    read_file,
    refuse_directories,
    refuse_existing,
    write_new_file,
)
from meshinfer.atomic_files import FileStamp as FileStamp
from meshinfer.atomic_files import file_stamp as file_stamp
from meshinfer.atomic_files import replace_file as replace_file
from meshinfer.atomic_files import replace_unchanged as replace_unchanged
from meshinfer.atomic_files import sync_directory as sync_directory
from meshinfer.errors import AdmissionError, IdentityError
from meshinfer.fleet_dir import BACKUP_PREFIX as BACKUP_PREFIX
from meshinfer.fleet_dir import FILE_FORMAT as FILE_FORMAT
from meshinfer.fleet_dir import FLEET_FILES as FLEET_FILES
from meshinfer.fleet_dir import FLEET_JSON, REVOCATIONS_BIN, read_hex_key
from meshinfer.fleet_dir import MAX_SMALL_FILE_BYTES as MAX_SMALL_FILE_BYTES
from meshinfer.fleet_dir import STAGING_PREFIX as STAGING_PREFIX
from meshinfer.fleet_dir import FleetDirectory as FleetDirectory
from meshinfer.fleet_dir import init_fleet as init_fleet
from meshinfer.fleet_dir import load_revocations as load_revocations
from meshinfer.fleet_dir import load_trust as load_trust
from meshinfer.fleet_dir import parse_revocations as parse_revocations
from meshinfer.fleet_dir import read_revocations as read_revocations
from meshinfer.fleet_dir import trust_to_json as trust_to_json
from meshinfer.proto.identity import (
    FleetTrust,
    NodeCertificate,
    NodeIdentity,
    RevocationList,
    generate_static_keypair,
    static_public_key,
)

# --- node directory ----------------------------------------------------------------------------


# The names of a node directory's own files (fleet.json and revocations.bin: fleet_dir's).
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
NODE_CERT = "node.cert"


@dataclass(frozen=True)
class NodeDirectory:
    """One node's directory: Noise static key pair, certificate, trust anchor, revocations."""

    path: Path

    @property
    def node_key(self) -> Path:
        return self.path / NODE_KEY

    @property
    def node_pub(self) -> Path:
        return self.path / NODE_PUB

    @property
    def node_cert(self) -> Path:
        return self.path / NODE_CERT

    @property
    def fleet_json(self) -> Path:
        return self.path / FLEET_JSON

    @property
    def revocations_bin(self) -> Path:
        return self.path / REVOCATIONS_BIN

    def has_key(self) -> bool:
        """Whether ``node.key`` exists."""
        return self.node_key.exists()

    def keygen(self, *, force: bool = False) -> bytes:
        """Write a fresh ``node.key`` (0600) and ``node.pub``; return the public key.

        With ``force`` the old ``node.pub`` is removed first, so a crash part way leaves the
        old pair, the old or new key alone (``node.pub`` is optional), or the new pair: never
        one key beside the other's public key."""
        refuse_existing([self.node_key, self.node_pub], force)
        refuse_directories([self.node_key, self.node_pub])  # before removing anything
        private, public = generate_static_keypair()
        make_directory(self.path)
        if force:
            _remove(self.node_pub)
        write_new_file(self.node_key, private.hex().encode() + b"\n", mode=SECRET_MODE, force=force)
        write_new_file(self.node_pub, public.hex().encode() + b"\n", mode=PUBLIC_MODE, force=force)
        return public

    def static_private(self) -> bytes:
        """The Noise static private key; checks its mode and that ``node.pub`` matches."""
        private = read_hex_key(self.node_key, "node key", private=True)
        public = static_public_key(private)
        if self.node_pub.exists() and read_hex_key(self.node_pub, "node public key") != public:
            raise IdentityError(
                f"{self.node_pub} does not match {self.node_key}: if node.key is the key the node"
                " was enrolled with, remove node.pub (it is optional); otherwise make a new pair"
                " with `keygen --force` and enroll the node again"
            )
        return private

    def install(
        self,
        certificate: NodeCertificate,
        trust: FleetTrust,
        revocations: RevocationList | None = None,
        *,
        force: bool = False,
    ) -> None:
        """Write ``node.cert``, ``fleet.json`` and (optionally) ``revocations.bin``."""
        outputs = [
            (self.node_cert, certificate.to_bytes()),
            (self.fleet_json, trust_to_json(trust)),
        ]
        if revocations is not None:
            outputs.append((self.revocations_bin, revocations.to_bytes()))
        refuse_existing([path for path, _ in outputs], force)
        make_directory(self.path)
        for path, data in outputs:
            write_new_file(path, data, mode=PUBLIC_MODE, force=force)

    def load(self) -> NodeIdentity:
        """Load and cross-check the whole node identity; raise :class:`IdentityError`."""
        private = self.static_private()
        trust = load_trust(self.fleet_json)
        try:
            encoded = read_file(self.node_cert, "node certificate", limit=MAX_SMALL_FILE_BYTES)
            certificate = NodeCertificate.from_bytes(encoded)
        except AdmissionError as exc:
            raise IdentityError(f"node certificate {self.node_cert} is invalid: {exc}") from None
        try:
            return NodeIdentity.from_parts(private, certificate, trust)
        except IdentityError as exc:
            raise IdentityError(f"node directory {self.path}: {exc}") from None

    def revocations(self, trust: FleetTrust) -> RevocationList:
        """The revocation list copied at enrollment (empty if there is none)."""
        return load_revocations(self.revocations_bin, trust, missing_ok=True)


def enroll(
    fleet: FleetDirectory,
    node: NodeDirectory,
    node_id: str,
    roles: frozenset[str],
    *,
    now: float,
    lifetime_s: float,
    force: bool = False,
    new_key: bool = False,
) -> NodeIdentity:
    """Make ``node`` ready to run: key (kept if present), certificate, trust anchor, revocations.
    ``force``: replace those files (and a ``node.pub`` left without its ``node.key``);
    ``new_key``: as for :meth:`FleetDirectory.sign`."""
    outputs = [node.node_cert, node.fleet_json, node.revocations_bin]
    _refuse_fleet_directory(fleet, node)  # it would take the node's key and copies
    refuse_existing(outputs, force)
    refuse_directories(outputs)  # before a serial is issued that no file would hold
    if node.path.is_dir():
        check_writable(node.path)
    fleet.revocations()  # fail on a bad file (trust anchor, revocations, authority key)
    fleet.authority()  # before touching the node directory
    present = static_public_key(node.static_private()) if node.has_key() else None
    if not new_key:  # before a key is made for a node id that is taken
        fleet.refuse_another_key(node_id, present, now=now)
    # (force: a node.pub left without its node.key is replaced too, not refused "use --force")
    public = present if present is not None else node.keygen(force=force)
    # the copies are read with the certificate under the fleet's lock (read before it, an
    # init --force in between gave the node the old fleet's trust anchor beside the new cert)
    cert, trust, revocations = fleet.issue(
        node_id, public, roles, now=now, lifetime_s=lifetime_s, new_key=new_key
    )
    node.install(cert, trust, revocations, force=force)
    return node.load()


def _remove(path: Path) -> None:
    """Remove the file ``path`` if it is there; :class:`IdentityError` if it cannot be."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot remove {path}: {exc.strerror}") from None


def check_writable(directory: Path) -> None:
    """:class:`IdentityError` naming ``directory`` unless a file can be created in it (tried:
    permissions, a read-only mount or a pseudo file system tell no other way), so that no
    serial is issued for a certificate that no file could hold."""
    probe = directory / f".write-check-{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise IdentityError(f"cannot create a file in {directory}: {exc.strerror}") from None
    try:
        probe.unlink()
    except OSError:
        pass


def _refuse_fleet_directory(fleet: FleetDirectory, node: NodeDirectory) -> None:
    """:class:`IdentityError` if ``node`` is ``fleet``'s own directory (by any name): the
    node's copies would be written over the fleet's files, outside the fleet's lock."""
    try:
        same = os.path.samefile(node.path, fleet.path)
    except OSError:  # one of them does not exist (yet)
        same = False
    if same:
        raise IdentityError(
            f"node directory {node.path} is the fleet directory {fleet.path}; give each node"
            " a directory of its own"
        )
