"""The ``trio-bus`` command (also ``python -m trio_bus``)."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import trio

from ._secrets import url_secrets
from ._topics_cli import TOPICS_DESCRIPTION, TOPICS_EPILOG, TOPICS_HELP, run_topics

logger = logging.getLogger("trio_bus.check")

DESCRIPTION = """\
trio_bus: a Trio event bus for domain events on Kafka, NATS JetStream or in
memory. One aggregate's events are handled one at a time and in order,
different aggregates concurrently, and a message is acknowledged only after
its handler succeeded."""

EPILOG = """\
examples:
  trio-bus demo                          the orders demo, no server needed
  trio-bus check nats://127.0.0.1:4222   is this broker usable right now?
  trio-bus topics kafka://127.0.0.1:9092 the topics the broker stores
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
  trio-bus check nats://127.0.0.1:4222 --timeout 5
  NATS_PASSWORD=... trio-bus check nats://nats.internal:4222 \\
      --tls-ca ca.pem --user svc --password-env NATS_PASSWORD
  trio-bus check kafka://broker:9093 --security-protocol SASL_SSL --tls-ca ca.pem \\
      --sasl-mechanism SCRAM-SHA-512 --sasl-user svc --sasl-password-file /run/secrets/kafka

Secrets: prefer --password-env/--password-file (and --token-env/--token-file)
to --password/--token, whose value every user of the machine can read in the
process list. Passwords in the URL (nats://user:password@host) work too and
are shown redacted, but share that drawback. See docs/security.md."""

SECURITY_GROUP = """\
TLS is verified against the system's CAs, or --tls-ca, by default. NATS
upgrades to TLS when the server requires it; Kafka uses it with
--security-protocol SSL or SASL_SSL (implied by any --tls-* option)."""

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
    _add_security_options(check)
    topics = command("topics", TOPICS_HELP, TOPICS_DESCRIPTION, TOPICS_EPILOG)
    topics.add_argument("url", help="bus URL, as for check")
    topics.add_argument("topic", nargs="?", help="describe this topic instead of listing")
    topics.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="(default: 10)"
    )
    _add_security_options(topics)
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
    try:
        password, token = _password(args), _token(args)
        options = _transport_options(args, password, token)
    except _UsageError as exc:
        print(f"trio-bus {args.command}: {exc}", file=sys.stderr)
        return 2
    secrets = [s for s in (password, token, *url_secrets(args.url)) if s]
    if args.command == "topics":
        return trio.run(run_topics, args.url, args.topic, args.timeout, options, secrets)
    return trio.run(_check, args.url, args.timeout, options, secrets)


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


def _add_security_options(check: argparse.ArgumentParser) -> None:
    tls = check.add_argument_group("TLS", SECURITY_GROUP)
    tls.add_argument("--tls-ca", metavar="FILE", help="CA bundle (PEM) to verify the broker with")
    tls.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), mutual TLS")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key (default: in --tls-cert)")
    tls.add_argument(
        "--tls-hostname", metavar="NAME", help="name the broker's certificate must carry (NATS)"
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the broker's certificate (testing only; logged as a warning)",
    )
    auth = check.add_argument_group("credentials")
    auth.add_argument("--user", "--sasl-user", metavar="NAME", help="user (NATS) or SASL user")
    password = auth.add_mutually_exclusive_group()
    password.add_argument(
        "--password-env",
        "--sasl-password-env",
        metavar="VAR",
        help="read the password from environment variable VAR",
    )
    password.add_argument(
        "--password-file",
        "--sasl-password-file",
        metavar="FILE",
        help="read the password from FILE (one line)",
    )
    password.add_argument(
        "--password", metavar="VALUE", help="the password itself (visible in the process list)"
    )
    token = auth.add_mutually_exclusive_group()
    token.add_argument("--token-env", metavar="VAR", help="read a NATS token from VAR")
    token.add_argument("--token-file", metavar="FILE", help="read a NATS token from FILE")
    token.add_argument(
        "--token", metavar="VALUE", help="a NATS token (visible in the process list)"
    )
    kafka = check.add_argument_group("Kafka")
    kafka.add_argument(
        "--security-protocol",
        choices=KAFKA_PROTOCOLS,
        help="default: from the other options (SSL with --tls-*, SASL_* with --user)",
    )
    kafka.add_argument(
        "--sasl-mechanism", choices=SASL_MECHANISMS, default="PLAIN", help="(default: PLAIN)"
    )


#: Kafka security protocols and SASL mechanisms aiokafka speaks.
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


#: The check options that ask for TLS.
_TLS_OPTIONS = ("tls_ca", "tls_cert", "tls_key", "tls_hostname", "insecure")


class _UsageError(Exception):
    """Options that cannot work together, or a secret that cannot be read."""


def _read_secret(value: str | None, env: str | None, file: str | None, what: str) -> str | None:
    if env is not None:
        if env not in os.environ:
            raise _UsageError(f"environment variable {env} (the {what}) is not set")
        return os.environ[env]
    if file is not None:
        try:
            return Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise _UsageError(f"cannot read the {what} from {file}: {exc.strerror}") from None
    return value


def _password(args: argparse.Namespace) -> str | None:
    return _read_secret(args.password, args.password_env, args.password_file, "password")


def _token(args: argparse.Namespace) -> str | None:
    return _read_secret(args.token, args.token_env, args.token_file, "token")


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """Verification on unless --insecure; None when no TLS option is given."""
    if not any(getattr(args, name) for name in _TLS_OPTIONS):
        return None
    if args.tls_key and not args.tls_cert:
        raise _UsageError("--tls-key needs --tls-cert")
    try:
        context = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:  # FileNotFoundError, bad PEM
        files = ", ".join(f for f in (args.tls_ca, args.tls_cert, args.tls_key) if f)
        raise _UsageError(f"cannot load the TLS files ({files}): {exc}") from None
    if args.insecure:
        logger.warning("--insecure: the broker's TLS certificate is NOT verified")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _transport_options(
    args: argparse.Namespace, password: str | None, token: str | None
) -> object | None:
    """The NatsOptions or KafkaOptions the security options ask for (None:
    none given, the transport's defaults)."""
    scheme = args.url.partition("://")[0].lower()
    if password is not None and args.user is None and scheme == "kafka":
        raise _UsageError("a password needs --user (--sasl-user)")
    if scheme == "nats":
        return _nats_options(args, password, token)
    if scheme == "kafka":
        if token is not None or args.tls_hostname:
            raise _UsageError("--token and --tls-hostname are NATS options")
        return _kafka_options(args, password)
    given = any(getattr(args, name) for name in (*_TLS_OPTIONS, "user", "security_protocol"))
    if given or password is not None or token is not None:
        raise _UsageError(f"security options apply to nats:// and kafka:// URLs, not {scheme}://")
    return None


def _nats_options(args: argparse.Namespace, password: str | None, token: str | None) -> object:
    if args.security_protocol:
        raise _UsageError("--security-protocol is a Kafka option")
    from .transports.nats import ConnectOptions, NatsOptions

    connect = ConnectOptions(
        user=args.user,
        password=password,
        token=token,
        tls=_ssl_context(args),
        tls_hostname=args.tls_hostname,
    )
    return NatsOptions(connect=connect)


def _kafka_options(args: argparse.Namespace, password: str | None) -> object:
    from .transports.kafka import KafkaOptions

    context = _ssl_context(args)
    protocol = args.security_protocol or (
        ("SASL_SSL" if context else "SASL_PLAINTEXT")
        if args.user
        else ("SSL" if context else "PLAINTEXT")
    )
    if not protocol.endswith("SSL") and context is not None:
        raise _UsageError(
            f"--tls-* options need --security-protocol SSL or SASL_SSL, not {protocol}"
        )
    if protocol.endswith("SSL") and context is None:
        context = ssl.create_default_context()  # verified against the system's CAs
    if protocol.startswith("SASL") and (args.user is None or password is None):
        raise _UsageError(f"{protocol} needs --sasl-user and a password")
    return KafkaOptions(
        security_protocol=protocol,
        ssl_context=context,
        sasl_mechanism=args.sasl_mechanism,
        sasl_plain_username=args.user,
        sasl_plain_password=password,
    )


async def _check(
    url: str, seconds: float, options: object | None = None, secrets: Sequence[str] = ()
) -> int:
    """Exit status: 0 healthy, 1 unhealthy, 2 could not connect. Nothing
    printed holds a secret: the URL and error texts are redacted."""
    from . import Monitoring, open_bus
    from ._secrets import redact_text, redact_url
    from .errors import AuthenticationError, BusError

    try:
        with trio.fail_after(seconds):
            async with open_bus(
                url,
                client_id="trio-bus-check",
                monitoring=Monitoring(probe_timeout=seconds / 2),
                transport_options=options,
            ) as bus:
                try:
                    await bus.probe()
                except trio.TooSlowError:
                    print(f"probe did not come back within {seconds / 2:g}s")
                report = await bus.health()
                print(report.describe())
                return 0 if report.healthy and report.round_trip_latency is not None else 1
    except (BusError, OSError, trio.TooSlowError) as exc:
        what = "authentication failed" if isinstance(exc, AuthenticationError) else "cannot reach"
        detail = redact_text(f"{type(exc).__name__}: {exc}", secrets)
        print(f"{what} {redact_url(url)}: {detail}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
