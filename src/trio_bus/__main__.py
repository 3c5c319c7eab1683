"""The ``trio-bus`` command."""

from __future__ import annotations

import argparse
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
    check = commands.add_parser(
        "check", help="connect, round-trip a probe message, print a health report"
    )
    check.add_argument("url", help="bus URL, e.g. kafka://127.0.0.1:9092")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds for the whole check")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        trio.run(lambda: run(orders=args.orders, throughput_messages=args.messages))
        return 0
    return trio.run(_check, args.url, args.timeout)


async def _check(url: str, seconds: float) -> int:
    """Exit status: 0 healthy, 1 unhealthy, 2 could not connect."""
    from . import Monitoring, open_bus
    from .errors import BusError

    try:
        with trio.fail_after(seconds):
            async with open_bus(
                url, client_id="trio-bus-check", monitoring=Monitoring(probe_timeout=seconds / 2)
            ) as bus:
                try:
                    await bus.probe()
                except trio.TooSlowError:
                    print(f"probe did not come back within {seconds / 2:g}s")
                report = await bus.health()
                print(report.describe())
                return 0 if report.healthy and report.round_trip_latency is not None else 1
    except (BusError, OSError, trio.TooSlowError) as exc:
        print(f"cannot reach {url}: {type(exc).__name__}: {exc}")
        return 2
