"""The boundary between Trio and the asyncio side of a broker transport.

aiokafka and nats-py are asyncio libraries; each of those transports runs
them on an asyncio loop of its own, opened by :func:`open_bridge` inside the
bus's task tree (trio-asyncio runs that loop inside a Trio task, in the same
thread). This module is the only one that touches trio-asyncio, and every
hand-off between the two sides goes through one of its three mechanisms:

* :meth:`Bridge.call` — Trio awaits an asyncio coroutine function (one
  crossing, ~125 us: cross per batch, never per message). A transport's
  long-running asyncio loops (pull, poll, commit, watch) are started the
  same way, as Trio tasks of the transport's nursery that await them:
  leaving the bus cancels them, and whatever they raise propagates there
  like any Trio task's failure. Unlike a bare ``aio_as_trio`` call, a call
  is bounded: once the caller is cancelled it waits at most
  :data:`UNWIND_TIMEOUT` for the asyncio side to unwind, and it fails with
  :class:`~trio_bus.errors.TransportUnavailableError` as soon as the loop
  has stopped, instead of waiting for an answer that cannot come.
* :class:`Handoff` — asyncio → Trio: the asyncio side ``put``\\ s items
  (synchronously, never blocking); one Trio task takes them in batches, and
  is woken once per batch, not per item.
* :class:`Mailbox` — Trio → asyncio: Trio code ``put``\\ s items
  (synchronously, never blocking; ack/commit requests); the asyncio side
  waits for and drains them.

State that both sides need is owned by one side and reached by the other
only through these; nothing else is mutated across the boundary.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Generic, ParamSpec, TypeVar

import trio
import trio_asyncio

from ..errors import TransportUnavailableError

__all__ = ["UNWIND_TIMEOUT", "Bridge", "Handoff", "Mailbox", "open_bridge"]

logger = logging.getLogger("trio_bus.bridge")

P = ParamSpec("P")
T = TypeVar("T")

#: Seconds a cancelled :meth:`Bridge.call` waits for the asyncio side to
#: finish unwinding before it gives up on it (the loop cancels it again when
#: it closes).
UNWIND_TIMEOUT = 1.0
#: Seconds leaving :func:`open_bridge` waits for the asyncio tasks still on
#: the loop to end, cancelling them again every :data:`RECANCEL_INTERVAL`.
TEARDOWN_TIMEOUT = 5.0
RECANCEL_INTERVAL = 0.1


class Bridge:
    """Runs asyncio coroutine functions from Trio on the transport's loop.

    Attributes:
        name: The transport's name, for error messages.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self.name = name
        self._stopped = False
        self._waiters: set[trio.Event] = set()
        self._teardowns: list[Callable[[], Awaitable[object]]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio loop (for the asyncio side's own use)."""
        return self._loop

    @property
    def running(self) -> bool:
        """False once the asyncio loop has stopped."""
        return not self._stopped and self._loop.is_running()

    def _loop_gone(self) -> TransportUnavailableError:
        return TransportUnavailableError(f"the asyncio loop of the {self.name} transport stopped")

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)`` on the asyncio side; one crossing.

        Cancelling the calling Trio task cancels the asyncio task and waits
        up to :data:`UNWIND_TIMEOUT` for it to finish. An
        ``asyncio.CancelledError`` the caller did not ask for (the loop is
        shutting down) becomes :class:`TransportUnavailableError`.

        Raises:
            TransportUnavailableError: the loop stopped before answering.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self.running:
            raise self._loop_gone()
        future = asyncio.ensure_future(_in_asyncio(fn, args, kwargs), loop=self._loop)
        answered = trio.Event()
        future.add_done_callback(lambda _: answered.set())
        self._waiters.add(answered)
        try:
            await answered.wait()
        except trio.Cancelled:
            future.cancel()
            with trio.CancelScope(shield=True) as unwind:
                unwind.deadline = trio.current_time() + UNWIND_TIMEOUT
                await answered.wait()
            if not future.done():
                logger.warning("an asyncio call of the %s transport did not unwind", self.name)
            raise
        finally:
            self._waiters.discard(answered)
        if not future.done():  # woken because the loop stopped
            future.cancel()
            raise self._loop_gone()
        try:
            return future.result()
        except asyncio.CancelledError:
            raise self._loop_gone() from None

    def at_teardown(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Await *fn()* on the asyncio side when the bridge closes, once
        every other asyncio task has ended, within :data:`UNWIND_TIMEOUT`:
        for what a stop cut short at its bound left open (a client's
        connections), which no task of that client can reopen by then."""
        self._teardowns.append(fn)

    async def wait_stopped(self) -> None:
        """Wait until the asyncio loop has stopped (normally: at close)."""
        loop: Any = self._loop
        await loop.wait_stopped()

    async def _watch(self) -> None:
        """Wake every waiting call once the loop has stopped (however)."""
        await self.wait_stopped()
        self._stopped = True
        for waiter in list(self._waiters):
            waiter.set()


async def _in_asyncio(fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any) -> T:
    # Calls fn inside the asyncio task, so its first line already runs in
    # asyncio context (trio-asyncio's advice: aio_as_trio(fn)(args)).
    return await fn(*args, **kwargs)


@asynccontextmanager
async def open_bridge(name: str) -> AsyncIterator[Bridge]:
    """Open an asyncio loop for the lifetime of the block.

    Leaving the block stops the loop after every asyncio task on it has
    been cancelled and has finished, within :data:`TEARDOWN_TIMEOUT` (a
    task that would not end is abandoned and named in an ERROR log), then
    awaits what was given to :meth:`Bridge.at_teardown`.
    """
    loop: Any
    async with trio_asyncio.open_loop() as loop:
        bridge = Bridge(loop, name)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge._watch, name=f"trio_bus.{name}-loop-watch")
                try:
                    yield bridge
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _end_tasks(loop, name)
                await _run_teardowns(bridge)


async def _end_tasks(loop: asyncio.AbstractEventLoop, name: str) -> None:
    """Cancel the loop's asyncio tasks and wait for them, at most
    :data:`TEARDOWN_TIMEOUT`; abandon (and name, at ERROR) those that
    would not end.

    trio-asyncio's own teardown cancels each task once and then waits for
    all of them, shielded and unbounded: one task that swallows its
    cancellation (a library retry loop) would hang leaving the bus. Here a
    task is cancelled again every :data:`RECANCEL_INTERVAL` until it ends;
    one still running at the bound is unregistered from asyncio, so the
    loop's teardown does not wait for it: a leaked task, reported, rather
    than a close that never ends.
    """
    if not loop.is_running():
        return  # nothing can run any more: trio-asyncio drops the tasks
    deadline = trio.current_time() + TEARDOWN_TIMEOUT
    while True:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not pending:
            return
        if trio.current_time() >= deadline:
            break
        for task in pending:
            task.cancel()
        await trio.sleep(RECANCEL_INTERVAL)
    for task in pending:
        logger.error(
            "the %s transport's asyncio task %s did not end within %gs of being cancelled;"
            " abandoned: %s",
            name,
            task.get_name(),
            TEARDOWN_TIMEOUT,
            _where(task),
        )
        # Private, but the only way to keep trio-asyncio from waiting for
        # it (asyncio.all_tasks reads this registry).
        asyncio.tasks._unregister_task(task)


async def _run_teardowns(bridge: Bridge) -> None:
    """Await the functions given to :meth:`Bridge.at_teardown`, together,
    within :data:`UNWIND_TIMEOUT`; failures are logged, not raised."""
    fns, bridge._teardowns = bridge._teardowns, []
    if not fns or not bridge.running:
        return
    outcomes: list[object] = []
    with trio.move_on_after(UNWIND_TIMEOUT):
        try:
            outcomes = await bridge.call(_gather, fns)
        except TransportUnavailableError:
            return
    if len(outcomes) < len(fns):
        logger.warning("the teardown of the %s transport did not end in time", bridge.name)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            logger.warning("a teardown of the %s transport failed: %r", bridge.name, outcome)


async def _gather(fns: list[Callable[[], Awaitable[object]]]) -> list[object]:
    return await asyncio.gather(*(fn() for fn in fns), return_exceptions=True)


def _where(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended, outermost coroutine first."""
    frames = task.get_stack()
    if not frames:
        return repr(task.get_coro())
    return " -> ".join(
        f"{f.f_code.co_qualname} ({f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno})"
        for f in frames
    )


class Handoff(Generic[T]):
    """Items handed from the asyncio side to one Trio consumer, in batches.

    The producer (asyncio side) calls :meth:`put` / :meth:`put_many`, which
    never block: the producer bounds what it produces itself (prefetch,
    pausing partitions). The consumer (one Trio task) awaits :meth:`take`.
    """

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Add one item (asyncio side) and wake the consumer."""
        self._items.append(item)
        if self._lot:
            self._lot.unpark_all()

    def put_many(self, items: Iterable[T]) -> None:
        """Add items in order (asyncio side); one wake-up for all."""
        self._items.extend(items)
        if self._items and self._lot:
            self._lot.unpark_all()

    def discard(self, drop: Callable[[T], bool]) -> int:
        """Remove queued items for which *drop* is true (producer side: a
        revoked partition); return how many."""
        kept = deque(item for item in self._items if not drop(item))
        dropped = len(self._items) - len(kept)
        self._items = kept
        return dropped

    def fail(self, error: BaseException) -> None:
        """Make :meth:`take` raise *error* once the queued items are taken."""
        self._error = error
        self._lot.unpark_all()

    def take_nowait(self, max_items: int) -> list[T]:
        """Up to *max_items* queued items, maybe none (Trio side)."""
        items = self._items
        if len(items) <= max_items:
            out = list(items)
            items.clear()
            return out
        return [items.popleft() for _ in range(max_items)]

    async def take(self, max_items: int) -> list[T]:
        """Wait for at least one item; return up to *max_items* (Trio side).

        Cancel-atomic: a cancelled ``take`` has taken nothing.

        Raises:
            BaseException: the error given to :meth:`fail`, once nothing is
                queued.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._items:
            if self._error is not None:
                raise self._error
            await self._lot.park()
        out = self.take_nowait(max_items)
        # A schedule point that cannot be cancelled: what was taken reaches
        # the caller.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return out


class Mailbox(Generic[T]):
    """Items handed from Trio code to the asyncio side.

    Trio code calls :meth:`put`, which never blocks (settling a delivery is
    synchronous); the asyncio side awaits :meth:`wait` and :meth:`drain`\\ s.
    """

    def __init__(self) -> None:
        self._items: list[T] = []
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Add an item (Trio side) and wake the asyncio side."""
        self._items.append(item)
        if not self._ready.is_set():
            self._ready.set()

    def wake(self) -> None:
        """Make :meth:`wait` return now (asyncio side: the same loop waits
        for its mailbox and for signals of its own side)."""
        if not self._ready.is_set():
            self._ready.set()

    def drain(self) -> list[T]:
        """Everything put so far, in order (asyncio side)."""
        items, self._items = self._items, []
        self._ready.clear()
        return items

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - asyncio side
        """Wait until something was put, at most *timeout* seconds (asyncio
        side); True when something is there."""
        if not self._items:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                pass
        return bool(self._items)
