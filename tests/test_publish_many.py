"""``publish_many`` with several chunks in flight: the split into streams,
outcomes reported in order while acks come back out of order (a fake
transport), and order per aggregate read back on every transport."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence

import pytest
import trio
import trio.testing

import trio_bus
from trio_bus import OutgoingMessage
from trio_bus._publisher import (
    MAX_CHUNKS_IN_FLIGHT,
    PUBLISH_BATCH,
    Publisher,
    split_streams,
)
from trio_bus._stats import TopicStats
from trio_bus.errors import PublishError, TransportUnavailableError
from trio_bus.transports._base import Consumer, ConsumerSpec, Transport

from .helpers import Recorder, collect


def records(n: int, keys: int, topic: str = "t", size: int = 0) -> list[OutgoingMessage]:
    """*n* records over *keys* aggregates; values ``b"<i> "`` padded to *size*."""
    return [
        OutgoingMessage(topic=topic, value=(b"%d " % i).ljust(size, b"."), key=f"k{i % keys}")
        for i in range(n)
    ]


# ------------------------------------------------------------ split_streams


def test_split_keeps_each_aggregate_in_one_stream_in_order() -> None:
    recs = records(3000, 100) + [OutgoingMessage(topic="u", value=b"x") for _ in range(7)]
    streams = split_streams(recs, range(len(recs)), 4)
    assert len(streams) == MAX_CHUNKS_IN_FLIGHT
    assert sorted(i for s in streams for i in s) == list(range(len(recs)))
    owner: dict[tuple[str, str | None], int] = {}
    for n, stream in enumerate(streams):
        assert stream == sorted(stream)
        for i in stream:
            lane = (recs[i].topic, recs[i].key)
            assert owner.setdefault(lane, n) == n


def test_split_balances_and_is_bounded() -> None:
    recs = records(3000, 100)
    assert [len(s) for s in split_streams(recs, range(3000), 3)] == [750] * 4
    assert len(split_streams(recs, range(3000), 99)) == MAX_CHUNKS_IN_FLIGHT
    assert split_streams(recs, range(10), 1) == [list(range(10))]
    # One dominant aggregate cannot be split: it keeps a stream of its own.
    skewed = records(10, 10) + records(2000, 1)
    sizes = sorted(len(s) for s in split_streams(skewed, range(len(skewed)), 3))
    assert sizes[-1] == 2001


# ------------------------------------------------------- a fake transport


class GatedTransport(Transport):
    """Holds every ``publish_batch`` until the test opens its gate; fails
    records whose value is ``b"bad"``; can raise as if unusable."""

    name = "gated"

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.calls: list[list[bytes]] = []
        self.gates: list[trio.Event] = []
        self.raise_on: bytes | None = None

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        self.calls.append([r.value for r in records])
        gate = trio.Event()
        self.gates.append(gate)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await gate.wait()
        finally:
            self.in_flight -= 1
        if self.raise_on is not None and any(r.value == self.raise_on for r in records):
            raise TransportUnavailableError("gone")
        return [PublishError(f"refused {r.key}") if r.value == b"bad" else None for r in records]

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        raise NotImplementedError


def publisher_on(transport: Transport) -> Publisher:
    return Publisher(
        transport, max_message_bytes=1 << 20, tracer=None, topic_stats=lambda _: TopicStats()
    )


async def open_gates_last_first(transport: GatedTransport, calls: int) -> None:
    """Answer the chunks in reverse order of sending, as late acks would."""
    answered = 0
    while answered < calls:
        await trio.testing.wait_all_tasks_blocked()
        waiting = [g for g in transport.gates if not g.is_set()]
        for gate in reversed(waiting):
            gate.set()
            answered += 1


async def test_chunks_are_in_flight_together_and_outcomes_stay_in_order() -> None:
    transport = GatedTransport()
    publisher = publisher_on(transport)
    n = 6 * PUBLISH_BATCH  # 4 streams of 1,500: two chunks each
    recs = records(n, 100)
    bad = {10, 2500, n - 1}
    recs = [
        OutgoingMessage(topic=r.topic, value=b"bad", key=r.key) if i in bad else r
        for i, r in enumerate(recs)
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gates_last_first, transport, 8)
        with pytest.raises(PublishError) as caught:
            await publisher.send_many(recs)
    assert transport.most_in_flight == MAX_CHUNKS_IN_FLIGHT
    assert len(transport.calls) == 8
    assert max(len(c) for c in transport.calls) <= PUBLISH_BATCH
    # The first failure in publish order, whatever chunk was answered first.
    error = caught.value
    assert str(error) == f"refused {recs[10].key}"
    assert error.__notes__ == [f"2 more of {n} messages failed too"]
    assert publisher.published == n - 3
    assert publisher.backlog == 0


async def test_results_report_every_message(memory_bus_url: str) -> None:
    msgs = [
        OutgoingMessage(topic="t", value=b"x", key=f"k{i % 37}", message_id=str(i))
        for i in range(5 * PUBLISH_BATCH)
    ]
    async with trio_bus.open_bus(memory_bus_url, monitoring=None) as bus:
        results = bus.open_publish_results(buffer=len(msgs))
        await bus.publish_many(msgs)
        got = [results.receive_nowait() for _ in msgs]
        with pytest.raises(trio.WouldBlock):
            results.receive_nowait()
    assert all(r.status == "success" for r in got)
    assert sorted(int(r.event_id or "") for r in got) == list(range(len(msgs)))
    # Streams report side by side; one aggregate's results in its order.
    per_key: dict[str | None, list[int]] = defaultdict(list)
    for r in got:
        per_key[r.aggregate_id].append(int(r.event_id or ""))
    assert all(ids == sorted(ids) for ids in per_key.values())


async def test_transport_failure_raises_itself_and_stops_the_rest() -> None:
    transport = GatedTransport()
    transport.raise_on = b"7 "
    publisher = publisher_on(transport)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gates_last_first, transport, 4)
        with pytest.raises(TransportUnavailableError, match="gone"):
            await publisher.send_many(records(4 * PUBLISH_BATCH, 40))
    assert publisher.backlog == 0
    assert len(transport.calls) == 4  # no second chunk after the failure


async def test_invalid_item_sends_nothing() -> None:
    transport = GatedTransport()
    publisher = publisher_on(transport)
    with pytest.raises(trio_bus.errors.InvalidAggregateIDError):
        publisher.records([*records(3000, 10), OutgoingMessage(topic="t", value=b"", key="")])
    assert transport.calls == []


def test_checked_messages_are_reused_only_when_nothing_of_them_can_change() -> None:
    """A message without headers is sent as it is (nothing of it is
    mutable); one with headers, or one that checking changes, is rebuilt,
    so changing the caller's headers afterwards changes nothing sent."""
    publisher = publisher_on(GatedTransport())
    plain = OutgoingMessage(topic="t", value=b"x", key="k1")
    headers = {"h": "1"}
    with_headers = OutgoingMessage(topic="t", value=b"x", key="k1", headers=headers)
    padded = OutgoingMessage(topic="t", value=b"x", key=" k1 ")
    buffer = OutgoingMessage(topic="t", value=bytearray(b"x"), key="k1")  # type: ignore[arg-type]
    checked = publisher.records([plain, with_headers, padded, buffer])
    assert checked[0] is plain
    assert all(a is not b for a, b in zip(checked[1:], [with_headers, padded, buffer], strict=True))
    headers["h"] = "2\r\nInjected: yes"
    assert dict(checked[1].headers) == {"h": "1"}
    assert (checked[2].key, checked[3].value) == ("k1", b"x")
    assert type(checked[3].value) is bytes
    with pytest.raises(TypeError):
        plain.headers["h"] = "1"  # type: ignore[index]


