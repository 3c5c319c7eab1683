"""Kafka credentials revoked while the bus runs, against a real Tansu behind
a SASL SCRAM terminator (Tansu 0.6 cannot hold SCRAM users itself:
docs/security.md, "Tansu").

Kafka authenticates a connection once, at its start, so a revocation
shows when connections are opened again: the operator changes the
service's password (``terminator.set_password``) and the brokers restart
(``terminator.drop_connections``), as a credential rotation followed by a
broker roll does. The bus reports the refusal through health at once and
fails with :class:`~trio_bus.errors.AuthenticationError` after
``auth_failure_grace`` -- never a secret in the error, the logs, the health
report or the metrics (docs/security.md, "Credentials revoked while
running").
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import prometheus_client
import pytest
import trio

import trio_bus
from trio_bus.errors import AuthenticationError
from trio_bus.health import HealthReport
from trio_bus.testing import S3Server, SASLTerminator, TansuBroker, free_port, kafka_url
from trio_bus.transports._refusals import Refusals
from trio_bus.transports.kafka import KafkaOptions

from ._kafka_broker import SASL_PASSWORD, SASL_USER, RestartableTansu, SASLKafka
from ._security import assert_no_secret, exception_texts, log_texts, wait_health
from .helpers import WAIT, Recorder, collect

ROTATED = "pw-Rotated-9b3f1d"
GRACE = 3.0
MECHANISM = "SCRAM-SHA-256"

log = logging.getLogger(__name__)


@attrs.frozen
class RollingKafka:
    """A Tansu on s3:// storage (restartable, data kept) behind a SASL
    terminator."""

    tansu: RestartableTansu
    terminator: SASLTerminator
    broker: TansuBroker

    @property
    def url(self) -> str:
        return kafka_url(self.broker)


@pytest.fixture
async def rolling_kafka(tansu_binary_path: str, tmp_path: Path) -> AsyncIterator[RollingKafka]:
    with S3Server(tmp_path / "s3") as s3:
        sasl_port = free_port()
        tansu = RestartableTansu(tansu_binary_path, tmp_path, s3, advertised_port=sasl_port)
        broker = await trio.to_thread.run_sync(tansu.start)
        terminator = SASLTerminator("127.0.0.1", tansu.port, listen_port=sasl_port)
        terminator.set_password(SASL_USER, SASL_PASSWORD)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(terminator.run)
                yield RollingKafka(tansu, terminator, broker)
                nursery.cancel_scope.cancel()
        finally:
            await trio.to_thread.run_sync(tansu.kill)


def options(grace: float = GRACE) -> KafkaOptions:
    return KafkaOptions(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=MECHANISM,
        sasl_plain_username=SASL_USER,
        sasl_plain_password=SASL_PASSWORD,
        auth_failure_grace=grace,
    )


@attrs.frozen
class Consuming:
    """An open bus consuming a topic of its own."""

    bus: trio_bus.Bus
    topic: str
    got: Recorder[trio_bus.Message]


@asynccontextmanager
async def consuming(url: str, client_id: str, grace: float = GRACE) -> AsyncIterator[Consuming]:
    """Open a bus logged in as SASL_USER whose subscription has handled one
    message (b"before")."""
    topic = f"rv-{uuid.uuid4().hex[:10]}"
    got: Recorder[trio_bus.Message] = Recorder()
    async with trio_bus.open_bus(url, client_id=client_id, transport_options=options(grace)) as bus:
        await bus.subscribe(topic, collect(got))
        await bus.publish(topic, b"before", key="k")
        await got.wait_for_count(1)
        yield Consuming(bus, topic, got)


async def wait_problem(bus: trio_bus.Bus) -> HealthReport:
    """Poll health until it reports a transport problem (the brokers are
    unreachable for a moment first: the connection check tells them apart)."""
    with trio.fail_after(WAIT):
        while True:
            report = await bus.health()
            if report.problem is not None:
                assert not report.healthy
                return report
            await trio.sleep(0.05)


def revoke(kafka: SASLKafka, password: str | None) -> float:
    """Change the service's password, then restart the brokers' connections
    (a broker roll); return when, on Trio's clock."""
    kafka.terminator.set_password(SASL_USER, password)
    kafka.terminator.drop_connections()
    return trio.current_time()


