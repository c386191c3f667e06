"""``meshinfer``: the umbrella command (``demo``, ``version``)."""

from __future__ import annotations

import argparse
import sys

from meshinfer import PROTOCOL_VERSION, __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the on-one-machine demonstration")
    demo.add_argument("--messages", type=int, default=5, help="messages each way (default 5)")
    demo.add_argument("--quiet", action="store_true", help="print only the summary")
    sub.add_parser("version", help="print the package and protocol versions")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "version":
        print(f"meshinfer {__version__} (wire protocol {PROTOCOL_VERSION})")
        return 0
    if args.messages < 1 or args.messages > 100_000:
        print("meshinfer demo: --messages must be between 1 and 100000", file=sys.stderr)
        return 2
    from meshinfer.demo import run_demo

    return run_demo(messages=args.messages, quiet=args.quiet)


if __name__ == "__main__":
    raise SystemExit(main())