async def test_batch_statistics_count_each_message() -> None:
    """Publish statistics are kept per batch; they still count every
    message, its latency and its failure."""
    transport = GatedTransport()
    stats: dict[str, TopicStats] = defaultdict(TopicStats)
    publisher = Publisher(
        transport, max_message_bytes=1 << 20, tracer=None, topic_stats=stats.__getitem__
    )
    batch = [*records(3, 3, topic="a"), *records(2, 2, topic="b")]
    batch[4] = OutgoingMessage(topic="b", value=b"bad", key="k1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gates_last_first, transport, 2)
        await publisher.send(records(4, 2, topic="a"))
        await publisher.send(batch)
    assert (stats["a"].published, stats["a"].publish_failed) == (7, 0)
    assert (stats["b"].published, stats["b"].publish_failed) == (1, 1)
    assert stats["a"].publish_latency.count == 7
    assert stats["b"].publish_latency.count == 1
    assert publisher.published == 8


# ------------------------------------------------- order on every transport


async def test_order_per_aggregate_with_chunks_in_flight(bus_url: str) -> None:
    """Enough messages for every stream to send several chunks, 1 KiB each
    (so aiokafka's partition batches fill and nats-py flushes mid-chunk),
    read back through a subscription: each aggregate's messages in publish
    order."""
    topic = f"pm-{uuid.uuid4().hex[:10]}"
    n, keys = 9 * PUBLISH_BATCH, 60  # 4 streams of ~2,250: 3 chunks each
    seen: Recorder[trio_bus.Message] = Recorder()
    async with trio_bus.open_bus(bus_url, monitoring=None) as bus:
        await bus.subscribe(topic, collect(seen), start="earliest")
        with trio.fail_after(120):
            await bus.publish_many(records(n, keys, topic, size=1024))
            await seen.wait_for_count(n, timeout=120)
    order: dict[str | None, list[int]] = defaultdict(list)
    for message in seen.items:
        order[message.aggregate_id].append(int(message.value.split()[0]))
    assert len(order) == keys
    for key, values in order.items():
        assert values == [i for i in range(n) if f"k{i % keys}" == key]
