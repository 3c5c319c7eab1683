"""Secure Kafka connections against real Tansu brokers.

Tansu 0.6 serves no TLS itself (``--cert`` and ``--key`` cannot be given
together), so TLS is tested through :class:`~trio_bus.testing.TLSTerminator`
in front of it, as a TLS-terminating load balancer would sit: aiokafka's
TLS, certificate verification and trio_bus's options are what is tested.
``--authentication`` wants SASL SCRAM, but Tansu 0.6 never keeps a SCRAM
user (its storage engines discard them), so its own SASL serves tests of
refusals only; successful logins go through
:class:`~trio_bus.testing.SASLTerminator` in front of a plaintext Tansu,
SCRAM as a Kafka broker does it (docs/security.md, "Tansu"). A refused
login or certificate is an AuthenticationError.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
import trio

import trio_bus
from trio_bus.errors import AuthenticationError, TransportUnavailableError
from trio_bus.testing import (
    S3Server,
    TansuBroker,
    TestCA,
    TLSFiles,
    TLSTerminator,
    free_port,
    run_tansu,
)
from trio_bus.testing.plugin import KAFKA_URL_PARAMS
from trio_bus.transports.kafka import KafkaOptions

from ._kafka_broker import SASL_PASSWORD, SASL_USER, RestartableTansu, SASLKafka
from ._security import (
    assert_no_secret,
    exception_texts,
    log_texts,
    open_fails,
    round_trip,
)

SECRET = "pw-Kafka-3c8e1a"


@attrs.frozen
class TLSKafka:
    """A plaintext Tansu advertising the TLS port a terminator serves."""

    broker: TansuBroker
    broker_port: int
    files: TLSFiles

    @property
    def url(self) -> str:
        return f"kafka://{self.broker.bootstrap}?{KAFKA_URL_PARAMS}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tansu_behind_tls(
    tansu_binary_path: str, tmp_path_factory: pytest.TempPathFactory, pki: TestCA
) -> Iterator[TLSKafka]:
    broker_port, tls_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("tansu-tls") / "tansu.log"
    with run_tansu(tansu_binary_path, log, broker_port, advertised_port=tls_port) as broker:
        yield TLSKafka(broker, broker_port, pki.issue("kafka"))


@pytest.fixture
async def tls_kafka(tansu_behind_tls: TLSKafka) -> AsyncIterator[tuple[TLSKafka, TLSTerminator]]:
    """The broker with its TLS terminator running for this test."""
    kafka = tansu_behind_tls
    terminator = TLSTerminator(
        kafka.files, "127.0.0.1", kafka.broker_port, listen_port=kafka.broker.port
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(terminator.run)
        yield kafka, terminator
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def auth_broker(
    tansu_binary_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TansuBroker]:
    """A broker started with ``--authentication`` (SASL SCRAM required)."""
    log = tmp_path_factory.mktemp("tansu-auth") / "tansu.log"
    with run_tansu(tansu_binary_path, log, authentication=True) as broker:
        yield broker


def tls_options(context: ssl.SSLContext) -> KafkaOptions:
    return KafkaOptions(security_protocol="SSL", ssl_context=context)


def scram(mechanism: str, user: str = "svc", password: str = SECRET) -> KafkaOptions:
    return KafkaOptions(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_plain_username=user,
        sasl_plain_password=password,
    )


# ----------------------------------------------------------------- TLS


async def test_tls_round_trip(tls_kafka: tuple[TLSKafka, TLSTerminator], pki: TestCA) -> None:
    kafka, terminator = tls_kafka
    await round_trip(kafka.url, tls_options(pki.client_context()))
    assert terminator.handshakes > 0
    assert terminator.refused == 0


async def test_untrusted_certificate_is_refused_fast(
    tls_kafka: tuple[TLSKafka, TLSTerminator], tmp_path: Path
) -> None:
    kafka, terminator = tls_kafka
    exc = await open_fails(kafka.url, tls_options(TestCA(tmp_path).client_context()))
    assert isinstance(exc, TransportUnavailableError), repr(exc)
    assert terminator.refused > 0
    assert terminator.handshakes == 0


async def test_untrusted_certificate_is_an_authentication_error(
    tls_kafka: tuple[TLSKafka, TLSTerminator], tmp_path: Path
) -> None:
    kafka, _ = tls_kafka
    exc = await open_fails(kafka.url, tls_options(TestCA(tmp_path).client_context()))
    assert isinstance(exc, AuthenticationError), repr(exc)
    assert exc.mechanism == "TLS"


async def test_plaintext_client_to_a_tls_listener_fails_fast(
    tls_kafka: tuple[TLSKafka, TLSTerminator],
) -> None:
    kafka, _ = tls_kafka
    exc = await open_fails(kafka.url, KafkaOptions())
    assert isinstance(exc, TransportUnavailableError), repr(exc)


async def test_no_secret_in_logs_metrics_health_or_repr(
    tls_kafka: tuple[TLSKafka, TLSTerminator], pki: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: aiokafka's records too
    kafka, _ = tls_kafka
    # The SASL settings ride along unused with SSL: they must not show anywhere.
    options = attrs.evolve(
        tls_options(pki.client_context()), sasl_plain_username="svc", sasl_plain_password=SECRET
    )
    shown = await round_trip(kafka.url, options)
    assert_no_secret([SECRET], [*log_texts(caplog), *shown, repr(options)])


# ---------------------------------------------------------------- SASL


async def test_client_without_sasl_is_refused_fast(auth_broker: TansuBroker) -> None:
    exc = await open_fails(f"kafka://{auth_broker.bootstrap}", KafkaOptions())
    assert isinstance(exc, TransportUnavailableError), repr(exc)


async def test_plain_mechanism_is_refused_fast(auth_broker: TansuBroker) -> None:
    # Tansu 0.6 offers SCRAM only ("NoSharedMechanism" in its log).
    exc = await open_fails(f"kafka://{auth_broker.bootstrap}", scram("PLAIN"))
    assert isinstance(exc, TransportUnavailableError), repr(exc)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_wrong_scram_credentials_are_an_authentication_error(
    auth_broker: TansuBroker, mechanism: str
) -> None:
    exc = await open_fails(f"kafka://{auth_broker.bootstrap}", scram(mechanism))
    assert isinstance(exc, AuthenticationError), repr(exc)
    assert exc.mechanism == mechanism


async def test_refused_scram_leaks_no_secret(
    auth_broker: TansuBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    exc = await open_fails(f"kafka://{auth_broker.bootstrap}", scram("SCRAM-SHA-512"))
    assert_no_secret([SECRET], [*exception_texts(exc), *log_texts(caplog)])


# ------------------------------------- SASL logins, through the terminator


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_right_scram_credentials_round_trip(
    sasl_kafka: SASLKafka, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    options = scram(mechanism, SASL_USER, SASL_PASSWORD)
    shown = await round_trip(sasl_kafka.url, options)
    # Producer, admin client and consumer group each log in.
    assert sasl_kafka.terminator.logins >= 3
    assert sasl_kafka.terminator.refused == 0
    assert_no_secret([SASL_PASSWORD], [*log_texts(caplog), *shown, repr(options)])


async def test_wrong_password_at_a_kafka_sasl_listener_is_an_authentication_error(
    sasl_kafka: SASLKafka, caplog: pytest.LogCaptureFixture
) -> None:
    # A Kafka broker answers a failed SCRAM login with SASL_AUTHENTICATION_FAILED,
    # which aiokafka only logs before "Unable to bootstrap".
    caplog.set_level(logging.DEBUG)
    exc = await open_fails(sasl_kafka.url, scram("SCRAM-SHA-512", SASL_USER, SECRET))
    assert isinstance(exc, AuthenticationError), repr(exc)
    assert exc.mechanism == "SCRAM-SHA-512"
    assert "SaslAuthenticationFailed" in exc.detail
    assert sasl_kafka.terminator.refused > 0
    assert_no_secret([SECRET, SASL_PASSWORD], [*exception_texts(exc), *log_texts(caplog)])


# --------------------------------------------------- Tansu's gaps, pinned
# These check Tansu, not trio_bus: when a Tansu upgrade closes a gap, they
# fail and say which tests docs/security.md promises to add.


def test_tansu_cannot_serve_tls(tansu_binary_path: str, pki: TestCA) -> None:
    files = pki.issue("tansu-gap")
    args = ["broker", "--cert", str(files.cert), "--key", str(files.key)]
    done = subprocess.run([tansu_binary_path, *args], capture_output=True, timeout=30, check=False)
    assert done.returncode != 0
    assert b"'--cert <CERT>' cannot be used with '--key <KEY>'" in done.stderr


def test_tansu_cannot_create_users_under_authentication(
    tansu_binary_path: str, auth_broker: TansuBroker
) -> None:
    # A broker without --authentication accepts the request but Tansu 0.6's
    # storage discards the user (docs/security.md, "Tansu"); one with it
    # refuses the request from an unauthenticated client.
    broker = f"tcp://{auth_broker.bootstrap}"
    done = subprocess.run(
        [tansu_binary_path, "user", "create", "--broker", broker, "svc", SECRET],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert b"NotAuthenticated" in auth_broker.log.read_bytes()


async def test_tansu_discards_scram_users(tansu_binary_path: str, tmp_path: Path) -> None:
    # The user is created on a broker without --authentication, which
    # answers success, then the broker restarts with it on the same s3://
    # storage (data kept: see test_s3_storage_keeps_topics_across_a_roll):
    # Tansu 0.6 kept no user, so its own SASL can never log anyone in.
    with S3Server(tmp_path / "s3") as s3:
        tansu = RestartableTansu(tansu_binary_path, tmp_path, s3)
        broker = await trio.to_thread.run_sync(tansu.start)
        create = [tansu_binary_path, "user", "create", "--broker", f"tcp://{broker.bootstrap}"]
        done = await trio.run_process(
            [*create, "--mechanism", "scram256", "svc", SECRET], capture_stdout=True, check=False
        )
        assert done.returncode == 0, done
        await trio.to_thread.run_sync(tansu.kill)
        await trio.to_thread.run_sync(lambda: tansu.start(authentication=True))
        try:
            exc = await open_fails(f"kafka://{broker.bootstrap}", scram("SCRAM-SHA-256"))
        finally:
            await trio.to_thread.run_sync(tansu.kill)
    assert isinstance(exc, AuthenticationError), repr(exc)


async def test_s3_storage_keeps_topics_across_a_roll(
    tansu_binary_path: str, tmp_path: Path
) -> None:
    with S3Server(tmp_path / "s3") as s3:
        tansu = RestartableTansu(tansu_binary_path, tmp_path, s3)
        broker = await trio.to_thread.run_sync(tansu.start)
        url = f"kafka://{broker.bootstrap}?{KAFKA_URL_PARAMS}"
        try:
            await round_trip(url, None)
            async with trio_bus.open_bus(url) as bus:
                before = set(await bus.topics.list())
            await trio.to_thread.run_sync(tansu.restart)
            async with trio_bus.open_bus(url) as bus:
                after = set(await bus.topics.list())
        finally:
            await trio.to_thread.run_sync(tansu.kill)
    assert before
    assert before <= after
