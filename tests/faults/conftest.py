"""Brokers for the fault scenarios: one of the test's own (scenarios kill
and restart it), optionally behind a :class:`trio_bus.testing.FaultProxy`,
and a :class:`~tests.faults.harness.Harness` around it."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from tests._kafka_broker import KAFKA_TEST_PARAMS
from trio_bus.testing import FaultProxy, NatsServer, free_port, run_tansu

from .harness import Harness


class BrokerEnv:
    """A real broker on a fixed loopback port, with a proxy port in front
    when *proxied*. :meth:`kill` SIGKILLs it; :meth:`start` starts it again
    on the same port (NATS keeps its store in its directory; Tansu runs
    with ``memory://`` storage and comes back empty, see docs/reliability.md)."""

    def __init__(self, transport: str, tmp: Path, tansu: str, *, proxied: bool) -> None:
        self.transport = transport
        self.tmp = tmp
        self.tansu = tansu
        self.port = free_port()
        self.front = free_port() if proxied else self.port
        self.proxy: FaultProxy | None = None
        self._stack = ExitStack()
        self._nats = NatsServer(tmp / "nats", port=self.port)
        self._tansu_pid: int | None = None

    @property
    def url(self) -> str:
        """The URL workers give ``open_bus`` (through the proxy, if any)."""
        if self.transport == "nats":
            return f"nats://127.0.0.1:{self.front}"
        return f"kafka://127.0.0.1:{self.front}?{KAFKA_TEST_PARAMS}"

    @property
    def address(self) -> str:
        """What the raw probe clients use: the broker itself for NATS; for
        Kafka the advertised (front) address, since metadata points there."""
        if self.transport == "nats":
            return f"nats://127.0.0.1:{self.port}"
        return f"127.0.0.1:{self.front}"

    def start(self) -> None:
        """Start (or start again) the broker process."""
        if self.transport == "nats":
            self._nats.start()
            return
        runs = self._stack.enter_context(ExitStack())
        broker = runs.enter_context(
            run_tansu(self.tansu, self.tmp / "tansu.log", self.port, advertised_port=self.front)
        )
        self._tansu_pid = broker.pid

    def kill(self) -> None:
        """SIGKILL the broker (its context still reaps it at the end)."""
        if self.transport == "nats":
            self._nats.stop(signal.SIGKILL)
        elif self._tansu_pid is not None:
            os.kill(self._tansu_pid, signal.SIGKILL)  # reaped when its context closes
            self._tansu_pid = None

    def close(self) -> None:
        self._nats.stop()
        self._stack.close()


@pytest.fixture(params=["nats", "kafka"])
def transport(request: pytest.FixtureRequest) -> str:
    """Each scenario runs on both broker transports."""
    return str(request.param)


def _env(transport: str, tmp_path: Path, tansu: str, proxied: bool) -> Iterator[BrokerEnv]:
    env = BrokerEnv(transport, tmp_path, tansu, proxied=proxied)
    env.start()
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def broker(transport: str, tmp_path: Path, tansu_binary_path: str) -> Iterator[BrokerEnv]:
    """The scenario's broker, clients connect directly."""
    yield from _env(transport, tmp_path, tansu_binary_path, proxied=False)


@pytest.fixture
async def proxied_broker(
    transport: str, tmp_path: Path, tansu_binary_path: str, nursery: trio.Nursery
) -> AsyncIterator[BrokerEnv]:
    """The scenario's broker behind a FaultProxy (``env.proxy``)."""
    for env in _env(transport, tmp_path, tansu_binary_path, proxied=True):
        env.proxy = FaultProxy("127.0.0.1", env.port, listen_port=env.front)
        await nursery.start(env.proxy.run)
        yield env


def _harness(env: BrokerEnv, tmp_path: Path, nursery: trio.Nursery) -> Iterator[Harness]:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    harness = Harness(logs, env.transport, env.url, env.address, nursery, proxy=env.proxy)
    try:
        yield harness
    finally:
        for worker in harness.workers:  # a failed scenario leaves no process behind
            if worker.running:
                worker.process.kill()


@pytest.fixture
def harness(broker: BrokerEnv, tmp_path: Path, nursery: trio.Nursery) -> Iterator[Harness]:
    """A harness on the scenario's own broker."""
    yield from _harness(broker, tmp_path, nursery)


@pytest.fixture
def proxied_harness(
    proxied_broker: BrokerEnv, tmp_path: Path, nursery: trio.Nursery
) -> Iterator[Harness]:
    """A harness whose workers reach the broker through the FaultProxy."""
    yield from _harness(proxied_broker, tmp_path, nursery)
