"""The transport's asyncio side as one structured unit.

Every loop that lives as long as the transport — the connection watch and
one loop per consumer — is a child of one ``asyncio.TaskGroup``, which
:meth:`Supervisor.run` holds open; the transport runs that coroutine as a
Trio task of its nursery through ``Bridge.call``. So:

* leaving the transport cancels the Trio task, which cancels the group and
  every loop in it, and waits for them;
* a loop that fails aborts the group, and its error (a
  :class:`~trio_bus.errors.TransportError`) comes out of the Trio task and
  ends the transport and ``open_bus``;
* a consumer's loop stops alone when the consumer closes.

(One Trio task per loop would work as well, but costs a Trio task per
subscription beside the bus's own fetch task; a group keeps it at one per
transport.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from ...errors import TransportError
from .connection import Connection
from .puller import Puller

__all__ = ["Supervisor"]


class Supervisor:
    """Owns the asyncio tasks of one transport (asyncio side)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._group: asyncio.TaskGroup | None = None
        self._ready = asyncio.Event()
        self._loops: dict[Puller, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Hold the group open until cancelled.

        Raises:
            TransportError: a loop failed (the first failure; the cause
                chained).
        """
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self.conn.watch(), name="trio_bus.nats-watch")
                self._ready.set()
                await asyncio.get_running_loop().create_future()  # until cancelled
        except BaseExceptionGroup as failures:
            first = _first_leaf(failures)
            if isinstance(first, TransportError):
                raise first  # noqa: B904 - its own cause is kept
            raise TransportError(f"a nats transport loop failed: {first!r}") from first
        finally:
            self._group = None

    async def wait_ready(self) -> None:
        """Return once :meth:`run` holds the group open."""
        await self._ready.wait()

    def _spawn(self, puller: Puller, coro: Coroutine[Any, Any, None]) -> None:
        if self._group is None:
            coro.close()
            raise TransportError("the nats transport is closing")
        self._loops[puller] = self._group.create_task(
            coro, name=f"trio_bus.nats-consumer-{puller.durable}"
        )

    async def open_consumer(self, puller: Puller) -> None:
        """Bind *puller* and start its loop in the group."""
        await puller.start(peers=self._loops.keys())
        self._spawn(puller, puller.run())

    async def close_consumer(self, puller: Puller, seconds: float, *, settle: bool = True) -> None:
        """Stop *puller*'s loop, then close it (naks, leave; ``settle=False``:
        send nothing)."""
        loop_task = self._loops.pop(puller, None)
        if loop_task is not None and not loop_task.done():
            loop_task.cancel()
            await asyncio.wait({loop_task}, timeout=seconds / 4)
        await puller.close(seconds, settle=settle)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
