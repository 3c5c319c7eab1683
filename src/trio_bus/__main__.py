"""The ``trio-bus`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-bus`` and ``python -m trio_bus``."""
    parser = argparse.ArgumentParser(prog="trio-bus", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the orders demo on the in-memory transport")
    demo.add_argument("--orders", type=int, default=8, help="number of orders (aggregates)")
    demo.add_argument(
        "--messages", type=int, default=20_000, help="messages in the throughput run (0: skip)"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        trio.run(lambda: run(orders=args.orders, throughput_messages=args.messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
