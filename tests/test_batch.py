"""Batch subscriptions on the memory transport, on a virtual clock where
timing matters; the semantic suite runs batches on every transport and the
property test checks their order guarantee."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing

import trio_bus
from trio_bus import RetryPolicy
from trio_bus.errors import ConfigError, NonRetryableError

from .helpers import Recorder, collect

Batch = list[bytes]


def recording(
    batches: Recorder[Batch], fail: Callable[[Batch], Exception | None] | None = None
) -> Callable[[Sequence[trio_bus.Message]], Awaitable[None]]:
    async def handler(messages: Sequence[trio_bus.Message]) -> None:
        values = [m.value for m in messages]
        error = fail(values) if fail else None
        if error is not None:
            raise error
        batches.add(values)

    return handler


async def test_batches_fill_up_to_max_batch_in_delivery_order(memory_bus_url: str) -> None:
    batches: Recorder[Batch] = Recorder()
    async with trio_bus.open_bus(memory_bus_url, pool_size=1) as bus:
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic="b", value=b"%d" % i, key=f"k{i % 3}") for i in range(25)
        )
        await bus.subscribe_batch("b", recording(batches), max_batch=10, start="earliest")
        await batches.wait_until(lambda: sum(map(len, batches.items)) == 25)
    assert [len(b) for b in batches.items] == [10, 10, 5]
    assert [v for b in batches.items for v in b] == [b"%d" % i for i in range(25)]


async def test_max_wait_lets_a_batch_fill(memory_bus_url: str, autojump_clock: object) -> None:
    batches: Recorder[Batch] = Recorder()
    called_at: list[float] = []

    async def handler(messages: Sequence[trio_bus.Message]) -> None:
        called_at.append(trio.current_time())
        batches.add([m.value for m in messages])

    async with trio_bus.open_bus(memory_bus_url, pool_size=1) as bus:
        await bus.subscribe_batch("b", handler, max_batch=3, max_wait=1.0)
        start = trio.current_time()
        await bus.publish("b", b"1", key="a")
        await trio.sleep(0.5)
        await bus.publish("b", b"2", key="b")
        await batches.wait_for_count(1)
        # Full batches go at once, without waiting.
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic="b", value=b"%d" % i, key="c") for i in range(3, 6)
        )
        await batches.wait_for_count(2)
    assert batches.items == [[b"1", b"2"], [b"3", b"4", b"5"]]
    assert 1.0 <= called_at[0] - start < 1.1
    assert called_at[1] - called_at[0] < 0.01


async def test_failing_batch_is_retried_whole_then_dead_lettered(memory_bus_url: str) -> None:
    batches: Recorder[Batch] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()
    attempts: list[Batch] = []

    def poison(values: Batch) -> Exception | None:
        attempts.append(values)
        return RuntimeError("poisoned batch") if b"poison" in values else None

    retry = RetryPolicy(max_attempts=2, backoff=0.01)
    async with trio_bus.open_bus(memory_bus_url, pool_size=1, retry=retry) as bus:
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic="b", value=v, key="k")
            for v in (b"0", b"poison", b"2", b"3", b"4", b"5")
        )
        await bus.subscribe("b.dlq", collect(dlq))
        await bus.subscribe_batch("b", recording(batches, poison), max_batch=3, start="earliest")
        await batches.wait_for_count(1)
        await dlq.wait_for_count(3)
    assert attempts == [[b"0", b"poison", b"2"]] * 2 + [[b"3", b"4", b"5"]]
    assert batches.items == [[b"3", b"4", b"5"]]
    assert [m.value for m in dlq.items] == [b"0", b"poison", b"2"]
    assert {m.headers["X-DLQ-Attempts"] for m in dlq.items} == {"2"}
    assert {m.headers["X-DLQ-Error-Message"] for m in dlq.items} == {"poisoned batch"}


async def test_bisect_dead_letters_only_what_fails_alone(memory_bus_url: str) -> None:
    batches: Recorder[Batch] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()
    attempts: list[Batch] = []

    def poison(values: Batch) -> Exception | None:
        attempts.append(values)
        return RuntimeError("poisoned") if b"poison" in values else None

    retry = RetryPolicy(max_attempts=2, backoff=0.01)
    values = [b"0", b"1", b"poison", b"3", b"4", b"5"]
    async with trio_bus.open_bus(memory_bus_url, pool_size=1, retry=retry) as bus:
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic="b", value=v, key="k") for v in values
        )
        await bus.subscribe("b.dlq", collect(dlq))
        await bus.subscribe_batch(
            "b", recording(batches, poison), max_batch=6, start="earliest", bisect=True
        )
        await dlq.wait_for_count(1)
        await batches.wait_until(lambda: sum(map(len, batches.items)) == 5)
    first, rest = values[:3], values[3:]
    pair = [b"1", b"poison"]
    # Each batch gets max_attempts, then splits: 6 -> 3 + 3 -> 1 + 2 -> 1 + 1.
    assert attempts[:7] == [values, values, first, first, [b"0"], pair, pair]
    assert attempts[7:] == [[b"1"], [b"poison"], [b"poison"], rest]
    # Order holds: each half runs before the later messages.
    assert batches.items == [[b"0"], [b"1"], rest]
    assert [m.value for m in dlq.items] == [b"poison"]
    assert dlq.items[0].headers["X-DLQ-Attempts"] == "2"


async def test_non_retryable_batch_is_dead_lettered_at_once(memory_bus_url: str) -> None:
    dlq: Recorder[trio_bus.Message] = Recorder()
    calls: list[Batch] = []

    def refuse(values: Batch) -> Exception | None:
        calls.append(values)
        return NonRetryableError("schema changed")

    async with trio_bus.open_bus(memory_bus_url, pool_size=1) as bus:
        await bus.subscribe("b.dlq", collect(dlq))
        await bus.subscribe_batch("b", recording(Recorder(), refuse))
        await bus.publish("b", b"x", key="k")
        await dlq.wait_for_count(1)
    assert calls == [[b"x"]]
    assert dlq.items[0].headers["X-DLQ-Attempts"] == "1"
    assert dlq.items[0].headers["X-DLQ-Error-Type"] == "NonRetryableError"


async def test_timeout_bounds_the_whole_batch(memory_bus_url: str, autojump_clock: object) -> None:
    batches: Recorder[tuple[int, Batch]] = Recorder()

    async def slow_first(messages: Sequence[trio_bus.Message]) -> None:
        if messages[0].attempt == 1:
            await trio.sleep_forever()
        batches.add((messages[0].attempt, [m.value for m in messages]))

    async with trio_bus.open_bus(memory_bus_url, pool_size=1, handler_timeout=30) as bus:
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic="b", value=b"%d" % i, key="k") for i in range(2)
        )
        start = trio.current_time()
        await bus.subscribe_batch("b", slow_first, start="earliest", handler_timeout=2.0)
        await batches.wait_for_count(1)
        elapsed = trio.current_time() - start
    assert batches.items == [(2, [b"0", b"1"])]
    assert 2.0 <= elapsed < 2.0 + 0.1 + 0.2  # the timeout (+ slack) and one backoff


async def test_a_message_of_another_route_ends_the_batch(memory_bus_url: str) -> None:
    """One actor, two subscriptions: the batch stops at the other route's
    message, which runs before anything queued after it."""
    events: Recorder[str] = Recorder()
    gate = trio.Event()

    async def plain(message: trio_bus.Message) -> None:
        if message.value == b"blocker":
            await gate.wait()
        events.add(message.value.decode())

    async def batch(messages: Sequence[trio_bus.Message]) -> None:
        events.add("+".join(m.value.decode() for m in messages))

    async with trio_bus.open_bus(memory_bus_url, pool_size=1) as bus:
        await bus.subscribe("p", plain)
        await bus.subscribe_batch("b", batch, max_batch=10)
        for topic, value in [("p", b"blocker"), ("b", b"b1"), ("b", b"b2"), ("p", b"p2")]:
            await bus.publish(topic, value, key="same")
            await trio.testing.wait_all_tasks_blocked()
        await bus.publish("b", b"b3", key="same")
        await trio.testing.wait_all_tasks_blocked()
        assert bus.statistics().queued == 4
        gate.set()
        await events.wait_for_count(4)
    assert events.items == ["blocker", "b1+b2", "p2", "b3"]


async def test_bad_batch_options_fail_at_the_call(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url) as bus:
        handler = recording(Recorder())
        with pytest.raises(ConfigError):
            await bus.subscribe_batch("b", handler, max_batch=0)
        with pytest.raises(ConfigError):
            await bus.subscribe_batch("b", handler, max_wait=-1)
        with pytest.raises(ConfigError):
            await bus.subscribe_batch("b", handler, retry=3)
        with pytest.raises(ConfigError):
            await bus.subscribe_batch("b", handler, bisect="yes")  # type: ignore[arg-type]
        assert bus.statistics().subscriptions == 0


async def test_closing_releases_a_collecting_batch(memory_bus_url: str) -> None:
    """A subscription closed while its actor waits for a batch to fill
    releases what it collected: the group gets it again."""
    first: Recorder[Batch] = Recorder()
    again: Recorder[Batch] = Recorder()
    async with trio_bus.open_bus(memory_bus_url, pool_size=1, client_id="svc") as bus:
        sub = await bus.subscribe_batch("b", recording(first), max_batch=5, max_wait=60)
        await bus.publish("b", b"1", key="k")
        await trio.testing.wait_all_tasks_blocked()
        assert sub.in_flight == 1
        with trio.fail_after(5):
            await sub.close()
        assert first.items == []
        await bus.subscribe_batch("b", recording(again), max_batch=5)
        await again.wait_for_count(1)
    assert again.items == [[b"1"]]


async def test_a_batch_handler_that_swallows_cancellation_times_out(
    memory_bus_url: str, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    dlq: Recorder[trio_bus.Message] = Recorder()
    calls: list[int] = []

    async def swallower(messages: Sequence[trio_bus.Message]) -> None:
        calls.append(messages[0].attempt)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:  # the bug under test
            return

    retry = RetryPolicy(max_attempts=2, backoff=0.01)
    async with trio_bus.open_bus(memory_bus_url, pool_size=1, retry=retry) as bus:
        await bus.subscribe("b.dlq", collect(dlq))
        await bus.subscribe_batch("b", swallower, handler_timeout=1.0)
        await bus.publish("b", b"x", key="k")
        await dlq.wait_for_count(1)
    assert calls == [1, 2]
    assert dlq.items[0].headers["X-DLQ-Error-Type"] == "HandlerTimeout"
    assert sum("swallows trio.Cancelled" in r.getMessage() for r in caplog.records) == 1
