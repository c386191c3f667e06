"""The fleet operator's directory, and the files of the fleet every node holds a copy of.

Fleet directory (kept by the fleet operator, e.g. on the coordinator host)::

    authority.key    0600  Ed25519 seed of the fleet authority, hex, one line
    fleet.json       0644  {"format": 1, "fleet_id": ..., "authority_public_key": hex}: the trust
                           anchor every node needs (a key that is no Ed25519 point is refused)
    revocations.bin  0644  RevocationList.to_bytes() (each entry signed by the authority)
    issued.json      0644  index of issued certificates, {"format": 1, "certificates": [...]};
                           serials are allocated from it (highest + 1)
    api-token        0600  random url-safe token for the coordinator HTTP API (read: at least
                           16 printable ASCII characters, no spaces)
    replaced-<UTC time>/  0700  the files of a fleet ``fleet init --force`` replaced

``fleet init`` is all or nothing: it writes the five files into a private directory inside the
fleet directory, then names them, ``fleet.json`` last; a fleet directory holding some of them
without ``fleet.json`` (an init cut short) is refused as an unfinished fleet until
``init --force`` makes it again. ``--force`` moves the files it replaces (the authority key
too) into ``replaced-<UTC time>/`` instead of deleting them. A node id that holds a good
certificate for another key is not certified again unless asked (``--new-key``). Commands that
change the index or the revocation list hold an exclusive lock on the fleet directory meanwhile
(:func:`meshinfer.filelock.lock_directory`); a second one at once is refused.

The readers of ``fleet.json`` and ``revocations.bin`` (:func:`load_trust`,
:func:`load_revocations`) are here too: a node directory holds copies of both
(:mod:`meshinfer.identity_files`, which imports this module and re-exports everything it
used to define). Files are written whole by :mod:`meshinfer.atomic_files` and read with a size
cap; every failure raises :class:`IdentityError` naming the file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.bindings

from meshinfer.atomic_files import (
    MAX_FILE_BYTES,
    PUBLIC_MODE,
    SECRET_MODE,
    make_directory,
    read_file,
    refuse_directories,
    refuse_existing,
    replace_file,
    sync_directory,
    write_new_file,
)
from meshinfer.errors import AdmissionError, ConfigError, IdentityError, RemoteProtocolError
from meshinfer.filelock import LockHeld, LockUnavailable, lock_directory
from meshinfer.proto.identity import (
    MAX_REVOCATION_LIST_BYTES,
    FleetAuthority,
    FleetTrust,
    NodeCertificate,
    RevocationEntry,
    RevocationList,
)

FILE_FORMAT = 1
MAX_SMALL_FILE_BYTES = 64 * 1024  # keys, tokens, fleet.json
#: the shortest API token taken (as the coordinator daemon's ``read_token``; init writes 43)
MIN_API_TOKEN_CHARS = 16
# The names of a fleet directory's files (fleet.json and revocations.bin also of a node's).
AUTHORITY_KEY = "authority.key"
API_TOKEN = "api-token"
REVOCATIONS_BIN = "revocations.bin"
ISSUED_JSON = "issued.json"
FLEET_JSON = "fleet.json"
#: a fleet directory's files, in the order ``fleet init`` names them: the trust anchor last
FLEET_FILES = (AUTHORITY_KEY, API_TOKEN, REVOCATIONS_BIN, ISSUED_JSON, FLEET_JSON)
STAGING_PREFIX = ".init-"  # where ``fleet init`` writes a new fleet before naming its files
BACKUP_PREFIX = "replaced-"  # where ``fleet init --force`` keeps the fleet it replaced


# --- key files and the fleet's trust anchor and revocations ------------------------------------


def read_hex_key(path: Path, what: str, *, private: bool = False) -> bytes:
    """The 32-byte key ``path`` holds as 64 hex digits (one line); :class:`IdentityError`
    naming ``what`` if it does not (``private``: or if group or others may read the file read,
    as :func:`~meshinfer.atomic_files.read_file` checks)."""
    data = read_file(path, what, limit=MAX_SMALL_FILE_BYTES, private=private)
    text = data.decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise IdentityError(f"{what} {path} must hold 64 hex digits (a 32-byte key)")
    return key


def trust_to_json(trust: FleetTrust) -> bytes:
    """The ``fleet.json`` contents for ``trust``."""
    document = {
        "format": FILE_FORMAT,
        "fleet_id": trust.fleet_id,
        "authority_public_key": trust.authority_public_key.hex(),
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def load_trust(path: Path) -> FleetTrust:
    """Read a ``fleet.json`` trust anchor."""
    document = _load_json(path, "fleet trust file", limit=MAX_SMALL_FILE_BYTES)
    try:
        key = bytes.fromhex(document["authority_public_key"])
        trust = FleetTrust(document["fleet_id"], key)
    except KeyError as exc:
        raise IdentityError(f"fleet trust file {path} is invalid: missing {exc}") from None
    except (TypeError, ValueError) as exc:
        raise IdentityError(f"fleet trust file {path} is invalid: {exc}") from None
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(key):
        # every certificate and revocation would then fail as "bad signature", far from here
        raise IdentityError(
            f"fleet trust file {path} is invalid: authority_public_key is not an Ed25519 public"
            " key (copy fleet.json again from the fleet directory)"
        )
    return trust


def load_revocations(path: Path, trust: FleetTrust, *, missing_ok: bool = False) -> RevocationList:
    """Read and verify ``revocations.bin``; an absent file is an empty list if ``missing_ok``
    (a symlink to a missing file is not absent: it is refused, as a list nobody can read)."""
    if missing_ok and not (path.exists() or path.is_symlink()):
        return RevocationList(trust.fleet_id)
    return parse_revocations(read_revocations(path), path, trust)


def read_revocations(path: Path) -> bytes:
    """``revocations.bin``'s bytes, unchecked (:func:`parse_revocations` checks them)."""
    return read_file(path, "revocation list", limit=MAX_REVOCATION_LIST_BYTES)


