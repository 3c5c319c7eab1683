"""Credentials revoked while the bus runs, against a real nats-server: the
operator changes the service's password in the server's config and
reloads it (SIGHUP), the server drops the connection with ``Authorization
Violation`` and refuses every reconnection. The bus reports it through
health at once and fails with :class:`~trio_bus.errors.AuthenticationError`
after ``auth_failure_grace`` — never the secret in the error, the logs or
the health report (docs/security.md, "Credentials revoked while running").
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import trio_bus
from trio_bus.errors import AuthenticationError
from trio_bus.testing import NatsServer
from trio_bus.transports.nats import ConnectOptions, NatsOptions

from ._security import assert_no_secret, exception_texts, log_texts, wait_health
from .helpers import WAIT, Recorder, collect

USER, PASSWORD, ROTATED = "svc", "pw-Revoked-3c9e1a", "pw-Rotated-7d2b4f"
GRACE = 3.0
#: bus.health() asks the server for every consumer's state; while
#: disconnected each request waits out request_timeout, so keep it short.
REQUEST_TIMEOUT = 0.5


@pytest.fixture
def server(trio_bus_nats_server: NatsServer, tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own whose credentials can be changed while it
    runs (they sit in its config file)."""
    with NatsServer(tmp_path / "nats", user=USER, password=PASSWORD, reloadable=True) as s:
        yield s


def options() -> NatsOptions:
    return NatsOptions(
        connect=ConnectOptions(user=USER, password=PASSWORD, auth_failure_grace=GRACE),
        request_timeout=REQUEST_TIMEOUT,
    )


async def test_revoked_password_is_reported_then_fails_the_bus(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    topic = f"rv-{uuid.uuid4().hex[:10]}"
    got: Recorder[trio_bus.Message] = Recorder()
    shown: list[str] = []
    revoked_at: list[float] = []
    with trio.fail_after(WAIT), pytest.raises(AuthenticationError) as raised:
        async with trio_bus.open_bus(
            server.url, client_id="revoked", transport_options=options()
        ) as bus:
            await bus.subscribe(topic, collect(got))
            await bus.publish(topic, b"before", key="k")
            await got.wait_for_count(1)
            assert (await bus.health()).problem is None

            await trio.to_thread.run_sync(lambda: server.change_credentials(password=ROTATED))
            revoked_at.append(trio.current_time())
            report = await wait_health(bus, healthy=False)
            unhealthy_after = trio.current_time() - revoked_at[0]
            # Within the grace: reported, with the mechanism, still running.
            assert report.problem is not None
            assert "user/password" in report.problem
            assert "authorization violation" in report.problem.lower()
            assert "user/password" in report.describe()
            shown += [report.describe(), repr(report)]
            await trio.sleep_forever()  # until the transport fails the bus
    failed_after = trio.current_time() - revoked_at[0]
    logging.getLogger(__name__).warning(
        "revoked: unhealthy after %.2f s, AuthenticationError after %.2f s (grace %s s)",
        unhealthy_after,
        failed_after,
        GRACE,
    )

    error = raised.value
    assert error.mechanism == "user/password"
    assert "authorization violation" in error.detail.lower()
    assert GRACE * 0.9 <= failed_after <= GRACE + 3.0, failed_after
    records = [r.getMessage() for r in caplog.records if r.name.startswith("trio_bus")]
    assert sum("refuses our credentials:" in m for m in records) == 1, records
    assert_no_secret(
        [PASSWORD, ROTATED], [*exception_texts(error), *log_texts(caplog), *shown, caplog.text]
    )


async def test_credentials_restored_within_the_grace_keep_the_bus(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"rv-{uuid.uuid4().hex[:10]}"
    got: Recorder[trio_bus.Message] = Recorder()
    grace_long = NatsOptions(
        connect=ConnectOptions(user=USER, password=PASSWORD, auth_failure_grace=WAIT),
        request_timeout=REQUEST_TIMEOUT,
    )
    with trio.fail_after(WAIT):
        async with trio_bus.open_bus(
            server.url, client_id="restored", transport_options=grace_long
        ) as bus:
            await bus.subscribe(topic, collect(got))
            await trio.to_thread.run_sync(lambda: server.change_credentials(password=ROTATED))
            await wait_health(bus, healthy=False)
            # The operator undoes the rotation: the next reconnection works.
            await trio.to_thread.run_sync(lambda: server.change_credentials(password=PASSWORD))
            report = await wait_health(bus, healthy=True)
            assert report.problem is None
            await bus.publish(topic, b"after", key="k")
            await got.wait_for_count(1)
    assert any("accepts our credentials again" in r.getMessage() for r in caplog.records)
    assert_no_secret([PASSWORD, ROTATED], [*log_texts(caplog), caplog.text])
