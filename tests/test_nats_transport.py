"""The NATS JetStream transport against a real nats-server.

Transport level (publish_batch / fetch / ack / release / aclose, topic
strategies, reconnection) and interop with a raw nats-py client that knows
nothing of trio_bus. The raw client runs its own asyncio loop in a worker
thread, as a separate program would. Every wait is bounded; nothing sleeps
to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import nats
import pytest
import trio

import trio_bus
from trio_bus import Envelope, OutgoingMessage, encode_envelope
from trio_bus._message import Record
from trio_bus._names import stable_hash
from trio_bus.errors import (
    ConfigError,
    PublishError,
    TopicConfigError,
    TransportUnavailableError,
)
from trio_bus.testing import contract_settings
from trio_bus.transports._base import ConsumerSpec, TransportSettings
from trio_bus.transports.nats import (
    ConnectOptions,
    ConsumerOptions,
    GroupOptions,
    NatsConsumer,
    NatsOptions,
    NatsTransport,
    StreamOptions,
    open_transport,
    stream_name,
)

from ._nats_server import NatsServer
from .helpers import Recorder, collect, task_count

T = TypeVar("T")
WAIT = 20.0


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


#: These tests check one durable consumer of an unpartitioned topic (raw
#: subjects, consumer names, ordered resume); partitioned groups are
#: tested in test_nats_groups.py.
UNPARTITIONED = GroupOptions(partitions=1)


def settings(url: str, options: object | None = None) -> TransportSettings:
    if options is None:
        options = NatsOptions(groups=UNPARTITIONED)
    elif isinstance(options, NatsOptions) and options.groups == GroupOptions():
        options = attrs.evolve(options, groups=UNPARTITIONED)
    return contract_settings(url, options=options)


@asynccontextmanager
async def transport(url: str, options: object | None = None) -> AsyncIterator[NatsTransport]:
    async with open_transport(settings(url, options)) as t:
        yield t


async def fetch_n(consumer: NatsConsumer, n: int, timeout: float = WAIT) -> list[Record]:
    out: list[Record] = []
    with trio.fail_after(timeout):
        while len(out) < n:
            out.extend(await consumer.fetch(n - len(out)))
    return out


async def nothing_within(consumer: NatsConsumer, seconds: float) -> bool:
    """True when no delivery arrives within *seconds* (a negative check)."""
    with trio.move_on_after(seconds):
        await consumer.fetch(1)
        return False
    return True


def msgs(topic: str, n: int, key: str | None = "k", start: int = 0) -> list[OutgoingMessage]:
    return [OutgoingMessage(topic=topic, value=b"%d" % i, key=key) for i in range(start, start + n)]


async def run_raw(fn: Callable[[Any], Awaitable[T]], url: str) -> T:
    """Run ``fn(nc)`` with a plain nats-py client on its own asyncio loop in
    a worker thread."""

    async def main() -> T:
        nc = await nats.connect(url)
        try:
            return await fn(nc)
        finally:
            await nc.close()

    return await trio.to_thread.run_sync(asyncio.run, main())


async def consumer_info(url: str, topic: str, durable: str) -> Any:
    async def get(nc: Any) -> Any:
        return await nc.jetstream().consumer_info(stream_name(topic), durable)

    return await run_raw(get, url)


FAST = NatsOptions(
    consumer=ConsumerOptions(ack_wait=2.0, idle_heartbeat=0.25, pull_expires=5.0),
    connect=ConnectOptions(ping_interval=1.0, reconnect_time_wait=0.1),
    publish_timeout=2.0,
)


# --------------------------------------------------------------- basics


async def test_publish_fetch_ack(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        batch = [*msgs(topic, 3), OutgoingMessage(topic=topic, value=b"nokey", message_id="id-1")]
        assert await t.publish_batch(batch) == [None] * 4
        records = await fetch_n(consumer, 4)
        assert [r.value for r in records] == [b"0", b"1", b"2", b"nokey"]
        assert [r.offset for r in records] == [1, 2, 3, 4]
        assert all(r.delivery_count == 1 and r.key is None for r in records)
        assert records[0].headers["X-Aggregate-ID"] == "k"
        assert records[0].subject == topic
        assert records[0].topic == topic
        assert "X-Aggregate-ID" not in records[3].headers
        assert records[3].headers["Nats-Msg-Id"] == "id-1"
        assert len({r.headers["Nats-Msg-Id"] for r in records}) == 4
        for r in records:
            consumer.ack(r)
        await consumer.flush()
        info = await consumer_info(nats_bus_url, topic, "g")
        assert info.num_ack_pending == 0
        assert info.delivered.stream_seq == 4
        await consumer.aclose()


async def test_publish_is_deduplicated_by_message_id(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        once = OutgoingMessage(topic=topic, value=b"x", message_id="same")
        assert await t.publish_batch([once, once]) == [None, None]
        assert await t.publish_batch(msgs(topic, 1)) == [None]
        records = await fetch_n(consumer, 2)
        assert [r.value for r in records] == [b"x", b"0"]


async def test_release_redelivers_before_newer(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g", max_batch=2))
        await t.publish_batch(msgs(topic, 2))
        first = await fetch_n(consumer, 2)
        consumer.release(first[0])
        consumer.ack(first[1])
        await consumer.flush()
        await t.publish_batch(msgs(topic, 1, start=2))
        again = await fetch_n(consumer, 2)
        assert [(r.value, r.delivery_count) for r in again] == [(b"0", 2), (b"2", 1)]


async def test_aclose_naks_unsettled_for_the_next_holder(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 5))
        records = await fetch_n(consumer, 5)
        consumer.ack(records[0])
        consumer.ack(records[2])
        await consumer.aclose()
        with pytest.raises(trio_bus.errors.BusClosedError):
            await consumer.fetch(1)
    async with transport(nats_bus_url) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 1, start=5))
        again = await fetch_n(consumer, 4)
        # The released ones first, in stream order, then the new one.
        assert [r.value for r in again] == [b"1", b"3", b"4", b"5"]
        assert [r.delivery_count for r in again] == [2, 2, 2, 1]


async def test_groups_and_start_positions(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url) as t:
        await t.publish_batch(msgs(topic, 2))
        earliest = await t.open_durable(ConsumerSpec(topic=topic, group="e", start="earliest"))
        latest = await t.open_durable(ConsumerSpec(topic=topic, group="l", start="latest"))
        await t.publish_batch(msgs(topic, 1, start=2))
        assert [r.value for r in await fetch_n(earliest, 3)] == [b"0", b"1", b"2"]
        got = await fetch_n(latest, 1)
        assert [r.value for r in got] == [b"2"]
        for r in got:
            latest.ack(r)
        await latest.aclose()
        # An existing group resumes where it acked, whatever start says.
        await t.publish_batch(msgs(topic, 1, start=3))
        resumed = await t.open_durable(ConsumerSpec(topic=topic, group="l", start="earliest"))
        assert [r.value for r in await fetch_n(resumed, 1)] == [b"3"]


async def test_in_progress_acks_keep_held_messages(nats_bus_url: str) -> None:
    """A delivery held for 3x AckWait is never redelivered: the transport
    sends +WPI while it is unsettled."""
    topic = uid("t")
    options = NatsOptions(consumer=ConsumerOptions(ack_wait=1.0, idle_heartbeat=0.25))
    async with transport(nats_bus_url, options) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 1))
        (held,) = await fetch_n(consumer, 1)
        assert await nothing_within(consumer, 3.0)
        consumer.ack(held)
        await consumer.flush()
        info = await consumer_info(nats_bus_url, topic, "g")
        assert info.num_redelivered == 0
        assert info.num_ack_pending == 0


async def test_without_in_progress_acks_the_server_redelivers(nats_bus_url: str) -> None:
    """The control experiment for the test above: the server redelivers (it
    counts it), but the transport hands over no second copy of a delivery
    it still holds, which would run the message again behind newer ones of
    its aggregate; settling the first delivery settles the sequence (the
    server acks by stream sequence)."""
    topic = uid("t")
    options = NatsOptions(
        consumer=ConsumerOptions(ack_wait=1.0, idle_heartbeat=0.25, in_progress_interval=60)
    )
    async with transport(nats_bus_url, options) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 1))
        (held,) = await fetch_n(consumer, 1)
        with trio.fail_after(WAIT):
            while (await consumer_info(nats_bus_url, topic, "g")).num_redelivered < 1:
                await trio.sleep(0.1)  # polling the server's state
        # The copy was sent before this one, on the same connection.
        await t.publish_batch(msgs(topic, 1, start=1))
        (newer,) = await fetch_n(consumer, 1)
        assert newer.value == b"1"
        consumer.ack(held)
        consumer.ack(newer)
        await consumer.flush()
        info = await consumer_info(nats_bus_url, topic, "g")
        assert info.num_ack_pending == 0


async def test_backpressure_bounds_prefetch(nats_bus_url: str) -> None:
    topic = uid("t")
    options = NatsOptions(consumer=ConsumerOptions(prefetch=10))
    async with transport(nats_bus_url, options) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 100))
        first = await fetch_n(consumer, 1)
        info = await consumer_info(nats_bus_url, topic, "g")
        # Not fetched by us, so at most one prefetch window was delivered.
        assert info.num_ack_pending <= 10 + 1
        rest = await fetch_n(consumer, 99)
        assert [int(r.value) for r in first + rest] == list(range(100))


# ------------------------------------------------------ topics and streams


async def test_stream_layout_and_options(nats_bus_url: str) -> None:
    topic = f"{uid('orders')}.eu"
    options = NatsOptions(
        stream=StreamOptions(storage="memory", max_age=3600, max_msgs=1000, duplicate_window=30)
    )
    async with transport(nats_bus_url, options) as t:
        await t.open_durable(ConsumerSpec(topic=topic, group="g"))

    async def info(nc: Any) -> Any:
        return await nc.jetstream().stream_info(stream_name(topic))

    config = (await run_raw(info, nats_bus_url)).config
    assert config.name == topic.replace(".", "_")
    assert sorted(config.subjects) == sorted([topic, f"{topic}.>"])
    assert getattr(config.storage, "value", config.storage) == "memory"
    assert config.max_age == 3600
    assert config.max_msgs == 1000
    assert config.duplicate_window == 30


async def test_validate_only_refuses_a_missing_stream(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url, NatsOptions(topic_strategy="validate_only")) as t:
        with pytest.raises(TopicConfigError, match="does not exist"):
            await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        first, second = await t.publish_batch(msgs(topic, 2))
        assert isinstance(first, PublishError)
        assert isinstance(first.__cause__, TopicConfigError)
        assert first is not second


async def test_mismatch_warn_fail_and_update(
    nats_bus_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = uid("t")
    async with transport(nats_bus_url, NatsOptions(stream=StreamOptions(max_age=60))) as t:
        await t.open_durable(ConsumerSpec(topic=topic, group="g"))
    wanted = NatsOptions(stream=StreamOptions(max_age=120), on_mismatch="fail")
    async with transport(nats_bus_url, wanted) as t:
        with pytest.raises(TopicConfigError, match="max_age"):
            await t.open_durable(ConsumerSpec(topic=topic, group="g"))
    with caplog.at_level(logging.WARNING, logger="trio_bus.nats"):
        async with transport(nats_bus_url, attrs_evolve(wanted, on_mismatch="warn")) as t:
            await t.open_durable(ConsumerSpec(topic=topic, group="g"))
    assert any("max_age" in r.getMessage() for r in caplog.records)
    update = attrs_evolve(wanted, topic_strategy="create_or_update")
    async with transport(nats_bus_url, update) as t:
        await t.open_durable(ConsumerSpec(topic=topic, group="g"))

    async def info(nc: Any) -> Any:
        return await nc.jetstream().stream_info(stream_name(topic))

    assert (await run_raw(info, nats_bus_url)).config.max_age == 120
    # The comparison is against the server, not a cache: now it matches.
    async with transport(nats_bus_url, wanted) as t:
        await t.open_durable(ConsumerSpec(topic=topic, group="g"))


def attrs_evolve(options: NatsOptions, **changes: Any) -> NatsOptions:
    import attrs

    return attrs.evolve(options, **changes)


async def test_skip_strategy_touches_nothing(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url, NatsOptions(topic_strategy="skip", publish_timeout=1)) as t:
        (outcome,) = await t.publish_batch(msgs(topic, 1))
        assert isinstance(outcome, PublishError)
        assert "stream" in str(outcome)
        with pytest.raises(TopicConfigError):
            await t.open_durable(ConsumerSpec(topic=topic, group="g"))


async def test_stream_name_collision_is_an_error(nats_bus_url: str) -> None:
    base = uid("c")
    async with transport(nats_bus_url) as t:
        await t.open_durable(ConsumerSpec(topic=f"{base}.x", group="g"))
        with pytest.raises(TopicConfigError, match="does not store topic"):
            await t.open_durable(ConsumerSpec(topic=f"{base}_x", group="g"))


async def test_nested_topic_lives_in_the_outer_stream_apart(nats_bus_url: str) -> None:
    """``t.dlq`` inside stream ``t`` (the default dead-letter name): its
    messages reach only its own consumers."""
    topic = uid("t")
    async with transport(nats_bus_url) as t:
        outer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        inner = await t.open_durable(ConsumerSpec(topic=f"{topic}.dlq", group="g"))
        assert inner.stream == outer.stream == stream_name(topic)
        assert await t.publish_batch(msgs(f"{topic}.dlq", 2)) == [None, None]
        assert await t.publish_batch(msgs(topic, 1)) == [None]
        assert [r.value for r in await fetch_n(inner, 2)] == [b"0", b"1"]
        got = await fetch_n(outer, 1)
        assert [(r.value, r.subject) for r in got] == [(b"0", topic)]
        assert await nothing_within(outer, 0.3)


async def test_outer_topic_after_nested_is_a_clear_error(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url) as t:
        await t.open_durable(ConsumerSpec(topic=f"{topic}.dlq", group="g"))
        with pytest.raises(TopicConfigError, match="overlap"):
            await t.open_durable(ConsumerSpec(topic=topic, group="g"))


# ------------------------------------------------------------------ errors


async def test_bad_options_and_unreachable_server() -> None:
    with pytest.raises(ConfigError):
        async with open_transport(settings("nats://127.0.0.1:1", options="fast")):
            pass
    with pytest.raises(ConfigError):
        ConsumerOptions(ack_wait=0)
    with pytest.raises(ConfigError):
        StreamOptions(storage="disk")  # type: ignore[arg-type]
    options = NatsOptions(connect=ConnectOptions(connect_timeout=0.5))
    with trio.fail_after(WAIT), pytest.raises(TransportUnavailableError):
        async with open_transport(settings("nats://127.0.0.1:1", options)):
            pass


# --------------------------------------------------------------- reconnect


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_pulling_resumes_after_server_restart(
    private_nats_server: NatsServer, sig: int
) -> None:
    server = private_nats_server
    topic = uid("t")
    async with transport(server.url, FAST) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 3))
        before = await fetch_n(consumer, 3)
        for r in before:
            consumer.ack(r)
        await consumer.flush()
        server.stop(sig)
        # During the outage a publish fails in bounded time, never "ok".
        with trio.fail_after(FAST.publish_timeout + 3):
            outcomes = await t.publish_batch(msgs(topic, 1, start=100))
        assert isinstance(outcomes[0], PublishError)
        await trio.to_thread.run_sync(server.start)
        # After the restart: publishes succeed and the silent pull is noticed.
        with trio.fail_after(WAIT):
            while True:
                outcomes = await t.publish_batch(msgs(topic, 1, start=3))
                if outcomes == [None]:
                    break
        seen: list[bytes] = []
        with trio.fail_after(WAIT):
            while b"3" not in seen:
                seen.extend(r.value for r in await consumer.fetch(10))
        # The outage publish may have been stored after all (outcome
        # unknown). After a clean stop the server kept our acks; after
        # SIGKILL it may lose the newest ack state and redeliver (at least
        # once), never lose a stored message.
        if sig == signal.SIGTERM:
            assert not {b"0", b"1", b"2"} & set(seen)


# ----------------------------------------------------------------- interop


async def test_raw_client_publishes_trio_bus_consumes_in_order(nats_bus_url: str) -> None:
    topic = uid("orders")
    got: Recorder[trio_bus.Message] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        got.add(message)

    async with trio_bus.open_bus(nats_bus_url, client_id="interop") as bus:
        await bus.subscribe(topic, handler)

        async def publish(nc: Any) -> None:
            js = nc.jetstream()
            for i in range(20):
                await js.publish(topic, b"h%d" % i, headers={"X-Aggregate-ID": f"a{i % 3}"})
                await js.publish(f"{topic}.order-{i % 2}", b"s%d" % i)

        await run_raw(publish, nats_bus_url)
        await got.wait_for_count(40)
    per_aggregate: dict[str, list[bytes]] = {}
    for m in got.items:
        assert m.aggregate_id is not None
        per_aggregate.setdefault(m.aggregate_id, []).append(m.value)
    assert per_aggregate["a0"] == [b"h%d" % i for i in range(0, 20, 3)]
    assert per_aggregate["order-1"] == [b"s%d" % i for i in range(1, 20, 2)]
    assert {m.subject for m in got.items if m.aggregate_id == "order-0"} == {f"{topic}.order-0"}


async def test_a_subject_under_a_topic_is_a_topic_of_its_own(nats_bus_url: str) -> None:
    """``publish("orders.order-7")`` goes to topic ``orders.order-7`` (as on
    Kafka); ``orders`` subscribers see only what is published to ``orders``
    (docs/nats.md, "Publishing to a subject under a topic")."""
    topic = uid("orders")
    outer: Recorder[trio_bus.Message] = Recorder()
    inner: Recorder[trio_bus.Message] = Recorder()

    async with trio_bus.open_bus(nats_bus_url, client_id="subjects") as bus:
        await bus.subscribe(topic, collect(outer))
        await bus.subscribe(f"{topic}.order-7", collect(inner))
        await bus.publish(f"{topic}.order-7", b"nested")
        await bus.publish(topic, b"sentinel", key="order-7")
        await inner.wait_for_count(1)
        await outer.wait_for_count(1)  # stored after "nested" in the same stream
    assert [m.value for m in inner.items] == [b"nested"]
    assert [m.value for m in outer.items] == [b"sentinel"]
    assert outer.items[0].aggregate_id == "order-7"


async def test_trio_bus_envelope_read_by_raw_client(nats_bus_url: str) -> None:
    topic = uid("orders")
    envelope = Envelope.new(
        aggregate_id="order-42",
        event_type="OrderPlaced",
        payload={"total": 5},
        trace_id="trace-1",
    )
    async with trio_bus.open_bus(nats_bus_url) as bus:
        await bus.publish_envelope(topic, envelope)

    async def read(nc: Any) -> tuple[str, bytes, dict[str, str]]:
        # The topic is partitioned (the default): a raw reader of a keyed
        # message filters <topic>.> (docs/scaling.md).
        sub = await nc.jetstream().pull_subscribe(f"{topic}.>", stream=stream_name(topic))
        (msg,) = await sub.fetch(1, timeout=5)
        await msg.ack()
        return msg.subject, msg.data, dict(msg.headers)

    subject, data, headers = await run_raw(read, nats_bus_url)
    assert subject == f"{topic}.~.{stable_hash('order-42') % 8}"
    assert data == encode_envelope(envelope)
    body = json.loads(data)
    assert body["event_id"] == envelope.event_id
    assert body["aggregate_id"] == "order-42"
    assert body["event_type"] == "OrderPlaced"
    assert body["event_version"] == 1
    assert body["trace_id"] == "trace-1"
    assert body["payload"] == {"total": 5}
    assert "timestamp" in body
    assert headers["X-Event-ID"] == envelope.event_id
    assert headers["Nats-Msg-Id"] == envelope.event_id
    assert headers["X-Aggregate-ID"] == "order-42"
    assert headers["X-Event-Type"] == "OrderPlaced"
    assert headers["X-Event-Version"] == "1"
    assert headers["X-Trace-ID"] == "trace-1"


# ----------------------------------------------- order after an unclean stop


async def test_ordered_resume_after_a_holder_died(nats_bus_url: str) -> None:
    """A previous holder (a raw client) took messages and died without
    acking or naking. The new consumer hands the old ones back first, in
    stream order, before anything newer."""
    topic = uid("t")
    options = NatsOptions(consumer=ConsumerOptions(ack_wait=1.0, idle_heartbeat=0.25))
    async with transport(nats_bus_url, options) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 4))
        await consumer.aclose()

    async def take_and_die(nc: Any) -> list[bytes]:
        sub = await nc.jetstream().pull_subscribe_bind("g", stream=stream_name(topic))
        taken = await sub.fetch(4, timeout=5)
        return [m.data for m in taken]  # no ack, no nak: the process "dies"

    # (The server may hand them out in another order: it re-queues a nak'd
    # message behind the others when the closed consumer's pull request is
    # still registered. The ordered resume below sorts that out.)
    assert sorted(await run_raw(take_and_die, nats_bus_url)) == [b"0", b"1", b"2", b"3"]
    async with transport(nats_bus_url, options) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 2, start=4))
        records = await fetch_n(consumer, 6, timeout=10)
        assert [r.value for r in records] == [b"%d" % i for i in range(6)]
        # 1: our first consumer prefetched them; 2: the raw client; 3: now.
        assert [r.delivery_count for r in records] == [3, 3, 3, 3, 1, 1]


def _values(records: Sequence[Record]) -> list[bytes]:
    return [r.value for r in records]


# ------------------------------------------------------ health and metrics


async def test_lanes_connected_timestamp_and_ephemeral(nats_bus_url: str) -> None:
    topic = uid("t")
    async with transport(nats_bus_url) as t:
        assert t.connected
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        probe = await t.open_durable(ConsumerSpec(topic=topic, group="probe", ephemeral=True))
        before = time.time()
        await t.publish_batch(msgs(topic, 3))
        records = await fetch_n(consumer, 3)
        assert records[0].timestamp is not None
        assert before - 1 <= records[0].timestamp <= time.time() + 1
        consumer.ack(records[0])
        await consumer.flush()
        (lane,) = await consumer.lanes()
        assert lane.topic == topic
        assert lane.partition is None
        assert lane.committed == 1
        assert lane.ack_pending == 2
        assert lane.lag == 2
        assert lane.in_flight == 2
        assert len(await fetch_n(probe, 3)) == 3
        name = probe.durable
        assert name != "probe"
        await probe.aclose()

    async def names(nc: Any) -> list[str]:
        infos = await nc.jetstream().consumers_info(stream_name(topic))
        return sorted(i.name for i in infos)

    # The ephemeral consumer is gone; the durable group stays.
    assert await run_raw(names, nats_bus_url) == ["g"]


async def test_memory_stream_lost_in_a_restart_is_recreated(
    private_nats_server: NatsServer,
) -> None:
    server = private_nats_server
    topic = uid("t")
    options = attrs_evolve(FAST, stream=StreamOptions(storage="memory"))
    async with transport(server.url, options) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        await t.publish_batch(msgs(topic, 1))
        consumer.ack((await fetch_n(consumer, 1))[0])
        await trio.to_thread.run_sync(server.restart)
        # The stream (and consumer) died with the server: both come back.
        with trio.fail_after(WAIT):
            while await t.publish_batch(msgs(topic, 1, start=1)) != [None]:
                pass
        assert [r.value for r in await fetch_n(consumer, 1)] == [b"1"]


# ------------------------------------------------------------- pure logic


def test_ack_subject_parsing_and_names() -> None:
    from trio_bus.transports.nats.options import duplicate_window, durable_name
    from trio_bus.transports.nats.settle import parse_reply

    v1 = "$JS.ACK.orders.g.3.42.40.1700000000123456789.7"
    count, seq, dseq, stamp = parse_reply(v1)
    assert (count, seq, dseq) == (3, 42, 40)
    assert stamp == pytest.approx(1700000000.123456789)
    v2 = "$JS.ACK.hub.ACCHASH.orders.g.1.5.5.1700000000000000000.0.tok"
    assert parse_reply(v2)[:3] == (1, 5, 5)
    assert stream_name("orders.eu.west", "APP_") == "APP_orders_eu_west"
    assert durable_name("billing.v2", "orders", nested=False) == "billing_v2"
    assert durable_name("g", "orders.dlq", nested=True) == "g__orders_dlq"
    assert duplicate_window(StreamOptions(max_age=30)) == 30
    assert duplicate_window(StreamOptions()) == 120
    with pytest.raises(ConfigError):
        ConsumerOptions(idle_heartbeat=20, pull_expires=30)
    with pytest.raises(ConfigError):
        NatsOptions(stream_prefix="a.b")
    with pytest.raises(ConfigError):
        NatsOptions(topics={"t": "memory"})  # type: ignore[dict-item]


async def test_closing_while_the_server_is_down_is_bounded(
    private_nats_server: NatsServer,
) -> None:
    server = private_nats_server
    topic = uid("t")
    baseline = task_count()
    with trio.fail_after(10):
        async with transport(server.url, FAST) as t:
            consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
            await t.publish_batch(msgs(topic, 2))
            held = await fetch_n(consumer, 2)
            consumer.ack(held[0])
            server.stop(signal.SIGKILL)
            start = trio.current_time()
    # Shielded cleanup with a bound: consumer close + connection close.
    assert trio.current_time() - start < 6
    assert task_count() == baseline


async def test_several_servers_in_the_url(nats_bus_url: str) -> None:
    """A dead server in the list does not stop the bus from connecting."""
    live = nats_bus_url.split("://", 1)[1]
    topic = uid("t")
    with trio.fail_after(WAIT):
        async with transport(f"nats://127.0.0.1:1,{live}") as t:
            assert await t.publish_batch(msgs(topic, 1)) == [None]


async def test_a_connection_closed_for_good_ends_the_transport(nats_bus_url: str) -> None:
    """nats-py closing the connection by itself (a fatal error) ends the
    transport's block with a typed error; a waiting fetch is cancelled."""
    topic = uid("t")
    with trio.fail_after(WAIT), pytest.raises(TransportUnavailableError, match="closed"):
        async with transport(nats_bus_url) as t:
            consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
            # What nats-py does on a fatal error: close the connection itself.
            await t.run_on_loop(t.client.close)
            await consumer.fetch(1)
            pytest.fail("fetch returned")