async def test_revoked_password_is_reported_then_fails_the_bus(
    sasl_kafka: SASLKafka, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: aiokafka's records too
    shown: list[str] = []
    revoked_at = unhealthy_after = 0.0
    with trio.fail_after(WAIT), pytest.raises(AuthenticationError) as raised:
        async with consuming(sasl_kafka.url, "revoked") as running:
            bus = running.bus
            assert (await bus.health()).problem is None

            revoked_at = revoke(sasl_kafka, ROTATED)
            report = await wait_problem(bus)
            unhealthy_after = trio.current_time() - revoked_at
            # Within the grace: reported, with the mechanism, still running.
            assert report.problem is not None
            assert MECHANISM in report.problem
            assert "127.0.0.1" in report.problem
            assert f"after {GRACE:g}s" in report.problem
            assert MECHANISM in report.describe()
            metrics = prometheus_client.generate_latest(bus.metrics_registry).decode()
            shown += [report.describe(), repr(report), metrics]
            await trio.sleep_forever()  # until the transport fails the bus
    failed_after = trio.current_time() - revoked_at
    log.warning(
        "kafka revoked: problem in health after %.2f s, AuthenticationError after %.2f s"
        " (grace %s s)",
        unhealthy_after,
        failed_after,
        GRACE,
    )

    error = raised.value
    assert error.mechanism == MECHANISM
    assert "127.0.0.1" in error.broker
    assert GRACE * 0.9 <= failed_after <= GRACE + 3.0, failed_after
    assert sasl_kafka.terminator.refused > 0
    records = [r for r in caplog.records if r.name.startswith("trio_bus")]
    errors = [r for r in records if "refuses our credentials:" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in records]
    assert errors[0].levelno == logging.ERROR
    assert_no_secret(
        [SASL_PASSWORD, ROTATED],
        [*exception_texts(error), *log_texts(caplog), *shown, caplog.text],
    )


async def test_deleted_user_fails_the_bus_too(sasl_kafka: SASLKafka) -> None:
    with trio.fail_after(WAIT), pytest.raises(AuthenticationError) as raised:
        async with consuming(sasl_kafka.url, "deleted"):
            revoke(sasl_kafka, None)
            await trio.sleep_forever()
    assert raised.value.mechanism == MECHANISM


async def test_credentials_restored_within_the_grace_keep_the_bus(
    sasl_kafka: SASLKafka, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(WAIT):
        async with consuming(sasl_kafka.url, "restored", grace=WAIT) as running:
            bus, got = running.bus, running.got
            revoke(sasl_kafka, ROTATED)
            await wait_problem(bus)
            # The operator undoes the rotation: the next connection works.
            sasl_kafka.terminator.set_password(SASL_USER, SASL_PASSWORD)
            report = await wait_health(bus, healthy=True)
            assert report.problem is None
            await bus.publish(running.topic, b"after", key="k")
            await got.wait_for_count(2)
    assert [m.value for m in got.items] == [b"before", b"after"]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("trio_bus")]
    assert any("accepts our credentials again" in m for m in messages), messages
    assert_no_secret([SASL_PASSWORD, ROTATED], [*log_texts(caplog), caplog.text])


def episode(refusals: Refusals) -> tuple[str | None, float | None]:
    """What health and the watch loop read (a call: no narrowing by mypy)."""
    return refusals.problem, refusals.remaining()


async def test_password_rotated_then_broker_roll_fails_the_bus(
    rolling_kafka: RollingKafka, caplog: pytest.LogCaptureFixture
) -> None:
    # The real sequence: the password changes, then the broker is killed and
    # started again (same port, same storage); the bus reconnects with the
    # old password and is refused.
    caplog.set_level(logging.DEBUG)
    killed_at = 0.0
    with trio.fail_after(WAIT), pytest.raises(AuthenticationError) as raised:
        async with consuming(rolling_kafka.url, "rolled") as running:
            rolling_kafka.terminator.set_password(SASL_USER, ROTATED)
            killed_at = trio.current_time()
            await trio.to_thread.run_sync(rolling_kafka.tansu.restart)
            report = await wait_problem(running.bus)
            assert report.problem is not None
            assert MECHANISM in report.problem
            await trio.sleep_forever()
    failed_after = trio.current_time() - killed_at
    log.warning("kafka broker roll: AuthenticationError %.2f s after the kill", failed_after)
    assert raised.value.mechanism == MECHANISM
    assert GRACE * 0.9 <= failed_after <= GRACE + 5.0, failed_after
    assert_no_secret(
        [SASL_PASSWORD, ROTATED],
        [*exception_texts(raised.value), *log_texts(caplog), caplog.text],
    )


async def test_broker_roll_with_the_same_password_keeps_the_bus(
    rolling_kafka: RollingKafka,
) -> None:
    with trio.fail_after(WAIT):
        async with consuming(rolling_kafka.url, "kept") as running:
            bus, got = running.bus, running.got
            await trio.to_thread.run_sync(rolling_kafka.tansu.kill)
            await wait_health(bus, healthy=False)
            # Down for longer than the grace: an outage, not a refusal.
            await trio.sleep(GRACE + 1.0)
            report = await bus.health()
            assert not report.connected
            assert report.problem is None
            await trio.to_thread.run_sync(rolling_kafka.tansu.start)
            await bus.publish(running.topic, b"after", key="k")
            await got.wait_for_count(2)
            report = await wait_health(bus, healthy=True)
            assert report.problem is None
    assert b"after" in [m.value for m in got.items]


def test_refusal_episode_policy(caplog: pytest.LogCaptureFixture) -> None:
    # The transport-neutral policy on a clock of the test's own.
    caplog.set_level(logging.DEBUG)
    now = [100.0]
    refusals = Refusals("kafka", 3.0, logging.getLogger("trio_bus.test"), clock=lambda: now[0])
    error = AuthenticationError("127.0.0.1:9092", MECHANISM, "refused")
    assert episode(refusals) == (None, None)
    refusals.refused(error)
    now[0] += 2.0
    refusals.refused(error)  # a repeat: the grace runs on from the first
    assert refusals.remaining() == pytest.approx(1.0)
    assert refusals.expired() is None
    assert refusals.problem == f"{error}; the transport fails if still refused after 3s"
    now[0] += 1.0
    assert refusals.expired() is error
    refusals.accepted()
    assert episode(refusals) == (None, None)
    assert refusals.expired() is None
    levels = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records]
    assert levels == [
        (logging.ERROR, "kafka refuses our credentials"),
        (logging.DEBUG, "kafka refuses our credentials again"),
        (logging.WARNING, "kafka accepts our credentials again"),
    ]
