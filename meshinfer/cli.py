"""``meshinfer``: the umbrella command (``demo``, ``wire-demo``, ``fleet``, ``version``).

``meshinfer fleet ...`` is the fleet authority's command group of ``meshinfer-coord fleet``
and ``meshinfer-node fleet`` (:mod:`meshinfer.fleetcli`, one implementation)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from meshinfer import PROTOCOL_VERSION, __version__
from meshinfer.fleetcli import (
    EXIT_CLOSED_PIPE,
    CommandParser,
    add_fleet_commands,
    dispatch,
    parse_command_line,
    stdout_gone,
)


def _build_parser() -> argparse.ArgumentParser:
    description = "meshinfer: demos on this machine, the fleet authority's commands, version"
    parser = CommandParser(prog="meshinfer", description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="a coordinator and node daemons on this machine classify digits together",
        description="Starts a throw-away fleet: a coordinator and node daemons as processes on"
        " loopback (CPU engine, mDNS), classifies the held-out digits across them, kills one"
        " node halfway, runs an ensemble, and prints accuracy, throughput, latency and the"
        " work each node did.",
    )
    demo.add_argument("--nodes", type=int, default=3, help="node daemons, 2..8 (default 3)")
    demo.add_argument("--in-flight", type=int, default=12, help="tasks in flight (default 12)")
    demo.add_argument("--no-kill", action="store_true", help="do not kill a node halfway")
    demo.add_argument("--keep", type=Path, help="keep the fleet, configs and logs in this dir")
    demo.add_argument("--quiet", action="store_true", help="print only the summary")
    demo.add_argument(
        "--json",
        action="store_true",
        help="print the summary as one JSON object (its keys: python3 -m pydoc meshinfer.demo)",
    )
    wire = sub.add_parser(
        "wire-demo", help="two nodes enrol, connect over Noise-encrypted TCP, exchange messages"
    )
    wire.add_argument("--messages", type=int, default=5, help="messages each way (default 5)")
    wire.add_argument("--quiet", action="store_true", help="print only the summary")
    add_fleet_commands(sub)
    sub.add_parser("version", help="print the package and protocol versions")
    return parser


def _fail(message: str) -> int:
    print(f"meshinfer: {message}", file=sys.stderr)
    return 2


def _unusable_keep_dir(path: Path) -> str | None:
    """Why ``path`` cannot hold a new demo's fleet, configs and logs (None: it can; it is made
    if missing). An earlier demo's directory is refused: its fleet would not be overwritten."""
    try:
        if path.exists() and not path.is_dir():
            return "not a directory"
        if path.is_dir() and any(path.iterdir()):
            return "not empty (an earlier demo's?); name a new or empty directory"
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot use it: {exc.strerror or exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parse_command_line(parser, argv)
    if isinstance(args, int):  # --help, or a usage error (one line on stderr, exit code 2)
        return args
    if args.command == "fleet":
        return dispatch(parser, args)
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C before a demo set its own handlers (while importing)
        print(f"meshinfer {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError as exc:  # ``meshinfer version | head -0``: the reader went away
        if stdout_gone(exc):
            return EXIT_CLOSED_PIPE
        raise


def _run(args: argparse.Namespace) -> int:
    if args.command == "version":
        print(f"meshinfer {__version__} (wire protocol {PROTOCOL_VERSION})")
        return 0
    if args.command == "wire-demo":
        if not 1 <= args.messages <= 100_000:
            return _fail("wire-demo: --messages must be between 1 and 100000")
        from meshinfer.demo_wire import run_demo as run_wire_demo

        return run_wire_demo(messages=args.messages, quiet=args.quiet)
    if not 2 <= args.nodes <= 8:
        return _fail("demo: --nodes must be between 2 and 8")
    if not 1 <= args.in_flight <= 256:
        return _fail("demo: --in-flight must be between 1 and 256")
    if args.keep is not None and (problem := _unusable_keep_dir(args.keep)) is not None:
        return _fail(f"demo: --keep {args.keep}: {problem}")
    from meshinfer.demo import DemoOptions, run_demo

    options = DemoOptions(
        nodes=args.nodes,
        in_flight=args.in_flight,
        kill=not args.no_kill,
        keep=args.keep,
        quiet=args.quiet or args.json,
        json=args.json,
    )
    return run_demo(options)


if __name__ == "__main__":
    raise SystemExit(main())
