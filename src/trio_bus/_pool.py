"""The global actor pool: routing, per-aggregate order, timeouts, retries,
dead-lettering and supervision.

One fixed set of actors serves every subscription of a bus. A message goes
to ``actors[stable_hash(aggregate_id) % pool_size]``, so one aggregate always
lands on one actor, which handles its inbox one message at a time: that is
the whole ordering mechanism. Messages without an aggregate ID are spread
round-robin.

Hot-path choices (measured, see docs/architecture.md):

* dispatch uses ``send_nowait`` and falls back to ``await send`` only when an
  inbox is full, which is where backpressure lives;
* an actor drains its inbox with ``receive_nowait`` and checkpoints every
  few messages rather than once per hop;
* each actor reuses one cancel scope across handler calls and moves its
  deadline (a fresh scope per call costs twice as much). When the deadline
  fires, the scope is spent: the actor opens a new one and goes on with the
  same message as a failed attempt.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from ._config import RetryPolicy
from ._envelope import Envelope, decode_envelope
from ._message import Message, OutgoingMessage, Record
from ._names import AGGREGATE_ID_HEADER, header_lookup, normalize_aggregate_id, stable_hash
from ._stats import RunningHandler, TopicStats
from .errors import ActorCrashedError, EnvelopeError, HandlerTimeout, InvalidAggregateIDError
from .transports._base import Consumer

__all__ = ["ActorPool", "Route", "current_message"]

logger = logging.getLogger("trio_bus.pool")

Handler = Callable[[Message], Awaitable[None]]
EnvelopeHandler = Callable[[Envelope], Awaitable[None]]
PublishOne = Callable[[OutgoingMessage], Awaitable[None]]

#: A handler timeout fires between ``timeout`` and ``timeout * (1 + slack)``
#: (at most MAX_TIMEOUT_SLACK seconds late): the price of moving a cancel
#: scope's deadline once per many calls instead of twice per call.
TIMEOUT_SLACK = 0.05
MAX_TIMEOUT_SLACK = 1.0

#: Messages an actor handles back to back before it yields to the scheduler.
_BATCH_BEFORE_CHECKPOINT = 16

#: Headers on a dead-lettered message (plus the original headers).
DLQ_ERROR_TYPE = "X-DLQ-Error-Type"
DLQ_ERROR_MESSAGE = "X-DLQ-Error-Message"
DLQ_ATTEMPTS = "X-DLQ-Attempts"
DLQ_ORIGINAL_TOPIC = "X-DLQ-Original-Topic"
DLQ_ORIGINAL_PARTITION = "X-DLQ-Original-Partition"
DLQ_ORIGINAL_OFFSET = "X-DLQ-Original-Offset"
DLQ_ORIGINAL_SUBJECT = "X-DLQ-Original-Subject"
DLQ_ORIGINAL_AGGREGATE_ID = "X-DLQ-Original-Aggregate-ID"
_MAX_ERROR_MESSAGE = 1000

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
    stats: TopicStats = attrs.field(factory=TopicStats)
    #: Set when the subscription stops: queued messages are released unrun.
    closing: bool = False
    in_flight: int = 0
    _idle: trio.Event = attrs.field(factory=trio.Event, alias="idle")

    def __attrs_post_init__(self) -> None:
        self._idle.set()

    def _dispatched(self) -> None:
        self.in_flight += 1
        if self.in_flight == 1:
            self._idle = trio.Event()

    def _settled(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until every dispatched message of this route is settled."""
        await self._idle.wait()


@attrs.define(slots=True, eq=False)
class _Work:
    route: Route
    record: Record
    message: Message
    #: Why the message is malformed (dead-lettered at once), or None.
    rejection: Exception | None = None


@attrs.define(eq=False)
class _Actor:
    index: int
    send: trio.MemorySendChannel[_Work]
    receive: trio.MemoryReceiveChannel[_Work]
    scope: trio.CancelScope | None = None
    current: _Work | None = None
    attempt: int = 1
    #: The current handler call is being cancelled because its route closed.
    abandoned: bool = False
    #: A failure whose handling must wait for a fresh cancel scope.
    pending_failure: Exception | None = None
    restarts: deque[float] = attrs.Factory(deque)
    busy_since: float | None = None


def _subject_aggregate(subject: str, topic: str) -> str | None:
    if len(subject) <= len(topic) + 1 or not subject.startswith(topic + "."):
        return None
    for token in reversed(subject[len(topic) + 1 :].split(".")):
        agg = normalize_aggregate_id(token)
        if agg is not None:
            return agg
    return None


