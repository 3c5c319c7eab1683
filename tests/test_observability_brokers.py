"""Observability against the real brokers: lag and pending metrics, held
commit points, ``trio-bus check`` on live and dead ports."""

from __future__ import annotations

import socket

import pytest
import trio
from prometheus_client import generate_latest

import trio_bus
from trio_bus import Monitoring
from trio_bus.__main__ import _check

from .helpers import Recorder

BROKERS = ["nats", "kafka"]


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_bus_url")
    return url


def _dead_url(scheme: str) -> str:
    # A port that was free a moment ago and has nothing listening.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"{scheme}://127.0.0.1:{port}"


async def test_check_exits_0_on_a_live_broker(
    broker_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _check(broker_url, 30) == 0
    out = capsys.readouterr().out
    assert out.startswith("HEALTHY")
    assert "round trip" in out


@pytest.mark.parametrize("scheme", BROKERS)
async def test_check_exits_2_on_a_dead_port(
    scheme: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _check(_dead_url(scheme), 10) == 2
    assert "cannot reach" in capsys.readouterr().out


async def test_lag_metrics_and_held_commit_point(broker_url: str, topic: str) -> None:
    """A stuck handler holds its lane's commit point: lag shows in the
    metrics, health reports a commit stall, both clear once it finishes."""
    gate = trio.Event()
    started: Recorder[bytes] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        started.add(message.value)
        if message.value == b"0":
            await gate.wait()

    n = 20
    monitoring = Monitoring(interval=3600, stall_after=0.5)
    async with trio_bus.open_bus(
        broker_url, client_id="lagging", monitoring=monitoring, handler_timeout=None
    ) as bus:
        await bus.subscribe(topic, handler)
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic=topic, value=b"%d" % i, key=f"k{i}") for i in range(n)
        )
        await started.wait_for_count(n)  # all but "0" finished; "0" is stuck
        reports: list[trio_bus.HealthReport] = []
        with trio.fail_after(30):
            while True:
                reports.append(await bus.health())
                if any(s.kind == "commit" for s in reports[-1].stalls):
                    break
                await trio.sleep(0.1)
        report = reports[-1]
        assert not report.healthy
        lanes = [lane.state for lane in report.lanes if lane.state.topic == topic]
        assert sum(lane.lag or 0 for lane in lanes) >= 1
        ns = f"{bus.transport.name}_eventbus_lagging"
        text = generate_latest(bus.metrics_registry).decode()
        assert f"{ns}_consumer_lag_messages{{" in text
        assert f"{ns}_consumer_committed_offset{{" in text
        gate.set()
        with trio.fail_after(30):
            while True:
                report = await bus.health()
                lanes = [lane.state for lane in report.lanes if lane.state.topic == topic]
                if report.healthy and all((lane.lag or 0) == 0 for lane in lanes):
                    break
                await trio.sleep(0.1)
        assert report.stalls == ()


async def test_probes_do_not_pile_up_on_nats(nats_bus_url: str) -> None:
    """The health topic's stream is in memory, with a max age and a message
    limit (it used to be a file stream without limits)."""
    async with trio_bus.open_bus(nats_bus_url, client_id="probe-limits") as bus:
        await bus.probe()
        transport = bus.transport

        async def stream_config() -> object:
            return (await transport.client.jetstream().stream_info("trio-bus_health")).config  # type: ignore[attr-defined]

        config = await transport.run_on_loop(stream_config)  # type: ignore[attr-defined]
    assert getattr(config.storage, "value", config.storage) == "memory"
    assert config.max_age == 60.0
    assert config.max_msgs == 1000


async def test_probe_topic_is_small_on_kafka(kafka_bus_url: str) -> None:
    async with trio_bus.open_bus(kafka_bus_url, client_id="probe-limits") as bus:
        await bus.probe()
        partitions, _ = await bus.transport.topic_metadata("trio-bus.health")  # type: ignore[attr-defined]
    assert partitions == 1