def parse_revocations(data: bytes, path: Path, trust: FleetTrust) -> RevocationList:
    """Decode and verify ``data``, read from ``path`` (named in the error)."""
    try:
        return RevocationList.from_bytes(data, trust)
    except RemoteProtocolError as exc:
        raise IdentityError(f"revocation list {path} is invalid: {exc}") from None


def _load_json(path: Path, what: str, *, limit: int = MAX_FILE_BYTES) -> dict[str, Any]:
    try:
        document = json.loads(read_file(path, what, limit=limit))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise IdentityError(f"{what} {path} is not valid JSON") from None
    if not isinstance(document, dict) or not _is_format(document.get("format")):
        raise IdentityError(f"{what} {path} has an unknown format")
    return document


def _is_header_text(text: str) -> bool:
    """Whether ``text`` can be sent as is in an HTTP header: printable ASCII, no spaces."""
    return text.isascii() and text.isprintable() and " " not in text


def _is_format(value: object) -> bool:
    return type(value) is int and value == FILE_FORMAT


# --- fleet directory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetDirectory:
    """The fleet operator's directory: authority key, trust anchor, index, revocations, token."""

    path: Path

    @property
    def authority_key(self) -> Path:
        return self.path / AUTHORITY_KEY

    @property
    def fleet_json(self) -> Path:
        return self.path / FLEET_JSON

    @property
    def revocations_bin(self) -> Path:
        return self.path / REVOCATIONS_BIN

    @property
    def issued_json(self) -> Path:
        return self.path / ISSUED_JSON

    @property
    def api_token_file(self) -> Path:
        return self.path / API_TOKEN

    @classmethod
    def init(cls, path: Path, fleet_id: str, *, force: bool = False) -> FleetDirectory:
        """Create a new fleet: authority key, trust anchor, empty index and revocations, token
        (see :func:`init_fleet`, which also says where a replaced fleet went)."""
        return init_fleet(Path(path), fleet_id, force=force, now=time.time())[0]

    def files(self) -> list[Path]:
        """The fleet's five files, in the order :func:`init_fleet` gives them their names
        (``fleet.json`` last: a directory without it holds no finished fleet)."""
        return [self.path / name for name in FLEET_FILES]

    def trust(self) -> FleetTrust:
        """The fleet's public trust anchor."""
        if not self.fleet_json.exists():
            _refuse_unfinished(self)
        return load_trust(self.fleet_json)

    def authority(self) -> FleetAuthority:
        """The signing authority; checks the key against ``fleet.json``."""
        trust = self.trust()
        seed = read_hex_key(self.authority_key, "authority key", private=True)
        authority = FleetAuthority.create(trust.fleet_id, seed)
        if authority.trust != trust:
            raise IdentityError(f"{self.authority_key} does not match {self.fleet_json}")
        return authority

    def revocations(self) -> RevocationList:
        """The fleet's current revocation list, verified."""
        return load_revocations(self.revocations_bin, self.trust())

    def api_token(self) -> str:
        """The coordinator HTTP API token."""
        data = read_file(self.api_token_file, "api token", limit=MAX_SMALL_FILE_BYTES, private=True)
        token = data.decode("ascii", "replace").strip()
        if len(token) < MIN_API_TOKEN_CHARS or not _is_header_text(token):
            raise IdentityError(
                f"api token {self.api_token_file} holds no usable token (one line of at least"
                f" {MIN_API_TOKEN_CHARS} printable ASCII characters without spaces);"
                " `fleet init` writes one"
            )
        return token

    def issued(self) -> list[NodeCertificate]:
        """Every certificate this fleet directory issued, by serial."""
        fleet_id = self.trust().fleet_id
        document = _load_json(self.issued_json, "issued-certificates index")
        try:
            certs = [bytes.fromhex(c["certificate"]) for c in document["certificates"]]
            issued = [NodeCertificate.from_bytes(c) for c in certs]
        except KeyError as exc:
            raise IdentityError(f"index {self.issued_json} is invalid: missing {exc}") from None
        except (TypeError, ValueError, AdmissionError) as exc:
            raise IdentityError(f"index {self.issued_json} is invalid: {exc}") from None
        foreign = next((c for c in issued if c.fleet_id != fleet_id), None)
        if foreign is not None:
            raise IdentityError(
                f"index {self.issued_json} is invalid: serial {foreign.serial} is a certificate"
                f" of fleet {foreign.fleet_id!r}, not {fleet_id!r}"
            )
        return sorted(issued, key=lambda c: c.serial)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the fleet directory's lock while reading, changing and rewriting the index or the
        revocation list, so that two commands at once can neither issue one serial twice nor
        lose a revocation (the second one is refused)."""
        fd = _lock_directory(self.path)
        try:
            yield
        finally:
            os.close(fd)

    def sign(
        self,
        node_id: str,
        static_public: bytes,
        roles: frozenset[str],
        *,
        now: float,
        lifetime_s: float,
        new_key: bool = False,
    ) -> NodeCertificate:
        """Issue a certificate valid from ``now`` for ``lifetime_s`` seconds and index it.

        A node id that holds a good certificate (issued, not revoked, not expired) for another
        key is refused (two machines under one id), unless ``new_key`` (the node moves to a new
        key; revoke the old serial once it runs with the new one)."""
        cert, _, _ = self.issue(
            node_id, static_public, roles, now=now, lifetime_s=lifetime_s, new_key=new_key
        )
        return cert

    def issue(
        self,
        node_id: str,
        static_public: bytes,
        roles: frozenset[str],
        *,
        now: float,
        lifetime_s: float,
        new_key: bool = False,
    ) -> tuple[NodeCertificate, FleetTrust, RevocationList]:
        """:meth:`sign`, and the trust anchor and revocation list read under the same lock: the
        copies a node enrolled with the certificate needs (read before the lock, an ``init
        --force`` in between gave the node the old fleet's anchor beside the new fleet's
        certificate, and a revocation in between was missing from its copy)."""
        if not now + lifetime_s > now:  # (a lifetime too short to move a float: none)
            raise ConfigError(f"certificate lifetime must be positive, got {lifetime_s}")
        with self._exclusive():
            authority = self.authority()  # under the lock: an init --force may have run
            issued = self.issued()
            revocations = self.revocations()
            if not new_key:
                self.refuse_another_key(
                    node_id, static_public, now=now, issued=issued, revocations=revocations
                )
            serial = max((c.serial for c in issued), default=0) + 1
            cert = authority.sign(
                node_id=node_id,
                static_public=static_public,
                roles=roles,
                not_before=now,
                not_after=now + lifetime_s,
                serial=serial,
            )
            replace_file(self.issued_json, _index_json([*issued, cert]))
        return cert, authority.trust, revocations

    def refuse_another_key(
        self,
        node_id: str,
        static_public: bytes | None,
        *,
        now: float,
        issued: list[NodeCertificate] | None = None,
        revocations: RevocationList | None = None,
    ) -> None:
        """:class:`IdentityError` if ``node_id`` holds a good certificate for a key other than
        ``static_public`` (None: a key not made yet), saying what to do."""
        if revocations is None:
            revocations = self.revocations()
        holding = [
            c
            for c in (self.issued() if issued is None else issued)
            if c.node_id == node_id
            and c.static_public != static_public
            and c.seconds_left(now, 0.0) >= 0  # (NaN: not held)
            and not revocations.is_revoked(c)
        ]
        if holding:
            held = holding[-1]
            raise IdentityError(
                f"node id {node_id!r} already holds serial {held.serial} for another key"
                f" ({held.fingerprint}), so two machines would share it: revoke that one first"
                f" (fleet revoke --serial {held.serial}), or give --new-key if the node moves"
                " to a new key (and revoke the old serial once it runs with the new one)"
            )

    def revoke(
        self, *, now: float, serial: int | None = None, node_id: str | None = None, reason: str = ""
    ) -> RevocationEntry:
        """Revoke an issued serial, or every issued certificate of a node; return the entry."""
        with self._exclusive():
            # read under the lock, with the list it signs onto: an init --force that ran before
            # the lock was taken replaced both (an entry of the old key made the list unreadable)
            authority = self.authority()
            revocations = self.revocations()
            targets = [c for c in self.issued() if c.serial == serial or c.node_id == node_id]
            what = f"serial {serial}" if serial is not None else f"node id {node_id!r}"
            if not targets:
                raise IdentityError(f"no certificate with {what} was issued from {self.path}")
            if all(revocations.is_revoked(c) for c in targets):
                raise IdentityError(f"{what} is already revoked")
            updated = authority.revoke(
                revocations, now=now, serial=serial, node_id=node_id, reason=reason
            )
            replace_file(self.revocations_bin, updated.to_bytes())
        (entry,) = updated.since(revocations.version).entries
        return entry


def init_fleet(
    path: Path, fleet_id: str, *, force: bool = False, now: float
) -> tuple[FleetDirectory, Path | None]:
    """Create a new fleet in ``path``, all or nothing; return it, and the directory inside
    ``path`` that the fleet it replaced (``force``) was moved to, or None.

    The five files are written into a directory of their own inside ``path`` first, then
    given their names one by one, ``fleet.json`` last; a fleet replaced is first moved aside
    (``fleet.json`` first) into ``replaced-<UTC time>/``. So an init cut short leaves either
    the old fleet whole, or files without a ``fleet.json``, which every fleet command refuses
    as an unfinished fleet (:meth:`FleetDirectory.trust`) until ``--force`` makes it again.
    """
    fleet = FleetDirectory(Path(path))
    refuse_directories(fleet.files())  # before replacing anything
    authority = FleetAuthority.create(fleet_id)
    contents = {
        AUTHORITY_KEY: (authority.seed.hex().encode() + b"\n", SECRET_MODE),
        API_TOKEN: (secrets.token_urlsafe(32).encode() + b"\n", SECRET_MODE),
        REVOCATIONS_BIN: (RevocationList(fleet_id).to_bytes(), PUBLIC_MODE),
        ISSUED_JSON: (_index_json([]), PUBLIC_MODE),
        FLEET_JSON: (trust_to_json(authority.trust), PUBLIC_MODE),
    }
    make_directory(fleet.path)
    with fleet._exclusive():
        existing = [p for p in fleet.files() if p.exists() or p.is_symlink()]
        if existing and not force:
            _refuse_unfinished(fleet)
            refuse_existing(existing, force)
        _remove_staging_left_over(fleet.path)  # by an init cut short (it holds a secret)
        staging = _stage(fleet.path, contents)
        try:
            backup = _set_aside(fleet.path, existing, now) if existing else None
            _name_files(staging, fleet.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return fleet, backup


def _stage(directory: Path, contents: dict[str, tuple[bytes, int]]) -> Path:
    """A new private directory inside ``directory`` holding ``contents``, flushed to disk."""
    staging = directory / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
    try:
        staging.mkdir(mode=0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create directory {staging}: {exc.strerror}") from None
    try:
        for name, (data, mode) in contents.items():
            write_new_file(staging / name, data, mode=mode)
    except IdentityError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _set_aside(directory: Path, files: list[Path], now: float) -> Path:
    """Move ``files`` (``fleet.json`` first) into a new ``replaced-<UTC time>`` directory
    inside ``directory``; return it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    for attempt in range(1, 1000):
        backup = directory / f"{BACKUP_PREFIX}{stamp}{'' if attempt == 1 else f'-{attempt}'}"
        try:
            backup.mkdir(mode=0o700)  # it holds the old authority key
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise IdentityError(f"cannot create directory {backup}: {exc.strerror}") from None
    else:
        raise IdentityError(f"cannot create a {BACKUP_PREFIX}{stamp} directory in {directory}")
    for path in sorted(files, key=lambda p: p.name != FLEET_JSON):
        _rename(path, backup / path.name)
    sync_directory(backup)
    sync_directory(directory)
    return backup


