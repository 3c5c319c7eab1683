"""The Kafka transport object and its lifetime."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiokafka
import aiokafka.errors as kafka_errors
import trio
from aiokafka.admin import AIOKafkaAdminClient

from ..._exceptions import unwrap_lone_exception
from ..._message import OutgoingMessage
from ...errors import BusClosedError, PublishOutcomeUnknownError, TopicConfigError, TransportError
from .._base import Consumer, ConsumerSpec, Transport, TransportSettings
from .._bridge import Bridge, open_bridge
from .admin import TopicProvisioner
from .errors import publish_error as _publish_error
from .errors import transport_error as _transport_error
from .group import _Group, _Subscription
from .options import CONNECTION_CHECK_INTERVAL, KafkaOptions, resolve_options
from .options import client_kwargs as _client_kwargs

__all__ = ["KafkaTransport", "open_transport"]

logger = logging.getLogger("trio_bus.transports.kafka")


class KafkaTransport(Transport):
    """The transport over aiokafka; created by :func:`open_transport`.

    Attributes:
        options: The effective :class:`KafkaOptions`.
        idempotent: Whether the producer runs idempotent (known once open).
    """

    name = "kafka"
    coalesce_publishes = True

    def __init__(self, settings: TransportSettings, options: KafkaOptions, bridge: Bridge) -> None:
        self.options = options
        self.hosts = settings.hosts
        self.client_id = settings.client_id
        self.bridge = bridge
        self.idempotent = False
        self.groups: dict[str, _Group] = {}
        self._max_message_bytes = settings.max_message_bytes
        self._producer: Any = None
        self._admin: Any = None
        self._topics: Any = None
        self._join_locks: dict[str, asyncio.Lock] = {}
        self._connected = True
        self._watcher: asyncio.Task[None] | None = None

    # -- asyncio side ----------------------------------------------------

    def _make_producer(self, idempotent: bool) -> Any:
        opts = self.options
        kwargs: dict[str, Any] = {
            "acks": opts.acks,
            "enable_idempotence": idempotent,
            "compression_type": None if opts.compression == "none" else opts.compression,
            "linger_ms": opts.linger_ms,
            "max_batch_size": opts.max_batch_size,
            "max_request_size": max(1024 * 1024, self._max_message_bytes + 64 * 1024),
            "request_timeout_ms": int(opts.publish_timeout * 1000),
        }
        kwargs.update(_client_kwargs(opts, self.hosts, self.client_id))
        kwargs.update(opts.producer_args)
        return aiokafka.AIOKafkaProducer(**kwargs)

    async def _aio_start(self) -> None:
        opts = self.options
        try:
            self._admin = AIOKafkaAdminClient(
                request_timeout_ms=int(opts.publish_timeout * 1000),
                **_client_kwargs(opts, self.hosts, self.client_id),
            )
            await self._admin.start()
            self._topics = TopicProvisioner(self._admin, opts)
            want_idempotence = opts.idempotence is not False and opts.acks == "all"
            producer = self._make_producer(want_idempotence)
            try:
                await producer.start()
                self.idempotent = want_idempotence
            except kafka_errors.KafkaError as exc:
                await producer.stop()
                if not want_idempotence or opts.idempotence is True:
                    raise
                # The broker refused InitProducerId (Tansu 0.6 does): fall
                # back to a plain acks=all producer and say so once.
                logger.warning(
                    "kafka broker %s does not support the idempotent producer "
                    "(%s: %s); publishing with acks=all without idempotence: a "
                    "retried send may be stored twice",
                    ",".join(self.hosts),
                    type(exc).__name__,
                    exc,
                )
                producer = self._make_producer(False)
                await producer.start()
            self._producer = producer
            self._watcher = asyncio.get_running_loop().create_task(self._watch_connection())
        except BaseException:
            await self._aio_close()
            raise

    async def _watch_connection(self) -> None:
        """Keep ``connected`` current: can a broker be reached right now?"""
        client = self._producer.client
        while True:
            ok = False
            for broker in client.cluster.brokers():
                try:
                    ok = await asyncio.wait_for(client.ready(broker.nodeId), 2.0)
                except (TimeoutError, kafka_errors.KafkaError, OSError):
                    ok = False
                if ok:
                    break
            if ok != self._connected:
                logger.log(
                    logging.INFO if ok else logging.WARNING,
                    "kafka broker %s",
                    "reachable again" if ok else "unreachable",
                )
            self._connected = ok
            await asyncio.sleep(CONNECTION_CHECK_INTERVAL)

    async def _aio_close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except BaseException:  # cancelled or failed: either way it is done
                pass
            self._watcher = None
        for group in list(self.groups.values()):
            try:
                await group.stop()
            except Exception:
                logger.exception("closing consumer group %r failed", group.name)
        self.groups.clear()
        for client in (self._producer, self._admin):
            if client is None:
                continue
            try:
                await (client.stop() if client is self._producer else client.close())
            except Exception:
                logger.exception("closing a kafka client failed")
        self._producer = self._admin = None

    async def _aio_publish(self, records: Sequence[OutgoingMessage]) -> list[Exception | None]:
        await self._topics.ensure({r.topic for r in records})
        producer = self._producer
        outcomes: list[Exception | None] = [None] * len(records)
        futures: dict[asyncio.Future[Any], int] = {}
        for i, rec in enumerate(records):
            try:
                fut = await producer.send(
                    rec.topic,
                    rec.value,
                    key=rec.key.encode() if rec.key is not None else None,
                    headers=[(k, v.encode()) for k, v in rec.headers.items()],
                )
            except kafka_errors.KafkaError as exc:
                outcomes[i] = _publish_error(exc, rec.topic)
            else:
                futures[fut] = i
        if futures:
            done, pending = await asyncio.wait(futures, timeout=self.options.publish_timeout)
            for fut in done:
                i = futures[fut]
                failure = fut.exception()
                if failure is not None:
                    outcomes[i] = _publish_error(failure, records[i].topic)
            for fut in pending:
                i = futures[fut]
                outcomes[i] = PublishOutcomeUnknownError(
                    f"no answer from the broker for a publish to {records[i].topic!r} "
                    f"within {self.options.publish_timeout} s"
                )
        return outcomes

    async def _aio_open_consumer(self, spec: ConsumerSpec) -> _Subscription:
        await self._topics.ensure({spec.topic})
        # One join at a time per group; groups join concurrently.
        lock = self._join_locks.setdefault(spec.group, asyncio.Lock())
        async with lock:
            group = self.groups.get(spec.group)
            if group is None:
                group = _Group(self, spec.group, ephemeral=spec.ephemeral)
                await group.start()
                self.groups[spec.group] = group
            sub = _Subscription(group, spec)
            try:
                await group.add(sub)
            except BaseException:
                if not group.routes:
                    self.groups.pop(spec.group, None)
                    await group.stop()
                raise
        return sub

    # -- Trio side ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a broker answered the last connection check (every
        ``CONNECTION_CHECK_INTERVAL`` seconds)."""
        return self._connected

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        """Send *records* (one bridge crossing); one outcome per record."""
        if not records:
            await trio.lowlevel.checkpoint()
            return []
        try:
            return await self.bridge.call(self._aio_publish, records)
        except (TopicConfigError, TransportError):
            raise
        except kafka_errors.KafkaError as exc:
            raise _transport_error(exc, "publishing") from exc

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        """Join *spec.group* with *spec.topic*; return once its partitions are
        assigned and their positions resolved."""
        try:
            return await self.bridge.call(self._aio_open_consumer, spec)
        except (TopicConfigError, TransportError, BusClosedError):
            raise
        except kafka_errors.KafkaError as exc:
            raise _transport_error(exc, f"joining consumer group {spec.group!r}") from exc

    async def topic_metadata(self, topic: str) -> tuple[int, int]:
        """``(partitions, replication_factor)`` of *topic* as the broker
        reports it (one crossing; for tools and tests)."""

        return await self.bridge.call(self._topics.describe, topic)


