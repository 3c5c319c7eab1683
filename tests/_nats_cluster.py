"""The ``nats_cluster`` fixture: a 3-node JetStream cluster of the test's
own (tests kill and restart its servers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_bus.testing import NatsCluster, NatsServer


@pytest.fixture
def nats_cluster(trio_bus_nats_server: NatsServer, tmp_path: Path) -> Iterator[NatsCluster]:
    """Three routed ``nats-server -js`` processes on loopback, ready (meta
    leader elected, all routed); stopped by PID afterwards.

    It depends on the session server only for the plugin's check that
    nats-server and nats-py are installed.
    """
    with NatsCluster(tmp_path / "cluster") as cluster:
        yield cluster