async def test_publish_waits_out_a_short_outage(private_nats_server: NatsServer) -> None:
    """Within publish_timeout a publish waits for the reconnection and is
    then acked by the server (never reported stored without that ack)."""
    server = private_nats_server
    topic = uid("t")
    options = attrs_evolve(FAST, publish_timeout=10.0)
    async with transport(server.url, options) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        assert await t.publish_batch(msgs(topic, 1)) == [None]
        server.stop()
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                outcome: list[Sequence[Exception | None]] = []

                async def publish() -> None:
                    outcome.append(await t.publish_batch(msgs(topic, 1, start=1)))

                nursery.start_soon(publish)
                await trio.to_thread.run_sync(server.start)
        assert outcome == [[None]]
        values = [r.value for r in await fetch_n(consumer, 2)]
        assert values == [b"0", b"1"]


def test_header_parser_matches_nats_py() -> None:
    from nats.aio.client import Client

    from trio_bus.transports.nats.connection import Client as _Client

    samples = [
        b"X-Aggregate-ID: order-1\r\nNats-Msg-Id: abc\r\n\r\n",
        b"A:b\r\nC:\tspaced value \r\nbad name: x\r\n: empty\r\nno-colon\r\n",
        b"K: \xc3\xa9t\xc3\xa9 \xff\r\nTab\tName: v\r\nX-\x0bY: z\r\n\xff: bin\r\n",
        b"",
    ]
    for raw in samples:
        assert _Client._parse_header_lines(raw) == Client._parse_header_lines(raw)


async def test_cancelled_open_consumer_leaves_nothing_behind(nats_bus_url: str) -> None:
    baseline = task_count()
    async with transport(nats_bus_url) as t:
        for delay in (0, 0.001, 0.003, 0.01, 0.03):
            opened: list[NatsConsumer] = []
            with trio.move_on_after(delay):
                opened.append(await t.open_durable(ConsumerSpec(topic=uid("t"), group="g")))
            # Either it returned a consumer (the caller owns it) or it left
            # nothing behind.
            for consumer in opened:
                await consumer.aclose()
            assert t._conn.on_reconnect == [t._publisher.resend_unacked]
            assert not t._consumers
    assert task_count() == baseline
