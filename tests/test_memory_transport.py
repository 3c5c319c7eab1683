"""The memory transport's broker semantics, at the transport interface."""

from __future__ import annotations

import uuid

import attrs
import pytest
import trio

from trio_bus._message import OutgoingMessage, Record
from trio_bus.errors import BusClosedError, ConfigError
from trio_bus.transports._base import Consumer, ConsumerSpec, TransportSettings
from trio_bus.transports.memory import (
    MemoryBroker,
    MemoryRetention,
    MemoryTransport,
    get_broker,
    open_transport,
)


def _transport() -> MemoryTransport:
    return MemoryTransport(get_broker(f"unit-{uuid.uuid4().hex}"))


def _msgs(topic: str, *values: bytes) -> list[OutgoingMessage]:
    return [OutgoingMessage(topic=topic, value=v, key="k") for v in values]


async def test_new_group_starts_latest_or_earliest() -> None:
    t = _transport()
    await t.publish_batch(_msgs("a", b"old"))
    latest = await t.open_consumer(ConsumerSpec(topic="a", group="g1"))
    earliest = await t.open_consumer(ConsumerSpec(topic="a", group="g2", start="earliest"))
    await t.publish_batch(_msgs("a", b"new"))
    assert [r.value for r in await latest.fetch(10)] == [b"new"]
    assert [r.value for r in await earliest.fetch(10)] == [b"old", b"new"]


async def test_existing_group_resumes_after_last_ack_and_redelivers_unacked() -> None:
    t = _transport()
    first = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    await t.publish_batch(_msgs("a", b"0", b"1", b"2"))
    r0, _, r2 = await first.fetch(10)
    first.ack(r0)
    first.ack(r2)
    await first.aclose()
    with pytest.raises(BusClosedError):
        await first.fetch(10)
    second = await t.open_consumer(ConsumerSpec(topic="a", group="g", start="earliest"))
    (again,) = await second.fetch(10)
    assert (again.value, again.offset, again.delivery_count) == (b"1", 1, 2)


async def test_release_redelivers_before_newer_messages() -> None:
    t = _transport()
    c = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    await t.publish_batch(_msgs("a", b"0", b"1"))
    r0, r1 = await c.fetch(10)
    c.ack(r0)
    c.release(r1)
    c.release(r1)  # settling twice is harmless
    await t.publish_batch(_msgs("a", b"2"))
    assert [r.value for r in await c.fetch(10)] == [b"1", b"2"]


async def test_group_members_share_and_groups_fan_out() -> None:
    t = _transport()
    m1 = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    m2 = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    other = await t.open_consumer(ConsumerSpec(topic="a", group="h"))
    await t.publish_batch(_msgs("a", b"0", b"1", b"2"))
    got1 = await m1.fetch(2)
    got2 = await m2.fetch(10)
    assert [r.value for r in [*got1, *got2]] == [b"0", b"1", b"2"]
    assert len(await other.fetch(10)) == 3
    # Closing a member releases only what it holds.
    await m1.aclose()
    assert [r.value for r in await m2.fetch(10)] == [b"0", b"1"]


async def test_fetch_waits_for_publish() -> None:
    t = _transport()
    c = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def fetch() -> None:
            got.extend(r.value for r in await c.fetch(10))

        nursery.start_soon(fetch)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await t.publish_batch(_msgs("a", b"x"))
    assert got == [b"x"]


async def test_trim_drops_only_what_every_group_acked() -> None:
    t = _transport()
    g = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    h = await t.open_consumer(ConsumerSpec(topic="a", group="h"))
    await t.publish_batch(_msgs("a", b"0", b"1", b"2"))
    for r in await g.fetch(10):
        g.ack(r)
    r0, *_ = await h.fetch(10)
    h.ack(r0)
    assert t.broker.pending("a", "h") == 2
    assert t.broker.trim("a") == 1
    assert [v for _, v, _ in t.broker.messages("a")] == [b"1", b"2"]
    assert t.broker.end_offset("a") == 3


