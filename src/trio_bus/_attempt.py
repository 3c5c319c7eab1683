"""One attempt of what an actor holds: the handler call under its cancel
scope, then success, retry in place, dead-lettering or hand-back.

The actor loop (``_pool.py``) takes a message and asks :class:`Handling`
to attempt it until it is settled. Each actor reuses one cancel scope
across calls and moves its deadline only when it leaves the call's
``[timeout, timeout + slack]`` window (a fresh scope per call costs twice
as much). When the deadline fires the scope is spent: the attempt reports
it, and the loop opens a new scope and counts the failure there
(:meth:`Handling.after_cancelled`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from ._batch import after_batch, batch_messages, bisect
from ._dead_letter import PublishOne, is_non_retryable, park
from ._message import Record
from ._work import Actor, Route, _current_message, settle
from .errors import HandlerTimeout

__all__ = ["MAX_TIMEOUT_SLACK", "TIMEOUT_SLACK", "Handling", "finish"]

logger = logging.getLogger("trio_bus.pool")

T = TypeVar("T")

#: A handler timeout fires between ``timeout`` and ``timeout * (1 + slack)``
#: (at most MAX_TIMEOUT_SLACK seconds late): the price of moving a cancel
#: scope's deadline once per many calls instead of twice per call.
TIMEOUT_SLACK = 0.05
MAX_TIMEOUT_SLACK = 1.0


def finish(actor: Actor, *, release: bool = False) -> None:
    """Settle what the actor holds (one message or a batch); after a
    batch, go on with what was set aside (see ``after_batch``)."""
    work = actor.current
    assert work is not None
    actor.current = None
    actor.busy_since = None
    if actor.batch:
        for each in actor.batch:
            settle(each, release=release)
        actor.batch.clear()
        after_batch(actor)
    else:
        settle(work, release=release)


class Handling:
    """Attempts, failures and dead-letters of the actors' work."""

    def __init__(self, publish: PublishOne) -> None:
        self._publish = publish
        #: The Trio clock's reading; the pool sets the run's clock method
        #: itself (one call instead of trio.current_time's three, twice
        #: per message).
        self.now: Callable[[], float] = trio.current_time

    async def attempt(self, actor: Actor, scope: trio.CancelScope) -> bool:
        """Run one attempt of ``actor.current`` and settle it if it is done.

        Returns False when ``scope`` can no longer be used.
        """
        work = actor.current
        assert work is not None
        route = work.route
        if route.closing:
            finish(actor, release=True)
            return True
        now = self.now()
        if work.lease is not None and self._fenced(actor, now):
            return True
        if work.rejection is not None:
            scope.deadline = math.inf
            await self._dead_letter(work, work.rejection, attempts=0, rejected=True)
            finish(actor)
            return True
        if route.batch is not None:
            messages = await batch_messages(actor, scope, route.batch)
            if messages is None:
                finish(actor, release=True)
                return True
            return await self._call(actor, scope, route.batch.invoke, messages, len(messages))
        message: Record = work  # the very object the handler gets
        if actor.attempt > 1:
            message = attrs.evolve(message, attempt=actor.attempt)
        else:
            actor.busy_since = now
            if work.timestamp is not None:
                route.stats.end_to_end.observe(time.time() - work.timestamp)
        token = _current_message.set(message)
        try:
            return await self._call(actor, scope, route.invoke, message, 1, now)
        finally:
            _current_message.reset(token)

    async def _call(
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
            now = self.now()
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
        lease = work.lease
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
            actor.pending_failure = _swallowed(route)
            return False
        stats = route.stats
        stats.handled += count
        stats.handler_duration.observe(self.now() - now)
        if actor.batch:
            finish(actor)
        else:  # finish(actor), inlined: once per message
            actor.current = actor.busy_since = None
            settle(work)
        return True

    async def after_cancelled(self, actor: Actor) -> None:
        """Settle an attempt whose scope was cancelled (in a fresh scope)."""
        abandoned, actor.abandoned = actor.abandoned, False
        failure, actor.pending_failure = actor.pending_failure, None
        if actor.current is None or self._fenced(actor):
            return
        if abandoned or actor.current.route.closing:
            finish(actor, release=True)
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
            finish(actor)
            return
        logger.debug(
            "handler failed on %s offset %s (attempt %d): %r",
            work.topic,
            work.offset,
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
        lease = work.lease
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
            work.topic,
            work.offset,
        )
        actor.pending_failure = None
        finish(actor, release=True)
        return True

    async def _dead_letter(
        self, work: Record, exc: Exception, *, attempts: int, rejected: bool = False
    ) -> None:
        route = work.route
        await park(
            self._publish,
            work,
            exc,
            topic=route.dead_letter_topic,
            aggregate_id=work.aggregate_id,
            attempts=attempts,
            retry=route.retry,
            rejected=rejected,
        )
        route.stats.dead_lettered += 1


def _swallowed(route: Route) -> HandlerTimeout:
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


def _timeout_error(route: Route) -> HandlerTimeout:
    timeout = route.handler_timeout
    limit = "its cancel scope" if timeout is None else f"{timeout:g}s"
    return HandlerTimeout(f"handler did not finish within {limit}")
