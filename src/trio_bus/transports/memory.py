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
* Retention: entries every group of a topic has acked are dropped
  automatically (amortised: a trim runs once per quarter-log of acks); a log
  nobody has subscribed to is kept. :class:`MemoryRetention` bounds each log
  further by messages, bytes and age, dropping the oldest entries even if a
  group has not acked them (as Kafka's retention does); a group positioned
  before the retained log resumes at its start. ``bus.topics.configure``
  sets a topic's own retention.
* Persistence (docs/topics.md): an *ephemeral* topic keeps no log — a
  message reaches only the groups that exist when it is published, each
  delivery counts as acked when fetched (at-most-once, never redelivered).
  A topic's mode is fixed by whoever touches it first (``auto``: persistent
  if the log exists, else ephemeral) and changed only by ``configure``.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from .._config import at_least, positive
from .._message import NO_HEADERS, OutgoingMessage, Record, new_record
from .._topics import Persistence, PersistencePolicy, StoredAs, TopicDescription, TopicRequest
from ..errors import BusClosedError, ConfigError, TopicConfigError
from ._base import Consumer, ConsumerSpec, LaneState, Transport, TransportSettings
from ._provisioning import mismatch

__all__ = ["MemoryBroker", "MemoryRetention", "get_broker", "open_transport"]

logger = logging.getLogger("trio_bus.memory")

#: Fewest acks between two automatic trims of a topic.
_MIN_ACKS_PER_TRIM = 64


@attrs.frozen(kw_only=True)
class MemoryRetention:
    """Limits on each topic log of a :class:`MemoryBroker`, beyond dropping
    what every group acked. Pass it as ``open_bus("memory://name",
    transport_options=MemoryRetention(...))`` or to :class:`MemoryBroker`.

    Attributes:
        max_messages: Most entries kept per topic (None: no limit).
        max_bytes: Most bytes of keys, values and headers kept per topic.
        max_age: Seconds an entry is kept after it was appended.
    """

    max_messages: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(at_least(1, integer=True))
    )
    max_bytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(at_least(1, integer=True))
    )
    max_age: float | None = attrs.field(default=None, validator=attrs.validators.optional(positive))


@attrs.define(slots=True)
class _Entry:
    key: str | None
    value: bytes
    headers: Mapping[str, str]
    timestamp: float
    #: Bytes of key, value and headers, for byte retention.
    size: int


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

    def forget_before(self, base: int) -> None:
        """Entries below *base* are gone: move past them."""
        self.next_index = max(self.next_index, base)
        if self.redeliver and self.redeliver[0] < base:
            self.redeliver = [i for i in self.redeliver if i >= base]
            heapq.heapify(self.redeliver)
        for index in [i for i in self.delivery_counts if i < base]:
            del self.delivery_counts[index]


