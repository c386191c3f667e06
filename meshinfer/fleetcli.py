"""Command-line plumbing shared by ``meshinfer-node`` and ``meshinfer-coord``, and the ``fleet``
subcommands both of them carry, as does ``meshinfer`` (one implementation: these functions).

Every command is an argparse subparser whose ``handler`` default takes the parsed namespace and
returns an exit code. :func:`run_cli` parses, dispatches (:func:`dispatch`, which ``meshinfer
fleet`` uses as well) and turns every expected failure (a bad argument, a
:class:`MeshInferError`, an ``OSError``) into one line on stderr and exit code 2, so
a user never sees a traceback; a reader that closed stdout early (``| head``) ends the command
quietly with exit code 141, and a closed stderr that cannot take the error line ends it quietly
with exit code 2. To add a command to a CLI::

    def add_status_command(commands: argparse._SubParsersAction) -> None:
        parser = commands.add_parser("status", help="...")
        parser.set_defaults(handler=_status)

Fleet commands (see :mod:`meshinfer.identity_files` for the directory layouts)::

    fleet init    --dir DIR --fleet-id ID [--force]      (--force keeps the old fleet's files)
    fleet sign    --dir DIR --node-id ID --pubkey HEX|FILE --roles R[,R...] [--days N] --out FILE
                  [--force] [--new-key]
    fleet enroll  --dir DIR --node-dir NODEDIR --node-id ID --roles R[,R...] [--days N] [--force]
                  [--new-key]
    fleet revoke  --dir DIR (--node-id ID | --serial N) [--reason TEXT]
    fleet show    --dir DIR [--json]

(``--days``: one minute, :data:`MIN_CERT_DAYS`, up to under 36600. ``sign --out`` is never one
of the fleet directory's own files, ``--pubkey`` never a file named as a private key, such as
``node.key`` or ``node.key.bak``; nor does ``--out`` replace a file holding a key, even with
``--force``, such as ``--pubkey``'s own ``node.pub``.)
"""

from __future__ import annotations

import argparse
import json
import os
import select
import string
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from meshinfer import __version__
from meshinfer.atomic_files import read_limited, read_regular
from meshinfer.errors import AdmissionError, ConfigError, MeshInferError
from meshinfer.identity_files import (
    FLEET_FILES,
    PUBLIC_MODE,
    FleetDirectory,
    NodeDirectory,
    check_writable,
    enroll,
    init_fleet,
    write_new_file,
)
from meshinfer.proto.identity import (
    ROLES,
    FleetTrust,
    NodeCertificate,
    RevocationList,
    check_name,
    check_reason,
    check_roles,
    utc_text,
)

EXIT_USAGE = 2
EXIT_CLOSED_PIPE = 141
"""A command whose reader closed stdout early stops quietly with the code a shell shows for a
process SIGPIPE killed (128 + 13)."""
MAX_PUBLIC_KEY_FILE_BYTES = 4096
DEFAULT_CERT_DAYS = 365.0
SECONDS_PER_DAY = 86400.0
#: the shortest ``--days`` taken (one minute): a shorter certificate expires before it is used
MIN_CERT_DAYS = 60.0 / SECONDS_PER_DAY

FLEET_HELP = "fleet authority: node certificates and revocations"
FLEET_DESCRIPTION = (
    "Manage a fleet authority directory: create it (init), certify node keys (sign, enroll), "
    "revoke certificates (revoke) and list what was issued (show)."
)

Handler = Callable[[argparse.Namespace], int]


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def new_parser(prog: str, description: str) -> tuple[CommandParser, Any]:
    """A top-level CLI parser with ``--version`` and a required command subparser group."""
    parser = CommandParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    return parser, commands


def command_line(
    prog: str, description: str, commands: Sequence[Callable[[Any], Any]]
) -> CommandParser:
    """:func:`new_parser` with every ``add(commands)`` function of ``commands`` applied."""
    parser, group = new_parser(prog, description)
    for add in commands:
        add(group)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run the chosen command's handler and return its exit code."""
    _tolerate_unencodable_output()
    args = parse_command_line(parser, argv)
    return args if isinstance(args, int) else dispatch(parser, args)


