"""The envelope codec: seed-system wire compatibility and validation."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from trio_bus import Envelope, decode_envelope, encode_envelope
from trio_bus._envelope import uuid7
from trio_bus.errors import EnvelopeError

# What the Go system's encoding/json emits for its Envelope (RFC 3339 with
# nanoseconds and an offset; payload embedded as JSON; empty tenant omitted).
GO_ENVELOPE = (
    b'{"event_id":"evt-1","aggregate_id":"order-42","event_type":"OrderPlaced",'
    b'"event_version":2,"timestamp":"2024-05-06T07:08:09.123456789+08:00",'
    b'"trace_id":"tr-1","correlation_id":"co-1","payload":{"total":12.5,"items":[1,2]}}'
)


def test_decodes_go_envelope_with_nanoseconds() -> None:
    env = decode_envelope(GO_ENVELOPE)
    assert env.event_id == "evt-1"
    assert env.aggregate_id == "order-42"
    assert env.event_version == 2
    assert env.timestamp == dt.datetime(
        2024, 5, 6, 7, 8, 9, 123457, tzinfo=dt.timezone(dt.timedelta(hours=8))
    )
    assert env.tenant_id == ""
    assert json.loads(env.payload) == {"total": 12.5, "items": [1, 2]}
    assert env.decode_payload() == {"total": 12.5, "items": [1, 2]}


def test_round_trip_keeps_payload_raw_and_omits_empty_fields() -> None:
    env = Envelope.new(aggregate_id="a-1", event_type="T", payload=b'{"x": [1, 2]}')
    data = encode_envelope(env)
    fields = json.loads(data)
    assert fields["payload"] == {"x": [1, 2]}
    assert "tenant_id" not in fields
    assert set(fields) == {
        "event_id",
        "aggregate_id",
        "event_type",
        "event_version",
        "timestamp",
        "payload",
    }
    assert b'{"x": [1, 2]}' in data  # embedded verbatim, not re-encoded
    assert decode_envelope(data) == env


def test_new_fills_id_version_and_time() -> None:
    before = dt.datetime.now(dt.UTC)
    env = Envelope.new(aggregate_id="a", event_type="T", payload={"k": 1}, tenant_id="t1")
    assert env.event_version == 1
    assert env.timestamp >= before
    assert env.payload == b'{"k":1}'
    assert env.headers() == {
        "X-Event-ID": env.event_id,
        "X-Aggregate-ID": "a",
        "X-Event-Type": "T",
        "X-Event-Version": "1",
        "X-Tenant-ID": "t1",
    }


def test_uuid7_is_version_7_and_time_ordered() -> None:
    first = uuid7()
    time.sleep(0.002)
    second = uuid7()
    assert first[14] == "7"
    assert first[19] in "89ab"
    assert first < second


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"event_type": " "}, "event_type"),
        ({"aggregate_id": ""}, "aggregate_id"),
        ({"aggregate_id": "has space"}, "aggregate_id"),
        ({"aggregate_id": "x" * 257}, "aggregate_id"),
        ({"event_version": 0}, "event_version"),
        ({"payload": b""}, "payload"),
        ({"payload": b"{not json"}, "JSON"),
        ({"payload": object()}, "JSON"),
        ({"timestamp": dt.datetime(2024, 1, 1)}, "timezone"),
        ({"event_id": " "}, "event_id"),
    ],
)
def test_validation_rejects(kwargs: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {"aggregate_id": "a", "event_type": "T", "payload": {"x": 1}}
    args.update(kwargs)
    with pytest.raises(EnvelopeError, match=reason):
        Envelope.new(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"event_id": "x"}',
        GO_ENVELOPE.replace(b'"event_version":2', b'"event_version":0'),
        GO_ENVELOPE.replace(b"+08:00", b""),
        GO_ENVELOPE.replace(b'"order-42"', b'"order 42"'),
    ],
)
def test_decode_rejects_malformed(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_envelope(data)


@pytest.mark.parametrize("payload", [b"not json", bytearray(b"{"), b'{"a": 1} trailing'])
def test_constructor_rejects_payload_that_is_not_json(payload: bytes) -> None:
    # Accepted, it would be sent as a body that every consumer dead-letters.
    with pytest.raises(EnvelopeError, match="not valid JSON"):
        Envelope(event_id="e-1", aggregate_id="a-1", event_type="T", payload=payload)


def test_constructor_rejects_payload_that_cannot_be_json() -> None:
    with pytest.raises(EnvelopeError, match="JSON"):
        Envelope(event_id="e-1", aggregate_id="a-1", event_type="T", payload=object())


def test_decoded_payload_is_plain_bytes() -> None:
    env = decode_envelope(GO_ENVELOPE)
    assert type(env.payload) is bytes
    assert env == decode_envelope(encode_envelope(env))
