"""The subscribe methods of :class:`~trio_bus.Bus` (a mixin it inherits):
argument checks, per-subscription options and the plans
:class:`~._subscription.Subscriptions` opens."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from ._batch import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT, BatchHandler, Batching
from ._config import UNSET, BusConfig, RetryPolicy
from ._envelope import Envelope
from ._message import Message
from ._names import validate_topic
from ._pool import Handler
from ._stats import TopicStats
from ._subscription import Subscription, SubscriptionPlan, Subscriptions, check_async_handler
from .errors import InvalidInputError
from .transports._base import StartPosition

__all__ = ["SubscribeMethods"]


class SubscribeMethods:
    """``subscribe``, ``subscribe_envelope``, ``subscribe_many`` and
    ``subscribe_batch``; :class:`~trio_bus.Bus` provides the state below."""

    _config: BusConfig
    _subscriptions: Subscriptions

    def _stats_for(self, topic: str) -> TopicStats:
        raise NotImplementedError

    # -------------------------------------------------------------- subscribe

    def _plan(
        self,
        topic: str,
        handler: Handler | Callable[[Envelope], Awaitable[None]],
        *,
        group: str | None,
        handler_timeout: float | object | None,
        start: StartPosition,
        wants_envelope: bool,
        retry: RetryPolicy | object = UNSET,
        dead_letter: str | Callable[[str], str] | object = UNSET,
        batch: Batching | None = None,
        ephemeral: bool = False,
    ) -> SubscriptionPlan:
        """Validate one subscribe call's arguments; resolve its options."""
        validate_topic(topic)
        group = self._config.client_id if group is None else validate_topic(group)
        if start not in ("latest", "earliest"):
            raise InvalidInputError(f"start must be 'latest' or 'earliest', not {start!r}")
        options = self._config.overridden(
            handler_timeout=handler_timeout, retry=retry, dead_letter=dead_letter
        )
        dead_letter_topic = options.dead_letter_topic(topic)
        self._config.persistence.keep(dead_letter_topic)
        return SubscriptionPlan(
            topic=topic,
            handler=handler,
            group=group,
            start=start,
            handler_timeout=options.handler_timeout,
            dead_letter_topic=dead_letter_topic,
            wants_envelope=wants_envelope,
            retry=options.retry,
            batch=batch,
            stats=self._stats_for(topic),
            ephemeral=ephemeral,
        )

    async def _subscribe(
        self,
        topic: str,
        handler: Handler | Callable[[Envelope], Awaitable[None]],
        **options: Any,
    ) -> Subscription:
        (subscription,) = await self._subscriptions.open_many(
            [self._plan(topic, handler, **options)]
        )
        return subscription

    async def _subscribe_probe(
        self, topic: str, handler: Callable[[Message], Awaitable[None]], group: str
    ) -> Subscription:
        return await self._subscribe(
            topic,
            handler,
            group=group,
            handler_timeout=None,
            start="latest",
            wants_envelope=False,
            ephemeral=True,
        )

    async def subscribe(
        self,
        topic: str,
        handler: Callable[[Message], Awaitable[None]],
        *,
        group: str | None = None,
        handler_timeout: float | object | None = UNSET,
        start: StartPosition = "latest",
        retry: RetryPolicy | object = UNSET,
        dead_letter: str | Callable[[str], str] | object = UNSET,
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
        handler_timeout: float | object | None = UNSET,
        start: StartPosition = "latest",
        retry: RetryPolicy | object = UNSET,
        dead_letter: str | Callable[[str], str] | object = UNSET,
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

    async def subscribe_many(
        self,
        handlers: Mapping[str, Handler | Callable[[Envelope], Awaitable[None]]]
        | Iterable[tuple[str, Handler | Callable[[Envelope], Awaitable[None]]]],
        *,
        group: str | None = None,
        handler_timeout: float | object | None = UNSET,
        start: StartPosition = "latest",
        retry: RetryPolicy | object = UNSET,
        dead_letter: str | Callable[[str], str] | object = UNSET,
        envelope: bool = False,
    ) -> tuple[Subscription, ...]:
        """Subscribe many handlers at once; return once **all** are live.

        Declare a service's subscriptions up front: where subscribing costs
        a group-wide step, it is taken once for all of them. On Kafka the
        group's consumer joins with every topic in **one rebalance** (one
        topic check, one metadata request, one rejoin), where one
        ``subscribe`` per topic would rebalance the whole group per topic.
        Elsewhere the subscriptions open concurrently. Each subscription
        behaves exactly as one made by :meth:`subscribe` (or
        :meth:`subscribe_envelope` with ``envelope=True``).

        All or none: every argument is validated before anything is opened,
        and if opening fails or is cancelled no subscription is left.

        Example::

            orders, payments = await bus.subscribe_many(
                {"orders": on_order, "payments": on_payment}, group="billing"
            )

        Args:
            handlers: ``{topic: handler}`` or ``(topic, handler)`` pairs (a
                topic may appear twice in pairs: the subscriptions then split
                its partitions, as two ``subscribe`` calls would). Handlers
                take a :class:`Message`, or an :class:`Envelope` with
                ``envelope=True``.
            group: As for :meth:`subscribe`; shared by all.
            handler_timeout: As for :meth:`subscribe`; shared by all.
            start: As for :meth:`subscribe`; shared by all.
            retry: As for :meth:`subscribe`; shared by all.
            dead_letter: As for :meth:`subscribe` (a template or function of
                the topic, so each topic gets its own); shared by all.
            envelope: Handlers receive the validated :class:`Envelope`, as
                with :meth:`subscribe_envelope`.

        Returns:
            The subscriptions, in the order of *handlers*.
        """
        pairs = list(handlers.items() if isinstance(handlers, Mapping) else handlers)
        plans = [
            self._plan(
                topic,
                handler,
                group=group,
                handler_timeout=handler_timeout,
                start=start,
                wants_envelope=envelope,
                retry=retry,
                dead_letter=dead_letter,
            )
            for topic, handler in pairs
        ]
        return tuple(await self._subscriptions.open_many(plans))

    async def subscribe_batch(
        self,
        topic: str,
        handler: BatchHandler,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT,
        group: str | None = None,
        handler_timeout: float | object | None = UNSET,
        start: StartPosition = "latest",
        retry: RetryPolicy | object = UNSET,
        dead_letter: str | Callable[[str], str] | object = UNSET,
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
        check_async_handler(handler)  # Subscriptions.open sees only batching.one
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
