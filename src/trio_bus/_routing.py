"""Aggregate-ID extraction: which aggregate a delivery belongs to.

Transports give hints (headers, key, subject); the envelope, when the body is
one, has the last word.
"""

from __future__ import annotations

from ._envelope import Envelope, decode_envelope
from ._message import Record
from ._names import (
    AGGREGATE_ID_HEADER,
    MAX_WIRE_HEADER_BYTES,
    MAX_WIRE_HEADERS,
    check_wire_headers,
    header_names,
    normalize_aggregate_id,
)
from .errors import EnvelopeError, HeaderLimitError, InvalidAggregateIDError

__all__ = ["classify"]


def _subject_aggregate(subject: str, topic: str) -> str | None:
    if len(subject) <= len(topic) + 1 or not subject.startswith(topic + "."):
        return None
    for token in reversed(subject[len(topic) + 1 :].split(".")):
        agg = normalize_aggregate_id(token)
        if agg is not None:
            return agg
    return None


def classify(
    record: Record, *, wants_envelope: bool
) -> tuple[str | None, Envelope | None, Exception | None]:
    """Extract ``(aggregate_id, envelope, rejection)`` from a delivery.

    Order: envelope ``aggregate_id`` > header ``X-Aggregate-ID`` (any case)
    > key > last valid token of the subject after the topic. An aggregate ID
    given explicitly but invalid makes the message malformed (rejection);
    so does a body that is not a valid envelope when *wants_envelope*, and
    headers over the wire limits (checked first: the lookup scans them).
    """
    headers = record.headers
    alias: str | None = None
    if headers:
        names_chars, alias = header_names(headers)
        # A character is at most 4 bytes: most messages end the check here.
        if (
            len(headers) > MAX_WIRE_HEADERS
            or 4 * (names_chars + sum(map(len, headers.values()))) > MAX_WIRE_HEADER_BYTES
        ):
            reason = check_wire_headers(headers)
            if reason is not None:
                return None, None, HeaderLimitError(reason)
    envelope: Envelope | None = None
    envelope_error: Exception | None = None
    if record.value[:1] == b"{":
        try:
            envelope = decode_envelope(record.value)
        except EnvelopeError as exc:
            envelope_error = exc
    rejection: Exception | None = None
    if envelope is not None:
        aggregate: str | None = envelope.aggregate_id
    else:
        raw = headers[alias] if alias is not None else None
        source = "header " + AGGREGATE_ID_HEADER
        if raw is None:
            raw, source = record.key, "key"
        if raw is not None:
            aggregate = normalize_aggregate_id(raw)
            if aggregate is None:
                rejection = InvalidAggregateIDError(f"invalid aggregate ID in {source}: {raw!r}")
        else:
            aggregate = _subject_aggregate(record.subject, record.topic)
        if wants_envelope and rejection is None:
            rejection = envelope_error or EnvelopeError("body is not a JSON envelope")
    return aggregate, envelope, rejection
