"""What the actor pool works on: routes (one per subscription), work
items (one per delivery) and the per-actor state that survives a restart."""

from __future__ import annotations

import contextvars
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from ._config import RetryPolicy
from ._envelope import Envelope
from ._message import Message, Record
from ._stats import TopicStats
from .transports._base import Consumer

if TYPE_CHECKING:
    from ._batch import Batching

__all__ = ["EnvelopeHandler", "Handler", "Route", "current_message", "new_work", "settle"]

Handler = Callable[[Message], Awaitable[None]]
EnvelopeHandler = Callable[[Envelope], Awaitable[None]]

_current_message: contextvars.ContextVar[Message] = contextvars.ContextVar(
    "trio_bus_current_message"
)


def current_message() -> Message:
    """The :class:`Message` whose handler is running in this task.

    Envelope handlers receive the decoded :class:`Envelope`; this reaches
    the transport-level message (headers, position, attempt) behind it.

    Raises:
        LookupError: called outside a handler.
    """
    return _current_message.get()


@attrs.define(eq=False)
class Route:
    """The core side of one subscription: where its messages go and how
    they are settled."""

    topic: str
    group: str
    consumer: Consumer
    #: Calls the user's handler (envelope adapter and tracing included).
    invoke: Handler
    handler_timeout: float | None
    dead_letter_topic: str
    wants_envelope: bool
    retry: RetryPolicy
    #: Set for a batch subscription: the pool calls ``batch.invoke``, not ``invoke``.
    batch: Batching | None = None
    #: The handler as the user gave it (``Bus.asyncapi`` reads routers from it).
    source: object = None
    stats: TopicStats = attrs.field(factory=TopicStats)
    #: A handler that swallowed a cancellation has been logged once.
    warned_swallow: bool = False
    _closing: bool = attrs.field(default=False, alias="closing")
    #: Scopes of actors waiting for a batch of this route to fill.
    collecting: set[trio.CancelScope] = attrs.field(factory=set)
    in_flight: int = 0
    _idle: trio.Event = attrs.field(factory=trio.Event, alias="idle")

    def __attrs_post_init__(self) -> None:
        self._idle.set()

    @property
    def closing(self) -> bool:
        """Set when the subscription stops: queued messages are released
        unrun, and batches still filling stop waiting."""
        return self._closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self._closing = value
        if value:
            for scope in self.collecting:
                scope.cancel()

    def _dispatched(self, count: int = 1) -> None:
        if not self.in_flight:
            self._idle = trio.Event()
        self.in_flight += count

    async def wait_idle(self) -> None:
        """Wait until every dispatched message of this route is settled."""
        await self._idle.wait()


@attrs.frozen(slots=True, eq=False)
class Work(Message):
    """One delivery in the pool: the :class:`Message` its handler gets,
    with the route and transport record behind it (one object per delivery
    instead of two: every long-lived object per message costs the cyclic
    garbage collector a share of a collection). The extra fields stay out
    of ``repr`` and are not part of the public :class:`Message`."""

    route: Route = attrs.field(kw_only=True, repr=False)
    record: Record = attrs.field(kw_only=True, repr=False)
    #: Why the message is malformed (dead-lettered at once), or None.
    rejection: Exception | None = attrs.field(default=None, kw_only=True, repr=False)

    @property
    def message(self) -> Message:
        """What the handler gets: this very object."""
        return self


# Work's slots, set directly by new_work: a frozen class's generated
# __init__ goes through object.__setattr__ for each of its 15 fields (about
# 1.5 us a delivery; the slots' own setters take 0.9).
_SLOTS = [
    getattr(Work, name).__set__
    for name in (
        "topic",
        "subject",
        "value",
        "key",
        "headers",
        "partition",
        "offset",
        "delivery_count",
        "timestamp",
        "aggregate_id",
        "attempt",
        "_envelope",
        "route",
        "record",
        "rejection",
    )
]


