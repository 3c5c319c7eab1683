"""Ctrl-C while a bus is open: the bus is cancelled, closed, and then
KeyboardInterrupt leaves ``open_bus`` (docs/architecture.md, "Ctrl-C")."""

from __future__ import annotations

import signal

import pytest
import trio

import trio_bus
from trio_bus._signals import _handler

from .helpers import Recorder


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    reason="SIGINT is ignored in this process (started in the background by a"
    " non-interactive shell); the bus rightly leaves an ignored SIGINT alone",
)
async def test_sigint_cancels_the_bus_then_raises_keyboard_interrupt(memory_bus_url: str) -> None:
    handled: Recorder[bytes] = Recorder()
    started: Recorder[bytes] = Recorder()
    blocker = trio.Event()

    async def handler(message: trio_bus.Message) -> None:
        started.add(message.value)
        if message.value == b"slow":
            await blocker.wait()  # never set: cancelled by Ctrl-C
        handled.add(message.value)

    with pytest.raises(KeyboardInterrupt):
        async with trio_bus.open_bus(memory_bus_url, shutdown_grace=30) as bus:
            assert signal.getsignal(signal.SIGINT) is _handler
            await bus.subscribe("t", handler, start="earliest")
            await bus.publish("t", b"fast", key="a")
            await bus.publish("t", b"slow", key="b")
            await started.wait_for_count(2)
            await handled.wait_for_count(1)
            signal.raise_signal(signal.SIGINT)
            await trio.sleep_forever()  # cancelled by the signal, not raising in here
    assert handled.items == [b"fast"]
    assert signal.getsignal(signal.SIGINT) is not _handler  # Trio's handler is back

    # The interrupted message was released, not acked: it comes back.
    again: Recorder[bytes] = Recorder()

    async def collect(message: trio_bus.Message) -> None:
        again.add(message.value)

    async with trio_bus.open_bus(memory_bus_url) as bus:
        await bus.subscribe("t", collect, start="earliest")
        await again.wait_for_count(1)
    assert again.items == [b"slow"]


async def test_an_application_sigint_handler_is_left_alone(memory_bus_url: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        own = signal.getsignal(signal.SIGINT)
        async with trio_bus.open_bus(memory_bus_url):
            assert signal.getsignal(signal.SIGINT) is own
            signal.raise_signal(signal.SIGINT)
            with trio.fail_after(5):
                assert await signals.__anext__() == signal.SIGINT
