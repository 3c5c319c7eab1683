"""What the actor pool works on: routes (one per subscription), the
actors' inboxes of deliveries (:class:`~._message.Record`, one object per
delivery) and the per-actor state that survives a restart."""

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
from ._message import Message, Record, drop_claim
from ._stats import TopicStats
from .transports._base import Consumer

if TYPE_CHECKING:
    from ._batch import Batching

__all__ = [
    "Claim",
    "EnvelopeHandler",
    "Handler",
    "Route",
    "current_message",
    "settle",
    "unclaim",
]

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


class Claim:
    """An aggregate's hold on the actor its messages go to, from the
    dispatch of one of its messages until none of them is queued or running
    there any more: while it is held, every message of the aggregate goes
    to that actor (the order guarantee); once it is gone, the next one may
    go to any actor. The dispatcher's map of claims holds only aggregates
    with messages in flight, so it is bounded by the inboxes, not by how
    many aggregates a sender invents."""

    __slots__ = ("aggregate", "count", "index", "owners")

    def __init__(self, owners: dict[str, Claim], aggregate: str, index: int) -> None:
        self.owners = owners
        self.aggregate = aggregate
        self.index = index
        #: Messages of the aggregate dispatched and not settled.
        self.count = 0


def unclaim(work: Record) -> None:
    """*work* is settled (or was never sent to its actor): drop its share
    of its aggregate's claim (once: a claim let go too early would let the
    aggregate's next message start on another actor)."""
    claim = work.claim
    if claim is not None:
        drop_claim(work)
        claim.count -= 1
        if not claim.count:
            del claim.owners[claim.aggregate]


def settle(work: Record, *, release: bool = False) -> None:
    """Ack (or, with *release*, hand back) one delivery and count it
    settled on its route."""
    unclaim(work)
    route = work.route
    if release:
        route.consumer.release(work)
    else:
        route.consumer.ack(work)
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
    send: trio.MemorySendChannel[list[Record]]
    receive: trio.MemoryReceiveChannel[list[Record]]
    #: Messages of chunks taken from the channel, not started yet.
    pending: deque[Record] = attrs.Factory(deque)
    queued: int = 0
    #: Dispatchers waiting for room (see wait_for_room), how many, and the
    #: highest ``queued`` one of them waits for.
    room: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    waiting: int = 0
    wake_at: int = -1
    scope: trio.CancelScope | None = None
    current: Record | None = None
    #: The running batch (``current`` first) of a batch route, else empty.
    batch: list[Record] = attrs.Factory(list)
    #: Taken from the inbox while collecting a batch but not part of it:
    #: it is handled right after the batch.
    stash: Record | None = None
    #: Second halves of bisected batches, to run after ``batch`` (a stack:
    #: the earliest half is last).
    halves: list[list[Record]] = attrs.Factory(list)
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

    def take_nowait(self) -> Record:
        """The next message of the inbox; raises trio.WouldBlock if none."""
        pending = self.pending
        if not pending:
            pending.extend(self.receive.receive_nowait())
        self.queued -= 1
        if self.waiting and self.queued <= self.wake_at:
            self.room.unpark_all()
        return pending.popleft()

    async def take(self) -> Record:
        """The next message, waiting for one (cancel-atomic: the channel's
        receive is, and nothing is taken before it returns)."""
        pending = self.pending
        if not pending:
            pending.extend(await self.receive.receive())
        self.queued -= 1
        if self.waiting and self.queued <= self.wake_at:
            self.room.unpark_all()
        return pending.popleft()

    async def wait_for_room(self, level: int) -> None:
        """Wait until at most *level* messages are queued (dispatcher; the
        actor wakes it only then, not at every message it takes)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.queued > level:
            self.wake_at = max(self.wake_at, level)
            self.waiting += 1
            try:
                await self.room.park()
            finally:
                self.waiting -= 1
                if not self.waiting:
                    self.wake_at = -1
