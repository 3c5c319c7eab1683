"""Messages as handlers see them, and as transports hand them over."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._envelope import Envelope
    from ._lease import Lease
    from ._work import Claim, Route

__all__ = ["NO_HEADERS", "Message", "OutgoingMessage", "Record", "bind", "drop_claim", "new_record"]

#: The headers of a message without any: one shared, immutable mapping (a
#: message built without headers needs no copy of them to be safe to send).
NO_HEADERS: Mapping[str, str] = MappingProxyType({})


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


@attrs.frozen(slots=True, eq=False)
class Record(Message):
    """One delivery: what a transport hands to the core, and the very
    :class:`Message` its handler gets (one object per delivery: each
    object that lives from fetch to ack costs the cyclic garbage collector
    a share of a collection). Transports create it with :func:`new_record`;
    the fields below are not part of the public :class:`Message` and stay
    out of ``repr``.

    Attributes:
        token: Transport-private ack handle (a NATS delivery, a Kafka
            partition's track...). The core never looks inside it.
        lease: The member's lease on the partition it came from, where the
            transport fences partitions between processes (see
            :mod:`trio_bus._lease`); None: no fence.
        route: The subscription's route in the pool, set by the dispatcher
            (None before).
        rejection: Why the message is malformed (dead-lettered at once), or
            None; set by the dispatcher.
        claim: Its aggregate's hold on the actor it was dispatched to
            (see :class:`~._work.Claim`), or None without an aggregate; set
            by the dispatcher.
    """

    token: object = attrs.field(default=None, kw_only=True, repr=False)
    lease: Lease | None = attrs.field(default=None, kw_only=True, repr=False)
    route: Route = attrs.field(kw_only=True, repr=False)
    rejection: Exception | None = attrs.field(default=None, kw_only=True, repr=False)
    claim: Claim | None = attrs.field(default=None, kw_only=True, repr=False)


# Record's slots in new_record's order. A frozen class's generated __init__
# sets each field through object.__setattr__ (about 1.5 us for 16); the
# slots' own setters take about 0.9.
_SLOTS = tuple(
    getattr(Record, name).__set__
    for name in (
        "topic",
        "subject",
        "value",
        "key",
        "headers",
        "partition",
        "offset",
        "delivery_count",
        "token",
        "timestamp",
        "lease",
        "aggregate_id",
        "attempt",
        "_envelope",
        "route",
        "rejection",
        "claim",
    )
)

#: The dispatcher's five (see bind), unpacked once.
_set_aggregate, _set_envelope, _set_route, _set_rejection, _set_claim = _SLOTS[11], *_SLOTS[13:]


def new_record(
    topic: str,
    subject: str,
    value: bytes,
    key: str | None,
    headers: Mapping[str, str],
    partition: int | None,
    offset: int,
    delivery_count: int | None = None,
    token: object = None,
    timestamp: float | None = None,
    lease: Lease | None = None,
) -> Record:
    """A delivery as a transport hands it over (the hot path's constructor).

    Args:
        topic: The topic the subscription asked for.
        subject: The wire subject (NATS: may be ``topic.<token>``; elsewhere
            equal to ``topic``).
        value: The body.
        key: The message key as sent (Kafka key; memory key; NATS: None).
        headers: Header names and values.
        partition: Kafka partition (or a NATS group's partition), else None.
        offset: Kafka offset, NATS stream sequence or memory log index.
        delivery_count: How often the broker has delivered it (1 = first),
            where the broker says so; else None.
        token: Transport-private ack handle.
        timestamp: When the message was published (seconds since the epoch)
            where the broker says so; for end-to-end latency metrics.
        lease: See :attr:`Record.lease`.
    """
    record: Record = object.__new__(Record)
    (
        set_topic,
        set_subject,
        set_value,
        set_key,
        set_headers,
        set_partition,
        set_offset,
        set_count,
        set_token,
        set_timestamp,
        set_lease,
        set_aggregate,
        set_attempt,
        set_envelope,
        set_route,
        set_rejection,
        set_claim,
    ) = _SLOTS
    set_topic(record, topic)
    set_subject(record, subject)
    set_value(record, value)
    set_key(record, key)
    set_headers(record, headers)
    set_partition(record, partition)
    set_offset(record, offset)
    set_count(record, delivery_count)
    set_token(record, token)
    set_timestamp(record, timestamp)
    set_lease(record, lease)
    set_aggregate(record, None)
    set_attempt(record, 1)
    set_envelope(record, None)
    set_route(record, None)
    set_rejection(record, None)
    set_claim(record, None)
    return record


def bind(
    record: Record,
    route: Route,
    aggregate: str | None,
    envelope: Envelope | None,
    rejection: Exception | None,
    claim: Claim | None,
) -> None:
    """The dispatcher's part of *record*: its route, aggregate, envelope,
    rejection and claim."""
    _set_aggregate(record, aggregate)
    _set_envelope(record, envelope)
    _set_route(record, route)
    _set_rejection(record, rejection)
    _set_claim(record, claim)


def drop_claim(record: Record) -> None:
    """Clear *record*'s claim (it was let go)."""
    _set_claim(record, None)


@attrs.frozen(slots=True)
class OutgoingMessage:
    """One message for :meth:`Bus.publish_many` (and what transports send).

    Attributes:
        topic: Destination topic.
        value: The body.
        key: The aggregate ID (Kafka: the record key, so one aggregate stays
            in one partition; NATS: sent as the ``X-Aggregate-ID`` header).
        headers: Extra headers (default: none, :data:`NO_HEADERS`).
        message_id: A deduplication id (NATS ``Nats-Msg-Id``); the
            envelope's ``event_id`` for envelopes.
    """

    topic: str
    value: bytes
    key: str | None = None
    headers: Mapping[str, str] = attrs.field(default=NO_HEADERS, repr=lambda h: repr(dict(h)))
    message_id: str | None = None
