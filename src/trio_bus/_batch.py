"""Batch subscriptions: one handler call for many messages, on the actors.

An actor that takes a message of a batch route collects more from *its own
inbox*, so every aggregate stays on its actor: no two batches ever hold the
same aggregate at once, and inside a batch an aggregate's messages keep
their delivery order. Collecting stops at ``max_batch`` messages, when
``max_wait`` has passed, or at the first message of another route (or a
malformed one): that message is the actor's *stash* and runs right after
the batch, so order across topics holds too.

A failing batch is retried whole, in place, per the route's retry policy.
When it keeps failing (or raises :class:`~trio_bus.errors.NonRetryableError`)
every message in it is dead-lettered, then acked; with ``bisect`` the batch
is split in two instead, and each half goes through the same cycle, first
half first, so only what fails alone is dead-lettered.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import trio

from ._config import at_least
from ._message import Message
from .errors import ConfigError

if TYPE_CHECKING:
    from ._work import Actor

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_WAIT", "BatchHandler", "Batching", "batch_messages"]

BatchHandler = Callable[[Sequence[Message]], Awaitable[None]]

#: Messages in one batch at most.
DEFAULT_MAX_BATCH = 100
#: Seconds an actor waits for a batch to fill; 0: take what is queued, so
#: batches grow with the backlog and add no latency.
DEFAULT_MAX_WAIT = 0.0


def _is_bool(_: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be a bool, not {value!r}")


@attrs.frozen(kw_only=True)
class Batching:
    """A batch route's handler and limits."""

    invoke: BatchHandler
    max_batch: int = attrs.field(default=DEFAULT_MAX_BATCH, validator=at_least(1, integer=True))
    max_wait: float = attrs.field(default=DEFAULT_MAX_WAIT, validator=at_least(0))
    bisect: bool = attrs.field(default=False, validator=_is_bool)

    async def one(self, message: Message) -> None:
        """The route's single-message handler: a batch of one."""
        await self.invoke((message,))


async def _collect(actor: Actor, scope: trio.CancelScope, batching: Batching) -> None:
    """Fill ``actor.batch`` (holding ``actor.current``) from the inbox."""
    batch = actor.batch
    route = batch[0].route
    # A deadline left from an earlier call must not fire while collecting.
    scope.deadline = math.inf
    until = trio.current_time() + batching.max_wait
    while len(batch) < batching.max_batch:
        try:
            work = actor.take_nowait()
        except trio.WouldBlock:
            if batching.max_wait <= 0 or route.closing:
                return
            with trio.move_on_at(until) as waited:
                route.collecting.add(waited)  # closing the route cancels it
                try:
                    work = await actor.take()
                finally:
                    route.collecting.discard(waited)
            if waited.cancelled_caught:
                return
        if work.route is not route or work.rejection is not None:
            actor.stash = work
            return
        batch.append(work)


def bisect(actor: Actor) -> bool:
    """Split the actor's failed batch when its route bisects: the first half
    runs next, the second after it. False when it cannot be split."""
    batch = actor.batch
    batching = batch[0].route.batch
    if batching is None or not batching.bisect or len(batch) < 2:
        return False
    half = len(batch) // 2
    actor.halves.append(batch[half:])
    del batch[half:]
    actor.attempt = 1
    return True


def after_batch(actor: Actor) -> None:
    """After a batch is settled: go on with the next bisected half, else
    with the stash."""
    if actor.halves:
        actor.batch.extend(actor.halves.pop())
        actor.current = actor.batch[0]
        actor.busy_since = trio.current_time()
    elif actor.stash is not None:
        actor.current, actor.stash = actor.stash, None
    actor.attempt = 1


async def batch_messages(
    actor: Actor, scope: trio.CancelScope, batching: Batching
) -> list[Message] | None:
    """The messages of this attempt of the batch starting at
    ``actor.current`` (collected on the first attempt); None when the route
    closed while it was collecting (then the caller releases the batch)."""
    first = actor.current
    assert first is not None
    if not actor.batch:
        actor.batch.append(first)
        actor.busy_since = trio.current_time()
        await _collect(actor, scope, batching)
        if first.route.closing:
            return None
        stats = first.route.stats.end_to_end
        now = time.time()
        for work in actor.batch:
            if work.timestamp is not None:
                stats.observe(now - work.timestamp)
    attempt = actor.attempt
    return [w if attempt == 1 else attrs.evolve(w, attempt=attempt) for w in actor.batch]
