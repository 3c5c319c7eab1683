"""The publish pipeline: validate -> rate limit -> coalesce ->
``publish_batch`` -> outcomes, counters and publish results.

For the Kafka and NATS transports one ``publish_batch`` call costs a bridge
crossing (~125 us) plus a broker round trip. Many tasks publishing one
message each would pay that per message; instead each ``publish()`` queues
its record and waits, and one sender task (:class:`Coalescer`) hands
everything queued so far to the transport as one batch. Under load batches
grow by themselves; alone, a publish goes out at once (no linger added here).

``publish_many`` keeps up to :data:`MAX_CHUNKS_IN_FLIGHT` chunks waiting for
their acks at once. The transport contract only orders records *within* one
``publish_batch``: neither the Kafka nor the NATS transport issues all of a
batch's sends before its first await (aiokafka's ``send`` waits whenever a
partition's batch is full, nats-py's ``publish`` whenever 2 MiB are
buffered), so two concurrent batches interleave. Hence the records are
split into *streams* by ``(topic, key)``: one aggregate's records all travel
in one stream, whose chunks go one after the other, while the streams run
side by side (see :func:`split_streams`).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
import trio
from opentelemetry.trace import Tracer

from ._envelope import Envelope, encode_envelope
from ._exceptions import leaves, raise_as_is
from ._message import NO_HEADERS, OutgoingMessage
from ._names import validate_aggregate_id, validate_headers, validate_topic
from ._ratelimit import PublishLimits, TokenBucket
from ._results import ResultStreams
from ._stats import TopicStats
from ._tracing import publish_span
from .errors import (
    BusClosedError,
    InvalidInputError,
    PayloadTooLargeError,
    PublishOutcomeUnknownError,
)
from .transports._base import Transport

__all__ = [
    "MAX_CHUNKS_IN_FLIGHT",
    "PUBLISH_BATCH",
    "Coalescer",
    "Publisher",
    "raise_first_failure",
    "split_streams",
]

#: Largest batch handed to a transport in one call (one bridge crossing).
PUBLISH_BATCH = 1000
#: Chunks of one ``publish_many`` awaiting their acks at once (per rate
#: limit bucket): enough to keep the broker busy while acks come back,
#: bounded so one call does not flood the client's buffers.
MAX_CHUNKS_IN_FLIGHT = 4


class Publisher:
    """Everything a bus does to publish: checks, batching, counting."""

    def __init__(
        self,
        transport: Transport,
        *,
        max_message_bytes: int,
        tracer: Tracer | None,
        topic_stats: Callable[[str], TopicStats],
        limits: PublishLimits | None = None,
    ) -> None:
        self._transport = transport
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._tracer = tracer
        self._topic_stats = topic_stats
        self.results = ResultStreams()
        self.coalescer = (
            Coalescer(transport, max_batch=PUBLISH_BATCH) if transport.coalesce_publishes else None
        )
        #: Messages handed to the transport and not yet answered for.
        self.backlog = 0
        #: Messages the transport accepted.
        self.published = 0
        self.closed = False

    def throttling(self) -> tuple[int, float]:
        """``(requests that waited for the rate limit, seconds waited)``."""
        return (0, 0.0) if self._limits is None else self._limits.throttling()

    # ------------------------------------------------------------ checks

    def outgoing(
        self,
        topic: str,
        value: bytes,
        key: str | None,
        headers: Mapping[str, str] | None,
        message_id: str | None = None,
        *,
        given: OutgoingMessage | None = None,
    ) -> OutgoingMessage:
        """A validated record, or a typed error before anything is sent.

        *given*: the message these fields come from, returned as it is when
        checking changes none of them (a message without headers: nothing
        of it is mutable), rather than built again.
        """
        validate_topic(topic)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise InvalidInputError(f"value must be bytes, not {type(value).__name__}")
        value = bytes(value)
        if len(value) > self._max_message_bytes:
            raise PayloadTooLargeError(
                f"message of {len(value)} bytes exceeds max_message_bytes={self._max_message_bytes}"
            )
        if key is not None:
            key = validate_aggregate_id(key)
        if not headers:
            if (
                given is not None
                and given.headers is NO_HEADERS
                and value is given.value
                and key == given.key
            ):
                return given
            checked = NO_HEADERS
        else:
            checked = validate_headers(headers)
        return OutgoingMessage(
            topic=topic, value=value, key=key, headers=checked, message_id=message_id
        )

    def envelope_record(
        self, topic: str, envelope: Envelope, headers: Mapping[str, str] | None
    ) -> OutgoingMessage:
        """The record of an :class:`Envelope`: the seed system's JSON, keyed
        by its aggregate ID, its metadata in headers."""
        if not isinstance(envelope, Envelope):
            raise InvalidInputError(f"expected an Envelope, not {type(envelope).__name__}")
        merged = {**(headers or {}), **envelope.headers()}
        return self.outgoing(
            topic, encode_envelope(envelope), envelope.aggregate_id, merged, envelope.event_id
        )

    def records(
        self, messages: Iterable[OutgoingMessage | tuple[str, Envelope]]
    ) -> list[OutgoingMessage]:
        """Validate every item of a ``publish_many`` before anything is sent."""
        return [
            self.envelope_record(m[0], m[1], None)
            if isinstance(m, tuple)
            else self.outgoing(m.topic, m.value, m.key, m.headers, m.message_id, given=m)
            for m in messages
        ]

    # ------------------------------------------------------------ sending

    async def send(
        self, records: list[OutgoingMessage], *, report: bool = True
    ) -> Sequence[BaseException | None]:
        """Hand *records* to the transport (merged with concurrent publishes
        where the transport wants it); count, time and report the outcomes.

        *report*: whether the outcomes go to the publish-result streams
        (False for the bus's own publishes: dead-letter copies and health
        probes).
        """
        if self.closed:
            raise BusClosedError("the bus is closed")
        if self._tracer is not None:
            with publish_span(self._tracer, self._transport.name, records) as traced:
                return await self._send(traced, report)
        return await self._send(records, report)

    async def _send(
        self, records: list[OutgoingMessage], report: bool
    ) -> Sequence[BaseException | None]:
        started = trio.current_time()
        self.backlog += len(records)
        outcomes: Sequence[BaseException | None]
        try:
            if self.coalescer is not None and len(records) == 1:
                try:
                    await self.coalescer.publish(records[0])
                    outcomes = [None]
                except (BusClosedError, trio.Cancelled) as exc:
                    outcomes = [exc]
                    raise
                except Exception as exc:
                    outcomes = [exc]
            else:
                outcomes = await self._transport.publish_batch(records)
        except BaseException as exc:
            outcomes = [exc] * len(records)
            raise
        finally:
            self.backlog -= len(records)
            self._count(records, outcomes, trio.current_time() - started)
            if report and self.results.streams:
                await self.results.emit(records, outcomes)
        return outcomes

    def _count(
        self,
        records: Sequence[OutgoingMessage],
        outcomes: Sequence[BaseException | None],
        elapsed: float,
    ) -> None:
        """Count a sent batch per topic (per batch: it took *elapsed* for
        all of them)."""
        stored = outcomes.count(None)
        self.published += stored
        if stored == len(records):  # the common case, without a loop in Python
            for topic, count in Counter(map(_topic_of, records)).items():
                stats = self._topic_stats(topic)
                stats.published += count
                stats.publish_latency.observe(elapsed, count)
            return
        for record, outcome in zip(records, outcomes, strict=True):
            stats = self._topic_stats(record.topic)
            if outcome is None:
                stats.published += 1
                stats.publish_latency.observe(elapsed)
            else:
                stats.publish_failed += 1

    async def send_one(self, record: OutgoingMessage, *, report: bool = True) -> None:
        """Publish one record; raise its failure.

        The bus's own publishes (``report=False``) skip the rate limit: a
        dead-letter copy is sent by an actor that holds its aggregate (and
        its consumer's progress) until it is stored, and its original was
        already counted when it was published; a throttled health probe
        would report the application's own throttling as a sick bus.
        """
        if report and self._limits is not None:
            bucket = self._limits.bucket_for(record.topic)
            if bucket is not None:
                if self.closed:
                    raise BusClosedError("the bus is closed")
                await bucket.acquire(1)
        raise_first_failure(await self.send([record], report=report))

    async def send_many(self, records: list[OutgoingMessage]) -> None:
        """Publish *records* in chunks of at most :data:`PUBLISH_BATCH`, up
        to :data:`MAX_CHUNKS_IN_FLIGHT` of them awaiting acks at once, order
        kept per ``(topic, key)``; raise the first failure (in the order of
        *records*) once every chunk has been answered for.

        A chunk of a rate-limited topic holds at most ``burst`` records and
        waits for its tokens before it is sent.
        """
        if self.closed:
            raise BusClosedError("the bus is closed")
        if not records:
            await trio.lowlevel.checkpoint()
            return
        if self._limits is None and len(records) <= PUBLISH_BATCH:
            raise_first_failure(await self.send(records))  # one chunk: as before
            return
        outcomes: list[BaseException | None] = [None] * len(records)
        streams = self._streams(records)
        if len(streams) == 1:
            await self._send_stream(records, *streams[0], outcomes)
        else:
            try:
                async with trio.open_nursery() as nursery:
                    for bucket, indices in streams:
                        nursery.start_soon(self._send_stream, records, bucket, indices, outcomes)
            except BaseExceptionGroup as group:
                raise_as_is(_first_error(group))
        raise_first_failure(outcomes)

    def _streams(
        self, records: Sequence[OutgoingMessage]
    ) -> list[tuple[TokenBucket | None, list[int]]]:
        """Indices of *records* per stream; a stream's records share one
        rate-limit bucket (or none), so a chunk takes tokens from one."""
        limits = self._limits
        groups: dict[TokenBucket | None, list[int]]
        if limits is None:
            groups = {None: list(range(len(records)))}
        else:
            groups = {}
            for i, record in enumerate(records):
                groups.setdefault(limits.bucket_for(record.topic), []).append(i)
        return [
            (bucket, stream)
            for bucket, indices in groups.items()
            for stream in split_streams(
                records,
                indices,
                math.ceil(len(indices) / _chunk_size(bucket)),
            )
        ]

    async def _send_stream(
        self,
        records: Sequence[OutgoingMessage],
        bucket: TokenBucket | None,
        indices: list[int],
        outcomes: list[BaseException | None],
    ) -> None:
        """Send one stream's chunks one after the other (order within the
        stream is the transport's order within a batch)."""
        size = _chunk_size(bucket)
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            if bucket is not None:
                await bucket.acquire(len(chunk))
            answered = await self.send([records[i] for i in chunk])
            for i, outcome in zip(chunk, answered, strict=True):
                outcomes[i] = outcome

    def close(self) -> None:
        """No publish from now on; end the result streams."""
        self.closed = True
        self.results.close()


@attrs.define(slots=True, eq=False)
class _Pending:
    record: OutgoingMessage
    done: trio.Event = attrs.Factory(trio.Event)
    error: Exception | None = None


class Coalescer:
    """One sender task feeding ``transport.publish_batch`` with whatever
    ``publish()`` calls queued meanwhile."""

    def __init__(self, transport: Transport, *, max_batch: int) -> None:
        self._transport = transport
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._wakeup = trio.lowlevel.ParkingLot()
        self._closed = False

    async def publish(self, record: OutgoingMessage) -> None:
        """Queue *record*; return once the broker accepted it.

        If the caller is cancelled while waiting, the record may still be
        published: its outcome is unknown to the caller.
        """
        if self._closed:
            raise BusClosedError("the bus is closed")
        pending = _Pending(record)
        self._queue.append(pending)
        self._wakeup.unpark()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches until cancelled; then fail whatever is still queued."""
        task_status.started()
        batch: list[_Pending] = []
        try:
            while True:
                while not self._queue:
                    await self._wakeup.park()
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                outcomes = await self._transport.publish_batch([p.record for p in batch])
                for pending, outcome in zip(batch, outcomes, strict=True):
                    pending.error = outcome
                    pending.done.set()
                batch = []
        finally:
            self._closed = True
            for pending in batch:
                pending.error = PublishOutcomeUnknownError(
                    "the bus closed while this publish was in flight"
                )
                pending.done.set()
            for pending in self._queue:
                pending.error = BusClosedError("the bus closed before this publish was sent")
                pending.done.set()
            self._queue.clear()


_topic_of = operator.attrgetter("topic")


def _chunk_size(bucket: TokenBucket | None) -> int:
    return PUBLISH_BATCH if bucket is None else min(PUBLISH_BATCH, bucket.limit.burst)


def split_streams(
    records: Sequence[OutgoingMessage], indices: Sequence[int], chunks: int
) -> list[list[int]]:
    """Split *indices* (into *records*) into :data:`MAX_CHUNKS_IN_FLIGHT`
    streams when they make more than one chunk, every ``(topic, key)`` in
    exactly one stream, each stream in the order of *indices*.

    Always the full number of streams, not ``chunks`` of them: streams come
    out only about equal, and 3,000 records in 3 streams would leave one
    with 1,020, whose last 20 cost a whole extra round trip; 4 x 750 do not.
    Lanes are placed largest first on the least loaded stream, so only a
    dominant aggregate unbalances them (its records go one chunk after the
    other anyway)::

        split_streams(records, range(3000), 3)  # 100 keys -> 4 x 750
    """
    if chunks <= 1:
        return [list(indices)]
    ways = MAX_CHUNKS_IN_FLIGHT
    lanes = [(records[i].topic, records[i].key) for i in indices]
    load = [0] * ways
    stream_of: dict[tuple[str, str | None], int] = {}
    for lane, size in sorted(Counter(lanes).items(), key=lambda item: -item[1]):
        target = min(range(ways), key=load.__getitem__)
        stream_of[lane] = target
        load[target] += size
    streams: list[list[int]] = [[] for _ in range(ways)]
    for i, lane in zip(indices, lanes, strict=True):
        streams[stream_of[lane]].append(i)
    return [stream for stream in streams if stream]


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception ``publish_many`` raises when streams raised: the first
    that is not a cancellation (a note counts the others), else the first
    cancellation (a cancellation from outside reached every stream)."""
    found = leaves(group)
    errors = [leaf for leaf in found if not isinstance(leaf, trio.Cancelled)]
    if not errors:
        return found[0]
    if len(errors) > 1:
        errors[0].add_note(f"{len(errors) - 1} more chunks of this publish_many raised too")
    return errors[0]


def raise_first_failure(outcomes: Sequence[BaseException | None]) -> None:
    """Raise the first failure of a batch, noting how many others failed."""
    failures = [o for o in outcomes if o is not None]
    if failures:
        first = failures[0]
        if len(failures) > 1:
            first.add_note(f"{len(failures) - 1} more of {len(outcomes)} messages failed too")
        raise first
