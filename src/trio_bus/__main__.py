"""The ``trio-bus`` command (also ``python -m trio_bus``)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import trio

DESCRIPTION = """\
trio_bus: a Trio event bus for domain events on Kafka, NATS JetStream or in
memory. One aggregate's events are handled one at a time and in order,
different aggregates concurrently, and a message is acknowledged only after
its handler succeeded."""

EPILOG = """\
examples:
  trio-bus demo                          the orders demo, no server needed
  trio-bus check nats://127.0.0.1:4222   is this broker usable right now?
  trio-bus asyncapi app:setup            the AsyncAPI document of a service
  trio-bus bench --help                  benchmark options (source checkout)

Run "trio-bus COMMAND --help" for a command's options."""

DEMO_HELP = "run the orders demo on the in-memory transport (no server needed)"
DEMO_DESCRIPTION = """\
Runs a few orders through a bus on the in-memory transport: each order's
events are handled in publish order while orders interleave, one failing
event is retried and then parked on the dead-letter topic, and a last run
measures end-to-end throughput."""

CHECK_HELP = "connect to a broker, round-trip a probe message, print a health report"
CHECK_DESCRIPTION = """\
Opens a bus on URL, publishes a probe message and waits for it to come back
through a subscription, then prints the bus's health report. Use it to see
whether a broker is reachable and working, e.g. from a deployment script."""
CHECK_EPILOG = """\
exit status:
  0  healthy: connected and the probe came back
  1  connected, but unhealthy or the probe did not come back in time
  2  could not connect (or the URL is invalid)

examples:
  trio-bus check kafka://127.0.0.1:9092
  trio-bus check nats://127.0.0.1:4222 --timeout 5"""

ASYNCAPI_HELP = "print the AsyncAPI 3.0 document of a service (MODULE:ATTR)"

BENCH_HELP = "benchmark trio_bus against the raw clients and FastStream (source checkout)"

#: Why ``bench`` needs a checkout, and how to get one.
BENCH_NEEDS_CHECKOUT = """\
trio-bus bench runs the benchmark suite in the benchmarks/ directory of a
trio_bus source checkout; it is not part of the installed package. Install
from a checkout and run it there:

  git clone <trio_bus repository> && cd trio_bus
  python3 -m venv .venv && .venv/bin/pip install -e ".[bench]"
  .venv/bin/trio-bus bench --help"""


def _version() -> str:
    try:
        return metadata.version("trio-bus")
    except metadata.PackageNotFoundError:  # running from a bare source tree
        from . import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    def command(
        name: str, summary: str, description: str, epilog: str | None = None
    ) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    parser = argparse.ArgumentParser(
        prog="trio-bus",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"trio-bus {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = command("demo", DEMO_HELP, DEMO_DESCRIPTION)
    demo.add_argument(
        "--orders", type=int, default=8, metavar="N", help="number of orders (default: 8)"
    )
    demo.add_argument(
        "--messages",
        type=int,
        default=20_000,
        metavar="N",
        help="messages in the throughput run; 0 skips it (default: 20000)",
    )
    check = command("check", CHECK_HELP, CHECK_DESCRIPTION, CHECK_EPILOG)
    check.add_argument(
        "url", help="bus URL: kafka://HOST:PORT, nats://HOST:PORT or memory://[NAME]"
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="bound on the whole check, connecting included (default: 10)",
    )
    # Its options belong to the benchmark suite: "trio-bus bench --help".
    commands.add_parser("bench", help=BENCH_HELP, add_help=False)
    # Its options: "trio-bus asyncapi --help".
    commands.add_parser("asyncapi", help=ASYNCAPI_HELP, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trio-bus`` with *argv* (default: ``sys.argv[1:]``); return the
    exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    if argv[:1] == ["asyncapi"]:
        from .asyncapi import main as asyncapi_main

        return asyncapi_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run

        trio.run(lambda: run(orders=args.orders, throughput_messages=args.messages))
        return 0
    return trio.run(_check, args.url, args.timeout)


def _checkout_root() -> Path | None:
    # The suite belongs to the sources this package was installed from (an
    # editable install: src/trio_bus/ -> the checkout), never to whatever
    # directory the command happens to run in.
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "benchmarks" / "cli.py").is_file() else None


def _bench(argv: list[str]) -> int:
    root = _checkout_root()
    if root is None:
        print(BENCH_NEEDS_CHECKOUT, file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import click
        from benchmarks.cli import main as bench_main
    except ImportError as exc:
        missing = textwrap.fill(f"trio-bus bench: {exc}.", width=78)
        print(f'{missing}\nInstall its dependencies: pip install -e ".[bench]"', file=sys.stderr)
        return 2
    try:
        status = bench_main.main(args=argv, prog_name="trio-bus bench", standalone_mode=False)
    except click.ClickException as exc:  # bad options: click's message, not a traceback
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 1
    return status if isinstance(status, int) else 0


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
