"""A group's records on their way to the subscriptions, and back (asyncio side).

:class:`Flow` alone owns a group's :class:`~.offsets.PartitionTrack`\\ s and
the counts that pausing is decided on. Records go to Trio through each
subscription's :class:`~.._bridge.Handoff`; the outcomes come back through
one :class:`~.._bridge.Mailbox` per group (an acked ``Record``, or a
:class:`Release` of one), and :meth:`Flow.apply_settles` applies them in
order before every pause/resume, seek and commit decision. The Trio side
never touches a track. :meth:`Flow.poll` is the group's poll loop (its
recovery policy is described in :mod:`.group`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import aiokafka.errors as kafka_errors
from aiokafka import TopicPartition

from ..._message import Record, new_record
from ...errors import TransportError
from .._base import LaneState
from .._bridge import Mailbox
from .errors import is_retriable
from .offsets import PartitionTrack
from .options import KafkaOptions

if TYPE_CHECKING:
    from ..._lease import Lease
    from .consumer import KafkaConsumer

__all__ = ["Flow", "Release", "Settle"]

logger = logging.getLogger("trio_bus.transports.kafka")

#: ``getmany`` timeout: the poll loop looks at its own state at least this often.
_POLL_TIMEOUT_MS = 200
#: Backoff of a retried fetch, doubling from the first to the second.
_RETRY_MIN, _RETRY_MAX = 0.05, 2.0


class Release:
    """A settle request: *record* was not handled (an ack is the bare record)."""

    __slots__ = ("record",)

    def __init__(self, record: Record) -> None:
        self.record = record


#: What the Trio side sends back: the record itself for an ack (the common
#: case costs no allocation), or a :class:`Release`.
Settle = Record | Release


def _decode_headers(raw: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    try:  # the common case: every value present and valid UTF-8
        return {name: value.decode() for name, value in raw}  # type: ignore[union-attr]
    except (AttributeError, UnicodeDecodeError):
        return {
            name: (value.decode("utf-8", "replace") if value is not None else "")
            for name, value in raw
        }


class Flow:
    """Delivery, settling and flow control of one consumer group.

    Attributes:
        routes: topic -> subscriptions of this group on it (several split
            its partitions, ``partition % n``).
        tracks: The assigned partitions' commit bookkeeping.
        settles: Ack/release requests from the Trio side.
        unsettled: Records delivered and not settled, all partitions.
    """

    def __init__(self, options: KafkaOptions, settles: Mailbox[Settle]) -> None:
        self.options = options
        self.settles = settles
        self.routes: dict[str, list[KafkaConsumer]] = {}
        self.tracks: dict[TopicPartition, PartitionTrack] = {}
        self.unsettled = 0
        self._paused_all = False
        # Tracks with a released record whose queued records were taken
        # back already (deliver adds none to them any more).
        self._taken_back: set[PartitionTrack] = set()
        self.consumer: Any = None
        #: The fence's lease per assigned partition (see .fence).
        self.leases: dict[TopicPartition, Lease] = {}

    # -- settling --------------------------------------------------------

    def apply_settles(self) -> None:
        """Apply every ack/release the Trio side sent, in order."""
        if not len(self.settles):
            return
        for item in self.settles.drain():
            if isinstance(item, Release):
                record, finished = item.record, False
            else:
                record, finished = item, True
            track = record.token
            assert isinstance(track, PartitionTrack)
            if not track.live:
                continue  # revoked or sought back: a later owner redelivers it
            if track.finish(record.offset) if finished else track.release(record.offset):
                track.handed_out -= 1
                self.unsettled -= 1

    @property
    def waits_for_settles(self) -> bool:
        """Whether a settle may unblock fetching now (something is paused or
        waits for a seek back): the poll loop then wakes on the mailbox."""
        return self._paused_all or any(
            t.paused or t.released is not None for t in self.tracks.values()
        )

    # -- delivering ------------------------------------------------------

    def deliver(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Turn a ``getmany`` result into Records for the subscriptions."""
        routes, tracks = self.routes, self.tracks
        for tp, messages in batches.items():
            track = tracks.get(tp)
            subs = routes.get(tp.topic)
            if track is None or not subs or track.revoking or track.released is not None:
                continue  # not ours any more, or about to be sought back
            topic, partition, lease = tp.topic, tp.partition, self.leases.get(tp)
            out: list[Record] = []
            add = track.add
            for msg in messages:
                if not add(msg.offset):
                    continue
                key, value, timestamp = msg.key, msg.value, msg.timestamp
                # Positional, in Record's field order (the hot path).
                out.append(
                    new_record(
                        topic,
                        topic,
                        value if value is not None else b"",
                        key.decode("utf-8", "replace") if key is not None else None,
                        _decode_headers(msg.headers) if msg.headers else {},
                        partition,
                        msg.offset,
                        None,
                        track,
                        timestamp / 1000 if timestamp is not None else None,
                        lease,
                    )
                )
            if out:
                self.unsettled += len(out)
                track.handed_out += len(out)
                subs[partition % len(subs)].handoff.put_many(out)

    def discard(self, tracks: Iterable[PartitionTrack]) -> None:
        """Take back the queued, not yet fetched records of *tracks*: their
        partition is revoked or sought back, so they come again from the
        commit point (to the next owner, or after the seek)."""
        doomed = set(tracks)
        if not doomed:
            return

        def drop(record: Record) -> bool:
            track = record.token
            if track in doomed:
                assert isinstance(track, PartitionTrack)
                track.handed_out -= 1
                return True
            return False

        for subs in self.routes.values():
            for sub in subs:
                sub.handoff.discard(drop)

    # -- flow control ----------------------------------------------------

    def regulate(self) -> None:
        """Apply settles, then pause partitions over their bound, resume
        drained ones, and seek back partitions with released records once
        none of their records is with the Trio side any more."""
        self.apply_settles()
        opts = self.options
        consumer = self.consumer
        limit, part_limit = opts.max_unsettled, opts.max_unsettled_per_partition
        if self.unsettled >= limit:
            self._paused_all = True
        elif self._paused_all and self.unsettled <= limit // 2:
            self._paused_all = False
        for tp, track in list(self.tracks.items()):
            if track.revoking:
                continue
            if track.released is not None:
                if track not in self._taken_back:
                    self._taken_back.add(track)
                    self.discard((track,))  # redelivered after the seek anyway
                if track.handed_out == 0:
                    self._seek_back(tp, track)
                    continue
            want_pause = (
                self._paused_all
                or track.released is not None
                or track.unsettled >= part_limit
                or (track.paused and track.unsettled > part_limit // 2)
            )
            if want_pause and not track.paused:
                track.paused = True
                consumer.pause(tp)
            elif not want_pause and track.paused:
                track.paused = False
                consumer.resume(tp)

    def _seek_back(self, tp: TopicPartition, old: PartitionTrack) -> None:
        """Redeliver from the first released record: a fresh track starts
        there (records after it that finished are delivered again)."""
        point = old.point
        self.replace(tp, PartitionTrack(point, committed=old.committed))
        self.consumer.seek(tp, point)
        if old.paused:
            self.consumer.resume(tp)

    def replace(self, tp: TopicPartition, track: PartitionTrack | None) -> None:
        """End *tp*'s current track (its late settles are ignored) and start
        *track* (None: the partition is gone)."""
        old = self.tracks.pop(tp, None)
        if old is not None:
            old.live = False
            self.unsettled -= old.unsettled
            self.discard((old,))
            self._taken_back.discard(old)
        if track is not None:
            self.tracks[tp] = track

    def close_all(self) -> None:
        """Forget every partition (the group stopped)."""
        for tp in list(self.tracks):
            self.replace(tp, None)

    def lanes(self, topic: str) -> list[LaneState]:
        """Per assigned partition of *topic*: committed offset, lag (the last
        fetch's high watermark minus committed: no broker round trip) and
        records with the Trio side."""
        self.apply_settles()
        consumer = self.consumer
        out: list[LaneState] = []
        if consumer is None:
            return out
        for tp, track in sorted(self.tracks.items()):
            if tp.topic != topic:
                continue
            highwater = consumer.highwater(tp)
            out.append(
                LaneState(
                    topic=tp.topic,
                    partition=tp.partition,
                    committed=track.committed,
                    lag=max(0, highwater - track.committed) if highwater is not None else None,
                    in_flight=track.handed_out,
                )
            )
        return out

    def fail_subscriptions(self, error: BaseException) -> None:
        """Make every subscription's fetch raise *error* once drained."""
        for subs in self.routes.values():
            for sub in subs:
                sub.handoff.fail(error)

    # -- the poll loop ---------------------------------------------------

    async def poll(self, failed: Callable[[], TransportError | None]) -> NoReturn:
        """Fetch, deliver, regulate, forever; raise ``failed()`` once it is
        set (a rebalance callback failed) and non-retriable fetch errors."""
        consumer, flow, settles = self.consumer, self, self.settles
        max_records = self.options.max_poll_records
        getter: asyncio.Future[Any] | None = None
        backoff = _RETRY_MIN
        try:
            while True:
                if (failure := failed()) is not None:
                    raise failure
                flow.regulate()
                if getter is None:
                    getter = asyncio.ensure_future(
                        consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS, max_records=max_records)
                    )
                if flow.waits_for_settles:
                    # A settle may resume a partition: wake for it too.
                    woken = asyncio.ensure_future(settles.wait())
                    await asyncio.wait((getter, woken), return_when=asyncio.FIRST_COMPLETED)
                    woken.cancel()
                    if not getter.done():
                        continue
                else:
                    await asyncio.wait((getter,))
                done, getter = getter, None
                try:
                    batches = done.result()
                except kafka_errors.KafkaError as exc:
                    if not is_retriable(exc):
                        raise
                    logger.warning("kafka fetch failed, retrying: %s", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _RETRY_MAX)
                    continue
                backoff = _RETRY_MIN
                if batches:
                    flow.deliver(batches)
        finally:
            if getter is not None:
                getter.cancel()
