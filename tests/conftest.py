"""Shared fixtures. Every semantic test takes ``bus_url`` and so runs on
every transport listed in ``TRANSPORTS``; each transport provides a fixture
``<name>_bus_url`` returning a URL to a live broker (real servers for Kafka
and NATS, started from PyPI wheels on free loopback ports)."""

from __future__ import annotations

import uuid

import pytest

pytest_plugins: list[str] = ["tests._kafka_broker", "tests._nats_server"]

#: Transports the semantic suite runs on.
TRANSPORTS = ["memory", "nats", "kafka"]


@pytest.fixture
def memory_bus_url() -> str:
    # A fresh named broker per test: no state leaks between tests.
    return f"memory://test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=TRANSPORTS)
def bus_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_bus_url")
    return url


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"
