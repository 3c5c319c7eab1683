"""One subscription as the core sees it (the Trio side of a group).

Everything here runs in Trio. Records arrive through the subscription's
:class:`~.._bridge.Handoff`, filled by the group's poll loop; acks and
releases leave through the group's :class:`~.._bridge.Mailbox`; every other
question (flush, lanes, close) is one ``bridge.call``. The only state this
side owns is which records it holds (to release them on close) and which
lanes it released a record of (their queued records must not be handed
out: the lane is rewound to the released record, rule 7 of the contract).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from ..._message import Record
from ...errors import BusClosedError, TransportError
from .._base import Consumer, ConsumerSpec, LaneState
from .._bridge import Bridge, Handoff
from .flow import Release
from .offsets import PartitionTrack

if TYPE_CHECKING:
    from .group import Group

__all__ = ["KafkaConsumer"]

logger = logging.getLogger("trio_bus.transports.kafka")


class KafkaConsumer(Consumer):
    """A subscription of one topic in one consumer group.

    Attributes:
        spec: What was subscribed.
        topic: ``spec.topic``.
        handoff: Records from the group's poll loop, not fetched yet.
    """

    def __init__(
        self,
        group: Group,
        spec: ConsumerSpec,
        bridge: Bridge,
        *,
        close_group: Callable[[str], Awaitable[None]],
    ) -> None:
        self.spec = spec
        self.topic = spec.topic
        self.handoff: Handoff[Record] = Handoff()
        self._group = group
        self._settles = group.settles
        self._bridge = bridge
        self._close_group = close_group
        self._held: set[Record] = set()
        #: Tracks (lanes) with a record this side released: until the poll
        #: loop rewinds them, their queued records are released unfetched.
        self._rewinding: set[PartitionTrack] = set()
        self.closed = False

    async def fetch(self, max_records: int) -> Sequence[Record]:
        """Wait for records of this subscription; return up to *max_records*.

        Cancel-atomic (a cancelled fetch took nothing).

        Raises:
            BusClosedError: the subscription or its group closed.
            TransportError: the group failed.
        """
        if self.closed:
            await trio.lowlevel.checkpoint()
            raise BusClosedError("subscription closed")
        while True:
            out = await self.handoff.take(max_records)
            if self._rewinding:
                out = self._skip_rewinding(out)
            if out:
                self._held.update(out)
                return out

    def _skip_rewinding(self, records: list[Record]) -> list[Record]:
        """Release, unfetched, records of lanes being rewound (they come
        again after the released one, in order)."""
        self._rewinding = {t for t in self._rewinding if t.live}
        kept = []
        for record in records:
            if record.token in self._rewinding:
                self._settles.put(Release(record))
            else:
                kept.append(record)
        return kept

    def ack(self, record: Record) -> None:
        """Mark *record* finished; its partition's commit point may pass it."""
        try:
            self._held.remove(record)
        except KeyError:
            return  # released at close already
        self._settles.put(record)

    def release(self, record: Record) -> None:
        """Mark *record* not handled: never committed past; redelivered."""
        held = self._held
        if record in held:
            held.remove(record)
            track = record.token
            assert isinstance(track, PartitionTrack)
            self._rewinding.add(track)
            self._settles.put(Release(record))

    async def lanes(self) -> Sequence[LaneState]:
        """Per assigned partition of this topic: committed offset, lag (the
        last fetch's high watermark minus committed) and records held by
        this side. One bridge crossing, no broker round trip."""
        return await self._bridge.call(_lanes, self._group, self.topic)

    async def flush(self) -> None:
        """Commit the finished prefix of every partition of the group now."""
        await self._bridge.call(self._group.commits.commit)

    async def aclose(self) -> None:
        """Release unsettled records, commit the finished prefix and leave
        the group when this was its last subscription. Shield-safe, bounded
        by ``close_timeout`` even when the broker cannot be reached."""
        if self.closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self.closed = True
        for record in list(self._held):
            self.release(record)
        group = self._group
        with trio.move_on_after(group.options.close_timeout) as scope:
            scope.shield = True
            try:
                if await self._bridge.call(group.remove, self):
                    await self._close_group(group.name)
            except TransportError as exc:  # the loop is gone: nothing to leave
                logger.warning("closing the subscription to %r: %s", self.topic, exc)
        if scope.cancelled_caught:
            logger.warning(
                "closing the subscription to %r took over %s s; its uncommitted "
                "records are redelivered",
                self.topic,
                group.options.close_timeout,
            )


async def _lanes(group: Group, topic: str) -> list[LaneState]:
    # Runs on the asyncio side: the group's state is read where it lives.
    return group.flow.lanes(topic)
