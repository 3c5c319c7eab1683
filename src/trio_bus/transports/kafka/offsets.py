"""Per-partition commit watermarks for the Kafka transport (pure logic).

Kafka stores one committed offset per partition: "everything before this
is done". Handlers of one partition finish out of order (different
aggregates run concurrently), so the commit point may only move over the
*contiguous* run of finished offsets from the front. A slow, retrying or
released record holds its partition's point back; records after it that
did finish are replayed after a crash (at-least-once).

:class:`PartitionTrack` has no I/O and no clock, so it is unit-tested on
its own (tests/test_kafka_offsets.py).
"""

from __future__ import annotations

from collections import deque

__all__ = ["PartitionTrack"]


class PartitionTrack:
    """Offsets of one assigned partition from the commit point onwards.

    One track lives from an assignment (or a seek) to the revocation (or
    the next seek) of its partition; a record carries its track as the ack
    token, so a record settled after its track died is ignored: it is never
    committed by a later owner's bookkeeping.

    Attributes:
        start: Position the track began at (committed offset or reset).
        committed: Highest offset committed to the broker by this process
            for this partition (``start`` when nothing was committed yet).
        next_offset: Offset after the last record added (fetch position).
        unsettled: Records added and neither finished nor released.
        handed_out: Records given to handlers and not settled yet.
        released: Lowest released offset, or None: the partition must be
            sought back there before its point can pass it.
        live: False once the partition was revoked or reset.
        revoking: True while a revocation waits for handlers to settle.
        paused: Whether flow control paused this partition.
    """

    __slots__ = (
        "_done",
        "_open",
        "_pending",
        "_released",
        "committed",
        "handed_out",
        "live",
        "next_offset",
        "paused",
        "released",
        "revoking",
        "start",
        "unsettled",
    )

    def __init__(self, start: int, *, committed: int | None = None) -> None:
        self.start = start
        self.committed = start if committed is None else committed
        self.next_offset = start
        self.unsettled = 0
        self.handed_out = 0
        self.released: int | None = None
        self._released: set[int] = set()
        self.live = True
        self.revoking = False
        self.paused = False
        # Offsets added and not yet passed by the point, ascending; an
        # offset stays here until every offset before it finished.
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        # Offsets added and neither finished nor released.
        self._open: set[int] = set()

    def add(self, offset: int) -> bool:
        """Record that *offset* was fetched; False for a duplicate or stale
        offset (below the fetch position), which must then be dropped."""
        if offset < self.next_offset:
            return False
        self._pending.append(offset)
        self._open.add(offset)
        self.next_offset = offset + 1
        self.unsettled += 1
        return True

    def finish(self, offset: int) -> bool:
        """Mark *offset* handled; True when it was unsettled before."""
        open_ = self._open
        if offset not in open_:
            return False
        open_.remove(offset)
        self.unsettled -= 1
        pending, done = self._pending, self._done
        if pending[0] == offset:  # the common case: finishing in order
            pending.popleft()
        else:
            done.add(offset)
        while pending and pending[0] in done:
            done.discard(pending.popleft())
        return True

    def release(self, offset: int) -> bool:
        """Mark *offset* not handled: the point never passes it in this
        track. True when it was unsettled before."""
        if offset not in self._open:
            return False
        self._open.remove(offset)
        self.unsettled -= 1
        self._released.add(offset)
        if self.released is None or offset < self.released:
            self.released = offset
        return True

    @property
    def point(self) -> int:
        """The offset to commit: the first offset not finished, or the fetch
        position when everything added has finished."""
        return self._pending[0] if self._pending else self.next_offset

    def commit_due(self) -> int | None:
        """The point when it is ahead of what was committed, else None."""
        point = self.point
        return point if point > self.committed else None
