"""Names that cross the wire: bounded caches and wire-header limits."""

from __future__ import annotations

import pytest

from trio_bus import _names
from trio_bus._names import (
    MAX_AGGREGATE_ID_BYTES,
    MAX_WIRE_HEADER_BYTES,
    MAX_WIRE_HEADERS,
    check_wire_headers,
    normalize_aggregate_id,
    normalized_cache_size,
    validate_topic,
)
from trio_bus.errors import InvalidTopicError


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    _names._normalized.clear()
    _names._normalized_chars = 0


def test_invalid_ids_are_not_cached() -> None:
    huge = "x" * 1_000_000
    for i in range(50):
        assert normalize_aggregate_id(f"{i}{huge}") is None
        assert normalize_aggregate_id(f"bad id {i}") is None
        assert normalize_aggregate_id(f"  order-{i}  ") == f"order-{i}"  # padded: not cached
    assert normalized_cache_size() == (0, 0)


def test_valid_ids_are_cached_and_returned_as_is() -> None:
    assert normalize_aggregate_id("order-1") == "order-1"
    assert normalize_aggregate_id("order-1") == "order-1"
    assert normalized_cache_size() == (1, len("order-1"))
    longest = "a" * MAX_AGGREGATE_ID_BYTES
    assert normalize_aggregate_id(longest) == longest
    assert normalize_aggregate_id(longest + "a") is None
    assert normalize_aggregate_id("é") is None  # non-ASCII never matches


def test_cache_is_bounded_in_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_names, "NORMALIZED_CACHE_ENTRIES", 10)
    for i in range(35):
        assert normalize_aggregate_id(f"id-{i}") == f"id-{i}"
        assert normalized_cache_size()[0] <= 10


def test_cache_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_names, "NORMALIZED_CACHE_BYTES", 1000)
    for i in range(100):
        value = f"{i:03d}" + "z" * (MAX_AGGREGATE_ID_BYTES - 3)
        assert normalize_aggregate_id(value) == value
        assert normalized_cache_size()[1] <= 1000


def test_validate_topic_rejects_unhashable_with_a_typed_error() -> None:
    with pytest.raises(InvalidTopicError):
        validate_topic(["orders"])
    assert validate_topic("orders") == "orders"


def test_wire_headers_within_limits() -> None:
    assert check_wire_headers({}) is None
    assert check_wire_headers({f"h{i}": "v" for i in range(MAX_WIRE_HEADERS)}) is None
    assert check_wire_headers({"h": "v" * (MAX_WIRE_HEADER_BYTES - 1)}) is None


def test_wire_headers_too_many() -> None:
    reason = check_wire_headers({f"h{i}": "" for i in range(MAX_WIRE_HEADERS + 1)})
    assert reason is not None
    assert str(MAX_WIRE_HEADERS) in reason


def test_wire_headers_too_big_counts_utf8_bytes() -> None:
    # 2-byte characters: within the limit in characters, over it in bytes.
    value = "é" * (MAX_WIRE_HEADER_BYTES // 2 + 1)
    reason = check_wire_headers({"h": value})
    assert reason is not None
    assert str(MAX_WIRE_HEADER_BYTES) in reason
    assert check_wire_headers({"h": "\ud800" * 10}) is None  # stray surrogates do not raise
