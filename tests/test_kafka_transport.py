"""The Kafka transport against a real Kafka-protocol broker (Tansu).

Transport-level: publish batches, the unified group consumer, positions of
new groups, commit watermarks, release, backpressure, restarts, topic
configuration and options. Bus-level behaviour is in
tests/test_kafka_bus.py.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_bus._message import OutgoingMessage, Record
from trio_bus.errors import BusClosedError, ConfigError, TopicConfigError
from trio_bus.transports._base import Consumer, ConsumerSpec, LaneState, TransportSettings
from trio_bus.transports.kafka import (
    KafkaOptions,
    KafkaTransport,
    TopicConfig,
    open_transport,
    resolve_options,
)

from ._kafka_broker import KafkaBroker, free_port, run_tansu

WAIT = 30.0


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _settings(broker: KafkaBroker, options: object | None = None) -> TransportSettings:
    return TransportSettings(
        url=broker.url,
        hosts=(broker.bootstrap,),
        client_id=_name("test"),
        options=options,
        max_message_bytes=1024 * 1024,
    )


@asynccontextmanager
async def kafka(
    broker: KafkaBroker, options: KafkaOptions | None = None
) -> AsyncIterator[KafkaTransport]:
    async with open_transport(_settings(broker, options)) as transport:
        yield transport


async def fetch_n(consumer: Consumer, n: int) -> list[Record]:
    """Fetch exactly *n* records (fails the test after WAIT seconds)."""
    out: list[Record] = []
    with trio.fail_after(WAIT):
        while len(out) < n:
            out.extend(await consumer.fetch(n - len(out)))
    return out


async def fetch_nothing(consumer: Consumer, wait: float = 0.5) -> None:
    """Assert nothing arrives for *wait* seconds (a bounded negative check)."""
    with trio.move_on_after(wait):
        got = await consumer.fetch(100)
        pytest.fail(f"unexpected records: {[(r.partition, r.offset) for r in got]}")


async def committed(transport: KafkaTransport, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offsets per partition, read by a separate
    client through the broker's OffsetFetch API."""
    import aiokafka

    async def read() -> dict[int, int | None]:
        client = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=list(transport.hosts),
            group_id=group,
            enable_auto_commit=False,
        )
        await client.start()
        try:
            parts = client.partitions_for_topic(topic)
            if parts is None:
                await client._client.force_metadata_update()
                parts = client.partitions_for_topic(topic) or set()
            out: dict[int, int | None] = {}
            for p in sorted(parts):
                out[p] = await client.committed(aiokafka.TopicPartition(topic, p))
            return out
        finally:
            await client.stop()

    return await transport.bridge.call(read)


def msgs(topic: str, n: int, *, keys: int = 1, start: int = 0) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(
            topic=topic,
            value=f"v{i}".encode(),
            key=f"k{i % keys}",
            headers={"X-Seq": str(i)},
        )
        for i in range(start, start + n)
    ]


async def test_publish_then_consume_keyed_in_order(kafka_broker: KafkaBroker) -> None:
    topic, group = _name("t"), _name("g")
    async with kafka(kafka_broker) as transport:
        outcomes = await transport.publish_batch(msgs(topic, 60, keys=6))
        assert list(outcomes) == [None] * 60
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        records = await fetch_n(consumer, 60)
        for r in records:
            consumer.ack(r)
        await consumer.flush()
        await consumer.aclose()
    by_key: dict[str, list[int]] = {}
    partition_of: dict[str | None, set[int | None]] = {}
    for r in records:
        assert r.topic == r.subject == topic
        assert r.value == f"v{r.headers['X-Seq']}".encode()
        assert r.key is not None
        by_key.setdefault(r.key, []).append(int(r.headers["X-Seq"]))
        partition_of.setdefault(r.key, set()).add(r.partition)
    assert sorted(by_key) == [f"k{i}" for i in range(6)]
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), key
        assert len(partition_of[key]) == 1  # the key pins the partition
    assert transport.groups == {}


