"""The Kafka transport under faults: a failing asyncio loop, a broker that
stops answering (blackhole), connections reset mid-stream.

Each test runs its own Tansu behind a :class:`~trio_bus.testing.FaultProxy`
and makes the broker advertise the proxy's port, so every connection the
clients (re)open goes through the proxy.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiokafka
import aiokafka.client
import aiokafka.conn
import aiokafka.errors as kafka_errors
import pytest
import trio
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.producer.sender import Sender

import trio_bus
from trio_bus._message import OutgoingMessage
from trio_bus.errors import (
    BusClosedError,
    PublishError,
    PublishOutcomeUnknownError,
    TransportError,
)
from trio_bus.testing import FaultProxy
from trio_bus.transports._base import ConsumerSpec, TransportSettings
from trio_bus.transports._bridge import UNWIND_TIMEOUT
from trio_bus.transports.kafka import KafkaOptions, TopicConfig, open_transport

from ._kafka_broker import KAFKA_TEST_PARAMS, KafkaBroker, free_port, run_tansu
from .helpers import WAIT, Recorder, collect


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def tansu_behind_proxy(binary: str, log: Path) -> Iterator[tuple[KafkaBroker, int]]:
    """Tansu advertising a port where a FaultProxy is to listen."""
    proxy_port, broker_port = free_port(), free_port()
    with run_tansu(binary, log, broker_port, advertised_port=proxy_port) as broker:
        yield KafkaBroker(broker.host, broker_port, broker.pid, broker.log), proxy_port


@asynccontextmanager
async def proxied(binary: str, log: Path) -> AsyncIterator[tuple[FaultProxy, str]]:
    """A broker behind a running proxy; yields the proxy and the bus URL."""
    with tansu_behind_proxy(binary, log) as (broker, proxy_port):
        async with trio.open_nursery() as nursery:
            proxy = FaultProxy("127.0.0.1", broker.port, listen_port=proxy_port)
            await nursery.start(proxy.run)
            try:
                yield proxy, f"kafka://127.0.0.1:{proxy_port}?{KAFKA_TEST_PARAMS}"
            finally:
                proxy.heal()
                nursery.cancel_scope.cancel()


async def test_a_failing_poll_loop_ends_open_bus_with_transport_error(
    kafka_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-retriable error on the asyncio side leaves open_bus as a typed
    TransportError (its cause the client's error), not a log line."""
    topic = _name("t")
    injected = kafka_errors.TopicAuthorizationFailedError("injected")
    assert not injected.retriable

    async def failing_getmany(self: object, *args: object, **kwargs: object) -> object:
        raise injected

    with trio.fail_after(WAIT), pytest.raises(TransportError) as caught:
        async with trio_bus.open_bus(kafka_broker.url) as bus:
            await bus.subscribe(topic, _noop)
            monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "getmany", failing_getmany)
            await trio.sleep_forever()
    assert caught.value.__cause__ is injected
    assert "poll" in str(caught.value)


async def _noop(message: trio_bus.Message) -> None:
    pass


async def test_close_is_bounded_while_blackholed(tansu_binary_path: str, tmp_path: Path) -> None:
    """With the broker unreachable (bytes held, no RST), a publish reports an
    unknown outcome within publish_timeout, and aclose and the transport's
    exit end within their bounds."""
    close_timeout, publish_timeout = 2.0, 1.5
    async with proxied(tansu_binary_path, tmp_path / "tansu.log") as (proxy, url):
        settings = TransportSettings(
            url=f"{url}&close_timeout={close_timeout}&publish_timeout={publish_timeout}",
            hosts=(url.split("//")[1].split("?")[0],),
            client_id=_name("c"),
            options=KafkaOptions(topic=TopicConfig(partitions=2)),
            max_message_bytes=1 << 20,
        )
        topic = _name("t")
        started = trio.current_time()
        with trio.fail_after(WAIT):
            async with open_transport(settings) as transport:
                await transport.publish_batch(
                    [OutgoingMessage(topic=topic, value=b"x", key=f"k{i}") for i in range(4)]
                )
                first = await transport.open_consumer(
                    ConsumerSpec(topic=topic, group=_name("g"), start="earliest")
                )
                await transport.open_consumer(
                    ConsumerSpec(topic=topic, group=_name("g"), start="earliest")
                )
                got = 0
                while got < 4:
                    records = await first.fetch(10)
                    got += len(records)
                    first.ack(records[0])
                proxy.blackhole()
                start = trio.current_time()
                outcomes = await transport.publish_batch(
                    [OutgoingMessage(topic=topic, value=b"y", key="k0")]
                )
                assert isinstance(outcomes[0], PublishOutcomeUnknownError)
                assert trio.current_time() - start < publish_timeout + 1
                start = trio.current_time()
                await first.aclose()
                assert trio.current_time() - start < close_timeout + UNWIND_TIMEOUT + 1
                with pytest.raises(BusClosedError):
                    await first.fetch(1)
                start = trio.current_time()
        # Each group within close_timeout, then the producer within it.
        elapsed = trio.current_time() - start
        assert elapsed < 2 * (close_timeout + UNWIND_TIMEOUT) + 2, elapsed
        assert trio.current_time() - started < WAIT