def parse_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace | int:
    """The parsed ``argv``, or the exit code where parsing ended the command (``--help``,
    ``--version``: 0; a usage error, already printed: 2)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the handler ``args`` chose and return its exit code; every expected failure is one
    line on stderr (see the module docstring)."""
    _tolerate_unencodable_output()
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in a warning at exit
        return code
    except BrokenPipeError as exc:
        if not stdout_gone(exc):  # a pipe the command wrote to itself: an error like any
            return report_error(parser, exc)
        return EXIT_CLOSED_PIPE
    except (MeshInferError, OSError) as exc:
        return report_error(parser, exc)
    except KeyboardInterrupt:
        return 130


def report_error(parser: argparse.ArgumentParser, exc: BaseException) -> int:
    """Print ``exc`` as the command's one error line on stderr; return :data:`EXIT_USAGE`.

    A stderr whose reader has gone (``2>&1 | head -0``) takes nothing: the command still ends
    quietly with :data:`EXIT_USAGE`, as argparse's own usage errors do, instead of a traceback
    and exit code 1 (or 120 from the flush at exit)."""
    try:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
    except OSError:  # BrokenPipeError, or any other failing stderr
        _discard_stream(sys.stderr)
    return EXIT_USAGE


def stdout_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is the reader of stdout having gone (``... | head``); if so, stdout now
    points at /dev/null (:func:`_discard_stdout`) and the command should stop quietly with
    :data:`EXIT_CLOSED_PIPE`. A broken pipe the command opened itself is not (False)."""
    if not isinstance(exc, BrokenPipeError) or not _stdout_closed():
        return False
    _discard_stdout()
    return True


def _stdout_closed() -> bool:
    """Whether whoever read stdout has gone (``... | head``): its pipe reports an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor, or no poll
        return False


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail on the closed pipe again:
    the reader stopped reading, which is no error of this command (as with ``git log | head``)."""
    _discard_stream(sys.stdout)


def _discard_stream(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null (a stream without one is left alone)."""
    try:
        fileno = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fileno)
    finally:
        os.close(devnull)


def _tolerate_unencodable_output() -> None:
    """Print what stdout cannot encode (a path of undecodable bytes) escaped rather than fail
    after the work is done; a stream that already tolerates it is left alone."""
    stdout = sys.stdout
    if getattr(stdout, "errors", None) == "strict" and hasattr(stdout, "reconfigure"):
        stdout.reconfigure(errors="backslashreplace")


# --- argument types (errors become one-line argparse messages) --------------------------------