async def test_latest_start_does_not_skip_right_after_open(
    kafka_broker: KafkaBroker,
) -> None:
    topic, group = _name("t"), _name("g")
    async with kafka(kafka_broker) as transport:
        for m in msgs(topic, 5):  # before: not for this group
            # One batch each: Tansu 0.6 reports a multi-record batch's end
            # offset as its base + 1 (docs/kafka.md), which would replay it.
            await transport.publish_batch([m])
        consumer = await transport.open_consumer(ConsumerSpec(topic=topic, group=group))
        await transport.publish_batch(msgs(topic, 3, start=100))
        records = await fetch_n(consumer, 3)
        assert [r.headers["X-Seq"] for r in records] == ["100", "101", "102"]
        await fetch_nothing(consumer, 0.3)
        await consumer.aclose()


async def test_commit_never_passes_unfinished_offset(kafka_broker: KafkaBroker) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(topic=TopicConfig(partitions=1))
    async with kafka(kafka_broker, options) as transport:
        await transport.publish_batch(msgs(topic, 10, keys=5))
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        records = await fetch_n(consumer, 10)
        assert [r.offset for r in records] == list(range(10))
        # Handlers of different aggregates finish out of order.
        for i in (1, 3, 4, 0, 7, 9):
            consumer.ack(records[i])
        await consumer.flush()
        assert await committed(transport, group, topic) == {0: 2}
        consumer.ack(records[2])
        await consumer.flush()
        assert await committed(transport, group, topic) == {0: 5}
        for i in (5, 6, 8):
            consumer.ack(records[i])
        await consumer.flush()
        assert await committed(transport, group, topic) == {0: 10}
        await consumer.aclose()


async def test_lanes_and_timestamps(kafka_broker: KafkaBroker) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(topic=TopicConfig(partitions=1))
    async with kafka(kafka_broker, options) as transport:
        before = time.time()
        await transport.publish_batch(msgs(topic, 5))
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        records = await fetch_n(consumer, 5)
        for r in records:
            assert r.timestamp is not None
            assert before - 5 <= r.timestamp <= time.time() + 5
        consumer.ack(records[0])
        consumer.ack(records[1])
        await consumer.flush()
        assert list(await consumer.lanes()) == [
            LaneState(topic=topic, partition=0, committed=2, lag=3, in_flight=3)
        ]
        await consumer.aclose()


async def test_ephemeral_group_commits_nothing(kafka_broker: KafkaBroker) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(topic=TopicConfig(partitions=1))
    async with kafka(kafka_broker, options) as transport:
        await transport.publish_batch(msgs(topic, 2))
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest", ephemeral=True)
        )
        for r in await fetch_n(consumer, 2):
            consumer.ack(r)
        await consumer.flush()
        await consumer.aclose()
        assert await committed(transport, group, topic) == {0: None}


async def test_periodic_commit_and_close_commit(kafka_broker: KafkaBroker) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(topic=TopicConfig(partitions=1), commit_interval=0.05)
    async with kafka(kafka_broker, options) as transport:
        await transport.publish_batch(msgs(topic, 4))
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        records = await fetch_n(consumer, 4)
        consumer.ack(records[0])
        consumer.ack(records[1])
        # No flush: the commit task sends it on its own.
        with trio.fail_after(WAIT):
            while (await committed(transport, group, topic)) != {0: 2}:
                await trio.sleep(0.05)
        consumer.ack(records[2])
        await consumer.aclose()  # commits the finished prefix, not record 3
        assert await committed(transport, group, topic) == {0: 3}


async def test_restart_resumes_after_committed_prefix(
    kafka_broker: KafkaBroker,
) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(topic=TopicConfig(partitions=2))
    async with kafka(kafka_broker, options) as transport:
        await transport.publish_batch(msgs(topic, 20, keys=4))
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        first = await fetch_n(consumer, 20)
        handled = {r.headers["X-Seq"] for r in first if int(r.headers["X-Seq"]) % 2 == 0}
        for r in first:
            if r.headers["X-Seq"] in handled:
                consumer.ack(r)
        await consumer.aclose()
    async with kafka(kafka_broker, options) as transport:
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="latest")  # existing group resumes
        )
        with trio.fail_after(WAIT):
            again: list[Record] = []
            while not {str(i) for i in range(20)} - handled <= {r.headers["X-Seq"] for r in again}:
                again.extend(await consumer.fetch(100))
        for r in again:
            consumer.ack(r)
        await consumer.aclose()
    # Every record not handled the first time came again.
    assert {str(i) for i in range(20)} - handled <= {r.headers["X-Seq"] for r in again}