def classify(route: Route, record: Record) -> tuple[str | None, Envelope | None, Exception | None]:
    """Extract ``(aggregate_id, envelope, rejection)`` from a delivery.

    Order: envelope ``aggregate_id`` > header ``X-Aggregate-ID`` (any case)
    > key > last valid token of the subject after the topic. An aggregate ID
    given explicitly but invalid makes the message malformed (rejection);
    so does a body that is not a valid envelope on an envelope subscription.
    """
    envelope: Envelope | None = None
    envelope_error: Exception | None = None
    if record.value[:1] == b"{":
        try:
            envelope = decode_envelope(record.value)
        except EnvelopeError as exc:
            envelope_error = exc
    rejection: Exception | None = None
    if envelope is not None:
        aggregate: str | None = envelope.aggregate_id
    else:
        raw = header_lookup(record.headers, AGGREGATE_ID_HEADER)
        source = "header " + AGGREGATE_ID_HEADER
        if raw is None:
            raw, source = record.key, "key"
        if raw is not None:
            aggregate = normalize_aggregate_id(raw)
            if aggregate is None:
                rejection = InvalidAggregateIDError(f"invalid aggregate ID in {source}: {raw!r}")
        else:
            aggregate = _subject_aggregate(record.subject, record.topic)
        if route.wants_envelope and rejection is None:
            rejection = envelope_error or EnvelopeError("body is not a JSON envelope")
    return aggregate, envelope, rejection


@attrs.define(eq=False)
class PoolStats:
    handled: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    restarts: int = 0


