"""The trio-asyncio boundary on its own: calls, owned loops, hand-offs."""

from __future__ import annotations

import asyncio
import sys

import pytest
import trio
import trio.testing

from trio_bus.errors import TransportUnavailableError
from trio_bus.transports import _bridge
from trio_bus.transports._bridge import UNWIND_TIMEOUT, Handoff, Mailbox, open_bridge


async def test_call_returns_and_raises() -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("from asyncio")

    async with open_bridge("test") as bridge:
        assert await bridge.call(double, 21) == 42
        with pytest.raises(ValueError, match="from asyncio"):
            await bridge.call(boom)


async def test_cancelling_a_call_cancels_the_asyncio_task() -> None:
    cancelled = trio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with open_bridge("test") as bridge:
        with trio.move_on_after(0.05):
            await bridge.call(forever)
        assert cancelled.is_set()


async def test_a_call_that_ignores_cancellation_is_bounded() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # a misbehaving client library: swallows the first cancel
        await asyncio.sleep(3600)  # the loop's close cancels this one

    async with open_bridge("test") as bridge:
        start = trio.current_time()
        with trio.move_on_after(0.05):
            await bridge.call(stubborn)
        assert trio.current_time() - start < 0.05 + UNWIND_TIMEOUT + 0.5


async def test_a_task_that_swallows_cancellation_twice_still_ends_at_close() -> None:
    swallowed = 0

    async def retrying() -> None:  # a client library's retry loop
        nonlocal swallowed
        while swallowed < 3:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1

    with trio.fail_after(_bridge.TEARDOWN_TIMEOUT):
        async with open_bridge("test") as bridge:
            task = bridge.loop.create_task(retrying())
            await trio.sleep(0.01)
    assert task.done()
    assert swallowed == 3


#: A bus process whose asyncio side has a task that ignores every cancel.
DEAF_TASK = """
import asyncio, logging, trio
from trio_bus.transports import _bridge

_bridge.TEARDOWN_TIMEOUT = 0.3
logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")

async def deaf():
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

async def main():
    async with _bridge.open_bridge("test") as bridge:
        bridge.loop.create_task(deaf(), name="deaf-task")
        await trio.sleep(0.01)

trio.run(main)
print("left the bridge")
"""


async def test_a_task_that_never_ends_is_abandoned_and_named_at_close() -> None:
    """trio-asyncio alone would wait for it forever, shielded: no timeout in
    this process could end that, so it runs in a child with a deadline."""
    with trio.fail_after(60):  # a hang is killed (run_process kills on cancel)
        done = await trio.run_process(
            [sys.executable, "-c", DEAF_TASK], capture_stdout=True, capture_stderr=True, check=False
        )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    assert "left the bridge" in out
    [line] = [line for line in err.splitlines() if "abandoned" in line]
    assert line.startswith("ERROR ")
    assert "deaf-task" in line
    assert "deaf" in line.rsplit("abandoned:", 1)[1]


async def test_calls_fail_fast_once_the_loop_has_stopped() -> None:
    async with open_bridge("test") as bridge:
        was_running = bridge.running
        bridge.loop.stop()
        with trio.fail_after(5):
            await bridge.wait_stopped()
        assert was_running
        assert not bridge.running
        with trio.fail_after(1), pytest.raises(TransportUnavailableError, match="loop"):
            await bridge.call(asyncio.sleep, 0)


async def test_an_owned_loop_that_fails_fails_its_nursery() -> None:
    async def pull_loop() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("pull loop broke")

    async with open_bridge("test") as bridge:
        with pytest.raises(ExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge.call, pull_loop)
                await trio.sleep_forever()
        assert info.group_contains(RuntimeError, match="pull loop broke")


async def test_handoff_batches_and_is_cancel_atomic() -> None:
    handoff: Handoff[int] = Handoff()

    async def produce() -> None:
        handoff.put_many(range(5))
        handoff.put(5)

    async with open_bridge("test") as bridge:
        with trio.move_on_after(0.01):
            await handoff.take(10)  # nothing there: cancelled, took nothing
        await bridge.call(produce)
        assert await handoff.take(4) == [0, 1, 2, 3]
        assert await handoff.take(4) == [4, 5]
        handoff.put(7)
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await handoff.take(4)
        assert len(handoff) == 1  # a cancelled take handed nothing out
        handoff.fail(RuntimeError("consumer gone"))
        assert await handoff.take(4) == [7]
        with pytest.raises(RuntimeError, match="consumer gone"):
            await handoff.take(4)


async def test_mailbox_wakes_the_asyncio_side() -> None:
    mailbox: Mailbox[str] = Mailbox()

    async def receive() -> list[str]:
        assert await mailbox.wait()
        return mailbox.drain()

    async def timeout() -> bool:
        return await mailbox.wait(0.01)

    async with open_bridge("test") as bridge, trio.open_nursery() as nursery:
        got: list[list[str]] = []
        done = trio.Event()

        async def run() -> None:
            got.append(await bridge.call(receive))
            done.set()

        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        mailbox.put("ack-1")
        mailbox.put("ack-2")
        with trio.fail_after(5):
            await done.wait()
        assert got == [["ack-1", "ack-2"]]
        assert await bridge.call(timeout) is False