@asynccontextmanager
async def open_transport(settings: TransportSettings) -> AsyncIterator[KafkaTransport]:
    """Open the Kafka transport: an asyncio loop, a producer and an admin
    client; consumers are added by ``open_consumer``. Leaving the block
    commits what finished, leaves every group and closes every client, also
    when cancelled (shielded, bounded by ``close_timeout``)."""
    options = resolve_options(settings)
    # trio-asyncio's loop nursery wraps whatever leaves the block; give
    # callers the one exception they would expect.
    with unwrap_lone_exception():
        async with _open(settings, options) as transport:
            yield transport


@asynccontextmanager
async def _open(
    settings: TransportSettings, options: KafkaOptions
) -> AsyncIterator[KafkaTransport]:
    async with open_bridge("kafka") as bridge:
        transport = KafkaTransport(settings, options, bridge)
        try:
            await bridge.call(transport._aio_start)
        except kafka_errors.KafkaError as exc:
            raise _transport_error(
                exc, f"cannot connect to kafka at {','.join(settings.hosts)}"
            ) from exc
        started = time.monotonic()
        try:
            yield transport
        finally:
            with trio.move_on_after(options.close_timeout * 2) as scope:
                scope.shield = True
                await bridge.call(transport._aio_close)
            if scope.cancelled_caught:
                logger.warning(
                    "closing the kafka transport took over %s s (open %.1f s)",
                    options.close_timeout * 2,
                    time.monotonic() - started,
                )
