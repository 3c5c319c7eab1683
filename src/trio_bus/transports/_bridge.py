"""A small typed layer over trio-asyncio, the only module of the core
transports that touches it.

Each Kafka/NATS transport owns one asyncio loop, opened inside the bus's
nursery, so leaving the bus closes the loop and every asyncio task on it.
Crossing costs ~125 us a call: callers cross once per batch, never per
message (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import trio_asyncio

__all__ = ["Bridge", "open_bridge"]

P = ParamSpec("P")
T = TypeVar("T")


class Bridge:
    """Runs asyncio coroutine functions from Trio on the bus's own loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)`` on the asyncio side; one crossing.

        Cancellation of the calling Trio task cancels the asyncio task.
        """
        result: T = await trio_asyncio.aio_as_trio(fn, loop=self.loop)(*args, **kwargs)
        return result


@asynccontextmanager
async def open_bridge() -> AsyncIterator[Bridge]:
    """Open an asyncio loop for the lifetime of the block."""
    loop: Any
    async with trio_asyncio.open_loop() as loop:
        yield Bridge(loop)
