"""Metrics, health and stalls, backlog, the probe, tracing and publish
results, driven by real traffic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

import trio_bus
from trio_bus import Monitoring, RetryPolicy
from trio_bus.__main__ import _check
from trio_bus._message import OutgoingMessage
from trio_bus.errors import PublishError, PublishOutcomeUnknownError
from trio_bus.metrics import metric_namespace, serve_metrics
from trio_bus.transports import SCHEMES
from trio_bus.transports._base import Transport, TransportSettings
from trio_bus.transports.memory import MemoryTransport, get_broker

from .helpers import Recorder, collect

FAST = RetryPolicy(max_attempts=2, backoff=0.01)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_namespace_follows_the_seed_convention() -> None:
    assert metric_namespace("kafka", "order-service.v2") == "kafka_eventbus_order_service_v2"
    assert metric_namespace("nats", "a b") == "nats_eventbus_a_b"


async def test_metrics_follow_real_traffic(memory_bus_url: str, topic: str) -> None:
    release = trio.Event()
    seen: Recorder[bytes] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        if message.value == b"bad":
            raise ValueError("always")
        if message.value == b"slow":
            await release.wait()
        seen.add(message.value)

    async with trio_bus.open_bus(memory_bus_url, client_id="svc", retry=FAST) as bus:
        reg = bus.metrics_registry
        ns = "memory_eventbus_svc"
        await bus.subscribe(topic, handler)
        await bus.publish(topic, b"ok", key="a")
        await bus.publish(topic, b"bad", key="b")
        await bus.publish(topic, b"slow", key="c")
        await bus.publish(topic, b"queued", key="c")
        await seen.poll_until(lambda: bus.statistics().dead_lettered == 1 and b"ok" in seen.items)
        assert value(reg, f"{ns}_messages_published_total", topic=topic) == 4
        assert value(reg, f"{ns}_messages_published_total", topic=f"{topic}.dlq") == 1
        assert value(reg, f"{ns}_messages_consumed_total", topic=topic) == 4
        assert value(reg, f"{ns}_messages_failed_total", topic=topic) == 2
        assert value(reg, f"{ns}_messages_retried_total", topic=topic) == 1
        assert value(reg, f"{ns}_messages_dead_lettered_total", topic=topic) == 1
        # "slow" runs, "queued" waits behind it in the same inbox.
        assert value(reg, f"{ns}_in_flight_messages") == 2
        assert value(reg, f"{ns}_inbox_depth_messages") == 1
        assert value(reg, f"{ns}_actors_busy") == 1
        release.set()
        await seen.wait_until(lambda: b"queued" in seen.items)
        assert value(reg, f"{ns}_messages_handled_total", topic=topic) == 3
        assert value(reg, f"{ns}_handler_duration_seconds_count", topic=topic) == 3
        assert value(reg, f"{ns}_end_to_end_latency_seconds_count", topic=topic) == 4
        assert value(reg, f"{ns}_publish_latency_seconds_count", topic=topic) == 4
        assert value(reg, f"{ns}_in_flight_messages") == 0
        assert value(reg, f"{ns}_actor_restarts_total") == 0


async def test_two_buses_in_one_process_do_not_collide(memory_bus_url: str) -> None:
    async with (
        trio_bus.open_bus(memory_bus_url, client_id="same") as a,
        trio_bus.open_bus(memory_bus_url, client_id="same") as b,
    ):
        await a.publish("t", b"x")
        assert a.metrics_registry is not b.metrics_registry
        ns = "memory_eventbus_same"
        assert value(a.metrics_registry, f"{ns}_messages_published_total", topic="t") == 1
        assert value(b.metrics_registry, f"{ns}_messages_published_total", topic="t") == 0


async def test_serve_metrics_over_http(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url, client_id="web") as bus, trio.open_nursery() as n:
        await bus.publish("t", b"x")
        port = await n.start(serve_metrics, bus.metrics_registry)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some():
                    response += chunk
        n.cancel_scope.cancel()
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert b'memory_eventbus_web_messages_published_total{topic="t"} 1.0' in response


async def test_health_reports_and_clears_stalls(memory_bus_url: str, topic: str) -> None:
    release = trio.Event()
    started: Recorder[int] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        started.add(1)
        await release.wait()

    monitoring = Monitoring(stall_after=0.2, interval=60)
    async with trio_bus.open_bus(
        memory_bus_url, monitoring=monitoring, handler_timeout=None
    ) as bus:
        await bus.subscribe(topic, handler)
        report = await bus.health()
        assert report.healthy
        assert report.connected
        assert report.actors_alive == report.pool_size == 256
        assert [s.live for s in report.subscriptions] == [True]
        await bus.publish(topic, b"x", key="k")
        await started.wait_for_count(1)
        stuck: list[trio_bus.HealthReport] = []

        async def stalled() -> bool:
            stuck.append(await bus.health())
            return {s.kind for s in stuck[-1].stalls} == {"handler", "commit"}

        with trio.fail_after(10):
            while not await stalled():
                await trio.sleep(0.05)
        report = stuck[-1]
        assert not report.healthy
        assert "aggregate k" in next(s.where for s in report.stalls if s.kind == "handler")
        (lane,) = report.lanes
        assert lane.state.lag == 1
        assert lane.state.ack_pending == 1
        release.set()
        await started.poll_until(lambda: bus.statistics().in_flight == 0)
        report = await bus.health()
        assert report.stalls == ()
        assert report.healthy
        assert "HEALTHY" in report.describe()


async def test_backlog_crossing_and_recovery_are_reported(memory_bus_url: str, topic: str) -> None:
    events: Recorder[trio_bus.BacklogEvent] = Recorder()
    gate = trio.Event()

    async def handler(message: trio_bus.Message) -> None:
        await gate.wait()

    monitoring = Monitoring(interval=0.02, lag_warning=5, lag_critical=20, on_backlog=events.add)
    async with trio_bus.open_bus(memory_bus_url, monitoring=monitoring, pool_size=1) as bus:
        await bus.subscribe(topic, handler)
        await bus.publish_many(OutgoingMessage(topic=topic, value=b"x") for _ in range(25))
        await events.wait_until(lambda: any(e.severity == "critical" for e in events.items))
        ns = "memory_eventbus_trio_bus"
        reg = bus.metrics_registry
        lag = value(reg, f"{ns}_consumer_lag_messages", topic=topic, group="trio-bus", partition="")
        assert lag >= 20
        assert (
            value(
                reg,
                f"{ns}_backlog_severity",
                kind="consumer_lag",
                topic=topic,
                group="trio-bus",
                partition="",
            )
            == 2
        )
        gate.set()
        await events.wait_until(lambda: events.items[-1].severity == "ok")
    kinds = [(e.previous, e.severity) for e in events.items]
    assert kinds[0] in {("ok", "warning"), ("ok", "critical")}
    assert kinds[-1][1] == "ok"
    assert all(e.kind == "consumer_lag" and e.topic == topic for e in events.items)


async def test_probe_failures_make_the_bus_unhealthy_and_recover(memory_bus_url: str) -> None:
    changes: Recorder[bool] = Recorder()
    gate = trio.Event()

    async def blocker(message: trio_bus.Message) -> None:
        await gate.wait()

    monitoring = Monitoring(
        interval=0.05,
        probe_interval=0.05,
        probe_timeout=0.1,
        probe_failures=2,
        on_health_change=changes.add,
    )
    # One actor: a stuck handler stops the probe from coming back.
    async with trio_bus.open_bus(
        memory_bus_url, monitoring=monitoring, pool_size=1, handler_timeout=None
    ) as bus:
        await bus.subscribe("work", blocker)
        latency = await bus.probe()
        assert latency < 1
        await bus.publish("work", b"x")
        with trio.fail_after(10):
            await bus.wait_unhealthy()
        report = await bus.health()
        assert not report.healthy
        assert report.probe_failures >= 2
        gate.set()
        with trio.fail_after(10):
            await bus.wait_healthy()
        assert (await bus.health()).last_round_trip is not None
    assert changes.items[:2] == [False, True]


async def test_check_command_on_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert await _check("memory://check", 10) == 0
    assert "HEALTHY" in capsys.readouterr().out


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_trace_context_survives_a_round_trip(
    bus_url: str, topic: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    got: Recorder[trio_bus.Message] = Recorder()
    async with trio_bus.open_bus(bus_url, tracing=provider) as bus:
        await bus.subscribe(topic, collect(got))
        await bus.publish(topic, b"traced", key="k")
        await got.wait_for_count(1)
    assert "traceparent" in got.items[0].headers
    finished = exporter.get_finished_spans()
    (producer,) = [s for s in finished if s.kind == SpanKind.PRODUCER]
    (consumer,) = [s for s in finished if s.kind == SpanKind.CONSUMER]
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert producer.name == f"send {topic}"
    assert consumer.name == f"process {topic}"


async def test_no_tracing_without_an_sdk(memory_bus_url: str, topic: str) -> None:
    got: Recorder[trio_bus.Message] = Recorder()
    async with trio_bus.open_bus(memory_bus_url) as bus:
        assert bus._tracer is None
        await bus.subscribe(topic, collect(got))
        await bus.publish(topic, b"x")
        await got.wait_for_count(1)
    assert "traceparent" not in got.items[0].headers


# A transport that refuses or loses the messages whose body says so: a fake
# for the pure logic of result reporting (brokers' own failures are tested
# per transport).
class _Flaky(MemoryTransport):
    name = "flaky"

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        fates = {b"refuse": PublishError("refused"), b"lose": PublishOutcomeUnknownError("lost")}
        await super().publish_batch([r for r in records if r.value not in fates])
        return [fates.get(r.value) for r in records]


@asynccontextmanager
async def open_transport(settings: TransportSettings) -> AsyncIterator[Transport]:
    yield _Flaky(get_broker(f"flaky-{settings.hosts}"))
    await trio.lowlevel.checkpoint()


async def test_publish_results_for_every_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCHEMES, "flaky", (__name__, None))
    async with trio_bus.open_bus("flaky://x", monitoring=None) as bus:
        results = bus.open_publish_results()
        tenant = bus.open_publish_results(tenant_id="t1")
        env = trio_bus.Envelope.new(aggregate_id="a-1", event_type="T", payload=1, tenant_id="t1")
        await bus.publish_envelope("orders", env)
        with pytest.raises(PublishError):
            await bus.publish("orders", b"refuse", key="a-2")
        with pytest.raises(PublishOutcomeUnknownError):
            await bus.publish("orders", b"lose")
        with pytest.raises(PublishError):
            await bus.publish_many(
                [
                    OutgoingMessage(topic="orders", value=b"fine", key="a-3"),
                    OutgoingMessage(topic="orders", value=b"refuse"),
                ]
            )
        got = [results.receive_nowait() for _ in range(5)]
        with pytest.raises(trio.WouldBlock):
            results.receive_nowait()
        only_t1 = tenant.receive_nowait()
        with pytest.raises(trio.WouldBlock):
            tenant.receive_nowait()
    assert [(r.status, r.aggregate_id) for r in got] == [
        ("success", "a-1"),
        ("failure", "a-2"),
        ("unknown", None),
        ("success", "a-3"),
        ("failure", None),
    ]
    assert got[0].event_id == env.event_id
    assert got[0].tenant_id == "t1"
    assert isinstance(got[1].error, PublishError)
    assert only_t1 == got[0]


async def test_publish_results_policy_when_the_reader_is_behind(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url) as bus:
        dropping = bus.open_publish_results(buffer=1, when_full="drop")
        waiting = bus.open_publish_results(buffer=1)
        await bus.publish("t", b"1")
        done = trio.Event()

        async def second() -> None:
            await bus.publish("t", b"2")
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # waits for the "wait" reader
            assert (await waiting.receive()).status == "success"
        assert done.is_set()
        assert (await waiting.receive()).status == "success"
        assert (await dropping.receive()).status == "success"
        with pytest.raises(trio.WouldBlock):
            dropping.receive_nowait()
        reg = bus.metrics_registry
        assert value(reg, "memory_eventbus_trio_bus_publish_results_dropped_total") == 1
        await dropping.aclose()
        await bus.publish("t", b"3")  # a closed reader is dropped, not an error
