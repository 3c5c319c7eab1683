"""The publish pipeline: validate -> coalesce -> ``publish_batch`` ->
outcomes, counters and publish results.

For the Kafka and NATS transports one ``publish_batch`` call costs a bridge
crossing (~125 us) plus a broker round trip. Many tasks publishing one
message each would pay that per message; instead each ``publish()`` queues
its record and waits, and one sender task (:class:`Coalescer`) hands
everything queued so far to the transport as one batch. Under load batches
grow by themselves; alone, a publish goes out at once (no linger added here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
import trio
from opentelemetry.trace import Tracer

from ._envelope import Envelope, encode_envelope
from ._message import OutgoingMessage
from ._names import validate_aggregate_id, validate_headers, validate_topic
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

__all__ = ["PUBLISH_BATCH", "Coalescer", "Publisher", "raise_first_failure"]

#: Largest batch handed to a transport in one call (one bridge crossing).
PUBLISH_BATCH = 1000


class Publisher:
    """Everything a bus does to publish: checks, batching, counting."""

    def __init__(
        self,
        transport: Transport,
        *,
        max_message_bytes: int,
        tracer: Tracer | None,
        topic_stats: Callable[[str], TopicStats],
    ) -> None:
        self._transport = transport
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

    # ------------------------------------------------------------ checks

    def outgoing(
        self,
        topic: str,
        value: bytes,
        key: str | None,
        headers: Mapping[str, str] | None,
        message_id: str | None = None,
    ) -> OutgoingMessage:
        """A validated record, or a typed error before anything is sent."""
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
        return OutgoingMessage(
            topic=topic,
            value=value,
            key=key,
            headers=validate_headers(headers),
            message_id=message_id,
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
            else self.outgoing(m.topic, m.value, m.key, m.headers, m.message_id)
            for m in messages
        ]

    # ------------------------------------------------------------ sending

    async def send(
        self, records: list[OutgoingMessage], *, report: bool = True
    ) -> Sequence[BaseException | None]:
        """Hand *records* to the transport (merged with concurrent publishes
        where the transport wants it); count, time and report the outcomes.

        *report*: whether the outcomes go to the publish-result streams
        (dead-letter copies and health probes do not).
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
            elapsed = trio.current_time() - started
            for record, outcome in zip(records, outcomes, strict=True):
                stats = self._topic_stats(record.topic)
                if outcome is None:
                    stats.published += 1
                    stats.publish_latency.observe(elapsed)
                else:
                    stats.publish_failed += 1
            self.published += sum(1 for o in outcomes if o is None)
            if report and self.results.streams:
                await self.results.emit(records, outcomes)
        return outcomes

    async def send_one(self, record: OutgoingMessage, *, report: bool = True) -> None:
        """Publish one record; raise its failure."""
        raise_first_failure(await self.send([record], report=report))

    async def send_many(self, records: list[OutgoingMessage]) -> None:
        """Publish *records* one :data:`PUBLISH_BATCH` at a time; raise the
        first failure once every batch has been answered for."""
        if self.closed:
            raise BusClosedError("the bus is closed")
        outcomes: list[BaseException | None] = []
        for start in range(0, len(records), PUBLISH_BATCH):
            outcomes.extend(await self.send(records[start : start + PUBLISH_BATCH]))
        raise_first_failure(outcomes)
        if not records:
            await trio.lowlevel.checkpoint()

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


def raise_first_failure(outcomes: Sequence[BaseException | None]) -> None:
    """Raise the first failure of a batch, noting how many others failed."""
    failures = [o for o in outcomes if o is not None]
    if failures:
        first = failures[0]
        if len(failures) > 1:
            first.add_note(f"{len(failures) - 1} more of {len(outcomes)} messages failed too")
        raise first
