"""The Trio side: :class:`NatsTransport`, :class:`NatsConsumer`, :func:`open_transport`.

Every loop the transport needs for its lifetime runs on the asyncio side,
in the task group of :class:`.Supervisor`: the connection watch
(:meth:`.Connection.watch`) and one loop per consumer (:meth:`.Puller.run`).
The group is held open by one Trio task of the transport's nursery that
awaits it through :meth:`Bridge.call <trio_bus.transports._bridge.Bridge.call>`.
Leaving the transport cancels them; whatever they raise ends the transport,
and so ``open_bus``, as a :class:`~trio_bus.errors.TransportError`.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..._exceptions import unwrap_lone_exception
from ..._message import OutgoingMessage, Record
from ..._topics import PersistencePolicy, TopicDescription, TopicRequest
from ...errors import BusClosedError, ConfigError, TransportError
from .._base import Consumer, ConsumerSpec, LaneState, Transport, TransportSettings
from .._bridge import Bridge, open_bridge
from .connection import Connection
from .ephemeral import CoreConsumer, CoreSubscription, Modes, publish_core
from .group import GroupConsumer
from .options import NatsOptions
from .publish import Publisher
from .puller import Puller
from .rounds import Rounds
from .settle import ACK, NAK, Delivery
from .streams import Streams, TopicInfo
from .supervisor import Supervisor
from .topics import TopicAdmin

__all__ = ["CLOSE_TIMEOUT", "NatsConsumer", "NatsTransport", "open_transport"]

logger = logging.getLogger("trio_bus.nats")

#: Seconds the shielded cleanup on close may take (naks, flush, close), even
#: when the server is unreachable; the asyncio side then gets at most
#: ``_bridge.UNWIND_TIMEOUT`` more to unwind.
CLOSE_TIMEOUT = 2.0


class NatsConsumer(Consumer):
    """A durable JetStream pull consumer bound to one subscription."""

    def __init__(self, transport: NatsTransport, puller: Puller) -> None:
        self._transport = transport
        self._puller = puller
        self._bridge = transport._bridge
        self._handoff = puller.handoff
        self._mailbox = puller.mailbox
        # The loop pulls only once half the prefetch window is free.
        self._low_water = puller.prefetch // 2
        self._closed = False

    @property
    def stream(self) -> str:
        """The JetStream stream holding this consumer's topic."""
        assert self._puller.where is not None
        return self._puller.where.stream

    @property
    def durable(self) -> str:
        """The durable consumer name."""
        return self._puller.durable

    async def fetch(self, max_records: int) -> Sequence[Record]:
        """Wait for deliveries; return 1..*max_records* (cancel-atomic).

        Raises:
            BusClosedError: the consumer is closed.
            TransportError: the consumer's loop failed.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise BusClosedError("the consumer is closed")
        records = await self._handoff.take(max_records)
        if len(self._handoff) <= self._low_water:
            self._mailbox.put(None)  # room: the loop may pull more
        return records

    def _settle(self, record: Record, payload: bytes) -> None:
        delivery = record.token
        if isinstance(delivery, Delivery) and not self._closed:
            self._mailbox.put((delivery, payload))

    def ack(self, record: Record) -> None:
        """The handler finished: ``+ACK`` (sent in a batch)."""
        self._settle(record, ACK)

    def release(self, record: Record) -> None:
        """Not handled: ``-NAK`` without delay (sent in a batch).

        Deliveries already waiting in the hand-off are NAK'd after it, in
        order: the server redelivers NAK'd messages in the order it got the
        NAKs, so the released one comes again before them (contract rule 7).
        """
        self._settle(record, NAK)
        for queued in self._handoff.take_nowait(len(self._handoff)):
            self._settle(queued, NAK)

    async def flush(self) -> None:
        """Send the queued acks/naks now and wait for the server to confirm
        them (bounded by ``CLOSE_TIMEOUT``)."""
        await self._bridge.call(self._puller.flush, CLOSE_TIMEOUT)

    async def lanes(self) -> Sequence[LaneState]:
        """One lane: the whole consumer (NATS has no partitions). Asks the
        server for the consumer's state (one crossing)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return ()
        return (await self._bridge.call(self._puller.lane),)

    async def aclose(self) -> None:
        """Stop the loop, nak what is unsettled, leave; bounded by
        ``CLOSE_TIMEOUT`` even when the server is unreachable."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._transport._consumers.discard(self)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            close = self._transport._supervisor.close_consumer
            try:
                await self._bridge.call(close, self._puller, CLOSE_TIMEOUT * 0.8)
            except TransportError as exc:  # redelivered after ack_wait instead
                logger.warning("closing consumer %s: %s", self.durable, exc)
        if scope.cancelled_caught:
            logger.warning("closing consumer %s took over %ss", self.durable, CLOSE_TIMEOUT)


class NatsTransport(Transport):
    """JetStream through nats-py on a trio-asyncio loop."""

    name = "nats"
    coalesce_publishes = True

    def __init__(
        self, bridge: Bridge, conn: Connection, persistence: PersistencePolicy | None = None
    ) -> None:
        self._bridge = bridge
        self._conn = conn
        self._streams = Streams(conn)
        self._publisher = Publisher(conn, self._streams)
        self._supervisor = Supervisor(conn)
        self._consumers: set[NatsConsumer | CoreConsumer | GroupConsumer] = set()
        # Partitioned groups (group.py): this bus's member name, one member
        # per subscription, and the task running their lease rounds.
        self._rounds = Rounds()
        self._member_id = conn.options.groups.member_id or uuid.uuid4().hex[:12]
        self._member_seq = itertools.count()
        self._modes = Modes(conn, persistence or PersistencePolicy())
        self._topics = TopicAdmin(conn, self._streams, self._modes)

    @property
    def connected(self) -> bool:
        """Whether the nats connection is up right now."""
        return bool(self._conn.nc.is_connected)

    @property
    def problem(self) -> str | None:
        """The server refusing our credentials (see ``auth_failure_grace``)."""
        return self._conn.problem

    @property
    def options(self) -> NatsOptions:
        """The options in effect."""
        return self._conn.options

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        """Publish *records* (one crossing); one outcome each, None only
        once the server acked it."""
        if not records:
            await trio.lowlevel.checkpoint()
            return []
        return await self._bridge.call(self._publish, records)

    async def _publish(self, records: Sequence[OutgoingMessage]) -> list[Exception | None]:
        # Asyncio side: JetStream for persistent topics, Core NATS for
        # ephemeral ones (see ephemeral.py), one outcome per record in order.
        modes = {topic: await self._modes.of(topic) for topic in {r.topic for r in records}}
        if "ephemeral" not in modes.values():
            return await self._publisher.publish_many(records)
        core = [i for i, r in enumerate(records) if modes[r.topic] == "ephemeral"]
        stored = [i for i, r in enumerate(records) if modes[r.topic] != "ephemeral"]
        outcomes: list[Exception | None] = [None] * len(records)
        for indices, outcome in (
            (core, await publish_core(self._conn, [records[i] for i in core])),
            (stored, await self._publisher.publish_many([records[i] for i in stored])),
        ):
            for i, each in zip(indices, outcome, strict=True):
                outcomes[i] = each
        return outcomes

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        """Bind the group's durable consumer (return once a pull is out),
        join a partitioned group, or subscribe to an ephemeral topic's
        subject."""
        if await self._bridge.call(self._modes.of, spec.topic) == "ephemeral":
            sub = CoreSubscription(self._conn, spec)
            core = CoreConsumer(
                self._bridge, sub, self._consumers.discard, close_timeout=CLOSE_TIMEOUT
            )
            try:
                await self._bridge.call(sub.start)
            except BaseException:
                await core.aclose()
                raise
            self._consumers.add(core)
            return core
        where = await self._bridge.call(self._streams.ensure, spec.topic)
        if where.partitions > 1 and not spec.ephemeral:
            return await self.open_group(spec, where)
        return await self.open_durable(spec)

    async def open_group(self, spec: ConsumerSpec, where: TopicInfo) -> GroupConsumer:
        """Join the partitioned group as a member; return once the
        partitions free for it pull (see group.py)."""
        member = f"{self._member_id}-{next(self._member_seq)}"
        group = GroupConsumer(self, spec, where, member)
        self._consumers.add(group)
        try:
            await group.open()
        except BaseException:
            await group.aclose()
            raise
        self._rounds.groups.add(group)
        self._rounds.wake()
        return group

    async def open_durable(self, spec: ConsumerSpec) -> NatsConsumer:
        """Bind the group's one JetStream durable consumer (the whole topic,
        partitioned or not) whatever the topic's persistence; return once a
        pull is out."""
        puller = Puller(self._conn, self._streams, spec)
        supervisor = self._supervisor
        try:
            await self._bridge.call(supervisor.open_consumer, puller)
        except BaseException:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                await self._bridge.call(supervisor.close_consumer, puller, CLOSE_TIMEOUT * 0.8)
            raise
        consumer = NatsConsumer(self, puller)
        self._consumers.add(consumer)
        return consumer

    async def configure_topic(self, topic: str, request: TopicRequest) -> TopicDescription:
        """``bus.topics.configure``: see :mod:`.topics`."""
        result: TopicDescription = await self._bridge.call(self._topics.configure, topic, request)
        return result

    async def describe_topic(self, topic: str) -> TopicDescription:
        """``bus.topics.describe``: the stream storing *topic*, if any."""
        result: TopicDescription = await self._bridge.call(self._topics.describe, topic)
        return result

    async def list_topics(self) -> Sequence[str]:
        """``bus.topics.list``: topics stored in this prefix's streams."""
        result: list[str] = await self._bridge.call(self._topics.list)
        return result

    async def run_on_loop(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run an asyncio coroutine function on the transport's loop (one
        crossing), e.g. to reach the nats-py client in tests and tools."""
        return await self._bridge.call(fn, *args)

    @property
    def client(self) -> Any:
        """The underlying ``nats.aio.client.Client`` (use it on the
        transport's loop only, through :meth:`run_on_loop`)."""
        return self._conn.nc


def _servers(settings: TransportSettings) -> list[str]:
    return [host if "://" in host else f"nats://{host}" for host in settings.hosts]


@asynccontextmanager
async def open_transport(settings: TransportSettings) -> AsyncIterator[NatsTransport]:
    """Connect to NATS; everything (loop, client, tasks) ends with the block.

    Raises:
        ConfigError: ``settings.options`` is not a :class:`NatsOptions`.
        TransportUnavailableError: no server could be reached, or nats-py
            closed the connection for good while the block ran.
        TransportError: a consumer's loop failed.
    """
    # The loop's and our nurseries wrap what passes through them; raise a
    # lone exception as itself, as a plain context manager would.
    with unwrap_lone_exception():
        async with _open_transport(settings) as transport:
            yield transport


@asynccontextmanager
async def _open_transport(settings: TransportSettings) -> AsyncIterator[NatsTransport]:
    options = settings.options if settings.options is not None else NatsOptions()
    if not isinstance(options, NatsOptions):
        raise ConfigError(f"the nats transport takes NatsOptions, not {type(options).__name__}")
    servers = _servers(settings)
    if not servers:
        raise ConfigError("a nats:// URL needs at least one host:port")
    async with open_bridge("nats") as bridge:
        conn = Connection(options)
        try:
            await bridge.call(conn.connect, servers, settings.client_id)
            async with trio.open_nursery() as nursery:
                transport = NatsTransport(bridge, conn, settings.persistence)
                supervisor = transport._supervisor
                nursery.start_soon(bridge.call, supervisor.run, name="trio_bus.nats-loops")
                await bridge.call(supervisor.wait_ready)
                nursery.start_soon(transport._rounds.run, name="trio_bus.nats-leases")
                try:
                    yield transport
                finally:
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                        for consumer in list(transport._consumers):
                            await consumer.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                try:
                    await bridge.call(conn.close)
                except TransportError as exc:  # the loop is gone already
                    logger.warning("closing the nats connection: %s", exc)