async def test_named_urls_are_separate_brokers() -> None:
    def settings(url: str, hosts: tuple[str, ...]) -> TransportSettings:
        return TransportSettings(
            url=url, hosts=hosts, client_id="c", options=None, max_message_bytes=10
        )

    async with (
        open_transport(settings("memory://", ())) as default,
        open_transport(settings("memory://x", ("x",))) as named,
    ):
        assert default.broker is get_broker("")
        assert named.broker is get_broker("x")


async def _drain_and_ack(consumer: Consumer, count: int) -> list[Record]:
    got: list[Record] = []
    while len(got) < count:
        batch = await consumer.fetch(count - len(got))
        for record in batch:
            consumer.ack(record)
        got.extend(batch)
    return got


async def test_acked_entries_are_dropped_automatically() -> None:
    t = _transport()
    g = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    h = await t.open_consumer(ConsumerSpec(topic="a", group="h"))
    for round_ in range(20):
        await t.publish_batch(_msgs("a", *[b"%d" % (round_ * 100 + i) for i in range(100)]))
        await _drain_and_ack(g, 100)
        await _drain_and_ack(h, 100)
    entries, size = t.broker.retained("a")
    # Bounded by the trim period, not by the 2000 messages published.
    assert entries <= 2 * 64
    assert size <= entries * len(b"k1999")
    assert t.broker.end_offset("a") == 2000


async def test_an_unacking_group_keeps_the_log() -> None:
    t = _transport()
    g = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    slow = await t.open_consumer(ConsumerSpec(topic="a", group="slow"))
    await t.publish_batch(_msgs("a", *[b"x"] * 300))
    await _drain_and_ack(g, 300)
    assert t.broker.retained("a")[0] == 300
    assert len(await slow.fetch(500)) == 300


async def test_a_log_without_groups_is_kept_for_a_later_earliest_group() -> None:
    t = _transport()
    await t.publish_batch(_msgs("a", *[b"x"] * 200))
    assert t.broker.trim("a") == 0
    late = await t.open_consumer(ConsumerSpec(topic="a", group="late", start="earliest"))
    assert len(await late.fetch(500)) == 200


@pytest.mark.parametrize(
    ("retention", "kept"),
    [
        (MemoryRetention(max_messages=10), [b"%02d" % i for i in range(20, 30)]),
        # Each entry is 1 (key) + 2 (value) bytes.
        (MemoryRetention(max_bytes=3 * 4), [b"%02d" % i for i in range(26, 30)]),
    ],
)
async def test_retention_limits_drop_oldest_even_unacked(
    retention: MemoryRetention, kept: list[bytes]
) -> None:
    t = MemoryTransport(MemoryBroker("r", retention=retention))
    c = await t.open_consumer(ConsumerSpec(topic="a", group="g"))
    await t.publish_batch(_msgs("a", b"00"))
    first = await c.fetch(1)  # held, then dropped by retention: releasing it is harmless
    await t.publish_batch(_msgs("a", *[b"%02d" % i for i in range(1, 30)]))
    c.release(first[0])
    assert [v for _, v, _ in t.broker.messages("a")] == kept
    assert [r.value for r in await c.fetch(100)] == kept
    assert t.broker.pending("a", "g") == len(kept)


async def test_retention_by_age(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("trio_bus.transports.memory.time.time", lambda: clock[0])
    t = MemoryTransport(MemoryBroker("age", retention=MemoryRetention(max_age=5)))
    await t.publish_batch(_msgs("a", b"old"))
    clock[0] += 10
    await t.publish_batch(_msgs("a", b"new"))
    assert [v for _, v, _ in t.broker.messages("a")] == [b"new"]
    clock[0] += 10
    assert t.broker.trim("a") == 1
    assert t.broker.messages("a") == []


async def test_retention_from_transport_options() -> None:
    options = MemoryRetention(max_messages=1)
    settings = TransportSettings(
        url="memory://opt",
        hosts=(f"opt-{uuid.uuid4().hex}",),
        client_id="c",
        options=options,
        max_message_bytes=10,
    )
    async with open_transport(settings) as transport:
        assert transport.broker.retention is options
    with pytest.raises(ConfigError):
        async with open_transport(attrs.evolve(settings, options=object())):
            pass  # pragma: no cover
    with pytest.raises(ConfigError):
        MemoryRetention(max_messages=0)
