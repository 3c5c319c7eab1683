"""The global actor pool: per-aggregate order and supervision.

One fixed set of actors serves every subscription of a bus. Dispatch
(``_dispatch.py``) sends an aggregate's messages to one actor for as long
as any of them is queued or running there, and an actor handles its inbox
one message at a time: that is the whole ordering mechanism. What one
attempt does (timeout, retry, dead-letter, lease fence) is ``_attempt.py``.

Hot-path choices (measured, see docs/architecture.md):

* an actor drains its inbox (chunks of one fetched batch) without waiting
  and checkpoints every few messages rather than once per hop;
* the pool's work item is the :class:`Message` the handler gets (one object
  per delivery besides the transport's record: long-lived objects cost the
  cyclic garbage collector);
* each actor reuses one cancel scope across handler calls and moves its
  deadline (see ``_attempt.py``).

Batch subscriptions (``_batch.py``) run on the same actors: an actor
collects a batch from its own inbox, where its aggregates' claims keep them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import trio

from ._attempt import Handling, finish
from ._dead_letter import PublishOne
from ._dispatch import Dispatcher
from ._message import Record
from ._stats import RunningHandler
from ._work import Actor, EnvelopeHandler, Handler, Route, current_message, settle
from .errors import ActorCrashedError

__all__ = ["ActorPool", "EnvelopeHandler", "Handler", "Route", "current_message"]

logger = logging.getLogger("trio_bus.pool")

#: Messages an actor handles back to back before it yields to the scheduler.
_BATCH_BEFORE_CHECKPOINT = 16


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
        self._handling = Handling(publish)
        #: Actor restarts after a crash of an actor's own loop.
        self.restarts = 0
        self._actors: list[Actor] = []
        for index in range(size):
            send, receive = trio.open_memory_channel[list[Record]](inbox_size)
            self._actors.append(Actor(index, send, receive))
        self._dispatcher = Dispatcher(self._actors, inbox_size)
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
                        topic=work.topic,
                        offset=work.offset,
                        aggregate_id=work.aggregate_id,
                        since=since,
                    )
                )
        return out

    def actors_alive(self) -> int:
        """Actor tasks currently running their loop."""
        return self._alive

    # ------------------------------------------------------------- dispatch

    async def dispatch(self, route: Route, records: Sequence[Record]) -> None:
        """Route a fetched batch into the actors' inboxes, in order (waits
        for room when an inbox is full: backpressure)."""
        await self._dispatcher.dispatch(route, records)

    # --------------------------------------------------------------- actors

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every actor under supervision until cancelled."""
        self._handling.now = trio.lowlevel.current_clock().current_time
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
        # finish hands the stash (if any) on as the next current: release it too.
        while actor.current is not None:
            finish(actor, release=True)

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
                        work = None
                        if actor.queued:  # else empty: no WouldBlock to raise
                            try:
                                work = actor.take_nowait()
                            except trio.WouldBlock:
                                pass
                        if work is None:
                            handled_in_a_row = 0
                            # The last call's deadline stays set (moving it
                            # here and back costs two moves per message when
                            # actors idle between messages); if it fires
                            # while idle, receive is cancel-atomic and the
                            # loop below just opens a fresh scope.
                            work = await actor.take()
                        actor.current = work
                        actor.attempt = 1
                    if self.fault_hook is not None:
                        self.fault_hook(actor.index)
                    if not await self._handling.attempt(actor, scope):
                        break  # the scope was cancelled and is spent
                    handled_in_a_row += 1
            if actor.pending_failure is not None or scope.cancelled_caught:
                await self._handling.after_cancelled(actor)

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
                settle(work, release=True)
