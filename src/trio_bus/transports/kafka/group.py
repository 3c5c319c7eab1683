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
from collections.abc import Iterable
from typing import Any, NoReturn

import aiokafka
import aiokafka.errors as kafka_errors
from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from ...errors import BusClosedError, TransportError, TransportUnavailableError
from .._base import StartPosition
from .._bridge import Mailbox
from .commits import Committer, commit_offsets
from .consumer import KafkaConsumer
from .errors import retrieve_when_done, transport_error
from .flow import Flow, Settle
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
        # A private, throw-away group (health probes): commit nothing.
        self.commits = Committer(name, self.flow, options.commit_interval, enabled=not ephemeral)
        self._starts: dict[str, StartPosition] = {}
        self._consumer: Any = None
        self._listener = _Listener(self)
        # Topics the consumer is subscribed to, and joins under way by topic.
        self._subscribed: set[str] = set()
        self._joining: dict[str, asyncio.Future[None]] = {}
        # Subscriptions waiting for a join that includes their topic.
        self._assign_waiters: list[tuple[str, asyncio.Future[None]]] = []
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
            "rebalance_timeout_ms": max(
                opts.session_timeout_ms, int(opts.rebalance_grace * 1000) + 5_000
            ),
        }
        kwargs.update(client_kwargs(opts, self._hosts, self._client_id))
        kwargs.update(opts.consumer_args)
        consumer = aiokafka.AIOKafkaConsumer(**kwargs)
        await consumer.start()
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
                await self._consumer.stop()
        finally:
            self.flow.close_all()
            self.flow.fail_subscriptions(closed)
            self._fail_waiters(closed)

    def _fail_waiters(self, error: BaseException) -> None:
        for _, fut in self._assign_waiters:
            if not fut.done():
                fut.set_exception(error)
        self._assign_waiters.clear()

    def _fail(self, error: BaseException, what: str) -> TransportError:
        failure = transport_error(error, f"kafka consumer group {self.name!r} {what}")
        # Raised by the poll loop into the transport's nursery, which cancels
        # the fetches and joins waiting on it: they must not raise it too
        # (one failure, one exception out of open_bus).
        self._failure = failure
        return failure

    # -- membership ------------------------------------------------------

    async def add(self, sub: KafkaConsumer) -> None:
        """Route *sub*'s topic here; return once the group assigned it.

        Concurrent adds share rejoins: each subscribes the consumer to the
        topics whose metadata is known so far, and aiokafka folds the
        changes that arrive while a join is under way into the next one,
        so N concurrent subscriptions cost a few joins, not N.
        """
        if self._failure is not None:
            raise self._failure
        topic, routes = sub.topic, self.flow.routes
        routes.setdefault(topic, []).append(sub)
        self._starts.setdefault(topic, sub.spec.start)
        try:
            joining = self._joining.get(topic)
            if joining is not None:  # a concurrent add joins this topic: wait for it
                await self._wait_assigned(joining, topic)
            elif topic not in self._subscribed:
                await self._join(topic)
        except BaseException:
            # Failed or cancelled: no orphan route may hold records nobody
            # fetches (their partitions' commit points would never move).
            if self._drop_route(sub):
                self._resubscribe()
            raise

    async def _join(self, topic: str) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        retrieve_when_done(done)  # concurrent adds of the topic may all be gone
        self._joining[topic] = done
        waiter = (topic, done)
        try:
            await self._wait_partitions_known(topic)
            self._subscribed.add(topic)
            self._assign_waiters.append(waiter)
            self._resubscribe()
            await self._wait_assigned(done, topic)
        except BaseException as exc:
            if waiter in self._assign_waiters:
                self._assign_waiters.remove(waiter)
            if not done.done():
                done.set_exception(
                    exc if isinstance(exc, Exception) else BusClosedError("join cancelled")
                )
            raise
        finally:
            if self._joining.get(topic) is done:
                del self._joining[topic]

    async def _wait_assigned(self, done: asyncio.Future[None], topic: str) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(done), self.options.join_timeout)
        except TimeoutError:
            raise TransportUnavailableError(
                f"consumer group {self.name!r} did not assign {topic!r} within "
                f"{self.options.join_timeout} s"
            ) from None

    def _resubscribe(self) -> None:
        """Subscribe the consumer to the topics ready to join (a topic whose
        partitions the leader does not know yet would be assigned none)."""
        if self._stopped:
            return
        if self._subscribed:
            self._consumer.subscribe(topics=sorted(self._subscribed), listener=self._listener)
        else:
            self._consumer.unsubscribe()

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

    def _drop_route(self, sub: KafkaConsumer) -> bool:
        """Forget *sub*; True when its topic has no subscription left."""
        routes = self.flow.routes
        subs = routes.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            routes.pop(sub.topic, None)
            self._starts.pop(sub.topic, None)
            self._subscribed.discard(sub.topic)
            return True
        return False

    async def remove(self, sub: KafkaConsumer) -> bool:
        """Close *sub*: commit, then drop its topic from the group. True when
        the group has no subscription left (the caller then stops it)."""
        sub.handoff.fail(BusClosedError("subscription closed"))
        topic_gone = self._drop_route(sub)
        await self.commits.commit()
        routes = self.flow.routes
        if not routes:
            return True
        if topic_gone:
            # Re-subscribe without the topic; the rebalance revokes its
            # partitions (committing their finished prefix) in the background.
            self._resubscribe()
        return False

    # -- rebalance (called by aiokafka's coordinator) ----------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop handing out the revoked partitions, wait up to
        ``rebalance_grace`` for their records with handlers, commit, forget."""
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
        for tp in revoked:
            flow.replace(tp, None)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Resolve positions of the new assignment; wake waiting subscribes."""
        # The join that ended here was for the subscription current now
        # (aiokafka discards a join whose subscription changed under it);
        # a subscribe slipping in just before this callback leaves the new
        # subscription unassigned: it has its own join to come.
        current = self._consumer._subscription.subscription
        joined = (
            set(current.topics) if current is not None and current.assignment is not None else set()
        )
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
        for topic, fut in list(self._assign_waiters):
            if topic in joined:
                self._assign_waiters.remove((topic, fut))
                if not fut.done():
                    fut.set_result(None)

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
