"""Publish results for users who keep an outbox table.

``bus.open_publish_results()`` returns a trio receive channel of
:class:`PublishResult`, one per message published through the bus
(dead-letter copies excluded), success or not. The stream is bounded; when
the reader falls behind, the policy chosen at opening applies:

* ``"wait"`` (default): the publisher waits until the reader takes the
  result (backpressure: no result is ever lost, publishing slows down);
* ``"drop"``: the result is dropped, counted in ``stream.dropped`` and the
  ``publish_results_dropped`` metric, and logged (once per burst).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import attrs
import trio

from ._message import OutgoingMessage
from ._names import AGGREGATE_ID_HEADER, header_lookup
from .errors import PublishOutcomeUnknownError

__all__ = ["PublishResult", "PublishResultStream", "ResultStreams"]

logger = logging.getLogger("trio_bus.results")

Status = Literal["success", "failure", "unknown"]
FullPolicy = Literal["wait", "drop"]
TENANT_HEADER = "X-Tenant-ID"


@attrs.frozen(kw_only=True)
class PublishResult:
    """The outcome of one publish.

    Attributes:
        event_id: The envelope's ``event_id`` (or the message id), if any.
        topic: Destination topic.
        aggregate_id: The key / aggregate ID, if any.
        tenant_id: From the envelope / ``X-Tenant-ID`` header, if any.
        status: ``"success"`` (stored), ``"failure"`` (refused) or
            ``"unknown"`` (no answer in time, or the caller was cancelled
            while waiting: it may have been stored).
        error: The exception for failure/unknown, else None.
    """

    event_id: str | None
    topic: str
    aggregate_id: str | None
    tenant_id: str | None
    status: Status
    error: BaseException | None = None


def result_for(record: OutgoingMessage, error: BaseException | None) -> PublishResult:
    if error is None:
        status: Status = "success"
    elif isinstance(error, PublishOutcomeUnknownError | trio.Cancelled):
        status = "unknown"
    else:
        status = "failure"
    return PublishResult(
        event_id=record.message_id,
        topic=record.topic,
        aggregate_id=record.key or header_lookup(record.headers, AGGREGATE_ID_HEADER),
        tenant_id=header_lookup(record.headers, TENANT_HEADER),
        status=status,
        error=error,
    )


@attrs.define(eq=False)
class PublishResultStream:
    """One reader's stream; ``receive`` is the channel to read."""

    receive: trio.MemoryReceiveChannel[PublishResult]
    _send: trio.MemorySendChannel[PublishResult] = attrs.field(alias="send")
    tenant_id: str | None
    policy: FullPolicy
    #: Results dropped because the reader was behind (policy "drop").
    dropped: int = 0
    _warned: bool = attrs.field(default=False, alias="warned")


class ResultStreams:
    """The open result streams of a bus."""

    def __init__(self) -> None:
        self.streams: list[PublishResultStream] = []

    def open(
        self, *, tenant_id: str | None, buffer: int, policy: FullPolicy
    ) -> PublishResultStream:
        send, receive = trio.open_memory_channel[PublishResult](buffer)
        stream = PublishResultStream(receive, send, tenant_id, policy)
        self.streams.append(stream)
        return stream

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.streams)

    async def emit(
        self, records: Sequence[OutgoingMessage], outcomes: Sequence[BaseException | None]
    ) -> None:
        for record, outcome in zip(records, outcomes, strict=True):
            result = result_for(record, outcome)
            for stream in list(self.streams):
                if stream.tenant_id is not None and stream.tenant_id != result.tenant_id:
                    continue
                await self._deliver(stream, result)

    async def _deliver(self, stream: PublishResultStream, result: PublishResult) -> None:
        try:
            try:
                stream._send.send_nowait(result)
                stream._warned = False
            except trio.WouldBlock:
                if stream.policy == "wait":
                    try:
                        await stream._send.send(result)
                    except trio.Cancelled:
                        stream.dropped += 1  # the publisher gave up waiting
                        raise
                    return
                stream.dropped += 1
                if not stream._warned:
                    stream._warned = True
                    logger.warning("publish results reader is behind; dropping results")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The reader closed its end: stop feeding it.
            self.streams.remove(stream)

    def close(self) -> None:
        for stream in self.streams:
            stream._send.close()
        self.streams.clear()
