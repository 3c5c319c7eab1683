"""Defaults and frozen configuration values."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._names import validate_topic
from ._topics import PersistencePolicy
from .errors import ConfigError

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_DEAD_LETTER",
    "DEFAULT_HANDLER_TIMEOUT",
    "DEFAULT_INBOX_SIZE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_RESTART_WINDOW",
    "DEFAULT_SHUTDOWN_GRACE",
    "UNSET",
    "BusConfig",
    "RateLimit",
    "RetryPolicy",
]

#: "Not given: use the bus's setting", for per-subscription options.
UNSET: Any = object()

#: Actors in the global pool (the seed system's figure).
DEFAULT_POOL_SIZE = 256
#: Messages queued per actor before dispatch waits (backpressure).
DEFAULT_INBOX_SIZE = 1000
#: Restarts of one actor allowed within DEFAULT_RESTART_WINDOW seconds.
DEFAULT_MAX_RESTARTS = 3
DEFAULT_RESTART_WINDOW = 60.0
#: Seconds one handler call may take before it is cancelled (None: no limit).
DEFAULT_HANDLER_TIMEOUT: float | None = 30.0
#: Seconds in-flight handlers get to finish when the bus closes normally.
DEFAULT_SHUTDOWN_GRACE = 10.0
#: Dead-letter topic name template; ``{topic}`` is the original topic.
DEFAULT_DEAD_LETTER = "{topic}.dlq"
#: Largest message body accepted by publish (Kafka's default max is ~1 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_CLIENT_ID = "trio-bus"
#: Seconds the shielded flush of acks may take when the bus is cancelled.
CANCEL_FLUSH_TIMEOUT = 2.0


def at_least(minimum: float, *, integer: bool = False) -> Any:
    """An attrs validator raising :class:`ConfigError` unless the value is a
    finite number (an int when *integer*) >= *minimum*."""

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        kinds = (int,) if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or not math.isfinite(value)
            or value < minimum
        ):
            kind = "an int" if integer else "a number"
            raise ConfigError(f"{attribute.name} must be {kind} >= {minimum}, got {value!r}")

    return check


def positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """An attrs validator raising :class:`ConfigError` unless the value is a
    finite number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{attribute.name} must be a positive number, got {value!r}")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a failing handler call is retried in place before dead-lettering.

    The message stays in its actor while it is retried, so later messages of
    the same aggregate wait behind it and order holds. Delay before attempt
    ``n + 1`` is ``min(max_backoff, backoff * multiplier ** (n - 1))``.

    Attributes:
        max_attempts: Handler calls in all, the first included (1 = no retry).
        backoff: Seconds before the first retry.
        max_backoff: Cap on the delay between attempts.
        multiplier: Growth factor of the delay.
    """

    max_attempts: int = attrs.field(default=3, validator=at_least(1, integer=True))
    backoff: float = attrs.field(default=0.1, validator=at_least(0))
    max_backoff: float = attrs.field(default=5.0, validator=at_least(0))
    multiplier: float = attrs.field(default=2.0, validator=at_least(1))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt *attempt* (1-based)."""
        return float(min(self.max_backoff, self.backoff * self.multiplier ** (attempt - 1)))


def _one_second_of(limit: RateLimit) -> int:
    rate: object = limit.per_second
    if isinstance(rate, int | float) and math.isfinite(rate) and rate > 0:
        return max(1, math.ceil(rate))
    return 1  # per_second's own validator reports the bad value


