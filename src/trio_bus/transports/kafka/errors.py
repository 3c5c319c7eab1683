"""aiokafka's errors mapped to trio_bus's, at the boundary, chained."""

from __future__ import annotations

import asyncio
from typing import Any

import aiokafka.errors as kafka_errors

from ...errors import (
    PublishError,
    PublishOutcomeUnknownError,
    TransportError,
    TransportUnavailableError,
)

__all__ = ["is_retriable", "publish_error", "retrieve_when_done", "transport_error"]

#: Delivery failures after which the record may or may not be stored.
_UNKNOWN_OUTCOME = (
    kafka_errors.KafkaTimeoutError,
    kafka_errors.RequestTimedOutError,
    kafka_errors.NotEnoughReplicasAfterAppendError,
    kafka_errors.KafkaConnectionError,
)


def publish_error(exc: BaseException, topic: str) -> PublishError:
    """Map an aiokafka delivery failure to trio_bus's error, chained."""
    cls = PublishOutcomeUnknownError if isinstance(exc, _UNKNOWN_OUTCOME) else PublishError
    err = cls(f"publish to {topic!r} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def transport_error(exc: BaseException, what: str) -> TransportError:
    """Map a client failure to :class:`TransportUnavailableError` (the broker
    cannot be reached) or :class:`TransportError`, chained; trio_bus's own
    transport errors pass unchanged."""
    if isinstance(exc, TransportError):
        return exc
    cls = (
        TransportUnavailableError
        if isinstance(exc, kafka_errors.KafkaConnectionError | OSError)
        else TransportError
    )
    err = cls(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def is_retriable(exc: BaseException) -> bool:
    """Whether a failed fetch may simply be tried again: aiokafka marks
    transient broker errors ``retriable``; a lost connection is reopened by
    the client itself."""
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, kafka_errors.KafkaConnectionError
    )


def retrieve_when_done(future: asyncio.Future[Any]) -> None:
    """Mark *future*'s error as seen once it ends: for an abandoned request
    (its answer came too late). An error nobody retrieves is reported when
    the future is collected, and trio-asyncio raises it into the loop."""
    future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
