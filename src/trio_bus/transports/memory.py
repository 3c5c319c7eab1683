"""The embedded in-memory transport: ``memory://`` (the default).

A real broker in miniature, living in the process: append-only topic logs,
consumer groups with a shared cursor (members of a group share the work,
different groups each get every message), explicit acks, and redelivery of
what was delivered but not acked when a consumer closes or is cancelled.

Brokers are named by the URL: ``memory://`` is the process-wide default
broker, ``memory://name`` a separate one (tests use a fresh name each). A
broker outlives the buses that use it, so a bus reopened on the same URL
resumes its groups where they acked, like a server would.

Choices, documented in docs/transports.md:

* A new group starts at the end of the log (``start="latest"``) or at its
  beginning (``"earliest"``); an existing group resumes.
* Released (unacked) messages are delivered again before newer ones,
  lowest log index first.
* Logs are kept whole while the broker lives (``MemoryBroker.trim`` drops
  what every group has acked).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from .._message import OutgoingMessage, Record
from ..errors import BusClosedError
from ._base import Consumer, ConsumerSpec, LaneState, Transport, TransportSettings

__all__ = ["MemoryBroker", "get_broker", "open_transport"]


@attrs.define(slots=True)
class _Entry:
    key: str | None
    value: bytes
    headers: dict[str, str]
    timestamp: float


@attrs.define(eq=False)
class _Group:
    """A consumer group's position on one topic."""

    next_index: int
    redeliver: list[int] = attrs.Factory(list)  # heap of log indices
    delivery_counts: dict[int, int] = attrs.Factory(dict)  # unacked only

    def pending(self, end: int) -> int:
        """Messages up to *end* not acked yet."""
        return end - self.next_index + len(self.redeliver) + len(self.delivery_counts)

    def low_water(self) -> int:
        pending = [*self.redeliver, *self.delivery_counts]
        return min(pending, default=self.next_index)


@attrs.define(eq=False)
class _Topic:
    base: int = 0  # log index of entries[0]; grows when trimmed
    entries: list[_Entry] = attrs.Factory(list)
    groups: dict[str, _Group] = attrs.Factory(dict)
    changed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    @property
    def end(self) -> int:
        return self.base + len(self.entries)


class MemoryBroker:
    """An in-process broker: topic logs and consumer groups."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._topics: dict[str, _Topic] = {}

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic()
        return topic

    def append(self, records: Sequence[OutgoingMessage]) -> None:
        """Append *records* to their topic logs and wake waiting consumers."""
        touched: set[str] = set()
        now = time.time()
        for rec in records:
            entry = _Entry(rec.key, rec.value, dict(rec.headers), now)
            self._topic(rec.topic).entries.append(entry)
            touched.add(rec.topic)
        for name in touched:
            self._topics[name].changed.unpark_all()

    def end_offset(self, topic: str) -> int:
        """Index one past the newest message of *topic*."""
        return self._topic(topic).end

    def messages(self, topic: str) -> list[tuple[str | None, bytes, dict[str, str]]]:
        """Snapshot of *topic*'s retained log as ``(key, value, headers)``
        (for tests and tools)."""
        return [(e.key, e.value, dict(e.headers)) for e in self._topic(topic).entries]

    def pending(self, topic: str, group: str) -> int:
        """Messages of *topic* that *group* has not acked yet."""
        t = self._topic(topic)
        g = t.groups.get(group)
        return 0 if g is None else g.pending(t.end)

    def trim(self, topic: str) -> int:
        """Drop the log prefix every group has acked; return how many."""
        t = self._topic(topic)
        floor = min((g.low_water() for g in t.groups.values()), default=t.end)
        dropped = max(0, floor - t.base)
        del t.entries[:dropped]
        t.base += dropped
        return dropped


_brokers: dict[str, MemoryBroker] = {}


def get_broker(name: str = "") -> MemoryBroker:
    """The process-wide broker called *name* (``memory://name``)."""
    broker = _brokers.get(name)
    if broker is None:
        broker = _brokers[name] = MemoryBroker(name)
    return broker


class _MemoryConsumer(Consumer):
    def __init__(self, broker: MemoryBroker, spec: ConsumerSpec) -> None:
        self._topic_name = spec.topic
        self._topic = broker._topic(spec.topic)
        group = self._topic.groups.get(spec.group)
        if group is None:
            start = self._topic.end if spec.start == "latest" else self._topic.base
            group = self._topic.groups[spec.group] = _Group(next_index=start)
        self._group = group
        self._group_name = spec.group
        self._ephemeral = spec.ephemeral
        # What this member holds unacked, so closing it releases only its own.
        self._held: set[int] = set()
        self._closed = False

    async def fetch(self, max_records: int) -> Sequence[Record]:
        topic, group = self._topic, self._group
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise BusClosedError("consumer closed")
            if group.redeliver or group.next_index < topic.end:
                break
            await topic.changed.park()
        out: list[Record] = []
        while group.redeliver and len(out) < max_records:
            out.append(self._deliver(heapq.heappop(group.redeliver)))
        while group.next_index < topic.end and len(out) < max_records:
            out.append(self._deliver(group.next_index))
            group.next_index += 1
        # Cancel-atomic: what was taken reaches the caller.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return out

    def _deliver(self, index: int) -> Record:
        entry = self._topic.entries[index - self._topic.base]
        count = self._group.delivery_counts.get(index, 0) + 1
        self._group.delivery_counts[index] = count
        self._held.add(index)
        return Record(
            topic=self._topic_name,
            subject=self._topic_name,
            value=entry.value,
            key=entry.key,
            headers=entry.headers,
            partition=None,
            offset=index,
            delivery_count=count,
            token=index,
            timestamp=entry.timestamp,
        )

    def ack(self, record: Record) -> None:
        index = record.offset
        if index in self._held:
            self._held.discard(index)
            self._group.delivery_counts.pop(index, None)

    def release(self, record: Record) -> None:
        index = record.offset
        if index in self._held:
            self._held.discard(index)
            heapq.heappush(self._group.redeliver, index)
            self._topic.changed.unpark_all()

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._closed = True
        for index in sorted(self._held):
            heapq.heappush(self._group.redeliver, index)
        self._held.clear()
        if self._ephemeral:
            self._topic.groups.pop(self._group_name, None)
        self._topic.changed.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def lanes(self) -> Sequence[LaneState]:
        await trio.lowlevel.checkpoint()
        group = self._group
        return [
            LaneState(
                topic=self._topic_name,
                committed=group.low_water(),
                lag=group.pending(self._topic.end),
                ack_pending=len(group.delivery_counts),
                in_flight=len(self._held),
            )
        ]


class MemoryTransport(Transport):
    """The transport over a :class:`MemoryBroker`."""

    name = "memory"

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        self.broker.append(records)
        await trio.lowlevel.checkpoint()
        return [None] * len(records)

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        await trio.lowlevel.checkpoint()
        return _MemoryConsumer(self.broker, spec)


@asynccontextmanager
async def open_transport(settings: TransportSettings) -> AsyncIterator[MemoryTransport]:
    """Open the memory transport named by ``settings.hosts`` (default broker
    when empty)."""
    name = settings.hosts[0] if settings.hosts else ""
    yield MemoryTransport(get_broker(name))
