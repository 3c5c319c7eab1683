"""Consumer groups: membership, rebalances, positions (asyncio side).

One ``AIOKafkaConsumer`` per group covers every topic subscribed in that
group (the seed system's "unified consumer"). Its two lifetime loops,
:meth:`Group.poll_loop` (running :meth:`.flow.Flow.poll`) and
``Committer.run``, are awaited by Trio tasks of
the transport (see :mod:`.transport`): they end only when those tasks are
cancelled, and whatever they raise fails the transport.

Recovery policy of the poll loop: a fetch that fails with a retriable Kafka
error or a lost connection is retried with a backoff (50 ms doubling to
2 s); aiokafka reconnects and rejoins by itself, and a rejoin after the
broker was gone for longer than the session is an ordinary rebalance
(revoke, commit the finished prefix, resume from the committed points).
Any other failure -- including positions that cannot be resolved after a
rebalance -- ends the loop with a :class:`~trio_bus.errors.TransportError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import aiokafka
import aiokafka.errors as kafka_errors
from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from ...errors import BusClosedError, TransportError
from .._base import StartPosition
from .._bridge import Mailbox
from .commits import Committer, commit_offsets
from .consumer import KafkaConsumer
from .errors import transport_error
from .fence import Fence
from .flow import Flow, Settle
from .join import Joiner
from .offsets import PartitionTrack
from .options import KafkaOptions, client_kwargs

__all__ = ["Group"]

logger = logging.getLogger("trio_bus.transports.kafka")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, group: Group) -> None:
        self._group = group

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._group.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._group.on_assigned(set(assigned))


class Group:
    """One consumer group of the transport. Lives on the asyncio side; the
    Trio side reaches it through ``bridge.call`` and its :attr:`settles`.

    Attributes:
        name: The group id.
        settles: Ack/release requests of its subscriptions (Trio -> asyncio).
        flow: Records, tracks and pausing.
        commits: Commits of finished offsets.
        joins: The subscribed topics and the subscribe calls waiting.
        fence: The leases of the assigned partitions.
        rebalances: Assignments received so far (one per completed join).
    """

    def __init__(
        self,
        name: str,
        options: KafkaOptions,
        hosts: tuple[str, ...],
        client_id: str,
        *,
        ephemeral: bool = False,
    ) -> None:
        self.name = name
        self.options = options
        self._hosts, self._client_id = hosts, client_id
        self.settles: Mailbox[Settle] = Mailbox()
        self.flow = Flow(options, self.settles)
        self.fence = Fence(
            name,
            session_timeout=options.session_timeout_ms / 1000,
            rebalance_timeout=options.rebalance_timeout_ms / 1000,
            margin=options.lease_margin,
        )
        self.flow.leases = self.fence.leases
        # A private, throw-away group (health probes): commit nothing.
        self.commits = Committer(
            name, self.flow, options.commit_interval, enabled=not ephemeral, fence=self.fence
        )
        self.joins = Joiner(name, options, self.flow.routes, self._subscribe)
        self.rebalances = 0
        self._consumer: Any = None
        self._listener = _Listener(self)
        self._failure: TransportError | None = None
        self._stopped = False

    @property
    def consumer(self) -> Any:
        """The group's AIOKafkaConsumer (None before start)."""
        return self._consumer

    @property
    def routes(self) -> dict[str, list[KafkaConsumer]]:
        """topic -> this group's subscriptions on it (for tests and tools)."""
        return self.flow.routes

    @property
    def tracks(self) -> dict[TopicPartition, PartitionTrack]:
        """The assigned partitions' bookkeeping (for tests and tools)."""
        return self.flow.tracks

    # -- lifetime --------------------------------------------------------

    async def start(self) -> None:
        """Create and start the group's consumer (no topics yet)."""
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
            "rebalance_timeout_ms": opts.rebalance_timeout_ms,
        }
        kwargs.update(client_kwargs(opts, self._hosts, self._client_id))
        kwargs.update(opts.consumer_args)
        consumer = aiokafka.AIOKafkaConsumer(**kwargs)
        try:
            await consumer.start()
        except BaseException:
            # Failed or cancelled half-way (the bootstrap connection may be
            # open): stop() below would not know this consumer.
            try:
                await consumer.stop()
            except Exception as exc:  # the start's own error is the one to raise
                logger.debug("group %r: stopping a consumer that did not start: %r", self.name, exc)
            raise
        self.fence.install(consumer._coordinator)
        self.joins.watch(consumer._coordinator)
        self.joins.client = consumer._client
        self._consumer = self.flow.consumer = self.commits.consumer = consumer

    async def stop(self) -> None:
        """Commit what finished (bounded) and leave the group; every fetch
        of its subscriptions then raises BusClosedError."""
        if self._stopped:
            return
        self._stopped = True
        closed = BusClosedError("the kafka consumer group closed")
        try:
            if self._consumer is not None:
                try:
                    await asyncio.wait_for(self.commits.commit(), self.options.close_timeout / 2)
                except TimeoutError:
                    logger.warning("group %r: final commit timed out", self.name)
                self.commits.enabled = False
                self.fence.lose("the group stops", warn=False)
                await self._consumer.stop()
        finally:
            self.fence.lose("the group stopped", warn=False)
            self.joins.closed = True
            self.flow.close_all()
            self.flow.fail_subscriptions(closed)
            self.joins.fail(closed)

    def _fail(self, error: BaseException, what: str) -> TransportError:
        failure = transport_error(error, f"kafka consumer group {self.name!r} {what}")
        # Raised by the poll loop into the transport's nursery, which cancels
        # the fetches and joins waiting on it: they must not raise it too
        # (one failure, one exception out of open_bus).
        self._failure = failure
        return failure

    # -- membership ------------------------------------------------------

    async def add(self, subs: Sequence[KafkaConsumer]) -> None:
        """Route *subs* here; return once the group assigned all their
        topics, after one rejoin for all of them (see :mod:`.join`)."""
        if self._failure is not None:
            raise self._failure
        await self.joins.add(subs)

    def _subscribe(self, topics: Sequence[str]) -> None:
        if self._stopped:
            return
        if topics:
            self._consumer.subscribe(topics=list(topics), listener=self._listener)
        else:
            self._consumer.unsubscribe()

    async def remove(self, sub: KafkaConsumer) -> bool:
        """Close *sub*: commit, then drop its topic from the group. True when
        the group has no subscription left (the caller then stops it)."""
        sub.handoff.fail(BusClosedError("subscription closed"))
        topic_gone = self.joins.drop_route(sub)
        await self.commits.commit()
        routes = self.flow.routes
        if not routes:
            return True
        if topic_gone:
            # Re-subscribe without the topic; the rebalance revokes its
            # partitions (committing their finished prefix) in the background.
            self.joins.resubscribe()
        return False

    # -- rebalance (called by aiokafka's coordinator) ----------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop handing out the revoked partitions, wait up to
        ``rebalance_grace`` for their records with handlers, commit, void
        their leases (a handler still running is cancelled), forget."""
        flow = self.flow
        flow.apply_settles()
        tracks = [t for tp in revoked if (t := flow.tracks.get(tp)) is not None]
        for track in tracks:
            track.revoking = True
        flow.discard(tracks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.rebalance_grace
        while any(t.handed_out for t in tracks):
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning(
                    "group %r: handlers of revoked partitions still running after "
                    "%s s; their records are left uncommitted (redelivered)",
                    self.name,
                    self.options.rebalance_grace,
                )
                break
            await self.settles.wait(remaining)
            flow.apply_settles()
        await self.commits.commit()
        self.fence.revoke(revoked)
        for tp in revoked:
            flow.replace(tp, None)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Lease the new assignment's partitions, resolve their positions,
        wake the subscribe calls it completes."""
        self.rebalances += 1
        self.fence.grant(assigned)
        # The join that ended here was for the subscription current now
        # (aiokafka discards a join whose subscription changed under it);
        # a subscribe slipping in just before this callback leaves the new
        # subscription unassigned: it has its own join to come.
        current = self._consumer._subscription.subscription
        joined = (
            set(current.topics) if current is not None and current.assignment is not None else set()
        )
        joined = self.joins.covered(joined, assigned, self._consumer._coordinator.generation)
        ours = sorted(tp for tp in assigned if tp.topic in self.flow.routes)
        for attempt in range(4):
            try:
                await self._resolve_positions(ours)
                break
            except kafka_errors.KafkaError as exc:
                if attempt == 3:
                    # Without positions these partitions would silently not be
                    # consumed: fail the group (the poll loop raises it).
                    self._fail(exc, "cannot resolve positions")
                    return
                logger.warning("group %r: resolving positions failed: %s", self.name, exc)
                await asyncio.sleep(0.1 * 2**attempt)
        self.joins.assigned(joined)

    async def _resolve_positions(self, ours: list[TopicPartition]) -> None:
        """Seek every assigned partition to its committed offset, or to where
        its subscription starts when the group has none (and anchor that)."""
        consumer = self._consumer
        # One OffsetFetch for all partitions (consumer.committed asks per
        # partition: 800 requests for 100 topics of 8).
        committed = await consumer._coordinator.fetch_committed_offsets(ours) if ours else {}
        need: dict[StartPosition, list[TopicPartition]] = {"earliest": [], "latest": []}
        positions: dict[TopicPartition, int] = {}
        starts = self.joins.starts
        for tp in ours:
            meta = committed.get(tp)
            if meta is None or meta.offset < 0:
                need[starts.get(tp.topic, "latest")].append(tp)
            else:
                positions[tp] = meta.offset
        fresh: dict[TopicPartition, int] = {}
        if need["earliest"]:
            fresh.update(await consumer.beginning_offsets(need["earliest"]))
        if need["latest"]:
            fresh.update(await consumer.end_offsets(need["latest"]))
        positions.update(fresh)
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
            self.flow.replace(tp, PartitionTrack(offset, committed=None if tp in fresh else offset))
        if fresh and self.commits.enabled:
            # Anchor a new group where it starts: a crash before the first
            # periodic commit must not move "latest" past unhandled records.
            try:
                await commit_offsets(consumer, fresh)
                for tp, offset in fresh.items():
                    self.flow.tracks[tp].committed = offset
            except kafka_errors.KafkaError as exc:
                logger.warning("group %r: anchoring start offsets failed: %s", self.name, exc)

    # -- the poll loop ---------------------------------------------------

    async def poll_loop(self) -> NoReturn:
        """Fetch, deliver, regulate; forever (a loop owned by a Trio task)."""
        try:
            await self.flow.poll(lambda: self._failure)
        except asyncio.CancelledError:
            raise
        except TransportError as exc:
            self._fail(exc, "failed")
            raise
        except Exception as exc:
            raise self._fail(exc, "poll loop failed") from exc