def new_work(
    record: Record,
    route: Route,
    aggregate: str | None,
    envelope: Envelope | None,
    rejection: Exception | None,
) -> Work:
    """The pool's object for one delivery of *route* (the hot path's
    constructor: the same fields as ``Work(...)``, taken from *record*)."""
    (
        topic,
        subject,
        value,
        key,
        headers,
        partition,
        offset,
        delivery_count,
        timestamp,
        aggregate_id,
        attempt,
        envelope_,
        route_,
        record_,
        rejection_,
    ) = _SLOTS
    work: Work = object.__new__(Work)
    topic(work, record.topic)
    subject(work, record.subject)
    value(work, record.value)
    key(work, record.key)
    headers(work, record.headers)
    partition(work, record.partition)
    offset(work, record.offset)
    delivery_count(work, record.delivery_count)
    timestamp(work, record.timestamp)
    aggregate_id(work, aggregate)
    attempt(work, 1)
    envelope_(work, envelope)
    route_(work, route)
    record_(work, record)
    rejection_(work, rejection)
    return work


def settle(work: Work, *, release: bool = False) -> None:
    """Ack (or, with *release*, hand back) one delivery and count it
    settled on its route."""
    route = work.route
    if release:
        route.consumer.release(work.record)
    else:
        route.consumer.ack(work.record)
    route.in_flight -= 1
    if not route.in_flight:
        route._idle.set()


@attrs.define(eq=False)
class Actor:
    """One actor's inbox and the state that survives a restart of its loop.

    The inbox is a bounded Trio memory channel of *chunks*: the dispatcher
    sends each actor one list per fetched batch (its messages, in order),
    and the actor unpacks a chunk into ``pending`` and takes messages from
    there one at a time. ``queued`` counts the messages dispatched to it and
    not started (in the channel and in ``pending``): the dispatcher sends
    without waiting only while that stays within the inbox size.
    """

    index: int
    send: trio.MemorySendChannel[list[Work]]
    receive: trio.MemoryReceiveChannel[list[Work]]
    #: Messages of chunks taken from the channel, not started yet.
    pending: deque[Work] = attrs.Factory(deque)
    queued: int = 0
    #: A dispatcher waiting for room (see wait_for_room), and how many.
    room: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    waiting: int = 0
    scope: trio.CancelScope | None = None
    current: Work | None = None
    #: The running batch (``current`` first) of a batch route, else empty.
    batch: list[Work] = attrs.Factory(list)
    #: Taken from the inbox while collecting a batch but not part of it:
    #: it is handled right after the batch.
    stash: Work | None = None
    #: Second halves of bisected batches, to run after ``batch`` (a stack:
    #: the earliest half is last).
    halves: list[list[Work]] = attrs.Factory(list)
    attempt: int = 1
    #: The current handler call is being cancelled because its route closed.
    abandoned: bool = False
    #: A failure whose handling must wait for a fresh cancel scope.
    pending_failure: Exception | None = None
    restarts: deque[float] = attrs.Factory(deque)
    busy_since: float | None = None
    #: The deadline the running call wants for its own timeout (the scope's
    #: may be capped lower by a lease).
    deadline: float = math.inf

    def take_nowait(self) -> Work:
        """The next message of the inbox; raises trio.WouldBlock if none."""
        pending = self.pending
        if not pending:
            pending.extend(self.receive.receive_nowait())
        self.queued -= 1
        if self.waiting:
            self.room.unpark()
        return pending.popleft()

    async def take(self) -> Work:
        """The next message, waiting for one (cancel-atomic: the channel's
        receive is, and nothing is taken before it returns)."""
        pending = self.pending
        if not pending:
            pending.extend(await self.receive.receive())
        self.queued -= 1
        if self.waiting:
            self.room.unpark()
        return pending.popleft()

    async def wait_for_room(self, limit: int) -> None:
        """Wait until fewer than *limit* messages are queued (dispatcher)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.queued >= limit:
            self.waiting += 1
            try:
                await self.room.park()
            finally:
                self.waiting -= 1