def _argument_type(check: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = check.__name__.lstrip("_")
    return convert


def _node_id(text: str) -> str:
    return check_name("node id", text)


def _fleet_id(text: str) -> str:
    return check_name("fleet id", text)


def _roles(text: str) -> frozenset[str]:
    return check_roles(role.strip() for role in text.split(",") if role.strip())


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = float("nan")
    if not MIN_CERT_DAYS <= days < 100 * 366:
        raise ConfigError(
            f"days must be a number from {MIN_CERT_DAYS:.6f} (one minute) to below 36600,"
            f" got {text!r}"
        )
    return days


def _serial(text: str) -> int:
    # int() also takes non-ASCII digits; 20 digits hold any serial (one below 2**63), and int()
    # refuses over 4,300 ("invalid serial value: " and all of them, echoed)
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise ConfigError(f"serial must be a non-negative integer, got {text!r:.80}")
    return int(text)


def _public_key(text: str) -> bytes:
    """A 64-hex-digit key, or the path of a file (such as node.pub) holding one."""
    key = _hex_key_text(text)
    if key is not None:
        return key
    path = Path(text)
    wrong = _hex_digits(text)
    # (os.path.lexists: Path.exists raised OSError on a name too long, a traceback from argparse)
    if wrong is not None and not os.path.lexists(path):
        # (not "file not found: <the text>": the paste is not echoed, it may be a private key)
        raise ConfigError(
            f"the key given is {wrong} (and names no file): give node.pub's 64 hex digits"
            " (32 bytes, no 0x), or the file holding them"
        )
    # node.key (or a symlink to it, or a copy such as node.key.bak) holds the private key:
    # certifying it would publish it (os.path.realpath: Path.resolve raises RuntimeError on a
    # symlink loop in Python 3.11)
    if _private_key_name(path) or _private_key_name(Path(os.path.realpath(path))):
        raise ConfigError(f"{text!r} is a private key file; give the public key (node.pub)")
    # never blocks: a FIFO there (even one swapped in after a look) is refused
    try:
        content = read_limited(path, "file", limit=MAX_PUBLIC_KEY_FILE_BYTES, error=ConfigError)
    except ConfigError as exc:
        raise ConfigError(f"{exc}: give a 64-hex-digit key or the file holding one") from None
    key = _hex_key_text(content.decode("ascii", errors="replace"))
    if key is None:
        raise ConfigError(f"{text!r} does not hold a 32-byte key as 64 hex digits")
    return key


def _private_key_name(path: Path) -> bool:
    """Whether ``path`` is named as a private key file: ``node.key``, ``authority.key`` or a
    copy of one (``node.key.bak``), but not ``host.key.pub``."""
    suffixes = path.suffixes
    return ".key" in suffixes and suffixes[-1] != ".pub"


def _hex_key_text(text: str) -> bytes | None:
    """The 32-byte key that ``text`` spells as 64 hex digits (blanks around allowed), or None."""
    candidate = text.strip()
    if len(candidate) != 64 or not all(c in string.hexdigits for c in candidate):
        return None
    return bytes.fromhex(candidate)


def _hex_digits(text: str) -> str | None:
    """What is wrong with ``text`` as a key if it is hex digits (blanks around and a 0x prefix
    allowed) and nothing else, at least 16 of them: a key pasted with a digit too many or too
    few."""
    candidate = text.strip()
    prefixed = candidate[:2].lower() == "0x"
    candidate = candidate[2:] if prefixed else candidate
    if len(candidate) < 16 or not all(c in string.hexdigits for c in candidate):
        return None  # (a short one is more likely a file name mistyped: "file not found")
    if prefixed and len(candidate) == 64:
        return "64 hex digits behind a 0x prefix"
    return f"{len(candidate)} hex digits, not 64"


def _reason(text: str) -> str:
    if not text.isprintable():
        raise ConfigError(f"reason must be printable text on one line, got {text!r:.80}")
    return check_reason(text)


NODE_ID = _argument_type(_node_id)
FLEET_ID = _argument_type(_fleet_id)
ROLE_LIST = _argument_type(_roles)
DAYS = _argument_type(_days)
SERIAL = _argument_type(_serial)
PUBLIC_KEY = _argument_type(_public_key)
REASON = _argument_type(_reason)


# --- pieces shared by the daemons' command lines ----------------------------------------------


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` option of a daemon command."""
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )


def add_config_command(commands: Any, filename: str, schema: Callable[[], Any]) -> None:
    """``config``: print the annotated default ``filename``, or ``--check FILE`` against it.

    ``schema()`` returns the :class:`~meshinfer.tomlconfig.Schema` (imported only when run).
    """
    help_text = f"print the annotated default {filename} (every key, documented)"
    parser = commands.add_parser("config", help=help_text, description=help_text)
    parser.add_argument("--check", type=Path, help="validate this file instead")
    parser.set_defaults(handler=lambda args: _config(schema(), args.check))


def _config(schema: Any, check: Path | None) -> int:
    if check is not None:
        schema.load(check)  # ConfigError -> one line on stderr, exit 2
        print(f"{check}: ok")
        return 0
    print(schema.render(), end="")
    return 0


# --- fleet commands ----------------------------------------------------------------------------


def add_fleet_commands(commands: Any) -> argparse.ArgumentParser:
    """Add the ``fleet`` command group to a CLI's subparsers; return the ``fleet`` parser."""
    fleet = commands.add_parser("fleet", help=FLEET_HELP, description=FLEET_DESCRIPTION)
    fleet_commands = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)
    for add in (_add_init, _add_sign, _add_enroll, _add_revoke, _add_show):
        add(fleet_commands)
    return fleet


def _command(commands: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--dir", required=True, type=Path, help="fleet directory")
    parser.set_defaults(handler=handler)
    return parser


def _add_init(commands: Any) -> None:
    parser = _command(commands, "init", "create a fleet authority and its directory", _init)
    parser.add_argument("--fleet-id", required=True, type=FLEET_ID)
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing (or unfinished) fleet; its files are moved to a"
        " replaced-<UTC time> directory inside --dir, not deleted",
    )


def _add_sign(commands: Any) -> None:
    parser = _command(commands, "sign", "sign a certificate for a node's public key", _sign)
    parser.add_argument("--node-id", required=True, type=NODE_ID)
    parser.add_argument("--pubkey", required=True, type=PUBLIC_KEY, help="hex key or node.pub")
    _add_roles_and_days(parser)
    parser.add_argument("--out", required=True, type=Path, help="certificate file to write")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_new_key(parser)


def _add_enroll(commands: Any) -> None:
    help_text = "make a ready node directory: key (kept if present), certificate, trust anchor"
    parser = _command(commands, "enroll", help_text, _enroll)
    parser.add_argument("--node-dir", required=True, type=Path)
    parser.add_argument("--node-id", required=True, type=NODE_ID)
    _add_roles_and_days(parser)
    parser.add_argument("--force", action="store_true", help="replace the node's cert and copies")
    _add_new_key(parser)


def _add_new_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--new-key",
        action="store_true",
        help="certify a node id that holds a good certificate for another key (the node moves"
        " to a new key; revoke the old serial once it runs with the new one)",
    )


def _add_revoke(commands: Any) -> None:
    parser = _command(commands, "revoke", "revoke a certificate or all of a node's", _revoke)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--node-id", type=NODE_ID)
    target.add_argument("--serial", type=SERIAL)
    parser.add_argument("--reason", default="", type=REASON, help="short text shown to operators")


def _add_show(commands: Any) -> None:
    parser = _command(commands, "show", "show the fleet, its certificates and revocations", _show)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _add_roles_and_days(parser: argparse.ArgumentParser) -> None:
    roles = ",".join(sorted(ROLES))
    parser.add_argument("--roles", required=True, type=ROLE_LIST, help=f"comma list of {roles}")
    parser.add_argument("--days", type=DAYS, default=DEFAULT_CERT_DAYS, help="validity in days")


def _init(args: argparse.Namespace) -> int:
    fleet, replaced = init_fleet(args.dir, args.fleet_id, force=args.force, now=time.time())
    trust = fleet.trust()
    print(f"fleet {trust.fleet_id} created in {args.dir}")
    print(f"authority key fingerprint {trust.authority_fingerprint}")
    if replaced is not None:
        print(f"the fleet it replaced (its authority key too) was moved to {replaced}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    fleet = FleetDirectory(args.dir)
    fleet.authority()  # refuse early if the authority is unusable
    _check_output(args.out, args.force, fleet)  # before a serial is issued no file would hold
    lifetime = args.days * SECONDS_PER_DAY
    cert = fleet.sign(
        args.node_id,
        args.pubkey,
        args.roles,
        now=time.time(),
        lifetime_s=lifetime,
        new_key=args.new_key,
    )
    write_new_file(args.out, cert.to_bytes(), mode=PUBLIC_MODE, force=args.force)
    print(f"signed serial {cert.serial} for node {cert.node_id} ({cert.fingerprint}) -> {args.out}")
    return 0


def _check_output(out: Path, force: bool, fleet: FleetDirectory) -> None:
    if out.is_dir() and not out.is_symlink():
        raise ConfigError(f"--out {out} is a directory; give the certificate file to write")
    if out.name in FLEET_FILES and _same_directory(out.parent, fleet.path):
        # with --force the certificate replaced it: the authority key lost for good, or the
        # index or revocation list rewritten outside the fleet's lock
        raise ConfigError(
            f"--out {out} is the fleet directory's own {out.name}; write the certificate"
            " elsewhere (such as the node's directory, as node.cert)"
        )
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")
    if (out.exists() or out.is_symlink()) and not force:
        raise ConfigError(f"{out} already exists; refusing to overwrite it (use --force)")
    if _holds_key(out):
        # with --force the certificate replaced it: --pubkey's own node.pub (the node then
        # fails to start: node.pub does not match), or a node.key lost for good
        raise ConfigError(
            f"--out {out} holds a key (64 hex digits), not a certificate; refusing to overwrite"
            " it even with --force: write the certificate elsewhere (such as the node's"
            " directory, as node.cert)"
        )
    check_writable(out.parent)


def _holds_key(path: Path) -> bool:
    """Whether ``path`` is a regular file holding a 32-byte key as 64 hex digits (a public or
    private key file, which a certificate never is)."""
    try:
        data = read_regular(path, MAX_PUBLIC_KEY_FILE_BYTES)
    except (OSError, ValueError):
        return False
    return _hex_key_text(data.decode("ascii", errors="replace")) is not None


def _same_directory(one: Path, other: Path) -> bool:
    """Whether ``one`` and ``other`` are one directory, by any name (False if either is
    missing)."""
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def _enroll(args: argparse.Namespace) -> int:
    node = NodeDirectory(args.node_dir)
    identity = enroll(
        FleetDirectory(args.dir),
        node,
        args.node_id,
        args.roles,
        now=time.time(),
        lifetime_s=args.days * SECONDS_PER_DAY,
        force=args.force,
        new_key=args.new_key,
    )
    cert = identity.certificate
    print(f"enrolled node {cert.node_id} serial {cert.serial} ({cert.fingerprint}) in {node.path}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    fleet = FleetDirectory(args.dir)
    entry = fleet.revoke(
        now=time.time(), serial=args.serial, node_id=args.node_id, reason=args.reason
    )
    target = f"serial {entry.serial}" if entry.serial is not None else f"node {entry.node_id}"
    print(f"revoked {target}; revocation list version {entry.sequence}")
    print(
        "the mesh admits that certificate until a running node has this list: push it to the"
        f" coordinator (meshinfer-coord revocations --push {args.dir}), or copy"
        f" {fleet.revocations_bin} into the identity directory of any running node or"
        " coordinator; gossip then spreads it to every node (one not running now gets it when"
        " it joins)"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    fleet = FleetDirectory(args.dir)
    report = fleet_report(fleet, now=time.time())
    print(json.dumps(report, indent=2) if args.json else _format_report(report))
    return 0


# --- fleet report ------------------------------------------------------------------------------


def fleet_report(fleet: FleetDirectory, *, now: float) -> dict[str, Any]:
    """A JSON-ready description of the fleet, its issued certificates and revocations."""
    trust, revocations = fleet.trust(), fleet.revocations()
    return {
        "fleet_id": trust.fleet_id,
        "authority_public_key": trust.authority_public_key.hex(),
        "authority_fingerprint": trust.authority_fingerprint,
        "revocation_version": revocations.version,
        "certificates": [_cert_record(c, trust, revocations, now) for c in fleet.issued()],
        "revocations": revocations.records(),
    }


def _cert_record(
    cert: NodeCertificate, trust: FleetTrust, revocations: RevocationList, now: float
) -> dict[str, Any]:
    return {
        "serial": cert.serial,
        "node_id": cert.node_id,
        "roles": sorted(cert.roles),
        "not_before": cert.not_before,
        "not_after": cert.not_after,
        "fingerprint": cert.fingerprint,
        "static_public_key": cert.static_public.hex(),
        "status": _status(cert, trust, revocations, now),
    }


def _status(
    cert: NodeCertificate, trust: FleetTrust, revocations: RevocationList, now: float
) -> str:
    try:
        cert.verify(trust)
    except AdmissionError as exc:  # e.g. the authority key was replaced after it was issued
        return exc.reason
    if revocations.is_revoked(cert):
        return "revoked"
    return cert.validity_problem(now, 0.0) or "valid"


def _format_report(report: dict[str, Any]) -> str:
    lines = [
        f"fleet id:        {report['fleet_id']}",
        f"authority key:   {report['authority_fingerprint']}",
        f"revocations:     version {report['revocation_version']}, "
        f"{_count(len(report['revocations']), 'entry', 'entries')}",
        f"certificates:    {len(report['certificates'])} issued",
    ]
    header = f"  {'SERIAL':>6}  {'NODE ID':<24} {'ROLES':<24} {'NOT AFTER (UTC)':<20} "
    lines += [header + f"{'FINGERPRINT':<16}  STATUS"] if report["certificates"] else []
    for c in report["certificates"]:
        lines.append(
            f"  {c['serial']:>6}  {c['node_id']:<24} {','.join(c['roles']):<24} "
            f"{utc_text(c['not_after']):<20} {c['fingerprint']:<16}  {c['status']}"
        )
    for r in report["revocations"]:
        target = f"serial {r['serial']}" if r["serial"] is not None else f"node {r['node_id']}"
        reason = f": {r['reason']}" if r["reason"] else ""
        lines.append(
            f"  revocation {r['sequence']}: {target} at {utc_text(r['revoked_at'])}{reason}"
        )
    return "\n".join(lines)


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"