class ActorPool:
    """A fixed set of actors, each a task with a bounded inbox."""

    def __init__(
        self,
        *,
        size: int,
        inbox_size: int,
        retry: RetryPolicy,
        max_restarts: int,
        restart_window: float,
        publish: PublishOne,
    ) -> None:
        self.size = size
        self.retry = retry
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._publish = publish
        self.stats = PoolStats()
        self._actors = []
        for index in range(size):
            send, receive = trio.open_memory_channel[_Work](inbox_size)
            self._actors.append(_Actor(index, send, receive))
        self._round_robin = 0
        self._alive = 0
        #: Test hook: called with the actor index before each message; an
        #: exception from it is a crash of the actor's own loop.
        self.fault_hook: Callable[[int], None] | None = None

    # ----------------------------------------------------------- statistics

    def inbox_depths(self) -> tuple[int, ...]:
        return tuple(a.send.statistics().current_buffer_used for a in self._actors)

    def in_flight(self) -> int:
        return sum(1 for a in self._actors if a.current is not None)

    def running(self) -> list[RunningHandler]:
        """Every handler call in progress."""
        out = []
        for a in self._actors:
            work, since = a.current, a.busy_since
            if work is not None and since is not None:
                out.append(
                    RunningHandler(
                        actor=a.index,
                        topic=work.record.topic,
                        offset=work.record.offset,
                        aggregate_id=work.message.aggregate_id,
                        since=since,
                    )
                )
        return out

    def actors_alive(self) -> int:
        """Actor tasks currently running their loop."""
        return self._alive

    # ------------------------------------------------------------- dispatch

    async def dispatch(self, route: Route, records: Sequence[Record]) -> None:
        """Route a fetched batch into the actors' inboxes, in order.

        Waits (backpressure) only when an inbox is full.
        """
        actors, size = self._actors, self.size
        route.stats.consumed += len(records)
        for record in records:
            aggregate, envelope, rejection = classify(route, record)
            message = Message(
                topic=record.topic,
                subject=record.subject,
                value=record.value,
                key=record.key,
                headers=record.headers,
                aggregate_id=aggregate,
                attempt=1,
                partition=record.partition,
                offset=record.offset,
                delivery_count=record.delivery_count,
                envelope=envelope,
            )
            if aggregate is not None:
                actor = actors[stable_hash(aggregate) % size]
            else:
                self._round_robin = (self._round_robin + 1) % size
                actor = actors[self._round_robin]
            work = _Work(route, record, message, rejection)
            route._dispatched()
            try:
                actor.send.send_nowait(work)
            except trio.WouldBlock:
                try:
                    await actor.send.send(work)
                except BaseException:
                    route.consumer.release(record)
                    route._settled()
                    raise
        await trio.lowlevel.checkpoint()

    # --------------------------------------------------------------- actors

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every actor under supervision until cancelled."""
        async with trio.open_nursery() as nursery:
            for actor in self._actors:
                nursery.start_soon(self._supervise, actor, name=f"trio_bus.actor-{actor.index}")
            task_status.started()

    async def _supervise(self, actor: _Actor) -> None:
        while True:
            self._alive += 1
            try:
                await self._actor_loop(actor)
            except Exception as exc:
                now = trio.current_time()
                actor.restarts.append(now)
                while actor.restarts and actor.restarts[0] < now - self.restart_window:
                    actor.restarts.popleft()
                self.stats.restarts += 1
                if len(actor.restarts) > self.max_restarts:
                    raise ActorCrashedError(
                        f"actor {actor.index} crashed {len(actor.restarts)} times in "
                        f"{self.restart_window:g}s (max_restarts={self.max_restarts})"
                    ) from exc
                logger.exception("actor %d crashed; restarting it", actor.index)
            except BaseException:
                # Cancelled: whatever it held was not handled.
                self._abandon_current(actor)
                raise
            finally:
                self._alive -= 1

    def _abandon_current(self, actor: _Actor) -> None:
        work = actor.current
        if work is not None:
            actor.current = None
            actor.busy_since = None
            self._release(work)

    def _release(self, work: _Work) -> None:
        work.route.consumer.release(work.record)
        work.route._settled()

    def _ack(self, work: _Work) -> None:
        work.route.consumer.ack(work.record)
        work.route._settled()

    async def _actor_loop(self, actor: _Actor) -> None:
        """Handle the inbox one message at a time, forever.

        ``actor.current`` survives a crash of this loop, so the restarted
        loop goes on with the same message: order holds across restarts.
        """
        receive = actor.receive
        while True:
            with trio.CancelScope() as scope:
                actor.scope = scope
                handled_in_a_row = 0
                while True:
                    if actor.current is None:
                        if handled_in_a_row >= _BATCH_BEFORE_CHECKPOINT:
                            handled_in_a_row = 0
                            await trio.lowlevel.checkpoint()
                        try:
                            actor.current = receive.receive_nowait()
                        except trio.WouldBlock:
                            handled_in_a_row = 0
                            # The last handler's deadline may still be set
                            # (see _attempt): never let it fire while idle.
                            scope.deadline = math.inf
                            actor.current = await receive.receive()
                        actor.attempt = 1
                    if self.fault_hook is not None:
                        self.fault_hook(actor.index)
                    if not await self._attempt(actor, scope):
                        break  # the deadline fired and the scope is spent
                    handled_in_a_row += 1
            if actor.pending_failure is not None:
                exc, actor.pending_failure = actor.pending_failure, None
                await self._failed(actor, exc)
            elif scope.cancelled_caught:
                await self._after_cancelled_attempt(actor)

    async def _attempt(self, actor: _Actor, scope: trio.CancelScope) -> bool:
        """Run one attempt of ``actor.current`` and settle it if it is done.

        Returns False when ``scope`` can no longer be used.
        """
        work = actor.current
        assert work is not None
        route = work.route
        if route.closing:
            self._finish(actor, release=True)
            return True
        if work.rejection is not None:
            scope.deadline = math.inf
            await self._dead_letter(work, work.rejection, attempts=0)
            self._finish(actor)
            return True
        message = work.message
        if actor.attempt > 1:
            message = attrs.evolve(message, attempt=actor.attempt)
        token = _current_message.set(message)
        timeout = route.handler_timeout
        now = trio.current_time()
        if actor.attempt == 1:
            actor.busy_since = now
            if work.record.timestamp is not None:
                route.stats.end_to_end.observe(time.time() - work.record.timestamp)
        # Moving a deadline costs ~6 us (a third of a message's cost), so
        # a call keeps the current deadline when it lies within its
        # [timeout, timeout + slack] window and moves it only otherwise: a
        # handler is cancelled no earlier than its timeout and at most
        # TIMEOUT_SLACK later (see docs/architecture.md).
        if timeout is None:
            if scope.deadline != math.inf:
                scope.deadline = math.inf
        else:
            earliest = now + timeout
            slack = min(timeout * TIMEOUT_SLACK, MAX_TIMEOUT_SLACK)
            if not earliest <= scope.deadline <= earliest + slack:
                scope.deadline = earliest + slack
        try:
            await route.invoke(message)
        except Exception as exc:
            scope.deadline = math.inf
            _current_message.reset(token)
            if scope.cancel_called:
                # The deadline passed while the handler was failing anyway:
                # the scope is spent, so count the failure outside it.
                actor.pending_failure = exc
                return False
            await self._failed(actor, exc)
            return True
        _current_message.reset(token)
        self.stats.handled += 1
        route.stats.handled += 1
        route.stats.handler_duration.observe(trio.current_time() - now)
        self._finish(actor)
        # A deadline that passed after the handler returned has cancelled the
        # scope without being delivered: the success stands, the scope does not.
        return not scope.cancel_called

    async def _after_cancelled_attempt(self, actor: _Actor) -> None:
        abandoned, actor.abandoned = actor.abandoned, False
        if actor.current is None:
            return
        if abandoned or actor.current.route.closing:
            self._finish(actor, release=True)
            return
        timeout = actor.current.route.handler_timeout
        exc = HandlerTimeout(f"handler did not finish within {timeout:g}s")
        await self._failed(actor, exc)

    async def _failed(self, actor: _Actor, exc: Exception) -> None:
        """Count a failed attempt; retry after a backoff or dead-letter."""
        work = actor.current
        assert work is not None
        self.stats.failed += 1
        work.route.stats.failed += 1
        if actor.attempt >= self.retry.max_attempts:
            await self._dead_letter(work, exc, attempts=actor.attempt)
            self._finish(actor)
            return
        logger.debug(
            "handler failed on %s offset %s (attempt %d): %r",
            work.record.topic,
            work.record.offset,
            actor.attempt,
            exc,
        )
        self.stats.retried += 1
        work.route.stats.retried += 1
        await trio.sleep(self.retry.delay(actor.attempt))
        actor.attempt += 1

    def _finish(self, actor: _Actor, *, release: bool = False) -> None:
        work = actor.current
        assert work is not None
        actor.current = None
        actor.busy_since = None
        if release:
            self._release(work)
        else:
            self._ack(work)

    async def _dead_letter(self, work: _Work, exc: Exception, *, attempts: int) -> None:
        """Park the message in the dead-letter topic; retry the publish until
        it succeeds (the message is acked only after it is parked)."""
        record = work.record
        headers = dict(record.headers)
        headers[DLQ_ERROR_TYPE] = type(exc).__name__
        headers[DLQ_ERROR_MESSAGE] = _one_line(str(exc))[:_MAX_ERROR_MESSAGE]
        headers[DLQ_ATTEMPTS] = str(attempts)
        headers[DLQ_ORIGINAL_TOPIC] = record.topic
        headers[DLQ_ORIGINAL_OFFSET] = str(record.offset)
        if record.partition is not None:
            headers[DLQ_ORIGINAL_PARTITION] = str(record.partition)
        if record.subject != record.topic:
            headers[DLQ_ORIGINAL_SUBJECT] = record.subject
        if isinstance(work.rejection, InvalidAggregateIDError):
            # Keep the bad aggregate ID for people, out of the bus's way.
            for name in [h for h in headers if h.lower() == AGGREGATE_ID_HEADER.lower()]:
                headers[DLQ_ORIGINAL_AGGREGATE_ID] = headers.pop(name)
        out = OutgoingMessage(
            topic=work.route.dead_letter_topic,
            value=record.value,
            # Same aggregate, same actor and partition: the DLQ keeps order.
            key=work.message.aggregate_id,
            headers=headers,
        )
        delay = self.retry.backoff or 0.1
        while True:
            try:
                await self._publish(out)
            except Exception:
                logger.warning(
                    "dead-lettering to %s failed; retrying in %.2fs",
                    out.topic,
                    delay,
                    exc_info=True,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, self.retry.max_backoff or 5.0)
            else:
                break
        self.stats.dead_lettered += 1
        work.route.stats.dead_lettered += 1
        logger.warning(
            "dead-lettered %s offset %s to %s after %d attempts: %s: %s",
            record.topic,
            record.offset,
            out.topic,
            attempts,
            type(exc).__name__,
            exc,
        )

    # -------------------------------------------------------------- closing

    def abandon_route(self, route: Route) -> None:
        """Cancel the handler calls still running for a closing route."""
        for actor in self._actors:
            if actor.current is not None and actor.current.route is route and actor.scope:
                actor.abandoned = True
                actor.scope.cancel()

    def release_queued(self) -> None:
        """After the actors stopped: release every message left in inboxes."""
        for actor in self._actors:
            self._abandon_current(actor)
            while True:
                try:
                    work = actor.receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                self._release(work)


def _one_line(text: str) -> str:
    return " ".join(text.split())