@attrs.define(eq=False)
class _Topic:
    base: int = 0  # log index of entries[0]; grows when trimmed
    entries: list[_Entry] = attrs.Factory(list)
    groups: dict[str, _Group] = attrs.Factory(dict)
    changed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    size: int = 0  # bytes of the retained entries
    acks_since_trim: int = 0
    #: No log kept (see the module docstring).
    ephemeral: bool = False
    #: This topic's own limits (``bus.topics.configure``), else the broker's.
    retention: MemoryRetention | None = None

    @property
    def end(self) -> int:
        return self.base + len(self.entries)

    def drop(self, count: int) -> int:
        """Drop the *count* oldest entries; return how many went."""
        count = min(count, len(self.entries))
        if count <= 0:
            return 0
        self.size -= sum(e.size for e in self.entries[:count])
        del self.entries[:count]
        self.base += count
        for group in self.groups.values():
            group.forget_before(self.base)
        return count

    def trim_acked(self) -> int:
        """Drop the prefix every group has acked (none without groups)."""
        self.acks_since_trim = 0
        if not self.groups:
            return 0
        floor = min(g.low_water() for g in self.groups.values())
        return self.drop(floor - self.base)

    def note_ack(self) -> None:
        self.acks_since_trim += 1
        if self.acks_since_trim >= max(_MIN_ACKS_PER_TRIM, len(self.entries) // 4):
            self.trim_acked()

    def enforce(self, retention: MemoryRetention, now: float) -> None:
        """Apply *retention*'s limits, oldest entries first."""
        excess = 0
        if retention.max_messages is not None:
            excess = len(self.entries) - retention.max_messages
        if retention.max_age is not None:
            cutoff = now - retention.max_age
            stale = max(excess, 0)
            while stale < len(self.entries) and self.entries[stale].timestamp < cutoff:
                stale += 1
            excess = max(excess, stale)
        if retention.max_bytes is not None:
            size, count = self.size, 0
            while count < len(self.entries) and size > retention.max_bytes:
                size -= self.entries[count].size
                count += 1
            excess = max(excess, count)
        self.drop(excess)


class MemoryBroker:
    """An in-process broker: topic logs and consumer groups."""

    def __init__(self, name: str = "", *, retention: MemoryRetention | None = None) -> None:
        self.name = name
        #: Limits on each log beyond dropping what every group acked.
        self.retention = retention or MemoryRetention()
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
            headers = rec.headers
            if headers:  # a copy: the sender's mapping may change later
                headers = dict(headers)
                size = sum(map(len, [*headers, *headers.values()]))
            else:
                headers, size = NO_HEADERS, 0
            size += len(rec.value) + len(rec.key or "")
            topic = self._topic(rec.topic)
            if topic.ephemeral and not topic.groups:
                continue  # nobody to deliver to, and nothing is kept
            topic.entries.append(_Entry(rec.key, rec.value, headers, now, size))
            topic.size += size
            touched.add(rec.topic)
        for name in touched:
            topic = self._topics[name]
            topic.enforce(topic.retention or self.retention, now)
            topic.changed.unpark_all()

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

    def retained(self, topic: str) -> tuple[int, int]:
        """``(entries, bytes)`` of *topic*'s retained log."""
        t = self._topic(topic)
        return len(t.entries), t.size

    def trim(self, topic: str) -> int:
        """Drop the log prefix every group has acked and apply the retention
        limits now; return how many entries went. (Both also happen by
        themselves; this makes it happen at once.)"""
        t = self._topic(topic)
        before = t.base
        t.trim_acked()
        t.enforce(t.retention or self.retention, time.time())
        return t.base - before

    # ---------------------------------------------------------- topics

    def declare(self, topic: str, mode: Persistence) -> None:
        """Fix *topic*'s persistence the first time anyone names it."""
        if topic not in self._topics:
            self._topic(topic).ephemeral = mode != "persistent"  # auto: no log yet

    def configure(self, topic: str, request: TopicRequest) -> TopicDescription:
        """``bus.topics.configure`` on this broker (default strategy:
        ``create_or_update`` -- the application owns an embedded broker)."""
        options = request.options
        if options is not None and not isinstance(options, MemoryRetention):
            raise ConfigError(
                f"memory topic options must be a MemoryRetention, not {type(options).__name__}"
            )
        strategy = request.strategy or "create_or_update"
        exists = topic in self._topics
        if not exists and strategy == "validate_only":
            raise TopicConfigError(f"memory topic {topic!r} does not exist")
        if strategy == "skip":
            return self.describe(topic)
        t = self._topic(topic)
        if exists and strategy != "create_or_update":
            mode = None if request.persistence == "auto" else request.persistence
            wanted = {"retention": options, "persistence": mode}
            have = {"retention": t.retention, "persistence": _mode(t)}
            diff = {k: v for k, v in wanted.items() if v is not None and v != have[k]}
            if diff:
                message = f"memory topic {topic!r} differs: {diff}"
                mismatch(request.on_mismatch or "warn", message, logger=logger)
                return self.describe(topic)
        if options is not None:
            t.retention = options
            t.enforce(options, time.time())
        if request.persistence is not None:
            t.ephemeral = request.persistence == "ephemeral" or (
                request.persistence == "auto" and not exists
            )
        return self.describe(topic)

    def describe(self, topic: str) -> TopicDescription:
        """The broker's view of *topic*."""
        t = self._topics.get(topic)
        retention = (t.retention if t is not None else None) or self.retention
        return TopicDescription(
            topic=topic,
            persistence="persistent" if t is None else _mode(t),
            exists=t is not None and not t.ephemeral,
            config=attrs.asdict(retention),
            messages=None if t is None else len(t.entries),
        )

    def topic_names(self) -> list[str]:
        """The topics with a log."""
        return [name for name, t in self._topics.items() if not t.ephemeral]


def _mode(topic: _Topic) -> StoredAs:
    return "ephemeral" if topic.ephemeral else "persistent"


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
            index = heapq.heappop(group.redeliver)
            if index >= topic.base:  # else retention dropped it meanwhile
                out.append(self._deliver(index))
        while group.next_index < topic.end and len(out) < max_records:
            out.append(self._deliver(group.next_index))
            group.next_index += 1
        if topic.ephemeral:  # at-most-once: delivered counts as acked
            for record in out:
                self.ack(record)
        # Cancel-atomic: what was taken reaches the caller.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return out

    def _deliver(self, index: int) -> Record:
        entry = self._topic.entries[index - self._topic.base]
        count = self._group.delivery_counts.get(index, 0) + 1
        self._group.delivery_counts[index] = count
        self._held.add(index)
        return new_record(
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
            self._topic.note_ack()

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

    def __init__(self, broker: MemoryBroker, persistence: PersistencePolicy | None = None) -> None:
        self.broker = broker
        self._persistence = persistence or PersistencePolicy()
        self._declared: set[str] = set()

    def _declare(self, topic: str) -> None:
        if topic not in self._declared:
            self.broker.declare(topic, self._persistence.of(topic))
            self._declared.add(topic)

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        for record in records:
            self._declare(record.topic)
        self.broker.append(records)
        await trio.lowlevel.checkpoint()
        return [None] * len(records)

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        await trio.lowlevel.checkpoint()
        self._declare(spec.topic)
        return _MemoryConsumer(self.broker, spec)

    async def configure_topic(self, topic: str, request: TopicRequest) -> TopicDescription:
        await trio.lowlevel.checkpoint()
        self._declared.add(topic)
        return self.broker.configure(topic, request)

    async def describe_topic(self, topic: str) -> TopicDescription:
        await trio.lowlevel.checkpoint()
        return self.broker.describe(topic)

    async def list_topics(self) -> Sequence[str]:
        await trio.lowlevel.checkpoint()
        return self.broker.topic_names()


@asynccontextmanager
async def open_transport(settings: TransportSettings) -> AsyncIterator[MemoryTransport]:
    """Open the memory transport named by ``settings.hosts`` (default broker
    when empty); ``settings.options``, if given, sets the broker's
    :class:`MemoryRetention`."""
    name = settings.hosts[0] if settings.hosts else ""
    broker = get_broker(name)
    if settings.options is not None:
        if not isinstance(settings.options, MemoryRetention):
            raise ConfigError(
                f"memory transport options must be a MemoryRetention, "
                f"not {type(settings.options).__name__}"
            )
        broker.retention = settings.options
    yield MemoryTransport(broker, settings.persistence)
