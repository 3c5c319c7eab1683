"""Helpers of the security tests (tests/test_security_*.py): a publish and
subscribe round trip, and everything a bus shows that a secret could leak
into."""

from __future__ import annotations

import logging
import traceback
import uuid

import prometheus_client
import pytest
import trio

import trio_bus
from trio_bus.health import HealthReport

from .helpers import WAIT, Recorder, collect

#: Bound on opening a bus with wrong settings: it must fail, not retry.
FAIL_FAST = 10.0


async def round_trip(url: str, options: object | None) -> list[str]:
    """Open a bus, publish one message and handle it through a
    subscription (fail the test unless it comes back within WAIT); return
    what the open bus showed (:func:`shown_by`)."""
    topic = f"sec-{uuid.uuid4().hex[:10]}"
    got: Recorder[trio_bus.Message] = Recorder()
    with trio.fail_after(WAIT):
        async with trio_bus.open_bus(
            url, client_id=f"c-{uuid.uuid4().hex[:8]}", transport_options=options
        ) as bus:
            await bus.subscribe(topic, collect(got))
            await bus.publish(topic, b"secured", key="k-1")
            await got.wait_for_count(1)
            shown = await shown_by(bus)
    assert got.items[0].value == b"secured"
    return shown


async def open_fails(url: str, options: object | None) -> Exception:
    """Open a bus that must fail within FAIL_FAST seconds (a hang raises
    trio.TooSlowError); return its exception."""
    with trio.fail_after(FAIL_FAST):
        try:
            async with trio_bus.open_bus(url, client_id="bad", transport_options=options):
                pytest.fail("opened with wrong settings")
        except Exception as exc:  # whatever it is: the tests check its type
            return exc
    raise AssertionError("unreachable")


def exception_texts(exc: BaseException) -> list[str]:
    """str and repr of *exc*, its notes, causes, contexts and group
    members, and the whole formatted traceback."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        texts += [str(e), repr(e), *getattr(e, "__notes__", ())]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        if isinstance(e, BaseExceptionGroup):
            todo += e.exceptions
    return texts


async def shown_by(bus: trio_bus.Bus) -> list[str]:
    """What an open bus shows its operators: metrics and health report."""
    report = await bus.health()
    metrics = prometheus_client.generate_latest(bus.metrics_registry).decode()
    return [metrics, report.describe(), repr(report)]


async def wait_health(bus: trio_bus.Bus, healthy: bool) -> HealthReport:
    """Poll health (no event tells it) until it reports *healthy*."""
    with trio.fail_after(WAIT):
        while True:
            report = await bus.health()
            if report.healthy == healthy:
                return report
            await trio.sleep(0.05)


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured record, formatted with its arguments and traceback."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in caplog.records]


def assert_no_secret(secrets: list[str], texts: list[str]) -> None:
    """Fail naming the first text that holds one of *secrets*."""
    assert texts, "nothing was captured"
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"secret {secret!r} leaked into: {text[:500]}"
