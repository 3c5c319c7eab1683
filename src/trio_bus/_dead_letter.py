"""Dead-lettering: the ``X-DLQ-*`` headers, which failures skip the
retries, and publishing until the message is parked."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ._config import RetryPolicy
from ._message import OutgoingMessage, Record
from ._names import AGGREGATE_ID_HEADER
from .errors import HeaderLimitError, InvalidAggregateIDError, NonRetryableError

__all__ = ["is_non_retryable", "park"]

logger = logging.getLogger("trio_bus.pool")

PublishOne = Callable[[OutgoingMessage], Awaitable[None]]

#: Headers on a dead-lettered message (plus the original headers).
DLQ_ERROR_TYPE = "X-DLQ-Error-Type"
DLQ_ERROR_MESSAGE = "X-DLQ-Error-Message"
#: The failure's ``__cause__`` (else unsuppressed ``__context__``), if any.
DLQ_CAUSE_TYPE = "X-DLQ-Cause-Type"
DLQ_CAUSE_MESSAGE = "X-DLQ-Cause-Message"
DLQ_ATTEMPTS = "X-DLQ-Attempts"
DLQ_ORIGINAL_TOPIC = "X-DLQ-Original-Topic"
DLQ_ORIGINAL_PARTITION = "X-DLQ-Original-Partition"
DLQ_ORIGINAL_OFFSET = "X-DLQ-Original-Offset"
DLQ_ORIGINAL_SUBJECT = "X-DLQ-Original-Subject"
DLQ_ORIGINAL_AGGREGATE_ID = "X-DLQ-Original-Aggregate-ID"
_MAX_ERROR_MESSAGE = 1000


def is_non_retryable(exc: BaseException) -> bool:
    """Whether *exc* is, contains (an exception group, e.g. from a nursery
    in the handler) or was raised from or while handling a
    :class:`NonRetryableError`: the cause/context graph is searched, except
    a context hidden by ``raise ... from None``."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if isinstance(current, NonRetryableError):
            return True
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        if current.__cause__ is not None:
            todo.append(current.__cause__)
        # Only "raise ... from None" (suppressed, no cause) disowns the context.
        hidden = current.__suppress_context__ and current.__cause__ is None
        if current.__context__ is not None and not hidden:
            todo.append(current.__context__)
    return False


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_MAX_ERROR_MESSAGE]


def dead_letter_headers(
    record: Record, exc: BaseException, attempts: int, *, rejected: bool = False
) -> dict[str, str]:
    """The original headers plus the ``X-DLQ-*`` ones describing *exc*
    (*rejected*: the message was malformed and never reached a handler)."""
    # Headers over the wire limits are not carried along: they are the
    # reason, and would make the dead-letter publish fail too.
    headers = {} if isinstance(exc, HeaderLimitError) else dict(record.headers)
    headers[DLQ_ERROR_TYPE] = type(exc).__name__
    headers[DLQ_ERROR_MESSAGE] = _one_line(str(exc))
    cause = exc.__cause__
    if cause is None and not exc.__suppress_context__:
        cause = exc.__context__
    if cause is not None:
        headers[DLQ_CAUSE_TYPE] = type(cause).__name__
        headers[DLQ_CAUSE_MESSAGE] = _one_line(str(cause))
    headers[DLQ_ATTEMPTS] = str(attempts)
    headers[DLQ_ORIGINAL_TOPIC] = record.topic
    headers[DLQ_ORIGINAL_OFFSET] = str(record.offset)
    if record.partition is not None:
        headers[DLQ_ORIGINAL_PARTITION] = str(record.partition)
    if record.subject != record.topic:
        headers[DLQ_ORIGINAL_SUBJECT] = record.subject
    if rejected and isinstance(exc, InvalidAggregateIDError):
        # Keep the bad aggregate ID for people, out of the bus's way.
        for name in [h for h in headers if h.lower() == AGGREGATE_ID_HEADER.lower()]:
            headers[DLQ_ORIGINAL_AGGREGATE_ID] = headers.pop(name)
    return headers


async def park(
    publish: PublishOne,
    record: Record,
    exc: BaseException,
    *,
    topic: str,
    aggregate_id: str | None,
    attempts: int,
    retry: RetryPolicy,
    rejected: bool = False,
) -> None:
    """Publish *record* to the dead-letter *topic*; retry the publish until
    it succeeds (the caller acks the message only after it is parked)."""
    out = OutgoingMessage(
        topic=topic,
        value=record.value,
        # Same aggregate, same actor and partition: the DLQ keeps order.
        key=aggregate_id,
        headers=dead_letter_headers(record, exc, attempts, rejected=rejected),
    )
    delay = retry.backoff or 0.1
    while True:
        try:
            await publish(out)
        except Exception:
            logger.warning(
                "dead-lettering to %s failed; retrying in %.2fs", topic, delay, exc_info=True
            )
            await trio.sleep(delay)
            delay = min(delay * 2, retry.max_backoff or 5.0)
        else:
            break
    logger.warning(
        "dead-lettered %s offset %s to %s after %d attempts: %s: %s",
        record.topic,
        record.offset,
        topic,
        attempts,
        type(exc).__name__,
        exc,
    )
