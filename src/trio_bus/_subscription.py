"""Subscriptions: open a consumer, fetch -> dispatch into the pool, close.

A subscription is a consumer of the transport plus one fetch task in the
bus's nursery that hands fetched batches to the actor pool. Closing one
stops its fetching, gives running handlers the bus's ``shutdown_grace``,
then releases what is left and closes the consumer; closing the bus does
the same for all of them at once (:class:`Subscriptions`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Self, cast

import attrs
import trio
from opentelemetry.trace import Tracer

from ._batch import Batching
from ._config import CANCEL_FLUSH_TIMEOUT, RetryPolicy
from ._envelope import Envelope
from ._message import Message
from ._pool import ActorPool, EnvelopeHandler, Handler, Route
from ._stats import TopicStats
from ._tracing import traced_handler
from .errors import BusClosedError, InvalidInputError
from .transports._base import Consumer, ConsumerSpec, LaneState, StartPosition, Transport

__all__ = [
    "FETCH_BATCH",
    "Subscription",
    "SubscriptionPlan",
    "Subscriptions",
    "check_async_handler",
]

logger = logging.getLogger("trio_bus")

#: Largest batch fetched in one call.
FETCH_BATCH = 500


def check_async_handler(handler: object) -> None:
    """Raise unless *handler* is an async callable: InvalidInputError for
    something not callable, TypeError for a plain function.

    A plain ``def`` handler would be accepted and then fail on every
    attempt (its result cannot be awaited) after running its side effects,
    and end in the dead-letter topic: refuse it at ``subscribe``.
    """
    target = handler
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target):
        return
    call = getattr(target, "__call__", None)  # noqa: B004 - callable objects too
    if call is not None and inspect.iscoroutinefunction(call):
        return
    if callable(handler):
        raise TypeError(f"handler {handler!r} is not an async function: define it with `async def`")
    raise InvalidInputError(f"handler must be an async callable, not {type(handler).__name__}")


class Subscription:
    """A live subscription, returned by :meth:`Bus.subscribe`.

    Close it with :meth:`close` (or ``async with``); closing the bus closes
    it too.
    """

    def __init__(self, owner: Subscriptions, route: Route) -> None:
        self._owner = owner
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

    async def lanes(self) -> Sequence[LaneState]:
        """Progress of each lane (Kafka partition, NATS/memory consumer):
        commit point, lag, deliveries held. May ask the broker."""
        return await self._route.consumer.lanes()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        consumer, pool, route = self._route.consumer, self._owner.pool, self._route
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
        self._owner.live.discard(self)
        try:
            await self._drain(self._owner.shutdown_grace)
        finally:
            with trio.CancelScope(shield=True):
                if self._route.in_flight:
                    self._owner.pool.abandon_route(self._route)
                    with trio.move_on_after(CANCEL_FLUSH_TIMEOUT):
                        await self._route.wait_idle()
                await self._close_consumer()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


@attrs.frozen(kw_only=True)
class SubscriptionPlan:
    """One subscription to open, as the bus resolved a subscribe call."""

    topic: str
    handler: Handler | Callable[[Envelope], Awaitable[None]]
    group: str
    start: StartPosition
    handler_timeout: float | None
    dead_letter_topic: str
    wants_envelope: bool
    retry: RetryPolicy
    stats: TopicStats
    batch: Batching | None = None
    ephemeral: bool = False


class Subscriptions:
    """Every subscription of one bus: opening them, and closing them all."""

    def __init__(
        self,
        *,
        transport: Transport,
        pool: ActorPool,
        nursery: trio.Nursery,
        tracer: Tracer | None,
        shutdown_grace: float,
    ) -> None:
        self.transport = transport
        self.pool = pool
        self.shutdown_grace = shutdown_grace
        self._nursery = nursery
        self._tracer = tracer
        self.live: set[Subscription] = set()
        #: Set once the bus is closing: no new subscription from then on.
        self.closing = False

    async def open_many(self, plans: Sequence[SubscriptionPlan]) -> list[Subscription]:
        """Open the consumers of *plans* together (one transport call: a
        Kafka group rejoins once for all) and start fetching; return once
        all are live. On failure or cancellation none is left running."""
        for plan in plans:
            check_async_handler(plan.handler)
        if self.closing:
            raise BusClosedError("the bus is closing")
        invokes = [self._invoke(plan) for plan in plans]
        consumers = await self.transport.open_consumers(
            [
                ConsumerSpec(
                    topic=plan.topic,
                    group=plan.group,
                    start=plan.start,
                    max_batch=FETCH_BATCH,
                    ephemeral=plan.ephemeral,
                )
                for plan in plans
            ]
        )
        subscriptions = [
            Subscription(self, _route(plan, consumer, invoke))
            for plan, consumer, invoke in zip(plans, consumers, invokes, strict=True)
        ]
        self.live.update(subscriptions)
        started = 0
        try:
            for subscription in subscriptions:
                await self._nursery.start(
                    subscription._run, name=f"trio_bus.subscription-{subscription.topic}"
                )
                started += 1
        except BaseException:
            with trio.CancelScope(shield=True):
                for subscription in subscriptions[:started]:
                    await subscription.close()
                for subscription in subscriptions[started:]:  # never fetched
                    subscription._closed = True
                    self.live.discard(subscription)
                    await subscription._close_consumer()
            raise
        return subscriptions

    def _invoke(self, plan: SubscriptionPlan) -> Handler:
        # The public methods pair wants_envelope with the handler's type.
        handler = plan.handler
        invoke = cast(
            Handler,
            _envelope_adapter(cast(EnvelopeHandler, handler)) if plan.wants_envelope else handler,
        )
        if self._tracer is not None:
            invoke = traced_handler(self._tracer, self.transport.name, plan.topic, invoke)
        return invoke

    def in_flight(self) -> int:
        """Messages dispatched and not yet settled, over all subscriptions."""
        return sum(s.in_flight for s in self.live)

    def stop_fetching(self) -> None:
        """No queued message may start from here on (call before any
        checkpoint on the way out)."""
        self.closing = True
        for sub in self.live:
            sub._stop_fetching()

    async def drain(self) -> None:
        """The graceful part of closing: stop fetching and give in-flight
        handlers ``shutdown_grace`` seconds, all subscriptions at once."""
        self.stop_fetching()
        async with trio.open_nursery() as nursery:
            for sub in list(self.live):
                nursery.start_soon(sub._drain, self.shutdown_grace)

    async def close_consumers(self) -> None:
        """After the actors stopped: release what they held and close every
        consumer (called shielded, with a deadline)."""
        self.pool.release_queued()
        async with trio.open_nursery() as nursery:
            for sub in self.live:
                sub._closed = True
                nursery.start_soon(sub._close_consumer)
        self.live.clear()


def _route(plan: SubscriptionPlan, consumer: Consumer, invoke: Handler) -> Route:
    batch = plan.batch
    return Route(
        topic=plan.topic,
        group=plan.group,
        consumer=consumer,
        invoke=invoke,
        handler_timeout=plan.handler_timeout,
        dead_letter_topic=plan.dead_letter_topic,
        wants_envelope=plan.wants_envelope,
        retry=plan.retry,
        batch=batch,
        # The handler as the user gave it (Bus.asyncapi reads routers).
        source=plan.handler if batch is None else batch.invoke,
        stats=plan.stats,
    )


def _envelope_adapter(handler: EnvelopeHandler) -> Handler:
    async def invoke(message: Message) -> None:
        assert message.envelope is not None  # the dispatcher rejected the rest
        await handler(message.envelope)

    return invoke
