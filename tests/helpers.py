"""Test helpers: event recorders that tests wait on without polling."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

import trio_bus

T = TypeVar("T")

#: Upper bound for one wait in a test against a real broker.
WAIT = 30.0


class Recorder(Generic[T]):
    """A list that wakes waiters whenever it grows."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._lot = trio.lowlevel.ParkingLot()

    def add(self, item: T) -> None:
        self.items.append(item)
        self._lot.unpark_all()

    def notify(self) -> None:
        """Wake waiters after a change made outside :meth:`add`."""
        self._lot.unpark_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Wait until *predicate()* holds; fail the test after *timeout*."""
        with trio.fail_after(timeout):
            while not predicate():
                await self._lot.park()

    async def poll_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Wait for a condition no :meth:`add` signals (bus statistics),
        checking it every few milliseconds; fail the test after *timeout*."""
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(0.005)

    async def wait_for_count(self, n: int, timeout: float = WAIT) -> None:
        await self.wait_until(lambda: len(self.items) >= n, timeout)

    def __len__(self) -> int:
        return len(self.items)


def collect(
    recorder: Recorder[trio_bus.Message],
) -> Callable[[trio_bus.Message], Awaitable[None]]:
    """A handler that records every message."""

    async def handler(message: trio_bus.Message) -> None:
        recorder.add(message)

    return handler


def task_count() -> int:
    """Number of tasks in this trio run."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            count(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


def collect_unclosed() -> None:
    """Collect garbage with ResourceWarnings ignored: what a client library
    left unclosed after an outage goes now, unreported, instead of failing
    a later test (see the fault tests that use it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
