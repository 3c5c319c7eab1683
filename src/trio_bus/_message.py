"""Messages as handlers see them, and as transports hand them over."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._envelope import Envelope
    from ._lease import Lease

__all__ = ["Message", "OutgoingMessage", "Record"]


@attrs.define(slots=True, eq=False)
class Record:
    """One delivery as a transport hands it to the core (transport-facing).

    Transports fill the wire fields; ``token`` is whatever the transport
    needs to ack this delivery later (a NATS message, a Kafka offset...).
    The core never looks inside it.

    Attributes:
        topic: The topic the subscription asked for.
        subject: The wire subject (NATS: may be ``topic.<token>``; elsewhere
            equal to ``topic``).
        value: The body.
        key: The message key as sent (Kafka key; memory key; NATS: None).
        headers: Header names and values.
        partition: Kafka partition, else None.
        offset: Kafka offset, NATS stream sequence or memory log index.
        delivery_count: How often the broker has delivered it (1 = first),
            where the broker says so; else None.
        token: Transport-private ack handle.
        timestamp: When the message was published (seconds since the epoch)
            where the broker says so; for end-to-end latency metrics.
        lease: The member's lease on the partition it came from, where the
            transport fences partitions between processes (see
            :mod:`trio_bus._lease`); None: no fence.
    """

    topic: str
    subject: str
    value: bytes
    key: str | None
    headers: Mapping[str, str]
    partition: int | None
    offset: int
    delivery_count: int | None = None
    token: object = None
    timestamp: float | None = None
    lease: Lease | None = None


@attrs.frozen(slots=True, eq=False)
class Message:
    """A message delivered to a handler.

    Attributes:
        topic: The topic it was consumed from.
        subject: The wire subject (NATS subject; equal to ``topic`` elsewhere).
        value: The body, as bytes.
        key: The key as sent, or None.
        headers: Header names and values (str to str).
        aggregate_id: The aggregate ID the bus ordered it by: envelope
            ``aggregate_id``, else header ``X-Aggregate-ID``, else the key,
            else the last valid dot-separated token of the NATS subject;
            None when there is none (no ordering applies).
        attempt: 1 on the first handler call, then 2, 3... on retries.
        partition: Kafka partition, else None.
        offset: Kafka offset, NATS stream sequence, or memory log index.
        delivery_count: Broker delivery count where the broker tracks it
            (NATS, memory; ``> 1`` means redelivered), else None.
        timestamp: When the broker stored it (seconds since the epoch:
            Kafka record timestamp, JetStream publish time, memory append
            time), or None where the broker does not say.
    """

    topic: str
    subject: str
    value: bytes
    key: str | None
    headers: Mapping[str, str]
    aggregate_id: str | None
    attempt: int
    partition: int | None
    offset: int
    delivery_count: int | None
    timestamp: float | None = None
    _envelope: Envelope | None = attrs.field(default=None, alias="envelope", repr=False)

    @property
    def envelope(self) -> Envelope | None:
        """The decoded envelope when the body is a valid one, else None."""
        return self._envelope


@attrs.frozen(slots=True)
class OutgoingMessage:
    """One message for :meth:`Bus.publish_many` (and what transports send).

    Attributes:
        topic: Destination topic.
        value: The body.
        key: The aggregate ID (Kafka: the record key, so one aggregate stays
            in one partition; NATS: sent as the ``X-Aggregate-ID`` header).
        headers: Extra headers.
        message_id: A deduplication id (NATS ``Nats-Msg-Id``); the
            envelope's ``event_id`` for envelopes.
    """

    topic: str
    value: bytes
    key: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    message_id: str | None = None