async def test_release_redelivers_and_holds_commit(kafka_broker: KafkaBroker) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(topic=TopicConfig(partitions=1))
    async with kafka(kafka_broker, options) as transport:
        await transport.publish_batch(msgs(topic, 5))
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        records = await fetch_n(consumer, 5)
        consumer.ack(records[0])
        consumer.release(records[1])
        for r in records[2:]:
            consumer.ack(r)
        await consumer.flush()
        assert await committed(transport, group, topic) == {0: 1}
        again = await fetch_n(consumer, 4)
        # Sought back to the released record: it and what followed it.
        assert [r.offset for r in again] == [1, 2, 3, 4]
        for r in again:
            consumer.ack(r)
        # A late ack of a record from before the seek changes nothing.
        consumer.ack(records[1])
        await consumer.flush()
        assert await committed(transport, group, topic) == {0: 5}
        await consumer.aclose()


async def test_revocation_commits_finished_prefix_only(kafka_broker: KafkaBroker) -> None:
    """A member joins while a handler of the first member is still running:
    after ``rebalance_grace`` the partition moves on with its finished prefix
    committed; the late ack of the slow record is never committed."""
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(topic=TopicConfig(partitions=1))  # grace 3 s (URL)
    async with kafka(kafka_broker, options) as ta, kafka(kafka_broker, options) as tb:
        await ta.publish_batch(msgs(topic, 5))
        ca = await ta.open_consumer(ConsumerSpec(topic=topic, group=group, start="earliest"))
        records = await fetch_n(ca, 5)
        for i in (0, 1, 3, 4):
            ca.ack(records[i])  # record 2 is the slow one
        start = trio.current_time()
        cb = await tb.open_consumer(ConsumerSpec(topic=topic, group=group, start="earliest"))
        assert trio.current_time() - start >= 2.5  # the revocation waited
        assert await committed(ta, group, topic) == {0: 2}
        ca.ack(records[2])  # too late: its partition was revoked
        await ca.flush()
        assert await committed(ta, group, topic) == {0: 2}
        owner = ca if ta.groups[group].tracks else cb
        again = await fetch_n(owner, 3)
        assert [r.offset for r in again] == [2, 3, 4]
        for r in again:
            owner.ack(r)
        await owner.flush()
        assert await committed(ta, group, topic) == {0: 5}
        await ca.aclose()
        await cb.aclose()


async def test_backpressure_pauses_and_resumes(kafka_broker: KafkaBroker) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(
        topic=TopicConfig(partitions=1),
        max_unsettled_per_partition=10,
        max_poll_records=5,
    )
    async with kafka(kafka_broker, options) as transport:
        await transport.publish_batch(msgs(topic, 60))
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        held = await fetch_n(consumer, 10)
        await fetch_nothing(consumer, 0.5)  # paused: nothing past the bound
        group_state = transport.groups[group]
        assert all(t.paused for t in group_state.tracks.values())
        # A pause longer than the session timeout (2 s here) keeps the
        # member in its group: no rebalance, same generation.
        generation = group_state.consumer._coordinator.generation
        await trio.sleep(2.5)  # the condition under test is time passing
        assert group_state.consumer._coordinator.generation == generation
        assert all(t.paused and t.live for t in group_state.tracks.values())
        for r in held:
            consumer.ack(r)
        rest = await fetch_n(consumer, 10)  # resumed once drained
        assert rest[0].offset == 10
        await consumer.aclose()


async def test_unified_consumer_per_group(kafka_broker: KafkaBroker) -> None:
    t1, t2, group = _name("t"), _name("t"), _name("g")
    async with kafka(kafka_broker) as transport:
        c1 = await transport.open_consumer(ConsumerSpec(topic=t1, group=group))
        c2 = await transport.open_consumer(ConsumerSpec(topic=t2, group=group))
        assert list(transport.groups) == [group]  # one aiokafka consumer
        await transport.publish_batch([*msgs(t1, 3), *msgs(t2, 4)])
        r1 = await fetch_n(c1, 3)
        r2 = await fetch_n(c2, 4)
        assert {r.topic for r in r1} == {t1}
        assert {r.topic for r in r2} == {t2}
        for c, rs in ((c1, r1), (c2, r2)):
            for r in rs:
                c.ack(r)
        await c1.aclose()
        # The group lives on for t2 alone.
        await transport.publish_batch(msgs(t2, 2, start=50))
        more = await fetch_n(c2, 2)
        assert {r.headers["X-Seq"] for r in more} == {"50", "51"}
        await c2.aclose()
        assert transport.groups == {}


