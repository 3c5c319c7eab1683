"""The global actor pool: routing, per-aggregate order, timeouts, retries,
dead-lettering and supervision.

One fixed set of actors serves every subscription of a bus. A message goes
to ``actors[stable_hash(aggregate_id) % pool_size]``, so one aggregate always
lands on one actor, which handles its inbox one message at a time: that is
the whole ordering mechanism. Messages without an aggregate ID are spread
round-robin.

Hot-path choices (measured, see docs/architecture.md):

* dispatch hands each actor one chunk (a list, in order) per fetched batch
  through its bounded memory-channel inbox with ``send_nowait``; only when
  the inbox's messages would exceed its size do they go one at a time, each
  waiting for room, which is where backpressure lives;
* an actor drains its inbox (chunks) without waiting and checkpoints every
  few messages rather than once per hop;
* the pool's work item is the :class:`Message` the handler gets (one object
  per delivery besides the transport's record: long-lived objects cost the
  cyclic garbage collector);
* each actor reuses one cancel scope across handler calls and moves its
  deadline (a fresh scope per call costs twice as much). When the deadline
  fires, the scope is spent: the actor opens a new one and goes on with the
  same message as a failed attempt.

Batch subscriptions (``_batch.py``) run on the same actors: an actor
collects a batch from its own inbox, so an aggregate never leaves its actor.
Dead-lettering lives in ``_dead_letter.py``, aggregate-ID extraction in
``_routing.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import attrs
import trio

from ._batch import after_batch, attempt_batch, bisect
from ._dead_letter import PublishOne, is_non_retryable, park
from ._message import Record
from ._names import stable_hash
from ._routing import classify
from ._stats import RunningHandler
from ._work import (
    Actor,
    EnvelopeHandler,
    Handler,
    Route,
    Work,
    _current_message,
    current_message,
)
from .errors import ActorCrashedError, HandlerTimeout

__all__ = ["ActorPool", "EnvelopeHandler", "Handler", "Route", "current_message"]

logger = logging.getLogger("trio_bus.pool")

T = TypeVar("T")

#: A handler timeout fires between ``timeout`` and ``timeout * (1 + slack)``
#: (at most MAX_TIMEOUT_SLACK seconds late): the price of moving a cancel
#: scope's deadline once per many calls instead of twice per call.
TIMEOUT_SLACK = 0.05
MAX_TIMEOUT_SLACK = 1.0

#: Messages an actor handles back to back before it yields to the scheduler.
_BATCH_BEFORE_CHECKPOINT = 16
#: Aggregate IDs whose actor index is remembered at most (IDs are at most
#: 256 bytes, so the cache stays within a few MiB).
ROUTE_CACHE_ENTRIES = 16384


class ActorPool:
    """A fixed set of actors, each a task with a bounded inbox."""

    def __init__(
        self,
        *,
        size: int,
        inbox_size: int,
        max_restarts: int,
        restart_window: float,
        publish: PublishOne,
    ) -> None:
        self.size = size
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._publish = publish
        #: Actor restarts after a crash of an actor's own loop.
        self.restarts = 0
        self._actors = []
        self._inbox_size = inbox_size
        for index in range(size):
            send, receive = trio.open_memory_channel[list[Work]](inbox_size)
            self._actors.append(Actor(index, send, receive))
        #: aggregate ID -> actor index (see _cache_route).
        self._route_cache: dict[str, int] = {}
        self._round_robin = 0
        self._alive = 0
        #: Test hook: called with the actor index before each message; an
        #: exception from it is a crash of the actor's own loop.
        self.fault_hook: Callable[[int], None] | None = None

    # ----------------------------------------------------------- statistics

    def inbox_depths(self) -> tuple[int, ...]:
        """Messages waiting per actor (dispatched, not started)."""
        return tuple(a.queued for a in self._actors)

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

        Each actor gets one chunk (a list, in delivery order) per batch,
        sent without waiting while the actor's queued messages stay within
        the inbox size; otherwise its messages go one at a time, each
        waiting for room (backpressure lives there). An inbox never holds
        more than ``inbox_size`` messages.
        """
        actors, size = self._actors, self.size
        route.stats.consumed += len(records)
        wants_envelope = route.wants_envelope
        chunks: dict[int, list[Work]] = {}
        for record in records:
            aggregate, envelope, rejection = classify(record, wants_envelope=wants_envelope)
            if aggregate is not None:
                index = self._route_cache.get(aggregate)
                if index is None:
                    index = self._cache_route(aggregate)
            else:
                index = self._round_robin = (self._round_robin + 1) % size
            # Positional, in Message's field order: a frozen class's keyword
            # init costs about 1.6x as much.
            work = Work(
                record.topic,
                record.subject,
                record.value,
                record.key,
                record.headers,
                aggregate,
                1,
                record.partition,
                record.offset,
                record.delivery_count,
                record.timestamp,
                envelope,
                route=route,
                record=record,
                rejection=rejection,
            )
            chunk = chunks.get(index)
            if chunk is None:
                chunks[index] = [work]
            else:
                chunk.append(work)
        limit = self._inbox_size
        for index, chunk in chunks.items():
            actor = actors[index]
            count = len(chunk)
            if actor.queued + count <= limit:
                route._dispatched(count)
                # Never full: it holds at most `queued` chunks.
                actor.send.send_nowait(chunk)
                actor.queued += count
            else:
                await self._send_waiting(route, actor, chunk)
        await trio.lowlevel.checkpoint()

    async def _send_waiting(self, route: Route, actor: Actor, chunk: list[Work]) -> None:
        # The inbox is full: one message at a time, each once there is room
        # (in flight from here: the dispatcher holds it).
        limit = self._inbox_size
        for sent, work in enumerate(chunk):
            route._dispatched()
            try:
                await actor.wait_for_room(limit)
            except BaseException:
                self._release(work)
                for left in chunk[sent + 1 :]:
                    route.consumer.release(left.record)
                raise
            actor.send.send_nowait([work])
            actor.queued += 1

    def _cache_route(self, aggregate: str) -> int:
        """The actor index of *aggregate*, remembered (bounded: emptied
        when full, so wire input cannot grow it without limit)."""
        cache = self._route_cache
        if len(cache) >= ROUTE_CACHE_ENTRIES:
            cache.clear()
        index = cache[aggregate] = stable_hash(aggregate) % self.size
        return index

    # --------------------------------------------------------------- actors

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every actor under supervision until cancelled."""
        async with trio.open_nursery() as nursery:
            for actor in self._actors:
                nursery.start_soon(self._supervise, actor, name=f"trio_bus.actor-{actor.index}")
            task_status.started()

    async def _supervise(self, actor: Actor) -> None:
        while True:
            self._alive += 1
            try:
                await self._actor_loop(actor)
            except Exception as exc:
                now = trio.current_time()
                actor.restarts.append(now)
                while actor.restarts and actor.restarts[0] < now - self.restart_window:
                    actor.restarts.popleft()
                self.restarts += 1
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

    def _abandon_current(self, actor: Actor) -> None:
        # _finish hands the stash (if any) on as the next current: release it too.
        while actor.current is not None:
            self.finish(actor, release=True)

    def _release(self, work: Work) -> None:
        work.route.consumer.release(work.record)
        work.route._settled()

    def _ack(self, work: Work) -> None:
        work.route.consumer.ack(work.record)
        work.route._settled()

    async def _actor_loop(self, actor: Actor) -> None:
        """Handle the inbox one message at a time, forever.

        ``actor.current`` survives a crash of this loop, so the restarted
        loop goes on with the same message: order holds across restarts.
        """
        while True:
            with trio.CancelScope() as scope:
                actor.scope = scope
                actor.deadline = math.inf
                handled_in_a_row = 0
                while True:
                    if actor.current is None:
                        if handled_in_a_row >= _BATCH_BEFORE_CHECKPOINT:
                            handled_in_a_row = 0
                            await trio.lowlevel.checkpoint()
                        try:
                            actor.current = actor.take_nowait()
                        except trio.WouldBlock:
                            handled_in_a_row = 0
                            # The last call's deadline stays set (moving it
                            # here and back costs two moves per message when
                            # actors idle between messages); if it fires
                            # while idle, receive is cancel-atomic and the
                            # loop below just opens a fresh scope.
                            actor.current = await actor.take()
                        actor.attempt = 1
                    if self.fault_hook is not None:
                        self.fault_hook(actor.index)
                    if not await self._attempt(actor, scope):
                        break  # the scope was cancelled and is spent
                    handled_in_a_row += 1
            if actor.pending_failure is not None or scope.cancelled_caught:
                await self._after_cancelled_attempt(actor)

    async def _attempt(self, actor: Actor, scope: trio.CancelScope) -> bool:
        """Run one attempt of ``actor.current`` and settle it if it is done.

        Returns False when ``scope`` can no longer be used.
        """
        work = actor.current
        assert work is not None
        route = work.route
        if route.closing:
            self.finish(actor, release=True)
            return True
        now = trio.current_time()
        if self._fenced(actor, now):
            return True
        if work.rejection is not None:
            scope.deadline = math.inf
            await self._dead_letter(work, work.rejection, attempts=0, rejected=True)
            self.finish(actor)
            return True
        if route.batch is not None:
            return await attempt_batch(self, actor, scope, route.batch)
        message = work.message
        if actor.attempt > 1:
            message = attrs.evolve(message, attempt=actor.attempt)
        if actor.attempt == 1:
            actor.busy_since = now
            if work.record.timestamp is not None:
                route.stats.end_to_end.observe(time.time() - work.record.timestamp)
        token = _current_message.set(message)
        try:
            return await self.call(actor, scope, route.invoke, message, 1, now)
        finally:
            _current_message.reset(token)

    async def call(
        self,
        actor: Actor,
        scope: trio.CancelScope,
        handler: Callable[[T], Awaitable[None]],
        arg: T,
        count: int,
        now: float | None = None,
    ) -> bool:
        """Call ``handler(arg)`` for the *count* messages the actor holds,
        under *scope* with the route's timeout; settle them on success,
        count the failure otherwise.

        Returns False when ``scope`` was cancelled (it is spent): the actor
        loop then settles the attempt outside it.
        """
        work = actor.current
        assert work is not None
        route = work.route
        timeout = route.handler_timeout
        if now is None:
            now = trio.current_time()
        # Moving a deadline costs ~6 us (a third of a message's cost), so
        # a call keeps the current deadline when it lies within its
        # [timeout, timeout + slack] window and moves it only otherwise: a
        # handler is cancelled no earlier than its timeout and at most
        # TIMEOUT_SLACK later (see docs/architecture.md).
        # The call's own deadline is kept apart from the scope's, which a
        # lease may cap (at its expiry): the window check must not see the
        # cap, or every call would move the deadline twice.
        own = actor.deadline
        if timeout is None:
            own = math.inf
        else:
            earliest = now + timeout
            slack = min(timeout * TIMEOUT_SLACK, MAX_TIMEOUT_SLACK)
            if not earliest <= own <= earliest + slack:
                own = earliest + slack
        actor.deadline = own
        lease = work.record.lease
        if lease is not None:
            lease.enter(scope, own)
        elif scope.deadline != own:
            scope.deadline = own
        try:
            try:
                await handler(arg)
            finally:
                if lease is not None:
                    lease.exit(scope, restore=False)
        except Exception as exc:
            scope.deadline = math.inf
            if scope.cancel_called:
                # The deadline passed while the handler was failing anyway:
                # the scope is spent, so count the failure outside it.
                actor.pending_failure = exc
                return False
            await self._failed(actor, exc)
            return True
        if scope.cancel_called:
            # The scope was cancelled while the handler ran (its deadline,
            # or its route closing) and yet it returned: it swallowed
            # trio.Cancelled, or finished in the very tick the deadline
            # fired. Either way it did not return in time: a timeout.
            actor.pending_failure = self._swallowed(route)
            return False
        route.stats.handled += count
        route.stats.handler_duration.observe(trio.current_time() - now)
        self.finish(actor)
        return True

    def _swallowed(self, route: Route) -> HandlerTimeout:
        if not route.warned_swallow:
            route.warned_swallow = True
            logger.warning(
                "a handler of %s (group %s) returned normally after its cancel scope was "
                "cancelled: it swallows trio.Cancelled (catch Exception, not BaseException), "
                "or finished in the very tick its deadline fired. Counted as a timeout; "
                "logged once per subscription.",
                route.topic,
                route.group,
            )
        return _timeout_error(route)

    async def _after_cancelled_attempt(self, actor: Actor) -> None:
        abandoned, actor.abandoned = actor.abandoned, False
        failure, actor.pending_failure = actor.pending_failure, None
        if actor.current is None or self._fenced(actor):
            return
        if abandoned or actor.current.route.closing:
            self.finish(actor, release=True)
            return
        await self._failed(actor, failure or _timeout_error(actor.current.route))

    async def _failed(self, actor: Actor, exc: Exception) -> None:
        """Count a failed attempt; retry after a backoff or dead-letter."""
        if self._fenced(actor):
            return
        work = actor.current
        assert work is not None
        route = work.route
        route.stats.failed += 1
        if actor.attempt >= route.retry.max_attempts or is_non_retryable(exc):
            if actor.batch and bisect(actor):
                route.stats.retried += 1
                return
            for each in actor.batch or (work,):
                await self._dead_letter(each, exc, attempts=actor.attempt)
            self.finish(actor)
            return
        logger.debug(
            "handler failed on %s offset %s (attempt %d): %r",
            work.record.topic,
            work.record.offset,
            actor.attempt,
            exc,
        )
        route.stats.retried += 1
        await trio.sleep(route.retry.delay(actor.attempt))
        actor.attempt += 1

    def _fenced(self, actor: Actor, now: float | None = None) -> bool:
        """Hand back what the actor holds if its lease lapsed (see _lease.py):
        no call, retry or dead-lettering without it; the transport drops the
        release and the partition's new owner handles the message. *now*:
        the current Trio time, when the caller read it already."""
        work = actor.current
        assert work is not None
        lease = work.record.lease
        if lease is None:
            return False
        if now is None:
            if lease.held():
                return False
        elif not lease.revoked and now < lease.expires:  # Lease.held at *now*
            return False
        logger.debug(
            "lease %r lapsed: handing back %s offset %s",
            lease,
            work.record.topic,
            work.record.offset,
        )
        actor.pending_failure = None
        self.finish(actor, release=True)
        return True

    def finish(self, actor: Actor, *, release: bool = False) -> None:
        """Settle what the actor holds (one message or a batch); after a
        batch, go on with what was set aside (see ``after_batch``)."""
        work = actor.current
        assert work is not None
        actor.current = None
        actor.busy_since = None
        settle = self._release if release else self._ack
        if actor.batch:
            for each in actor.batch:
                settle(each)
            actor.batch.clear()
            after_batch(actor)
        else:
            settle(work)

    async def _dead_letter(
        self, work: Work, exc: Exception, *, attempts: int, rejected: bool = False
    ) -> None:
        route = work.route
        await park(
            self._publish,
            work.record,
            exc,
            topic=route.dead_letter_topic,
            aggregate_id=work.message.aggregate_id,
            attempts=attempts,
            retry=route.retry,
            rejected=rejected,
        )
        route.stats.dead_lettered += 1

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
                    work = actor.take_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                self._release(work)


def _timeout_error(route: Route) -> HandlerTimeout:
    timeout = route.handler_timeout
    limit = "its cancel scope" if timeout is None else f"{timeout:g}s"
    return HandlerTimeout(f"handler did not finish within {limit}")
