"""Shared fixtures. Every semantic test takes ``bus_url`` and so runs on
every transport listed in ``TRANSPORTS``; each transport provides a fixture
``<name>_bus_url`` returning a URL to a live broker (real servers for Kafka
and NATS, started from PyPI wheels on free loopback ports by the project's
own pytest plugin, :mod:`trio_bus.testing.plugin`)."""

from __future__ import annotations

import importlib.metadata
import uuid

import pytest

# The plugin normally loads through its pytest11 entry point; an editable
# install made before the entry point existed lacks it, so load it here then.
_PLUGIN_BY_ENTRY_POINT = any(
    ep.name == "trio_bus" for ep in importlib.metadata.entry_points(group="pytest11")
)
pytest_plugins: list[str] = [
    *([] if _PLUGIN_BY_ENTRY_POINT else ["trio_bus.testing.plugin"]),
    "pytester",
    "tests._kafka_broker",
    "tests._nats_server",
]

#: Transports the semantic suite runs on.
TRANSPORTS = ["memory", "nats", "kafka"]


def pytest_configure(config: pytest.Config) -> None:
    # The brokers come from the [test] extra and are part of the default
    # suite: a missing one is an error here, not a skip.
    config.option.trio_bus_require_servers = True


@pytest.fixture
def memory_bus_url(trio_bus_memory_url: str) -> str:
    """A fresh named memory broker per test: no state leaks between tests."""
    return trio_bus_memory_url


@pytest.fixture(params=TRANSPORTS)
def bus_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_bus_url")
    return url


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"
