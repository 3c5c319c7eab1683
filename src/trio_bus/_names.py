"""Validation of names that cross the wire: topics, aggregate IDs, headers.

The rules are the subset portable to both Kafka and NATS, so a topic that is
valid here is valid on every transport.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping

from .errors import InvalidAggregateIDError, InvalidInputError, InvalidTopicError

MAX_TOPIC_LENGTH = 249
MAX_AGGREGATE_ID_BYTES = 256
AGGREGATE_ID_HEADER = "X-Aggregate-ID"

_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_AGGREGATE_RE = re.compile(r"[A-Za-z0-9:_\-./]+")


_valid_topics: set[str] = set()
_VALID_TOPICS_CACHE = 4096


def validate_topic(topic: object) -> str:
    """Return *topic* if it is a portable topic name, else raise
    :class:`~trio_bus.errors.InvalidTopicError`."""
    if topic in _valid_topics:
        return topic
    if not isinstance(topic, str):
        raise InvalidTopicError(f"topic must be a str, not {type(topic).__name__}")
    if not 1 <= len(topic) <= MAX_TOPIC_LENGTH:
        raise InvalidTopicError(
            f"topic must have 1-{MAX_TOPIC_LENGTH} characters, got {len(topic)}"
        )
    if _TOPIC_RE.fullmatch(topic) is None:
        raise InvalidTopicError(
            f"invalid topic {topic!r}: use [A-Za-z0-9._-] with no empty dot-separated token"
        )
    if len(_valid_topics) < _VALID_TOPICS_CACHE:
        _valid_topics.add(topic)
    return topic


_normalized: dict[str, str | None] = {}
_NORMALIZED_CACHE = 65536


def normalize_aggregate_id(value: str) -> str | None:
    """Trim *value* and return it if it is a valid aggregate ID, else None.

    Results are cached: the same few aggregates come back message after
    message.
    """
    try:
        return _normalized[value]
    except KeyError:
        pass
    result = _normalize(value)
    if len(_normalized) >= _NORMALIZED_CACHE:
        _normalized.clear()
    _normalized[value] = result
    return result


def _normalize(value: str) -> str | None:
    value = value.strip()
    if (
        value
        and len(value.encode()) <= MAX_AGGREGATE_ID_BYTES
        and _AGGREGATE_RE.fullmatch(value) is not None
    ):
        return value
    return None


def validate_aggregate_id(value: object) -> str:
    """Return the trimmed aggregate ID or raise
    :class:`~trio_bus.errors.InvalidAggregateIDError`."""
    if not isinstance(value, str):
        raise InvalidAggregateIDError(f"aggregate ID must be a str, not {type(value).__name__}")
    normalized = normalize_aggregate_id(value)
    if normalized is None:
        raise InvalidAggregateIDError(
            f"invalid aggregate ID {value!r}: 1-{MAX_AGGREGATE_ID_BYTES} bytes "
            "of [A-Za-z0-9:_-./] after trimming"
        )
    return normalized


def validate_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Copy *headers* into a plain dict, checking every key and value is a
    non-control str (both Kafka and NATS headers must survive the trip)."""
    if not headers:
        return {}
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidInputError(f"header {name!r}: names and values must be str")
        if not name or any(c in name for c in ": \r\n\t") or not name.isprintable():
            raise InvalidInputError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value:
            raise InvalidInputError(f"header {name!r}: value has a line break")
        out[name] = value
    return out


def header_lookup(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup (HTTP-style header names)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def stable_hash(aggregate_id: str) -> int:
    """Hash of an aggregate ID that is the same in every process.

    Python's ``hash()`` is salted per process; routing must not be.
    """
    return zlib.crc32(aggregate_id.encode())
