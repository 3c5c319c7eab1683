"""Topic provisioning policy shared by the broker transports.

Both Kafka and NATS apply the same rules when a topic (Kafka topic,
JetStream stream) is first used: a *strategy* says whether the transport may
create or change it, and a *mismatch action* says what happens when the
broker's real configuration differs from the options. The validators here
are the ones every transport options class uses, so a bad value fails the
same way (a :class:`~trio_bus.errors.ConfigError` naming the field)
whatever the transport.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import attrs

from .._config import positive
from ..errors import ConfigError, TopicConfigError

__all__ = [
    "MismatchAction",
    "TopicStrategy",
    "TOPIC_STRATEGIES",
    "MISMATCH_ACTIONS",
    "int_at_least",
    "mismatch",
    "non_negative",
    "one_of",
    "optional",
    "optional_positive",
]

#: ``create_only``: create a missing topic, never change an existing one;
#: ``create_or_update``: also update what may change on a live topic;
#: ``validate_only``: never create or change, only compare;
#: ``skip``: touch nothing (no admin calls).
TopicStrategy = Literal["create_only", "create_or_update", "validate_only", "skip"]
#: ``warn``: log the difference and go on; ``fail``: raise TopicConfigError.
MismatchAction = Literal["warn", "fail"]
TOPIC_STRATEGIES: tuple[TopicStrategy, ...] = (
    "create_only",
    "create_or_update",
    "validate_only",
    "skip",
)
MISMATCH_ACTIONS: tuple[MismatchAction, ...] = ("warn", "fail")

Validator = Callable[[object, "attrs.Attribute[Any]", object], None]


def one_of(*choices: object) -> Validator:
    """An attrs validator accepting only *choices*."""

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {choices!r}, got {value!r}")

    return check


def int_at_least(minimum: int) -> Validator:
    """An attrs validator accepting ints (not bools) >= *minimum*."""

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{attribute.name} must be an int >= {minimum}, got {value!r}")

    return check


def non_negative(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """An attrs validator accepting numbers >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{attribute.name} must be a number >= 0, got {value!r}")


def optional(inner: Validator) -> Validator:
    """*inner*, or None."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            inner(instance, attribute, value)

    return check


optional_positive: Validator = optional(positive)


def mismatch(
    action: MismatchAction,
    message: str,
    *,
    logger: logging.Logger,
    cause: BaseException | None = None,
) -> None:
    """Apply the mismatch action to one difference between a topic's options
    and the broker: raise :class:`~trio_bus.errors.TopicConfigError` on
    ``"fail"``, log a warning on ``"warn"``."""
    if action == "fail":
        raise TopicConfigError(message) from cause
    logger.warning("%s", message)
