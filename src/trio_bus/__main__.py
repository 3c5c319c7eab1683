"""The ``trio-bus`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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
    commands.add_parser(
        "bench",
        help="benchmarks against the raw clients and FastStream (source checkout, [bench] extra)",
        add_help=False,
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])  # its own options: see ``trio-bus bench --help``
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        trio.run(lambda: run(orders=args.orders, throughput_messages=args.messages))
        return 0
    return trio.run(_check, args.url, args.timeout)


def _bench(argv: list[str]) -> int:
    # The suite lives in the repository's benchmarks/ package (it needs the
    # brokers, FastStream and matplotlib), not in the installed library:
    # run it from the top of a source checkout.
    if Path("benchmarks", "cli.py").is_file() and "" not in sys.path:
        sys.path.insert(0, "")
    try:
        from benchmarks.cli import main as bench_main
    except ImportError as exc:
        print(
            f"trio-bus bench runs from a source checkout ({exc}): "
            'pip install -e ".[bench]" and run it at the top of the repository'
        )
        return 2
    bench_main.main(args=argv, prog_name="trio-bus bench", standalone_mode=False)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