async def test_concurrent_subscribes_share_rejoins(kafka_broker: KafkaBroker) -> None:
    """Six topics subscribed at once in one group: a few group joins, not one
    per topic (each costs about a second on Tansu), and every subscription
    is live when its open_consumer returns."""
    topics, group = [_name("t") for _ in range(6)], _name("g")
    consumers: dict[str, Consumer] = {}
    async with kafka(kafka_broker) as transport:

        async def subscribe(topic: str) -> None:
            consumers[topic] = await transport.open_consumer(ConsumerSpec(topic=topic, group=group))

        async with trio.open_nursery() as nursery:
            for topic in topics:
                nursery.start_soon(subscribe, topic)
        generation = transport.groups[group].consumer._coordinator.generation
        assert generation <= 3, generation  # one rejoin per subscribe would be 6
        await transport.publish_batch([m for t in topics for m in msgs(t, 1)])
        for topic, consumer in consumers.items():
            (record,) = await fetch_n(consumer, 1)
            assert record.topic == topic
            consumer.ack(record)
        for consumer in consumers.values():
            await consumer.aclose()
        assert transport.groups == {}


async def test_cancelled_open_consumer_leaves_no_orphan(kafka_broker: KafkaBroker) -> None:
    t1, t2, group = _name("t"), _name("t"), _name("g")
    async with kafka(kafka_broker) as transport:
        with trio.move_on_after(0.3) as scope:  # a join takes about 1 s here
            await transport.open_consumer(ConsumerSpec(topic=t1, group=group))
        assert scope.cancelled_caught
        state = transport.groups.get(group)
        assert state is None or t1 not in state.routes
        # The group still works for another topic.
        consumer = await transport.open_consumer(ConsumerSpec(topic=t2, group=group))
        assert list(transport.groups[group].routes) == [t2]
        await transport.publish_batch(msgs(t2, 2))
        assert len(await fetch_n(consumer, 2)) == 2
        await consumer.aclose()


async def test_aclose_in_cancelled_shielded_scope(kafka_broker: KafkaBroker) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(topic=TopicConfig(partitions=1))
    async with kafka(kafka_broker, options) as transport:
        await transport.publish_batch(msgs(topic, 3))
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        records = await fetch_n(consumer, 3)
        consumer.ack(records[0])
        with trio.CancelScope() as outer:
            outer.cancel()
            with trio.CancelScope(shield=True):
                await consumer.aclose()
        assert transport.groups == {}
        assert await committed(transport, group, topic) == {0: 1}
        with pytest.raises(BusClosedError):
            await consumer.fetch(1)


@pytest.mark.parametrize("compression", ["lz4", "zstd", "snappy", "gzip", "none"])
async def test_compression_codecs(kafka_broker: KafkaBroker, compression: Any) -> None:
    topic, group = _name("t"), _name("g")
    options = KafkaOptions(
        compression=compression,
        topic=TopicConfig(partitions=1),
        # Pass-through arguments reach the right client.
        producer_args={"retry_backoff_ms": 50},
        consumer_args={"check_crcs": True, "max_partition_fetch_bytes": 2 << 20},
    )
    async with kafka(kafka_broker, options) as transport:
        batch = [OutgoingMessage(topic=topic, value=b"x" * 2048 + bytes([i])) for i in range(20)]
        assert list(await transport.publish_batch(batch)) == [None] * 20
        consumer = await transport.open_consumer(
            ConsumerSpec(topic=topic, group=group, start="earliest")
        )
        records = await fetch_n(consumer, 20)
        assert [r.value for r in records] == [m.value for m in batch]
        assert all(r.key is None for r in records)
        await consumer.aclose()


