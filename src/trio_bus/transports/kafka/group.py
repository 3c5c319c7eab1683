"""Consumer groups: membership, rebalances, flow and commits (asyncio side)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiokafka
import aiokafka.errors as kafka_errors
import trio
from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from ..._message import Record
from ...errors import BusClosedError, TransportUnavailableError
from .._base import Consumer, ConsumerSpec, LaneState, StartPosition
from .errors import transport_error as _transport_error
from .offsets import PartitionTrack
from .options import client_kwargs as _client_kwargs

if TYPE_CHECKING:
    from .transport import KafkaTransport

logger = logging.getLogger("trio_bus.transports.kafka")


def _decode_headers(raw: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    return {
        name: (value.decode("utf-8", "replace") if value is not None else "") for name, value in raw
    }


class _Subscription(Consumer):
    """One subscription's view of its group's consumer."""

    def __init__(self, group: _Group, spec: ConsumerSpec) -> None:
        self._group = group
        self.spec = spec
        self.topic = spec.topic
        # Records fetched for this subscription and not handed out yet.
        self.buffer: deque[Record] = deque()
        self._ready: trio.Event | None = None
        self.closed = False
        # Handed out and not settled; released on close.
        self._held: set[Record] = set()

    def wake(self) -> None:
        """Wake a waiting fetch (called from the asyncio poll loop)."""
        ready = self._ready
        if ready is not None:
            self._ready = None
            ready.set()

    async def fetch(self, max_records: int) -> Sequence[Record]:
        """Wait for records of this subscription; return up to *max_records*."""
        group = self._group
        while True:
            if self.closed:
                raise BusClosedError("subscription closed")
            if group.error is not None:
                raise _transport_error(group.error, f"consumer group {group.name!r} failed")
            out = self._take(max_records)
            if out:
                await trio.lowlevel.checkpoint()
                return out
            ready = self._ready = trio.Event()
            await ready.wait()

    def _take(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        buffer, held = self.buffer, self._held
        while buffer and len(out) < max_records:
            record = buffer.popleft()
            track = record.token
            assert isinstance(track, PartitionTrack)
            if not track.live or track.revoking:
                continue  # its partition moved on; the next owner gets it
            track.handed_out += 1
            held.add(record)
            out.append(record)
        return out

    def ack(self, record: Record) -> None:
        """Mark *record* finished; its partition's commit point may pass it."""
        if record in self._held:
            self._held.discard(record)
            self._group.settle(record, finished=True)

    def release(self, record: Record) -> None:
        """Mark *record* not handled: never committed past; redelivered."""
        if record in self._held:
            self._held.discard(record)
            self._group.settle(record, finished=False)

    async def lanes(self) -> Sequence[LaneState]:
        """Per assigned partition of this topic: committed offset, lag (the
        last fetch's high watermark minus committed) and records with
        handlers. Reads local state only: no bridge crossing."""
        await trio.lowlevel.checkpoint()
        group = self._group
        consumer = group.consumer
        out: list[LaneState] = []
        for tp, track in sorted(group.tracks.items()):
            if tp.topic != self.topic or consumer is None:
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

    async def flush(self) -> None:
        """Commit the finished prefix of every partition of the group now."""
        await self._group.transport.bridge.call(self._group.commit)

    async def aclose(self) -> None:
        """Release unsettled records, commit the finished prefix and leave
        the group when this was its last subscription. Shield-safe, bounded
        by ``close_timeout``."""
        if self.closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self.closed = True
        self.wake()
        for record in list(self._held):
            self.release(record)
        self.buffer.clear()
        group = self._group
        with trio.move_on_after(group.options.close_timeout) as scope:
            scope.shield = True
            try:
                await group.transport.bridge.call(group.remove, self)
            except Exception:
                logger.exception("closing the subscription to %r failed", self.topic)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, group: _Group) -> None:
        self._group = group

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._group.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._group.on_assigned(set(assigned))