def _name_files(staging: Path, directory: Path) -> None:
    """Move the staged fleet's files into ``directory``, ``fleet.json`` last."""
    for name in FLEET_FILES:
        _rename(staging / name, directory / name)
    sync_directory(directory)


def _rename(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
    except OSError as exc:
        raise IdentityError(f"cannot move {source} to {target}: {exc.strerror}") from None


def _remove_staging_left_over(directory: Path) -> None:
    for left in directory.glob(f"{STAGING_PREFIX}*"):
        if left.is_dir() and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)


def _refuse_unfinished(fleet: FleetDirectory) -> None:
    """:class:`IdentityError` if ``fleet`` holds some of its files but not ``fleet.json``."""
    present = [p.name for p in fleet.files() if p.exists() or p.is_symlink()]
    if present and FLEET_JSON not in present:
        backups = sorted(p.name for p in fleet.path.glob(f"{BACKUP_PREFIX}*"))
        kept = f"; the fleet replaced last is in {backups[-1]}/ there" if backups else ""
        raise IdentityError(
            f"fleet directory {fleet.path} holds an unfinished fleet ({', '.join(present)}"
            f" without {FLEET_JSON}: a `fleet init` was cut short{kept}); make it again with"
            " `fleet init --force`, which keeps these files in a backup directory"
        )


def _lock_directory(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock (close it to unlock)."""
    try:
        return lock_directory(path)
    except LockHeld:
        raise IdentityError(
            f"fleet directory {path} is in use by another fleet command;"
            " run this one again when that one is done"
        ) from None
    except LockUnavailable as exc:
        raise IdentityError(f"fleet directory {path}: {exc}") from None


def _index_json(certs: list[NodeCertificate]) -> bytes:
    records = [
        {
            "serial": c.serial,
            "node_id": c.node_id,
            "fingerprint": c.fingerprint,
            "certificate": c.to_bytes().hex(),
        }
        for c in certs
    ]
    return (json.dumps({"format": FILE_FORMAT, "certificates": records}, indent=2) + "\n").encode()
