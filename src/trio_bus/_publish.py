"""Merging concurrent publishes into shared batches.

For the Kafka and NATS transports one ``publish_batch`` call costs a bridge
crossing (~125 us) plus a broker round trip. Many tasks publishing one
message each would pay that per message; instead each ``publish()`` queues
its record and waits, and one sender task hands everything queued so far to
the transport as one batch. Under load batches grow by themselves; alone, a
publish goes out at once (no linger added here).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from ._message import OutgoingMessage
from .errors import BusClosedError, PublishOutcomeUnknownError
from .transports._base import Transport

__all__ = ["Coalescer", "raise_first_failure"]


@attrs.define(slots=True, eq=False)
class _Pending:
    record: OutgoingMessage
    done: trio.Event = attrs.Factory(trio.Event)
    error: Exception | None = None


class Coalescer:
    """One sender task feeding ``transport.publish_batch`` with whatever
    ``publish()`` calls queued meanwhile."""

    def __init__(self, transport: Transport, *, max_batch: int) -> None:
        self._transport = transport
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._wakeup = trio.lowlevel.ParkingLot()
        self._closed = False

    async def publish(self, record: OutgoingMessage) -> None:
        """Queue *record*; return once the broker accepted it.

        If the caller is cancelled while waiting, the record may still be
        published: its outcome is unknown to the caller.
        """
        if self._closed:
            raise BusClosedError("the bus is closed")
        pending = _Pending(record)
        self._queue.append(pending)
        self._wakeup.unpark()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches until cancelled; then fail whatever is still queued."""
        task_status.started()
        batch: list[_Pending] = []
        try:
            while True:
                while not self._queue:
                    await self._wakeup.park()
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                outcomes = await self._transport.publish_batch([p.record for p in batch])
                for pending, outcome in zip(batch, outcomes, strict=True):
                    pending.error = outcome
                    pending.done.set()
                batch = []
        finally:
            self._closed = True
            for pending in batch:
                pending.error = PublishOutcomeUnknownError(
                    "the bus closed while this publish was in flight"
                )
                pending.done.set()
            for pending in self._queue:
                pending.error = BusClosedError("the bus closed before this publish was sent")
                pending.done.set()
            self._queue.clear()


def raise_first_failure(outcomes: Sequence[BaseException | None]) -> None:
    """Raise the first failure of a batch, noting how many others failed."""
    failures = [o for o in outcomes if o is not None]
    if failures:
        first = failures[0]
        if len(failures) > 1:
            first.add_note(f"{len(failures) - 1} more of {len(outcomes)} messages failed too")
        raise first