class _Group:
    """One consumer group: one aiokafka consumer for all of its topics.

    Lives on the asyncio side; the Trio side only calls the synchronous
    :meth:`settle` (through ``ack``/``release``) and reads buffers.
    """

    def __init__(self, transport: KafkaTransport, name: str, *, ephemeral: bool = False) -> None:
        self.transport = transport
        # A private, throw-away group (health probes): commit nothing.
        self.ephemeral = ephemeral
        self.options = transport.options
        self.name = name
        self.routes: dict[str, list[_Subscription]] = {}
        self._starts: dict[str, StartPosition] = {}
        self.tracks: dict[TopicPartition, PartitionTrack] = {}
        self.error: BaseException | None = None
        self._unsettled = 0
        self._paused_all = False
        self._consumer: Any = None
        self._listener = _Listener(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Future[None] | None = None
        self._revoke_wait: asyncio.Future[None] | None = None
        self._commit_lock = asyncio.Lock()
        # Group-join bookkeeping: subscribe() bumps _sub_seq; a join that
        # started (revoke callback) after it carries the new topic set.
        self._sub_seq = 0
        self._prepare_seq = 0
        self._assign_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._stopped = False
        self._consumer_stopped = False

    @property
    def consumer(self) -> Any:
        """The group's AIOKafkaConsumer (None before start)."""
        return self._consumer

    # -- lifetime (asyncio side) ---------------------------------------

    async def start(self) -> None:
        opts = self.options
        kwargs: dict[str, Any] = {
            "group_id": self.name,
            "enable_auto_commit": False,
            # Positions of new partitions are set explicitly in on_assigned;
            # this only applies when a committed offset fell out of
            # retention, where replaying beats skipping.
            "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": opts.fetch_max_wait_ms,
            "max_poll_records": opts.max_poll_records,
            "session_timeout_ms": opts.session_timeout_ms,
            "heartbeat_interval_ms": opts.heartbeat_interval_ms,
            "max_poll_interval_ms": opts.max_poll_interval_ms,
            "rebalance_timeout_ms": max(
                opts.session_timeout_ms, int(opts.rebalance_grace * 1000) + 5_000
            ),
        }
        kwargs.update(_client_kwargs(opts, self.transport.hosts, self.transport.client_id))
        kwargs.update(opts.consumer_args)
        self._consumer = aiokafka.AIOKafkaConsumer(**kwargs)
        await self._consumer.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._poll_loop()),
            loop.create_task(self._commit_loop()),
        ]

    async def add(self, sub: _Subscription) -> None:
        """Route *sub*'s topic here; return once the group assigned it."""
        topic = sub.topic
        new_topic = topic not in self.routes
        self.routes.setdefault(topic, []).append(sub)
        self._starts.setdefault(topic, sub.spec.start)
        if not new_topic:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (self._sub_seq + 1, done)
        try:
            await self._wait_partitions_known(topic)
            self._sub_seq += 1
            self._assign_waiters.append(waiter)
            self._consumer.subscribe(topics=sorted(self.routes), listener=self._listener)
            try:
                await asyncio.wait_for(asyncio.shield(done), self.options.join_timeout)
            except TimeoutError:
                raise TransportUnavailableError(
                    f"consumer group {self.name!r} did not assign {topic!r} within "
                    f"{self.options.join_timeout} s"
                ) from None
        except BaseException:
            # Failed or cancelled: no orphan route may hold records nobody
            # fetches (their partitions' commit points would never move).
            if waiter in self._assign_waiters:
                self._assign_waiters.remove(waiter)
            if self._drop_route(sub) and self.routes and not self._stopped:
                self._consumer.subscribe(topics=sorted(self.routes), listener=self._listener)
            raise

    async def _wait_partitions_known(self, topic: str) -> None:
        """Wait until this consumer's metadata lists *topic*'s partitions.

        The group leader assigns from its own metadata: joining with a topic
        it does not know yet (just created) assigns none of its partitions,
        and the later rejoin would resolve "latest" after messages published
        in between -- skipping them.
        """
        client = self._consumer._client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.join_timeout
        while not client.cluster.partitions_for_topic(topic):
            if loop.time() > deadline:
                raise TransportUnavailableError(
                    f"no partition metadata for kafka topic {topic!r} within "
                    f"{self.options.join_timeout} s"
                )
            await client.add_topic(topic)
            if not client.cluster.partitions_for_topic(topic):
                await asyncio.sleep(0.05)  # metadata not there yet: ask again
                await client.force_metadata_update()

    def _drop_route(self, sub: _Subscription) -> bool:
        """Forget *sub*; True when its topic has no subscription left."""
        subs = self.routes.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self.routes.pop(sub.topic, None)
            self._starts.pop(sub.topic, None)
            return True
        return False

    async def remove(self, sub: _Subscription) -> None:
        """Close *sub*: commit, then leave the group or drop its topic."""
        topic_gone = self._drop_route(sub)
        await self.commit()
        if not self.routes:
            await self.stop()
            self.transport.groups.pop(self.name, None)
        elif topic_gone:
            # Re-subscribe without the topic; the rebalance revokes its
            # partitions (committing their finished prefix) in the background.
            self._consumer.subscribe(topics=sorted(self.routes), listener=self._listener)

    async def stop(self) -> None:
        """Commit what finished and leave the group (bounded by the caller)."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("kafka consumer task failed")
        try:
            await self.commit()
        finally:
            for track in self.tracks.values():
                track.live = False
            self.tracks.clear()
            try:
                self._consumer_stopped = True
                await self._consumer.stop()
            finally:
                for subs in self.routes.values():
                    for s in subs:
                        s.closed = True
                        s.wake()
                for _, fut in self._assign_waiters:
                    if not fut.done():
                        fut.set_exception(BusClosedError("transport closed"))
                self._assign_waiters.clear()

    # -- rebalance (asyncio side, called by aiokafka's coordinator) ------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._prepare_seq = self._sub_seq
        tracks = [t for tp in revoked if (t := self.tracks.get(tp)) is not None]
        for track in tracks:
            track.revoking = True
        self._drop_buffered(lambda r: r.token in tracks)
        if any(t.handed_out for t in tracks) and self.options.rebalance_grace > 0:
            self._revoke_wait = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._revoke_wait), self.options.rebalance_grace
                )
            except TimeoutError:
                logger.warning(
                    "group %r: handlers of revoked partitions still running after "
                    "%s s; their records are left uncommitted (redelivered)",
                    self.name,
                    self.options.rebalance_grace,
                )
            finally:
                self._revoke_wait = None
        await self.commit()
        for tp in revoked:
            gone = self.tracks.pop(tp, None)
            if gone is not None:
                self._unsettled -= gone.unsettled
                gone.live = False

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        ours = sorted(tp for tp in assigned if tp.topic in self.routes)
        for attempt in range(4):
            try:
                await self._resolve_positions(ours)
                break
            except kafka_errors.KafkaError as exc:
                if attempt == 3:
                    # Without positions these partitions would silently not be
                    # consumed: fail the group loudly instead.
                    self._fail(exc)
                    return
                logger.warning("group %r: resolving positions failed: %s", self.name, exc)
                await asyncio.sleep(0.1 * 2**attempt)
        if self._consumer.assignment() == assigned:
            for seq, fut in list(self._assign_waiters):
                if seq <= self._prepare_seq:
                    self._assign_waiters.remove((seq, fut))
                    if not fut.done():
                        fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        logger.error("group %r failed: %r", self.name, exc)
        for subs in self.routes.values():
            for sub in subs:
                sub.wake()
        for _, fut in self._assign_waiters:
            if not fut.done():
                fut.set_exception(_transport_error(exc, f"consumer group {self.name!r}"))
        self._assign_waiters.clear()

    async def _resolve_positions(self, ours: list[TopicPartition]) -> None:
        """Seek every assigned partition to its committed offset, or to where
        its subscription starts when the group has none (and anchor that)."""
        consumer = self._consumer
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in ours))
        need: dict[StartPosition, list[TopicPartition]] = {"earliest": [], "latest": []}
        positions: dict[TopicPartition, int] = {}
        for tp, offset in zip(ours, committed, strict=True):
            if offset is None:
                need[self._starts.get(tp.topic, "latest")].append(tp)
            else:
                positions[tp] = offset
        fresh: dict[TopicPartition, int] = {}
        if need["earliest"]:
            fresh.update(await consumer.beginning_offsets(need["earliest"]))
        if need["latest"]:
            fresh.update(await consumer.end_offsets(need["latest"]))
        positions.update(fresh)
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
            old = self.tracks.pop(tp, None)
            if old is not None:
                old.live = False
                self._unsettled -= old.unsettled
            self.tracks[tp] = PartitionTrack(offset, committed=None if tp in fresh else offset)
        if fresh and not self.ephemeral:
            # Anchor a new group where it starts: a crash before the first
            # periodic commit must not move "latest" past unhandled records.
            try:
                await consumer.commit(fresh)
                for tp, offset in fresh.items():
                    self.tracks[tp].committed = offset
            except kafka_errors.KafkaError as exc:
                logger.warning("group %r: anchoring start offsets failed: %s", self.name, exc)

    def _drop_buffered(self, dropped: Callable[[Record], bool]) -> None:
        for subs in self.routes.values():
            for sub in subs:
                if any(dropped(r) for r in sub.buffer):
                    sub.buffer = deque(r for r in sub.buffer if not dropped(r))

    # -- consuming (asyncio side) ----------------------------------------

    async def _poll_loop(self) -> None:
        consumer = self._consumer
        opts = self.options
        loop = asyncio.get_running_loop()
        getter: asyncio.Task[Any] | None = None
        backoff = 0.05
        try:
            while True:
                self._flow()
                if getter is None:
                    getter = loop.create_task(
                        consumer.getmany(timeout_ms=200, max_records=opts.max_poll_records)
                    )
                wake = self._wake = loop.create_future()
                await asyncio.wait((getter, wake), return_when=asyncio.FIRST_COMPLETED)
                self._wake = None
                if not getter.done():
                    continue
                task, getter = getter, None
                try:
                    batches = task.result()
                except kafka_errors.KafkaError as exc:
                    if not getattr(exc, "retriable", False) and not isinstance(
                        exc, kafka_errors.KafkaConnectionError
                    ):
                        raise
                    logger.warning("group %r: fetch failed, retrying: %s", self.name, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                if batches:
                    self._deliver(batches)
        except asyncio.CancelledError:
            if getter is not None:
                getter.cancel()
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    def _deliver(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> None:
        woken: set[_Subscription] = set()
        for tp, messages in batches.items():
            track = self.tracks.get(tp)
            subs = self.routes.get(tp.topic)
            if track is None or not subs or track.revoking or track.released is not None:
                continue  # not ours any more, or about to be sought back
            sub = subs[tp.partition % len(subs)]
            buffer = sub.buffer
            topic, partition = tp.topic, tp.partition
            added = 0
            for msg in messages:
                if not track.add(msg.offset):
                    continue
                key = msg.key
                buffer.append(
                    Record(
                        topic=topic,
                        subject=topic,
                        value=msg.value if msg.value is not None else b"",
                        key=key.decode("utf-8", "replace") if key is not None else None,
                        headers=_decode_headers(msg.headers) if msg.headers else {},
                        partition=partition,
                        offset=msg.offset,
                        token=track,
                        timestamp=msg.timestamp / 1000 if msg.timestamp is not None else None,
                    )
                )
                added += 1
            if added:
                self._unsettled += added
                woken.add(sub)
        for sub in woken:
            sub.wake()

    def _flow(self) -> None:
        """Pause partitions over their bound, resume drained ones, and seek
        back partitions with released records once nothing is in flight."""
        opts = self.options
        consumer = self._consumer
        limit, part_limit = opts.max_unsettled, opts.max_unsettled_per_partition
        if self._unsettled >= limit:
            self._paused_all = True
        elif self._paused_all and self._unsettled <= limit // 2:
            self._paused_all = False
        for tp, track in list(self.tracks.items()):
            if track.released is not None and track.handed_out == 0 and not track.revoking:
                self._seek_back(tp, track)
                continue
            want_pause = (
                self._paused_all
                or track.released is not None  # refetched after the seek anyway
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
        old.live = False
        self._unsettled -= old.unsettled
        self._drop_buffered(lambda r: r.token is old)
        track = PartitionTrack(point, committed=old.committed)
        self.tracks[tp] = track
        self._consumer.seek(tp, point)
        if old.paused:
            self._consumer.resume(tp)

    def settle(self, record: Record, *, finished: bool) -> None:
        """Ack or release bookkeeping (Trio side, synchronous)."""
        track = record.token
        assert isinstance(track, PartitionTrack)
        if not track.live:
            return  # revoked or reset: a later owner redelivers it
        ok = track.finish(record.offset) if finished else track.release(record.offset)
        if not ok:
            return
        track.handed_out -= 1
        self._unsettled -= 1
        if track.revoking:
            if (
                self._revoke_wait is not None
                and not self._revoke_wait.done()
                and not any(t.revoking and t.handed_out for t in self.tracks.values())
            ):
                self._revoke_wait.set_result(None)
            return
        opts = self.options
        if (
            not finished
            or (track.paused and track.unsettled <= opts.max_unsettled_per_partition // 2)
            or (self._paused_all and self._unsettled <= opts.max_unsettled // 2)
        ):
            self._poke()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    # -- committing (asyncio side) ---------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.commit_interval)
            await self.commit()

    async def commit(self) -> None:
        """Commit every partition's finished prefix that moved."""
        async with self._commit_lock:
            due = {
                tp: point
                for tp, track in self.tracks.items()
                if (point := track.commit_due()) is not None
            }
            if not due or self.ephemeral or self._consumer is None or self._consumer_stopped:
                return
            try:
                await self._consumer.commit(due)
            except (kafka_errors.KafkaError, kafka_errors.IllegalStateError) as exc:
                # Rebalancing or not a member any more: what was not committed
                # is redelivered to the next owner (at-least-once).
                logger.warning("group %r: commit failed: %s", self.name, exc)
                return
            for tp, point in due.items():
                track = self.tracks.get(tp)
                if track is not None and point > track.committed:
                    track.committed = point