async def test_connection_resets_mid_stream_keep_order_and_lose_nothing(
    tansu_binary_path: str, tmp_path: Path
) -> None:
    """2,000 messages over 50 aggregates while every connection is reset
    five times: first deliveries per aggregate in publish order, none lost."""
    aggregates, per_aggregate = 50, 40
    topic = _name("t")
    seen: Recorder[tuple[int, int]] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        seen.add((int(message.headers["agg"]), int(message.headers["seq"])))

    async with proxied(tansu_binary_path, tmp_path / "tansu.log") as (proxy, url):
        options = KafkaOptions(topic=TopicConfig(partitions=4))
        async with trio_bus.open_bus(url, transport_options=options) as bus:
            await bus.subscribe(topic, handler, start="earliest")
            connections = proxy.accepted

            async def publish_aggregate(agg: int) -> None:
                for seq in range(per_aggregate):
                    for _ in range(20):  # a reset fails in-flight publishes
                        try:
                            await bus.publish(
                                topic,
                                b"x",
                                key=f"a{agg}",
                                headers={"agg": str(agg), "seq": str(seq)},
                            )
                            break
                        except PublishError:
                            continue
                    else:  # pragma: no cover
                        pytest.fail("publish kept failing")

            async def reset_while_flowing() -> None:
                for i in range(1, 6):
                    await seen.wait_for_count(i * 300)
                    proxy.reset()

            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reset_while_flowing)
                    for agg in range(aggregates):
                        nursery.start_soon(publish_aggregate, agg)
                await seen.wait_until(lambda: len(set(seen.items)) == aggregates * per_aggregate)
    assert proxy.resets == 5
    assert proxy.accepted > connections  # the clients reconnected through it
    _assert_first_deliveries_in_order(seen.items, range(per_aggregate))


def _assert_first_deliveries_in_order(
    items: list[tuple[int, int]], expected: range | None = None
) -> None:
    firsts: dict[int, list[int]] = defaultdict(list)
    known: set[tuple[int, int]] = set()
    for agg, seq in items:
        if (agg, seq) not in known:
            known.add((agg, seq))
            firsts[agg].append(seq)
    for agg, seqs in firsts.items():
        assert seqs == sorted(seqs), (agg, seqs)
        if expected is not None:
            assert seqs == list(expected), agg


async def test_blackhole_then_heal_keeps_order_and_never_fakes_success(
    tansu_binary_path: str, tmp_path: Path
) -> None:
    """The network holds every byte for 10 s, then heals. Publishes during
    the outage fail with a typed error within publish_timeout or wait for
    the broker's answer; every publish reported stored is delivered, first
    deliveries per aggregate stay in publish order."""
    publish_timeout, aggregates = 3.0, 10
    topic = _name("t")
    seen: Recorder[tuple[int, int]] = Recorder()
    stored: set[tuple[int, int]] = set()
    failed_during_outage = 0

    async def handler(message: trio_bus.Message) -> None:
        seen.add((int(message.headers["agg"]), int(message.headers["seq"])))

    async with proxied(tansu_binary_path, tmp_path / "tansu.log") as (proxy, url):
        options = KafkaOptions(topic=TopicConfig(partitions=4), publish_timeout=publish_timeout)
        async with trio_bus.open_bus(url, transport_options=options) as bus:
            await bus.subscribe(topic, handler, start="earliest")
            next_seq = [0] * aggregates

            async def publish(agg: int) -> None:
                nonlocal failed_during_outage
                seq = next_seq[agg]
                next_seq[agg] += 1
                blackholed = proxy.blackholed
                start = trio.current_time()
                try:
                    await bus.publish(
                        topic, b"x", key=f"a{agg}", headers={"agg": str(agg), "seq": str(seq)}
                    )
                except PublishError:
                    # The bus sends one batch at a time: a publish may queue
                    # behind one batch in flight, then wait for its own.
                    assert trio.current_time() - start < 2 * publish_timeout + 1.5
                    failed_during_outage += blackholed
                    return
                # Stored means acknowledged: never while the broker is cut off.
                assert not proxy.blackholed
                stored.add((agg, seq))

            async def round_(n: int) -> None:
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(publish, i % aggregates)

            with trio.fail_after(120):
                await round_(200)
                await seen.wait_until(lambda: stored <= set(seen.items))
                proxy.blackhole()
                outage_end = trio.current_time() + 10
                while trio.current_time() < outage_end:
                    await round_(aggregates)
                proxy.heal()
                await round_(200)
                await seen.wait_until(lambda: stored <= set(seen.items))
    assert failed_during_outage > 0
    _assert_first_deliveries_in_order(seen.items)


async def test_stops_cut_short_at_close_timeout_leave_no_connection_open(
    kafka_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's stop (leaving waits for a join under way) and the
    producer's stop that outlast close_timeout are abandoned, but the
    connections of their clients are closed before the asyncio loop ends
    (aiokafka closes them only at the end of a stop)."""
    opened: list[aiokafka.conn.AIOKafkaConnection] = []
    create_conn = aiokafka.client.create_conn

    async def recording_create_conn(*args: object, **kwargs: object) -> object:
        conn = await create_conn(*args, **kwargs)
        opened.append(conn)
        return conn

    async def hang(self: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(aiokafka.client, "create_conn", recording_create_conn)
    topic = _name("t")
    seen: Recorder[trio_bus.Message] = Recorder()
    with trio.fail_after(WAIT):
        async with trio_bus.open_bus(f"{kafka_broker.url}&close_timeout=1") as bus:
            await bus.subscribe(topic, collect(seen), start="earliest")
            await bus.publish(topic, b"x", key="k")
            await seen.wait_for_count(1)
            monkeypatch.setattr(GroupCoordinator, "close", hang)
            monkeypatch.setattr(Sender, "close", hang)
    assert opened
    assert not [conn for conn in opened if conn.connected()]
