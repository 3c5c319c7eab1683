"""Ephemeral topics on NATS: Core NATS subjects, no stream, at-most-once.

An ephemeral topic's messages are published with plain ``PUB`` on the
topic's subject and received by a Core NATS subscription (a queue group per
consumer group, so members share the work). Nothing is stored: a message
reaches the subscriptions that exist when the server routes it, once; acks
and releases are no-ops. Within one subscription NATS delivers in publish
order, so the bus's per-aggregate order holds inside one bus; across the
members of a queue group it does not (see docs/topics.md).

Core NATS cannot be paused, so a subscription bounds what it holds: beyond
``MAX_HELD`` messages waiting for the bus, new ones are dropped and counted
(``dropped``), as the server itself does with a slow consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
import trio

from ..._message import OutgoingMessage, Record, new_record
from ..._names import AGGREGATE_ID_HEADER
from ..._topics import PersistencePolicy, StoredAs
from ...errors import BusClosedError, PublishError, TransportError
from .._base import Consumer, ConsumerSpec, LaneState
from .._bridge import Bridge, Handoff
from .connection import Connection
from .options import stream_name
from .streams import map_api_error

__all__ = ["MAX_HELD", "CoreConsumer", "CoreSubscription", "Modes", "publish_core", "stored"]

logger = logging.getLogger("trio_bus.nats")

#: Most messages one ephemeral subscription holds for the bus before it
#: drops new ones.
MAX_HELD = 10_000


async def stored(conn: Connection, topic: str) -> bool:
    """Whether a JetStream stream stores *topic* (its own or an outer one)."""
    jsm = conn.jsm
    try:
        await jsm.stream_info(stream_name(topic, conn.options.stream_prefix))
        return True
    except nats.js.errors.NotFoundError:
        pass
    except Exception as exc:
        raise map_api_error(exc, f"looking up the stream of {topic!r}") from exc
    try:
        await jsm.find_stream_name_by_subject(topic)
        return True
    except nats.js.errors.NotFoundError:
        return False
    except Exception as exc:
        raise map_api_error(exc, f"looking up the stream of {topic!r}") from exc


class Modes:
    """Each topic's persistence as this transport resolved it (asyncio side):
    ``auto`` becomes persistent when a stream stores the topic, once."""

    def __init__(self, conn: Connection, policy: PersistencePolicy) -> None:
        self._conn = conn
        self._policy = policy
        self._resolved: dict[str, StoredAs] = {}

    async def of(self, topic: str) -> StoredAs:
        """How *topic* is published and consumed."""
        mode = self._resolved.get(topic)
        if mode is None:
            wanted = self._policy.of(topic)
            if wanted == "auto":
                mode = "persistent" if await stored(self._conn, topic) else "ephemeral"
            else:
                mode = wanted
            self._resolved[topic] = mode
        return mode

    def set(self, topic: str, mode: StoredAs) -> None:
        """``bus.topics.configure(persistence=...)`` decided it."""
        self._resolved[topic] = mode


async def publish_core(
    conn: Connection, records: Sequence[OutgoingMessage]
) -> list[Exception | None]:
    """Publish *records* with Core NATS; None each once the server has them
    (a flush round trip), else one PublishError each."""
    nc = conn.nc
    try:
        for record in records:
            headers = dict(record.headers)
            if record.key is not None:
                headers[AGGREGATE_ID_HEADER] = record.key
            await nc.publish(record.topic, record.value, headers=headers or None)
        await asyncio.wait_for(nc.flush(), conn.options.publish_timeout)
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        outcomes: list[Exception | None] = []
        for record in records:
            error = PublishError(f"core nats publish to {record.topic!r} failed: {exc!r}")
            error.__cause__ = exc
            outcomes.append(error)
        return outcomes
    return [None] * len(records)


class CoreSubscription:
    """One ephemeral subscription (asyncio side), feeding a :class:`Handoff`."""

    def __init__(self, conn: Connection, spec: ConsumerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.handoff: Handoff[Record] = Handoff()
        #: Messages dropped because the bus was MAX_HELD behind.
        self.dropped = 0
        self._sub: Any = None
        self._offset = 0

    async def start(self) -> None:
        """Subscribe (a private group gets no queue: every member is it)."""
        queue = "" if self.spec.ephemeral else self.spec.group
        self._sub = await self.conn.nc.subscribe(
            self.spec.topic, queue=queue, cb=self._on_msg, pending_msgs_limit=MAX_HELD * 2
        )
        await asyncio.wait_for(self.conn.nc.flush(), self.conn.options.request_timeout)

    async def _on_msg(self, msg: Any) -> None:
        if len(self.handoff) >= MAX_HELD:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % MAX_HELD == 0:
                logger.warning(
                    "ephemeral topic %s: the bus is %d messages behind; dropped %d so far",
                    self.spec.topic,
                    MAX_HELD,
                    self.dropped,
                )
            return
        self._offset += 1
        self.handoff.put(
            new_record(
                topic=self.spec.topic,
                subject=msg.subject,
                value=msg.data,
                key=None,
                headers=msg.headers or {},
                partition=None,
                offset=self._offset,
            )
        )

    async def close(self) -> None:
        """Unsubscribe; what was not taken is lost (at-most-once)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                logger.debug("unsubscribing %s: %r", self.spec.topic, exc)


class CoreConsumer(Consumer):
    """The Trio side of a :class:`CoreSubscription`: settling is a no-op."""

    def __init__(
        self,
        bridge: Bridge,
        sub: CoreSubscription,
        on_close: Callable[[CoreConsumer], None] | None = None,
        *,
        close_timeout: float,
    ) -> None:
        self._bridge = bridge
        self._close_timeout = close_timeout
        self._sub = sub
        self._closed = False
        self._on_close = on_close

    async def fetch(self, max_records: int) -> Sequence[Record]:
        if self._closed:
            raise BusClosedError("consumer closed")
        return await self._sub.handoff.take(max_records)

    def ack(self, record: Record) -> None:
        pass  # at-most-once: nothing to tell the server

    def release(self, record: Record) -> None:
        pass

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close(self)
        self._sub.handoff.fail(BusClosedError("consumer closed"))
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._close_timeout
            try:
                await self._bridge.call(self._sub.close)
            except TransportError as exc:  # the loop is gone already
                logger.debug("closing an ephemeral subscription: %s", exc)

    async def lanes(self) -> Sequence[LaneState]:
        await trio.lowlevel.checkpoint()
        return [LaneState(topic=self._sub.spec.topic, lag=len(self._sub.handoff))]
