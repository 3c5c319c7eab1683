"""The event envelope, wire-compatible with the seed system's JSON envelope.

:class:`Envelope` is an attrs value; the wire codec lives beside it in
functions over a private msgspec struct, because attrs is not a serialization
system. The payload stays raw JSON bytes end to end: it is validated once
when an envelope is built from user input, and never re-parsed on the way
through the bus.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from typing import Any

import attrs
import msgspec

from ._names import AGGREGATE_ID_HEADER, normalize_aggregate_id
from .errors import EnvelopeError

__all__ = ["ENVELOPE_HEADERS", "Envelope", "decode_envelope", "encode_envelope"]

#: Header names carrying the envelope's metadata beside the body (seed system
#: convention), so brokers and tools can route and filter without decoding.
ENVELOPE_HEADERS = {
    "event_id": "X-Event-ID",
    "aggregate_id": AGGREGATE_ID_HEADER,
    "event_type": "X-Event-Type",
    "event_version": "X-Event-Version",
    "trace_id": "X-Trace-ID",
    "correlation_id": "X-Correlation-ID",
    "tenant_id": "X-Tenant-ID",
}


class _Wire(msgspec.Struct, kw_only=True, omit_defaults=True):
    # Field order and names follow the Go struct's JSON tags.
    event_id: str
    aggregate_id: str
    event_type: str
    event_version: int
    timestamp: _dt.datetime
    trace_id: str = ""
    correlation_id: str = ""
    tenant_id: str = ""
    payload: msgspec.Raw = msgspec.Raw(b"")


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Wire)
_any_decoder = msgspec.json.Decoder()


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562) string: sortable event ids."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _check_timestamp(_: object, __: object, value: _dt.datetime) -> None:
    if value.tzinfo is None:
        raise EnvelopeError("timestamp must be timezone-aware (RFC 3339 with offset)")


class _CheckedJSON(bytes):
    """Payload bytes already parsed as JSON (by :func:`decode_envelope`):
    the consume path checks each body once, not twice."""

    __slots__ = ()


def _to_payload(value: object) -> bytes:
    # Bytes from the user are checked here, at construction: an envelope with
    # a non-JSON payload would encode into a body every consumer dead-letters.
    if isinstance(value, _CheckedJSON):
        return bytes(value)
    if isinstance(value, bytes | bytearray | memoryview | msgspec.Raw):
        data = bytes(value)
        if data.strip():  # blank: reported by _validate as "payload is empty"
            try:
                _any_decoder.decode(data)
            except msgspec.DecodeError as exc:
                raise EnvelopeError(f"payload is not valid JSON: {exc}") from None
        return data
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise EnvelopeError(f"payload cannot be encoded as JSON: {exc}") from None


def _validate(env: Envelope) -> None:
    if not env.event_id.strip():
        raise EnvelopeError("event_id is blank")
    if not env.event_type.strip():
        raise EnvelopeError("event_type is blank")
    if env.event_version <= 0:
        raise EnvelopeError(f"event_version must be > 0, got {env.event_version}")
    if normalize_aggregate_id(env.aggregate_id) != env.aggregate_id:
        raise EnvelopeError(f"invalid aggregate_id {env.aggregate_id!r}")
    if not env.payload.strip():
        raise EnvelopeError("payload is empty")


@attrs.frozen(kw_only=True)
class Envelope:
    """A domain event with the metadata the seed system puts around it.

    Build one with :meth:`Envelope.new`, which fills ``event_id`` (UUIDv7),
    ``event_version`` (1) and ``timestamp``. The constructor validates every
    field: a *payload* given as bytes must be valid JSON, anything else is
    encoded as JSON, else :class:`~trio_bus.errors.EnvelopeError`::

        env = Envelope.new(
            aggregate_id="order-42", event_type="OrderPlaced", payload={"total": 5}
        )
        await bus.publish_envelope("orders", env)

    Attributes:
        event_id: Unique id of the event; NATS deduplicates publishes by it.
        aggregate_id: The entity the event belongs to; orders handling.
        event_type: What happened, e.g. ``"OrderPlaced"``.
        event_version: Schema version of the payload, > 0.
        timestamp: When it happened, timezone-aware.
        trace_id: Optional tracing id.
        correlation_id: Optional id tying a conversation together.
        tenant_id: Optional tenant; omitted from the JSON when empty.
        payload: The event body as raw JSON bytes, kept undecoded.
    """

    event_id: str
    aggregate_id: str
    event_type: str
    event_version: int = attrs.field(default=1)
    timestamp: _dt.datetime = attrs.field(factory=_utcnow, validator=_check_timestamp)
    trace_id: str = ""
    correlation_id: str = ""
    tenant_id: str = ""
    payload: bytes = attrs.field(converter=_to_payload)

    def __attrs_post_init__(self) -> None:
        _validate(self)

    @classmethod
    def new(
        cls,
        *,
        aggregate_id: str,
        event_type: str,
        payload: object,
        event_version: int = 1,
        trace_id: str = "",
        correlation_id: str = "",
        tenant_id: str = "",
        event_id: str | None = None,
        timestamp: _dt.datetime | None = None,
    ) -> Envelope:
        """Build a validated envelope, generating what the caller leaves out.

        *payload* is JSON bytes (checked to be valid JSON) or any object
        msgspec can encode as JSON.
        """
        return cls(
            event_id=event_id if event_id is not None else uuid7(),
            aggregate_id=aggregate_id,
            event_type=event_type,
            event_version=event_version,
            timestamp=timestamp if timestamp is not None else _utcnow(),
            trace_id=trace_id,
            correlation_id=correlation_id,
            tenant_id=tenant_id,
            payload=payload,
        )

    def decode_payload(self, type: type[Any] = object) -> Any:  # noqa: A002 - msgspec's name
        """Decode the JSON payload, optionally into *type* (any type msgspec
        supports: a ``msgspec.Struct``, a dataclass, an attrs class...)."""
        return msgspec.json.decode(self.payload, type=type)

    def headers(self) -> dict[str, str]:
        """The envelope's metadata as transport headers (``X-Event-ID``...)."""
        out = {
            "X-Event-ID": self.event_id,
            AGGREGATE_ID_HEADER: self.aggregate_id,
            "X-Event-Type": self.event_type,
            "X-Event-Version": str(self.event_version),
        }
        for field in ("trace_id", "correlation_id", "tenant_id"):
            value = getattr(self, field)
            if value:
                out[ENVELOPE_HEADERS[field]] = value
        return out


def encode_envelope(env: Envelope) -> bytes:
    """Encode *env* as the seed system's JSON envelope."""
    return _encoder.encode(
        _Wire(
            event_id=env.event_id,
            aggregate_id=env.aggregate_id,
            event_type=env.event_type,
            event_version=env.event_version,
            timestamp=env.timestamp,
            trace_id=env.trace_id,
            correlation_id=env.correlation_id,
            tenant_id=env.tenant_id,
            payload=msgspec.Raw(env.payload),
        )
    )


def decode_envelope(data: bytes) -> Envelope:
    """Decode and validate a JSON envelope.

    Raises:
        EnvelopeError: the bytes are not a valid envelope; the message says why.
    """
    try:
        wire = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EnvelopeError(f"malformed envelope: {exc}") from None
    try:
        return Envelope(
            event_id=wire.event_id,
            aggregate_id=wire.aggregate_id,
            event_type=wire.event_type,
            event_version=wire.event_version,
            timestamp=wire.timestamp,
            trace_id=wire.trace_id,
            correlation_id=wire.correlation_id,
            tenant_id=wire.tenant_id,
            payload=_CheckedJSON(wire.payload),
        )
    except EnvelopeError as exc:
        raise EnvelopeError(f"invalid envelope: {exc}") from None
