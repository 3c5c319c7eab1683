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
#: Most headers a message from the wire may carry (see check_wire_headers).
MAX_WIRE_HEADERS = 64
#: Most bytes of header names plus values a message from the wire may carry.
MAX_WIRE_HEADER_BYTES = 16 * 1024

_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_AGGREGATE_RE = re.compile(r"[A-Za-z0-9:_\-./]+")


_valid_topics: set[str] = set()
_VALID_TOPICS_CACHE = 4096


def validate_topic(topic: object) -> str:
    """Return *topic* if it is a portable topic name, else raise
    :class:`~trio_bus.errors.InvalidTopicError`."""
    if not isinstance(topic, str):
        raise InvalidTopicError(f"topic must be a str, not {type(topic).__name__}")
    if not 1 <= len(topic) <= MAX_TOPIC_LENGTH:
        raise InvalidTopicError(
            f"topic must have 1-{MAX_TOPIC_LENGTH} characters, got {len(topic)}"
        )
    if topic in _valid_topics:
        return topic
    if _TOPIC_RE.fullmatch(topic) is None:
        raise InvalidTopicError(
            f"invalid topic {topic!r}: use [A-Za-z0-9._-] with no empty dot-separated token"
        )
    if len(_valid_topics) < _VALID_TOPICS_CACHE:
        _valid_topics.add(topic)
    return topic


#: Cache of valid, already-trimmed aggregate IDs (each maps to itself). Only
#: valid IDs are cached, so wire input cannot fill it with junk, and it is
#: bounded both in entries and in characters (IDs are ASCII: 1 char = 1 byte).
_normalized: dict[str, str] = {}
_normalized_chars = 0
NORMALIZED_CACHE_ENTRIES = 65536
NORMALIZED_CACHE_BYTES = 4 * 1024 * 1024


def normalize_aggregate_id(value: str) -> str | None:
    """Trim *value* and return it if it is a valid aggregate ID, else None.

    Valid results are cached (the same few aggregates come back message
    after message); the cache holds at most ``NORMALIZED_CACHE_ENTRIES`` IDs
    and ``NORMALIZED_CACHE_BYTES`` bytes, and is emptied when either fills.
    """
    global _normalized_chars
    cached = _normalized.get(value)
    if cached is not None:
        return cached
    result = _normalize(value)
    if result is not None and result == value:  # padded variants are not cached
        if (
            len(_normalized) >= NORMALIZED_CACHE_ENTRIES
            or _normalized_chars + len(result) > NORMALIZED_CACHE_BYTES
        ):
            _normalized.clear()
            _normalized_chars = 0
        _normalized[result] = result
        _normalized_chars += len(result)
    return result


def normalized_cache_size() -> tuple[int, int]:
    """``(entries, bytes)`` held by the aggregate-ID cache (for tests and
    monitoring)."""
    return len(_normalized), _normalized_chars


def _normalize(value: str) -> str | None:
    value = value.strip()
    # The pattern is ASCII only, so characters = bytes: checking the length
    # first rejects a huge ID without encoding or scanning it.
    if 0 < len(value) <= MAX_AGGREGATE_ID_BYTES and _AGGREGATE_RE.fullmatch(value) is not None:
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
    valid = _valid_header_names
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidInputError(f"header {name!r}: names and values must be str")
        if name not in valid:
            if not name or any(c in name for c in ": \r\n\t") or not name.isprintable():
                raise InvalidInputError(f"invalid header name {name!r}")
            if len(valid) < _VALID_HEADER_NAMES_CACHE and len(name) <= 256:
                valid.add(name)
        if "\r" in value or "\n" in value:
            raise InvalidInputError(f"header {name!r}: value has a line break")
        out[name] = value
    return out


#: Header names already checked (a publisher sends the same few names again
#: and again); bounded in entries and name length.
_valid_header_names: set[str] = set()
_VALID_HEADER_NAMES_CACHE = 4096


def check_wire_headers(headers: Mapping[str, str]) -> str | None:
    """Return why *headers* of a message from the wire are over the limits,
    or None if they are within them.

    A broker accepts far more than a handler should ever have to hold
    (Kafka: any number of headers up to the record size; NATS: up to
    ``max_payload``). The bus dead-letters a message over these limits with
    the returned reason instead of handing it on: at most
    ``MAX_WIRE_HEADERS`` headers and ``MAX_WIRE_HEADER_BYTES`` bytes of
    names plus values (UTF-8, a stray surrogate counting three bytes).
    The limits leave room for the dead-letter headers the bus adds.
    """
    if not headers:
        return None
    if len(headers) > MAX_WIRE_HEADERS:
        return f"{len(headers)} headers, more than the limit of {MAX_WIRE_HEADERS}"
    # Fast path (every message comes here): a character is at most 4 bytes.
    if 4 * sum(len(name) + len(value) for name, value in headers.items()) <= MAX_WIRE_HEADER_BYTES:
        return None
    total = 0
    for name, value in headers.items():
        total += len(name.encode("utf-8", "surrogatepass"))
        total += len(value.encode("utf-8", "surrogatepass"))
        if total > MAX_WIRE_HEADER_BYTES:
            return f"headers exceed the limit of {MAX_WIRE_HEADER_BYTES} bytes"
    return None


#: Per tuple of header names seen on the wire: the characters of the names,
#: and the name that is ``X-Aggregate-ID`` in any case (or None). Messages of
#: one producer share their names, so names are case-folded once per set,
#: not per message. Bounded like the aggregate-ID cache; only short name
#: sets are kept.
_name_facts: dict[tuple[str, ...], tuple[int, str | None]] = {}
NAME_FACTS_ENTRIES = 1024
NAME_FACTS_CHARS = 1024
_AGGREGATE_LOWER = AGGREGATE_ID_HEADER.lower()


def header_names(headers: Mapping[str, str]) -> tuple[int, str | None]:
    """``(characters of all header names, the name that is X-Aggregate-ID
    in any case or None)`` of a non-empty *headers*, cached per name set."""
    names = tuple(headers)
    facts = _name_facts.get(names)
    if facts is None:
        chars = sum(map(len, names))
        # The exact spelling wins over other cases (as in header_lookup).
        alias = (
            AGGREGATE_ID_HEADER
            if AGGREGATE_ID_HEADER in headers
            else next((n for n in names if n.lower() == _AGGREGATE_LOWER), None)
        )
        facts = (chars, alias)
        if chars <= NAME_FACTS_CHARS:
            if len(_name_facts) >= NAME_FACTS_ENTRIES:
                _name_facts.clear()
            _name_facts[names] = facts
    return facts


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
