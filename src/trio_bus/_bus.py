"""``open_bus`` and the :class:`Bus`: the public front of trio_bus."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar, cast

import attrs
import trio
from opentelemetry.trace import Tracer, TracerProvider

from ._batch import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT, BatchHandler, Batching
from ._config import (
    CANCEL_FLUSH_TIMEOUT,
    DEFAULT_CLIENT_ID,
    DEFAULT_DEAD_LETTER,
    DEFAULT_HANDLER_TIMEOUT,
    DEFAULT_INBOX_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_POOL_SIZE,
    DEFAULT_RESTART_WINDOW,
    DEFAULT_SHUTDOWN_GRACE,
    RetryPolicy,
    at_least,
)
from ._envelope import Envelope, encode_envelope
from ._exceptions import lone_exception, raise_as_is
from ._message import Message, OutgoingMessage
from ._names import validate_aggregate_id, validate_headers, validate_topic
from ._pool import ActorPool, EnvelopeHandler, Handler, Route
from ._publish import Coalescer, raise_first_failure
from ._results import FullPolicy, PublishResult, PublishResultStream, ResultStreams
from ._stats import TopicStats
from ._tracing import publish_span, traced_handler, tracer_for
from .asyncapi import Publication, build_document
from .errors import BusClosedError, ConfigError, InvalidInputError, PayloadTooLargeError
from .health import HealthReport, Monitor, Monitoring
from .metrics import registry_for
from .transports import parse_url, resolve
from .transports._base import ConsumerSpec, StartPosition, Transport, TransportSettings

__all__ = ["Bus", "BusStatistics", "Subscription", "open_bus"]

logger = logging.getLogger("trio_bus")

T = TypeVar("T")
_UNSET: object = object()
#: Largest batch handed to a transport in one call (one bridge crossing).
PUBLISH_BATCH = 1000
#: Largest batch fetched in one call.
FETCH_BATCH = 500
DEFAULT_MONITORING = Monitoring()


def _dead_letter_name(spec: str | Callable[[str], str], topic: str) -> str:
    name = spec(topic) if callable(spec) else spec.format(topic=topic)
    return validate_topic(name)


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"handler_timeout must be a positive number or None, not {value!r}")
    return float(value)


def _optional_timeout(_: object, __: object, value: float | None) -> None:
    _check_timeout(value)


@attrs.frozen(kw_only=True)
class _Config:
    client_id: str = attrs.field()
    pool_size: int = attrs.field(validator=at_least(1, integer=True))
    inbox_size: int = attrs.field(validator=at_least(1, integer=True))
    max_restarts: int = attrs.field(validator=at_least(0, integer=True))
    restart_window: float = attrs.field(validator=at_least(0))
    handler_timeout: float | None = attrs.field(validator=_optional_timeout)
    retry: RetryPolicy = attrs.field()
    dead_letter: str | Callable[[str], str] = attrs.field()
    shutdown_grace: float = attrs.field(validator=at_least(0))
    max_message_bytes: int = attrs.field(validator=at_least(1, integer=True))

    @client_id.validator
    def _check_client_id(self, _: object, value: object) -> None:
        if not isinstance(value, str):
            raise ConfigError("client_id must be a str")
        validate_topic(value)  # used as group and stream-consumer name

    @retry.validator
    def _check_retry(self, _: object, value: object) -> None:
        if not isinstance(value, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, not {type(value).__name__}")

    @dead_letter.validator
    def _check_dead_letter(self, _: object, value: object) -> None:
        if not (callable(value) or (isinstance(value, str) and "{topic}" in value)):
            raise ConfigError("dead_letter must be a template containing {topic} or a callable")


@attrs.frozen(kw_only=True)
class BusStatistics:
    """A snapshot of a bus's activity, from :meth:`Bus.statistics`.

    Attributes:
        pool_size: Actors in the pool.
        subscriptions: Live subscriptions.
        in_flight: Messages dispatched to actors and not yet acked/released.
        queued: Messages waiting in actor inboxes (sum of ``inbox_depths``).
        inbox_depths: Messages waiting per actor, by actor index.
        published: Messages the transport accepted.
        handled: Handler calls that succeeded.
        failed: Handler calls that failed or timed out (each attempt counts).
        retried: Attempts scheduled again after a failure.
        dead_lettered: Messages parked in a dead-letter topic.
        restarts: Actor restarts after a crash of the actor's own loop.
    """

    pool_size: int
    subscriptions: int
    in_flight: int
    queued: int
    inbox_depths: tuple[int, ...]
    published: int
    handled: int
    failed: int
    retried: int
    dead_lettered: int
    restarts: int


class Subscription:
    """A live subscription, returned by :meth:`Bus.subscribe`.

    Close it with :meth:`close` (or ``async with``); closing the bus closes
    it too.
    """

    def __init__(self, bus: Bus, route: Route) -> None:
        self._bus = bus
        self._route = route
        self._scope = trio.CancelScope()
        self._fetch_done = trio.Event()
        self._live = False
        self._closed = False

    @property
    def topic(self) -> str:
        """The subscribed topic."""
        return self._route.topic

    @property
    def group(self) -> str:
        """The consumer group."""
        return self._route.group

    @property
    def in_flight(self) -> int:
        """Messages of this subscription dispatched and not yet settled."""
        return self._route.in_flight

    @property
    def live(self) -> bool:
        """Whether the subscription is fetching."""
        return self._live

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        consumer, pool, route = self._route.consumer, self._bus._pool, self._route
        try:
            with self._scope:
                self._live = True
                task_status.started()
                while True:
                    records = await consumer.fetch(FETCH_BATCH)
                    await pool.dispatch(route, records)
        finally:
            self._live = False
            self._fetch_done.set()

    def _stop_fetching(self) -> None:
        self._route.closing = True
        self._scope.cancel()

    async def _drain(self, grace: float) -> None:
        """Stop fetching; give in-flight handlers *grace* seconds."""
        self._stop_fetching()
        await self._fetch_done.wait()
        with trio.move_on_after(grace):
            await self._route.wait_idle()

    async def _close_consumer(self) -> None:
        try:
            await self._route.consumer.aclose()
        except Exception:
            logger.exception("closing the consumer of %s failed", self.topic)

    async def close(self) -> None:
        """Stop this subscription.

        Fetching stops; handlers already running get the bus's
        ``shutdown_grace`` to finish; messages not started are released
        (delivered again to the group). Idempotent.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._bus._subscriptions.discard(self)
        try:
            await self._drain(self._bus._config.shutdown_grace)
        finally:
            with trio.CancelScope(shield=True):
                if self._route.in_flight:
                    self._bus._pool.abandon_route(self._route)
                    with trio.move_on_after(CANCEL_FLUSH_TIMEOUT):
                        await self._route.wait_idle()
                await self._close_consumer()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Bus:
    """A connection to a transport, with the global actor pool.

    Create it with :func:`open_bus`; it is usable inside that block only.
    """

    def __init__(
        self,
        config: _Config,
        transport: Transport,
        nursery: trio.Nursery,
        *,
        monitoring: Monitoring,
        tracer: Tracer | None,
    ) -> None:
        self._config = config
        self._transport = transport
        self._nursery = nursery
        self._tracer = tracer
        self._topic_stats: dict[str, TopicStats] = {}
        self._results = ResultStreams()
        #: Messages handed to the transport and not yet answered for.
        self._publish_backlog = 0
        self._pool = ActorPool(
            size=config.pool_size,
            inbox_size=config.inbox_size,
            max_restarts=config.max_restarts,
            restart_window=config.restart_window,
            publish=self._publish_dead_letter,
        )
        self._coalescer = (
            Coalescer(transport, max_batch=PUBLISH_BATCH) if transport.coalesce_publishes else None
        )
        self._subscriptions: set[Subscription] = set()
        self._publications: list[Publication] = []
        self._published = 0
        self._closing = False
        self._closed = False
        self._monitor = Monitor(self, monitoring)
        self.metrics_registry = registry_for(self)
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

    def statistics(self) -> BusStatistics:
        """A frozen snapshot of counters and queue depths."""
        depths = self._pool.inbox_depths()
        stats = self._pool.stats
        return BusStatistics(
            pool_size=self._pool.size,
            subscriptions=len(self._subscriptions),
            in_flight=sum(s._route.in_flight for s in self._subscriptions),
            queued=sum(depths),
            inbox_depths=depths,
            published=self._published,
            handled=stats.handled,
            failed=stats.failed,
            retried=stats.retried,
            dead_lettered=stats.dead_lettered,
            restarts=stats.restarts,
        )

    # ---------------------------------------------------------------- publish

    def _outgoing(
        self,
        topic: str,
        value: bytes,
        key: str | None,
        headers: Mapping[str, str] | None,
        message_id: str | None = None,
    ) -> OutgoingMessage:
        validate_topic(topic)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise InvalidInputError(f"value must be bytes, not {type(value).__name__}")
        value = bytes(value)
        if len(value) > self._config.max_message_bytes:
            raise PayloadTooLargeError(
                f"message of {len(value)} bytes exceeds max_message_bytes="
                f"{self._config.max_message_bytes}"
            )
        if key is not None:
            key = validate_aggregate_id(key)
        return OutgoingMessage(
            topic=topic,
            value=value,
            key=key,
            headers=validate_headers(headers),
            message_id=message_id,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosedError("the bus is closed")

    async def _send(
        self, records: list[OutgoingMessage], *, report: bool = True
    ) -> Sequence[BaseException | None]:
        """Hand *records* to the transport (merged with concurrent publishes
        where the transport wants it); count, time and report the outcomes."""
        self._check_open()
        if self._tracer is not None:
            with publish_span(self._tracer, self._transport.name, records) as traced:
                return await self._send_traced(traced, report)
        return await self._send_traced(records, report)

    async def _send_traced(
        self, records: list[OutgoingMessage], report: bool
    ) -> Sequence[BaseException | None]:
        started = trio.current_time()
        self._publish_backlog += len(records)
        outcomes: Sequence[BaseException | None]
        try:
            if self._coalescer is not None and len(records) == 1:
                try:
                    await self._coalescer.publish(records[0])
                    outcomes = [None]
                except (BusClosedError, trio.Cancelled) as exc:
                    outcomes = [exc]
                    raise
                except Exception as exc:
                    outcomes = [exc]
            else:
                outcomes = await self._transport.publish_batch(records)
        except BaseException as exc:
            outcomes = [exc] * len(records)
            raise
        finally:
            self._publish_backlog -= len(records)
            elapsed = trio.current_time() - started
            for record, outcome in zip(records, outcomes, strict=True):
                stats = self._stats_for(record.topic)
                if outcome is None:
                    stats.published += 1
                    stats.publish_latency.observe(elapsed)
                else:
                    stats.publish_failed += 1
            self._published += sum(1 for o in outcomes if o is None)
            if report and self._results.streams:
                await self._results.emit(records, outcomes)
        return outcomes

    async def _publish_dead_letter(self, record: OutgoingMessage) -> None:
        raise_first_failure(await self._send([record], report=False))

    async def _send_one(self, record: OutgoingMessage) -> None:
        raise_first_failure(await self._send([record]))

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
        await self._send_one(self._outgoing(topic, value, key, headers))

    async def publish_envelope(
        self, topic: str, envelope: Envelope, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish an :class:`Envelope` as the seed system's JSON, keyed by its
        aggregate ID, with its metadata in headers (``X-Event-ID``...)."""
        await self._send_one(self._envelope_record(topic, envelope, headers))

    def _envelope_record(
        self, topic: str, envelope: Envelope, headers: Mapping[str, str] | None
    ) -> OutgoingMessage:
        if not isinstance(envelope, Envelope):
            raise InvalidInputError(f"expected an Envelope, not {type(envelope).__name__}")
        merged = {**(headers or {}), **envelope.headers()}
        return self._outgoing(
            topic, encode_envelope(envelope), envelope.aggregate_id, merged, envelope.event_id
        )

    async def publish_many(
        self, messages: Iterable[OutgoingMessage | tuple[str, Envelope]]
    ) -> None:
        """Publish many messages with one transport call per
        :data:`PUBLISH_BATCH` messages: the fast path for bulk loads.

        Each item is an :class:`OutgoingMessage` or a ``(topic, envelope)``
        pair. Everything is validated before anything is sent. Order is kept
        per topic and key.

        Raises:
            PublishError: the first failure; a note says how many others
                failed. Messages without a failure were stored.
        """
        records = [
            self._envelope_record(m[0], m[1], None)
            if isinstance(m, tuple)
            else self._outgoing(m.topic, m.value, m.key, m.headers, m.message_id)
            for m in messages
        ]
        self._check_open()
        outcomes: list[BaseException | None] = []
        for start in range(0, len(records), PUBLISH_BATCH):
            outcomes.extend(await self._send(records[start : start + PUBLISH_BATCH]))
        raise_first_failure(outcomes)
        if not records:
            await trio.lowlevel.checkpoint()

    # -------------------------------------------------------------- subscribe

    async def _subscribe(
        self,
        topic: str,
        handler: Handler | Callable[[Envelope], Awaitable[None]],
        *,
        group: str | None,
        handler_timeout: float | object | None,
        start: StartPosition,
        wants_envelope: bool,
        ephemeral: bool = False,
        retry: RetryPolicy | object = _UNSET,
        dead_letter: str | Callable[[str], str] | object = _UNSET,
        batch: Batching | None = None,
    ) -> Subscription:
        validate_topic(topic)
        if not callable(handler):
            raise InvalidInputError("handler must be an async callable")
        # The public methods pair wants_envelope with the handler's type.
        invoke = cast(
            Handler,
            _envelope_adapter(cast(EnvelopeHandler, handler)) if wants_envelope else handler,
        )
        group = self._config.client_id if group is None else validate_topic(group)
        if start not in ("latest", "earliest"):
            raise InvalidInputError(f"start must be 'latest' or 'earliest', not {start!r}")
        # Per-subscription options: the bus's config with them swapped in,
        # checked by the same validators.
        given = {"handler_timeout": handler_timeout, "retry": retry, "dead_letter": dead_letter}
        overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not _UNSET}
        options = attrs.evolve(self._config, **overrides) if overrides else self._config
        timeout = options.handler_timeout
        dead_letter_topic = _dead_letter_name(options.dead_letter, topic)
        if self._closing:
            raise BusClosedError("the bus is closing")
        if self._tracer is not None:
            invoke = traced_handler(self._tracer, self._transport.name, topic, invoke)
        consumer = await self._transport.open_consumer(
            ConsumerSpec(
                topic=topic, group=group, start=start, max_batch=FETCH_BATCH, ephemeral=ephemeral
            )
        )
        route = Route(
            topic=topic,
            group=group,
            consumer=consumer,
            invoke=invoke,
            handler_timeout=timeout,
            dead_letter_topic=dead_letter_topic,
            wants_envelope=wants_envelope,
            retry=options.retry,
            batch=batch,
            source=handler if batch is None else batch.invoke,
            stats=self._stats_for(topic),
        )
        subscription = Subscription(self, route)
        self._subscriptions.add(subscription)
        await self._nursery.start(subscription._run, name=f"trio_bus.subscription-{topic}")
        return subscription

    async def subscribe(
        self,
        topic: str,
        handler: Callable[[Message], Awaitable[None]],
        *,
        group: str | None = None,
        handler_timeout: float | object | None = _UNSET,
        start: StartPosition = "latest",
        retry: RetryPolicy | object = _UNSET,
        dead_letter: str | Callable[[str], str] | object = _UNSET,
    ) -> Subscription:
        """Subscribe *handler* to *topic*; return once the subscription is live.

        ``async def handler(message: Message) -> None`` is called once per
        message, one at a time per aggregate ID, concurrently across
        aggregates. Returning acks the message; raising (or running past the
        timeout) retries it in place per the bus's :class:`RetryPolicy`, then
        parks it in the dead-letter topic (``<topic>.dlq`` by default) and
        acks it.

        A handler must never wait for another message of its own aggregate:
        that message is queued behind it on the same actor.

        Args:
            topic: The topic.
            handler: The async callable.
            group: Consumer group; None means the bus's ``client_id``, so
                instances of one service share the work and different
                services each get every message.
            handler_timeout: Seconds per call (None: no limit); default the
                bus's.
            start: Where a *new* group starts: ``"latest"`` (only messages
                published from now on) or ``"earliest"`` (replay). An existing
                group resumes where it acked.
            retry: This subscription's :class:`RetryPolicy`; default the
                bus's.
            dead_letter: This subscription's dead-letter topic template
                (``"{topic}.dlq"``) or function of the topic; default the
                bus's.

        Raising :class:`~trio_bus.errors.NonRetryableError` (or raising
        from it) dead-letters the message at once. A handler that returns
        after its deadline fired (it swallowed ``trio.Cancelled``) has
        timed out all the same; it is logged once at WARNING.
        """
        return await self._subscribe(
            topic,
            handler,
            group=group,
            handler_timeout=handler_timeout,
            start=start,
            wants_envelope=False,
            retry=retry,
            dead_letter=dead_letter,
        )

    async def subscribe_envelope(
        self,
        topic: str,
        handler: Callable[[Envelope], Awaitable[None]],
        *,
        group: str | None = None,
        handler_timeout: float | object | None = _UNSET,
        start: StartPosition = "latest",
        retry: RetryPolicy | object = _UNSET,
        dead_letter: str | Callable[[str], str] | object = _UNSET,
    ) -> Subscription:
        """Like :meth:`subscribe`, but the handler receives the decoded and
        validated :class:`Envelope` (:func:`trio_bus.current_message` gives
        the :class:`Message` behind it). A body that is not a valid envelope
        is dead-lettered at once, without retries, with the decode error in
        the ``X-DLQ-Error-Message`` header.

        *handler* may be a :class:`~trio_bus.Router`, which calls a typed
        handler per ``event_type`` (see docs/handlers.md)."""
        return await self._subscribe(
            topic,
            handler,
            group=group,
            handler_timeout=handler_timeout,
            start=start,
            wants_envelope=True,
            retry=retry,
            dead_letter=dead_letter,
        )

    async def subscribe_batch(
        self,
        topic: str,
        handler: BatchHandler,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT,
        group: str | None = None,
        handler_timeout: float | object | None = _UNSET,
        start: StartPosition = "latest",
        retry: RetryPolicy | object = _UNSET,
        dead_letter: str | Callable[[str], str] | object = _UNSET,
        bisect: bool = False,
    ) -> Subscription:
        """Subscribe a handler that takes a sequence of messages at a time.

        ``async def handler(messages: Sequence[Message]) -> None``. Batches
        form per actor: an actor collects up to *max_batch* messages of this
        subscription from its own inbox, waiting up to *max_wait* seconds
        for more. So an aggregate's messages in a batch are in delivery
        order, and no other batch holds that aggregate meanwhile: handle a
        batch in sequence order (or per aggregate) and order holds.

        Returning acks every message of the batch. Raising (or running past
        *handler_timeout*, which bounds the whole call) retries the whole
        batch in place; past ``max_attempts`` (or at once for
        :class:`~trio_bus.errors.NonRetryableError`) each message is
        dead-lettered — or, with *bisect*, the batch is split in two and
        each half retried the same way, so only messages that fail alone
        are dead-lettered. Other arguments as for :meth:`subscribe`.

        Args:
            topic: The topic.
            handler: The async callable.
            max_batch: Messages in one call at most.
            max_wait: Seconds to wait for a batch to fill (0: take what is
                already queued; batches grow with the backlog).
            group: As for :meth:`subscribe`.
            handler_timeout: Seconds per batch call; default the bus's.
            start: As for :meth:`subscribe`.
            retry: As for :meth:`subscribe`.
            dead_letter: As for :meth:`subscribe`.
            bisect: Split a batch that keeps failing instead of
                dead-lettering all of it.
        """
        if not callable(handler):
            raise InvalidInputError("handler must be an async callable")
        batching = Batching(invoke=handler, max_batch=max_batch, max_wait=max_wait, bisect=bisect)
        return await self._subscribe(
            topic,
            batching.one,
            group=group,
            handler_timeout=handler_timeout,
            start=start,
            wants_envelope=False,
            retry=retry,
            dead_letter=dead_letter,
            batch=batching,
        )

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
            routes=[sub._route for sub in self._subscriptions],
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
        self._check_open()
        stream: PublishResultStream = self._results.open(
            tenant_id=tenant_id, buffer=buffer, policy=when_full
        )
        return stream.receive

    # ---------------------------------------------------------------- closing

    async def _drain(self) -> None:
        """The graceful part of closing: stop fetching and give in-flight
        handlers ``shutdown_grace`` seconds, all subscriptions at once."""
        grace = self._config.shutdown_grace
        for sub in self._subscriptions:
            # Before any checkpoint: no queued message may start from here on.
            sub._stop_fetching()
        async with trio.open_nursery() as nursery:
            for sub in list(self._subscriptions):
                nursery.start_soon(sub._drain, grace)

    async def _shutdown(self, pool_scope: trio.CancelScope, pool_done: trio.Event) -> None:
        """The bounded, shielded part: stop the actors, release what they
        held, flush and close every consumer, stop the publisher."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CANCEL_FLUSH_TIMEOUT
            for sub in self._subscriptions:
                sub._stop_fetching()
            pool_scope.cancel()
            await pool_done.wait()
            self._pool.release_queued()
            async with trio.open_nursery() as nursery:
                for sub in self._subscriptions:
                    sub._closed = True
                    nursery.start_soon(sub._close_consumer)
            self._subscriptions.clear()
            self._closed = True
            self._results.close()


def _envelope_adapter(handler: EnvelopeHandler) -> Handler:
    async def invoke(message: Message) -> None:
        assert message.envelope is not None  # the dispatcher rejected the rest
        await handler(message.envelope)

    return invoke


async def _run_scoped(
    fn: Callable[..., Awaitable[None]],
    scope: trio.CancelScope,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with scope:
            await fn(task_status=task_status)
    finally:
        done.set()


def _is_cancellation(exc: BaseException | None) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        return rest is None
    return False


def _collapse(
    group: BaseExceptionGroup[BaseException], user_exc: BaseException | None
) -> BaseException:
    """Pick the one exception ``open_bus`` should raise out of *group*."""
    if user_exc is not None and not _is_cancellation(user_exc):
        if isinstance(user_exc, BaseExceptionGroup):
            return user_exc
        matched, _ = group.split(lambda e: e is user_exc)
        if matched is not None:
            return user_exc
    _, rest = group.split(trio.Cancelled)
    if rest is None:
        return group
    return lone_exception(rest) or rest


@asynccontextmanager
async def open_bus(
    url: str = "memory://",
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    pool_size: int = DEFAULT_POOL_SIZE,
    inbox_size: int = DEFAULT_INBOX_SIZE,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    restart_window: float = DEFAULT_RESTART_WINDOW,
    handler_timeout: float | None = DEFAULT_HANDLER_TIMEOUT,
    retry: RetryPolicy | None = None,
    dead_letter: str | Callable[[str], str] = DEFAULT_DEAD_LETTER,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    transport_options: object | None = None,
    monitoring: Monitoring | None = DEFAULT_MONITORING,
    tracing: bool | TracerProvider | None = None,
) -> AsyncIterator[Bus]:
    """Open an event bus for the duration of an ``async with`` block.

    The URL scheme picks the transport: ``memory://`` (embedded, the
    default; ``memory://name`` for a separate broker), ``kafka://h:p[,h:p]``,
    ``nats://h:p[,h:p]``::

        async with trio_bus.open_bus("memory://") as bus:
            await bus.subscribe("orders", handle)
            await bus.publish("orders", b"{}", key="order-1")

    Leaving the block stops fetching, gives in-flight handlers
    ``shutdown_grace`` seconds, acks what finished and leaves the rest for
    redelivery; on cancellation handlers stop at once and only the acks of
    finished messages are flushed (shielded, bounded). Nothing the bus
    started outlives the block.

    Args:
        url: Transport URL.
        client_id: Client name; the default consumer group.
        pool_size: Actors in the global pool (concurrency across aggregates).
        inbox_size: Bounded inbox per actor; dispatch waits when full.
        max_restarts: Restarts of one actor allowed within
            ``restart_window`` seconds after its own loop crashed; one more
            and the error leaves ``open_bus``.
        restart_window: See ``max_restarts``.
        handler_timeout: Default seconds per handler call (None: no limit).
        retry: Retry policy for failing handler calls.
        dead_letter: Dead-letter topic template (``"{topic}.dlq"``) or a
            function of the topic.
        shutdown_grace: Seconds in-flight handlers get on a normal close.
        max_message_bytes: Largest accepted body.
        transport_options: Transport-specific options object (e.g.
            ``KafkaOptions``, ``NatsOptions``).
        monitoring: Settings of the monitor task (lag, backlog, stalls,
            probe); None: no monitor task (``health()`` still works).
        tracing: OpenTelemetry spans and trace context in headers; None:
            on when an OpenTelemetry SDK tracer provider is installed; a
            ``TracerProvider``: use that one.

    Raises:
        ConfigError, UnsupportedURLError: bad configuration.
        MissingExtraError: the transport's client library is not installed.
        TransportError: the transport could not connect.
        ActorCrashedError: an actor crashed past ``max_restarts``.
    """
    if monitoring is not None and not isinstance(monitoring, Monitoring):
        raise ConfigError(f"monitoring must be a Monitoring, not {type(monitoring).__name__}")
    config = _Config(
        client_id=client_id,
        pool_size=pool_size,
        inbox_size=inbox_size,
        max_restarts=max_restarts,
        restart_window=restart_window,
        handler_timeout=handler_timeout,
        retry=RetryPolicy() if retry is None else retry,
        dead_letter=dead_letter,
        shutdown_grace=shutdown_grace,
        max_message_bytes=max_message_bytes,
    )
    scheme, hosts = parse_url(url)
    factory = resolve(scheme)
    settings = TransportSettings(
        url=url,
        hosts=hosts,
        client_id=client_id,
        options=transport_options,
        max_message_bytes=max_message_bytes,
    )
    user_exc: BaseException | None = None
    try:
        async with factory(settings) as transport, trio.open_nursery() as nursery:
            bus = Bus(
                config,
                transport,
                nursery,
                monitoring=monitoring or Monitoring(),
                tracer=tracer_for(tracing),
            )
            pool_scope, pool_done = trio.CancelScope(), trio.Event()
            await nursery.start(_run_scoped, bus._pool.run, pool_scope, pool_done)
            publisher_scope = trio.CancelScope()
            if bus._coalescer is not None:
                await nursery.start(_run_scoped, bus._coalescer.run, publisher_scope, trio.Event())
            monitor_scope = trio.CancelScope()
            if monitoring is not None:
                await nursery.start(_run_scoped, bus._monitor.run, monitor_scope, trio.Event())
            try:
                yield bus
            except BaseException as exc:
                user_exc = exc
                raise
            finally:
                bus._closing = True
                monitor_scope.cancel()
                try:
                    if not _is_cancellation(user_exc) and not pool_done.is_set():
                        await bus._drain()
                finally:
                    await bus._shutdown(pool_scope, pool_done)
                    publisher_scope.cancel()
    except BaseExceptionGroup as group:
        chosen = _collapse(group, user_exc)
        if chosen is group:
            raise
        raise_as_is(chosen)