async def test_idempotence_detected(
    kafka_broker: KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # Tansu 0.6 refuses InitProducerId: "auto" falls back and says so.
    with caplog.at_level(logging.WARNING, logger="trio_bus.transports.kafka"):
        async with kafka(kafka_broker) as transport:
            idempotent = transport.idempotent
    if not idempotent:
        assert "does not support the idempotent producer" in caplog.text
        from trio_bus.errors import TransportError

        with pytest.raises(TransportError):
            async with kafka(kafka_broker, KafkaOptions(idempotence=True)):
                pass  # pragma: no cover
    async with kafka(kafka_broker, KafkaOptions(idempotence=False)) as transport:
        assert not transport.idempotent


async def test_topic_created_with_configuration(kafka_broker: KafkaBroker) -> None:
    topic = _name("t")
    options = KafkaOptions(
        topic_strategy="create_only",
        on_mismatch="fail",
        topics={topic: TopicConfig(partitions=3, retention_ms=3_600_000)},
    )
    async with kafka(kafka_broker, options) as transport:
        await transport.publish_batch(msgs(topic, 1))
        assert await transport.topic_metadata(topic) == (3, 1)
    # A later transport with a different partition count: mismatch, and the
    # topic is not changed.
    wrong = KafkaOptions(on_mismatch="fail", topics={topic: TopicConfig(partitions=6)})
    async with kafka(kafka_broker, wrong) as transport:
        with pytest.raises(TopicConfigError, match="3 partitions"):
            await transport.publish_batch(msgs(topic, 1))
        assert await transport.topic_metadata(topic) == (3, 1)
    for strategy in ("create_or_update", "create_only"):
        warn = KafkaOptions(topic_strategy=strategy, topics={topic: TopicConfig(partitions=6)})
        async with kafka(kafka_broker, warn) as transport:
            assert list(await transport.publish_batch(msgs(topic, 1))) == [None]
            assert await transport.topic_metadata(topic) == (3, 1)


async def test_validate_only_missing_topic(kafka_broker: KafkaBroker) -> None:
    options = KafkaOptions(topic_strategy="validate_only", on_mismatch="fail")
    async with kafka(kafka_broker, options) as transport:
        with pytest.raises(TopicConfigError, match="does not exist"):
            await transport.open_consumer(ConsumerSpec(topic=_name("t"), group=_name("g")))


def test_options_validation(kafka_broker: KafkaBroker) -> None:
    with pytest.raises(ConfigError):
        resolve_options(_settings(kafka_broker, options={"linger_ms": 1}))
    with pytest.raises(ConfigError):
        KafkaOptions(compression="brotli")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        KafkaOptions(acks=1, idempotence=True)
    with pytest.raises(ConfigError):
        KafkaOptions(session_timeout_ms=1000, heartbeat_interval_ms=1000)
    with pytest.raises(ConfigError):
        TopicConfig(partitions=0)
    settings = _settings(kafka_broker)
    bad = TransportSettings(
        url=settings.url + "&nope=1",
        hosts=settings.hosts,
        client_id="x",
        options=None,
        max_message_bytes=1,
    )
    with pytest.raises(ConfigError, match="nope"):
        resolve_options(bad)
    opts = resolve_options(settings)
    assert opts.session_timeout_ms == 2000
    assert opts.commit_interval == 0.1
    assert opts.acks == "all"
    assert opts.compression == "lz4"


async def test_connected_follows_the_broker(tansu_binary_path: str, tmp_path: Path) -> None:
    port = free_port()
    with run_tansu(tansu_binary_path, tmp_path / "tansu.log", port) as broker:
        settings = TransportSettings(
            url=f"kafka://127.0.0.1:{port}",
            hosts=(f"127.0.0.1:{port}",),
            client_id="x",
            options=KafkaOptions(close_timeout=2),
            max_message_bytes=1024,
        )
        async with open_transport(settings) as transport:
            assert transport.connected
            os.kill(broker.pid, signal.SIGKILL)
            with trio.fail_after(WAIT):
                while transport.connected:
                    await trio.sleep(0.05)  # it is checked every second


async def test_unreachable_broker_is_transport_error() -> None:
    from trio_bus.errors import TransportUnavailableError

    port = free_port()  # nothing listens there
    settings = TransportSettings(
        url=f"kafka://127.0.0.1:{port}",
        hosts=(f"127.0.0.1:{port}",),
        client_id="x",
        options=None,
        max_message_bytes=1024,
    )
    with trio.fail_after(WAIT), pytest.raises(TransportUnavailableError):
        async with open_transport(settings):
            pass  # pragma: no cover
