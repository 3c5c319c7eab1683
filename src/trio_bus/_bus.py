"""The :class:`Bus`: the public front of trio_bus.

The bus is a facade over three parts, each in its own module: the publish
pipeline (:mod:`._publisher`), the subscriptions and their fetch tasks
(:mod:`._subscription`) and the actor pool (:mod:`._pool`); the monitor
(:mod:`.health`) and the metrics collector (:mod:`.metrics`) observe it
through :meth:`Bus.statistics` and :meth:`Bus.subscriptions` only. Its
subscribe methods live in :mod:`._subscribe_api`.
:func:`open_bus` (:mod:`._open`) wires them together and owns their tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import trio
from opentelemetry.trace import Tracer

from ._config import BusConfig
from ._envelope import Envelope
from ._message import OutgoingMessage
from ._names import validate_topic
from ._pool import ActorPool
from ._publisher import Publisher
from ._ratelimit import PublishLimits
from ._results import FullPolicy, PublishResult, PublishResultStream
from ._stats import BusStatistics, TopicStats
from ._subscribe_api import SubscribeMethods
from ._subscription import Subscription, Subscriptions
from ._topics import TopicAdmin
from .asyncapi import Publication, build_document
from .errors import BusClosedError, InvalidInputError
from .health import HealthReport, Monitor, Monitoring
from .metrics import registry_for
from .transports._base import Transport

__all__ = ["Bus", "BusStatistics", "Subscription"]


class Bus(SubscribeMethods):
    """A connection to a transport, with the global actor pool.

    Create it with :func:`open_bus`; it is usable inside that block only.
    """

    def __init__(
        self,
        config: BusConfig,
        transport: Transport,
        nursery: trio.Nursery,
        *,
        monitoring: Monitoring,
        tracer: Tracer | None,
    ) -> None:
        self._config = config
        self._transport = transport
        self._tracer = tracer
        self._topic_stats: dict[str, TopicStats] = {}
        self._publisher = Publisher(
            transport,
            max_message_bytes=config.max_message_bytes,
            tracer=tracer,
            topic_stats=self._stats_for,
            limits=PublishLimits.build(config.publish_rate, config.publish_rates),
        )
        self._pool = ActorPool(
            size=config.pool_size,
            inbox_size=config.inbox_size,
            max_restarts=config.max_restarts,
            restart_window=config.restart_window,
            publish=self._publish_dead_letter,
        )
        self._subscriptions = Subscriptions(
            transport=transport,
            pool=self._pool,
            nursery=nursery,
            tracer=tracer,
            shutdown_grace=config.shutdown_grace,
        )
        self._monitor = Monitor(
            self,
            monitoring,
            subscribe_probe=self._subscribe_probe,
            publish_probe=self._publish_probe,
        )
        self._publications: list[Publication] = []
        self.topics = TopicAdmin(transport)
        """Configure, describe and list topics while running (see
        :class:`~trio_bus.TopicAdmin`)."""
        self.metrics_registry = registry_for(self, self._monitor)
        """This bus's own Prometheus registry (see :mod:`trio_bus.metrics`)."""

    # ------------------------------------------------------------ properties

    @property
    def client_id(self) -> str:
        """The client id; the default consumer group."""
        return self._config.client_id

    @property
    def transport(self) -> Transport:
        """The transport this bus runs on."""
        return self._transport

    def _stats_for(self, topic: str) -> TopicStats:
        stats = self._topic_stats.get(topic)
        if stats is None:
            stats = self._topic_stats[topic] = TopicStats()
        return stats

    def subscriptions(self) -> tuple[Subscription, ...]:
        """The live subscriptions (the monitor's private probe included)."""
        return tuple(self._subscriptions.live)

    def statistics(self) -> BusStatistics:
        """A frozen snapshot of counters, queue depths and running handlers."""
        pool = self._pool
        depths = pool.inbox_depths()
        # Each counter is kept once, per topic; the bus-wide ones are sums.
        topics = tuple(s.snapshot(t) for t, s in sorted(self._topic_stats.items()))
        throttled, throttled_seconds = self._publisher.throttling()
        return BusStatistics(
            pool_size=pool.size,
            actors_alive=pool.actors_alive(),
            subscriptions=len(self._subscriptions.live),
            in_flight=self._subscriptions.in_flight(),
            queued=sum(depths),
            max_inbox_depth=max(depths, default=0),
            inbox_depths=depths,
            published=self._publisher.published,
            handled=sum(t.handled for t in topics),
            failed=sum(t.failed for t in topics),
            retried=sum(t.retried for t in topics),
            dead_lettered=sum(t.dead_lettered for t in topics),
            restarts=pool.restarts,
            publish_backlog=self._publisher.backlog,
            publish_results_dropped=self._publisher.results.dropped,
            running=tuple(pool.running()),
            topics=topics,
            publish_throttled=throttled,
            publish_throttled_seconds=throttled_seconds,
        )

    # ---------------------------------------------------------------- publish

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish one message; return once the transport stored it durably.

        Args:
            topic: Destination topic.
            value: The body.
            key: The aggregate ID: messages with the same key are handled in
                order, one at a time.
            headers: Extra headers (str to str).

        Raises:
            InvalidTopicError, InvalidAggregateIDError, PayloadTooLargeError,
            InvalidInputError: bad arguments, before anything is sent.
            PublishError: the broker refused it;
                PublishOutcomeUnknownError: no answer in time.
            BusClosedError: the bus is closed.
        """
        await self._publisher.send_one(self._publisher.outgoing(topic, value, key, headers))

    async def publish_envelope(
        self, topic: str, envelope: Envelope, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish an :class:`Envelope` as the seed system's JSON, keyed by its
        aggregate ID, with its metadata in headers (``X-Event-ID``...)."""
        await self._publisher.send_one(self._publisher.envelope_record(topic, envelope, headers))

    async def publish_many(
        self, messages: Iterable[OutgoingMessage | tuple[str, Envelope]]
    ) -> None:
        """Publish many messages with one transport call per
        :data:`PUBLISH_BATCH` messages: the fast path for bulk loads.

        Each item is an :class:`OutgoingMessage` or a ``(topic, envelope)``
        pair. Everything is validated before anything is sent. Up to
        :data:`MAX_CHUNKS_IN_FLIGHT` chunks wait for their acks at once;
        order is kept per topic and key (one aggregate's messages are sent
        one chunk after the other), not across keys. Under a rate limit a
        chunk holds at most ``burst`` messages and waits for its tokens.

        Raises:
            PublishError: the first failure, in the order of *messages*; a
                note says how many others failed. Messages without a
                failure were stored.
        """
        publisher = self._publisher
        await publisher.send_many(publisher.records(messages))

    async def _publish_dead_letter(self, record: OutgoingMessage) -> None:
        await self._publisher.send_one(record, report=False)

    async def _publish_probe(self, topic: str, value: bytes, headers: Mapping[str, str]) -> None:
        publisher = self._publisher
        await publisher.send_one(publisher.outgoing(topic, value, None, headers), report=False)

    # --------------------------------------------------------------- AsyncAPI

    def declare_publication(
        self,
        topic: str,
        *,
        event_type: str,
        payload: type[Any] | None = None,
        event_version: int | None = None,
        description: str | None = None,
    ) -> None:
        """Declare that this service publishes envelopes of *event_type*
        (payload *payload*, any JSON when None) on *topic*, for
        :meth:`asyncapi`. Declaring changes nothing else."""
        self._publications.append(
            Publication(
                topic=validate_topic(topic),
                event_type=event_type,
                payload=payload,
                event_version=event_version,
                description=description,
            )
        )

    def asyncapi(self, *, title: str | None = None, version: str = "0.0.0") -> dict[str, Any]:
        """An AsyncAPI 3.0 document (a JSON-ready dict) of this bus's live
        subscriptions (receive operations), their dead-letter topics and the
        publications declared with :meth:`declare_publication` (send
        operations). Routed payload types appear as JSON schemas.

        Args:
            title: ``info.title``; default the bus's ``client_id``.
            version: ``info.version`` (the application's version).
        """
        return build_document(
            title=title or self.client_id,
            version=version,
            routes=[sub._route for sub in self._subscriptions.live],
            publications=self._publications,
        )

    # ------------------------------------------------------- health, results

    async def health(self) -> HealthReport:
        """Check the bus now: connection, subscriptions, actors, stalls, lag.

        Samples every consumer's lanes (may ask the broker), then reports.
        ``report.healthy`` is False when the transport is disconnected, a
        subscription's fetch task is down, an actor is not running, anything
        stalls longer than ``Monitoring.stall_after``, or the round-trip
        probe failed ``probe_failures`` times in a row.
        """
        await self._monitor.sample()
        return self._monitor.report()

    async def probe(self) -> float:
        """Publish a probe on the health topic and wait until it has come
        back through the broker and the actor pool; return the latency in
        seconds.

        Raises:
            trio.TooSlowError: it did not come back within
                ``Monitoring.probe_timeout`` (wrap the call in
                ``trio.fail_after`` for a shorter bound).
        """
        return await self._monitor.probe()

    async def wait_unhealthy(self) -> None:
        """Wait until the periodic probe declares the bus unhealthy."""
        await self._monitor.wait_probe_verdict(False)

    async def wait_healthy(self) -> None:
        """Wait until the periodic probe declares the bus healthy again."""
        await self._monitor.wait_probe_verdict(True)

    def open_publish_results(
        self, *, tenant_id: str | None = None, buffer: int = 1000, when_full: FullPolicy = "wait"
    ) -> trio.MemoryReceiveChannel[PublishResult]:
        """A stream of :class:`PublishResult`, one per later publish (for an
        outbox table): success, failure or unknown, with the event id.

        Args:
            tenant_id: Only results of this tenant (envelope ``tenant_id`` /
                ``X-Tenant-ID`` header); None: every result.
            buffer: Results held for a slow reader.
            when_full: ``"wait"``: publishers wait for the reader (nothing
                is lost); ``"drop"``: results are dropped and counted
                (``publish_results_dropped`` metric) and a warning is logged.

        Close the returned channel to stop the stream.
        """
        if when_full not in ("wait", "drop"):
            raise InvalidInputError(f"when_full must be 'wait' or 'drop', not {when_full!r}")
        if not isinstance(buffer, int) or buffer < 0:
            raise InvalidInputError(f"buffer must be an int >= 0, not {buffer!r}")
        if self._publisher.closed:
            raise BusClosedError("the bus is closed")
        stream: PublishResultStream = self._publisher.results.open(
            tenant_id=tenant_id, buffer=buffer, policy=when_full
        )
        return stream.receive