@attrs.frozen(kw_only=True)
class RateLimit:
    """A publish rate limit: a token bucket of *burst* messages refilled at
    *per_second* messages a second.

    Publishers over the limit wait (nothing is dropped), first come first
    served. Up to *burst* messages go at once after a quiet spell; in any
    span of ``t`` seconds at most ``burst + per_second * t`` are let through
    to the transport (which may still send them in one batch)::

        async with trio_bus.open_bus(
            url, publish_rate=trio_bus.RateLimit(per_second=500, burst=100)
        ) as bus: ...

    Attributes:
        per_second: Messages a second in the long run (> 0).
        burst: Bucket size, in messages (>= 1); default one second's worth.
            It also caps one ``publish_many`` chunk of a limited topic.
    """

    per_second: float = attrs.field(validator=positive)
    burst: int = attrs.field(
        default=attrs.Factory(_one_second_of, takes_self=True),
        validator=at_least(1, integer=True),
    )


def _check_rates(_: object, __: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"publish_rates must be a mapping, not {type(value).__name__}")
    for topic, limit in value.items():
        if not isinstance(topic, str):
            raise ConfigError(f"publish_rates keys must be topic names, not {topic!r}")
        try:
            validate_topic(topic)
        except ValueError as exc:
            raise ConfigError(f"publish_rates: {exc}") from exc
        if limit is not None and not isinstance(limit, RateLimit):
            raise ConfigError(
                f"publish_rates[{topic!r}] must be a RateLimit or None, not {type(limit).__name__}"
            )


def _check_rate(_: object, __: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, RateLimit):
        raise ConfigError(f"publish_rate must be a RateLimit or None, not {type(value).__name__}")


def check_timeout(value: object) -> float | None:
    """A handler timeout: a positive number of seconds, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"handler_timeout must be a positive number or None, not {value!r}")
    return float(value)


def _optional_timeout(_: object, __: attrs.Attribute[Any], value: float | None) -> None:
    check_timeout(value)


@attrs.frozen(kw_only=True)
class BusConfig:
    """The validated settings of one bus (built by :func:`open_bus`)."""

    client_id: str = attrs.field()
    pool_size: int = attrs.field(validator=at_least(1, integer=True))
    inbox_size: int = attrs.field(validator=at_least(1, integer=True))
    max_restarts: int = attrs.field(validator=at_least(0, integer=True))
    restart_window: float = attrs.field(validator=at_least(0))
    handler_timeout: float | None = attrs.field(validator=_optional_timeout)
    retry: RetryPolicy = attrs.field()
    dead_letter: str | Callable[[str], str] = attrs.field()
    shutdown_grace: float = attrs.field(validator=at_least(0))
    max_message_bytes: int = attrs.field(validator=at_least(1, integer=True))
    #: The limit shared by every topic not in ``publish_rates``.
    publish_rate: RateLimit | None = attrs.field(default=None, validator=_check_rate)
    #: Per-topic limits replacing ``publish_rate`` (None: not limited).
    publish_rates: Mapping[str, RateLimit | None] = attrs.field(
        factory=dict, validator=_check_rates
    )
    #: Each topic's persistence mode (shared with the transport).
    persistence: PersistencePolicy = attrs.field(factory=PersistencePolicy)

    @client_id.validator
    def _check_client_id(self, _: object, value: object) -> None:
        if not isinstance(value, str):
            raise ConfigError("client_id must be a str")
        validate_topic(value)  # used as group and stream-consumer name

    @retry.validator
    def _check_retry(self, _: object, value: object) -> None:
        if not isinstance(value, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, not {type(value).__name__}")

    @dead_letter.validator
    def _check_dead_letter(self, _: object, value: object) -> None:
        if not (callable(value) or (isinstance(value, str) and "{topic}" in value)):
            raise ConfigError("dead_letter must be a template containing {topic} or a callable")

    def overridden(self, **given: object) -> BusConfig:
        """This config with the per-subscription options that were given
        (not :data:`UNSET`) swapped in, checked by the same validators."""
        overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not UNSET}
        return attrs.evolve(self, **overrides) if overrides else self

    def dead_letter_topic(self, topic: str) -> str:
        """The dead-letter topic of *topic* (validated)."""
        spec = self.dead_letter
        return validate_topic(spec(topic) if callable(spec) else spec.format(topic=topic))
