"""The semantics contract (docs/architecture.md), on every transport.

Each test takes ``bus_url`` and so runs on memory, NATS and Kafka against
real servers. Tests wait on recorded events with hard deadlines; they never
sleep to synchronise.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec
import pytest
import trio

import trio_bus
from trio_bus import RetryPolicy
from trio_bus._names import MAX_WIRE_HEADERS
from trio_bus.errors import ActorCrashedError, ConfigError, HandlerTimeout, NonRetryableError

from .helpers import Recorder, collect, task_count

FAST_RETRY = RetryPolicy(max_attempts=3, backoff=0.01, max_backoff=0.05)


def open_test_bus(url: str, **kwargs: Any) -> AbstractAsyncContextManager[trio_bus.Bus]:
    options: dict[str, Any] = {
        "pool_size": 16,
        "retry": FAST_RETRY,
        "shutdown_grace": 5.0,
        "handler_timeout": 10.0,
    }
    options.update(kwargs)
    return trio_bus.open_bus(url, **options)


async def test_per_aggregate_order_and_no_overlap(bus_url: str, topic: str) -> None:
    """Random delays and failures: an aggregate's calls never overlap and
    its successes follow publish order; every message ends handled or
    dead-lettered."""
    rng = random.Random(1234)
    aggregates = [f"agg-{i}" for i in range(20)]
    plan = [(rng.choice(aggregates), i) for i in range(200)]
    fail_first = {i for _, i in plan if rng.random() < 0.15}
    dead = {i for i in fail_first if rng.random() < 0.3}
    active: set[str] = set()
    overlaps: list[str] = []
    succeeded: Recorder[tuple[str, int]] = Recorder()
    dead_lettered: Recorder[trio_bus.Message] = Recorder()
    attempts: dict[int, int] = defaultdict(int)

    async def handler(message: trio_bus.Message) -> None:
        agg = message.aggregate_id
        assert agg is not None
        seq = int(message.value)
        if agg in active:
            overlaps.append(agg)
        active.add(agg)
        try:
            attempts[seq] += 1
            await trio.sleep(rng.random() * 0.003)
            if seq in dead or (seq in fail_first and attempts[seq] == 1):
                raise RuntimeError(f"planned failure of {seq}")
        finally:
            active.discard(agg)
        succeeded.add((agg, seq))

    async def on_dead(message: trio_bus.Message) -> None:
        dead_lettered.add(message)
        succeeded.notify()  # the waiter below watches both recorders

    async with open_test_bus(bus_url) as bus:
        await bus.subscribe(topic, handler)
        await bus.subscribe(f"{topic}.dlq", on_dead)
        for agg, seq in plan:
            await bus.publish(topic, str(seq).encode(), key=agg)
        await succeeded.wait_until(lambda: len(succeeded) + len(dead_lettered) >= len(plan))
    assert overlaps == []
    assert {int(m.value) for m in dead_lettered.items} == dead
    by_agg: dict[str, list[int]] = defaultdict(list)
    for agg, seq in succeeded.items:
        by_agg[agg].append(seq)
    for agg in aggregates:
        expected = [seq for a, seq in plan if a == agg and seq not in dead]
        assert by_agg[agg] == expected, agg


async def test_parallelism_reaches_pool_size(bus_url: str, topic: str) -> None:
    pool_size = 8
    active = 0
    peak = 0
    release = trio.Event()
    full: Recorder[int] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        full.add(active)
        await release.wait()
        active -= 1

    async with open_test_bus(bus_url, pool_size=pool_size) as bus:
        await bus.subscribe(topic, handler)
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic=topic, value=b"x", key=f"a{i}") for i in range(100)
        )
        await full.wait_until(lambda: peak >= pool_size)
        # All 100 dispatched, yet no more than pool_size run at once.
        await full.poll_until(lambda: bus.statistics().in_flight == 100)
        assert peak == pool_size
        release.set()
        await full.poll_until(lambda: bus.statistics().handled == 100)
    assert peak == pool_size


async def test_timeout_retries_then_dead_letters_without_blocking_others(
    bus_url: str, topic: str
) -> None:
    order: Recorder[str] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()
    calls: list[int] = []

    parked_before: list[int] = []

    async def handler(message: trio_bus.Message) -> None:
        if message.value == b"stuck":
            calls.append(message.attempt)
            await trio.sleep_forever()
        if message.value == b"after":
            parked_before.append(bus.statistics().dead_lettered)
        order.add(f"{message.aggregate_id}:{message.value.decode()}")

    retry = RetryPolicy(max_attempts=2, backoff=0.01)
    async with open_test_bus(bus_url, retry=retry, handler_timeout=0.3) as bus:
        await bus.subscribe(topic, handler)
        await bus.subscribe(f"{topic}.dlq", collect(dlq))
        await bus.publish(topic, b"stuck", key="A")
        await bus.publish(topic, b"after", key="A")
        await bus.publish(topic, b"free", key="B")
        await order.wait_until(lambda: "A:after" in order.items)
        await dlq.wait_for_count(1)
        stats = bus.statistics()
    assert calls == [1, 2]
    assert order.items.index("B:free") < order.items.index("A:after")
    # The later message of A waited until the stuck one was parked.
    assert parked_before == [1]
    (dead,) = dlq.items
    assert dead.value == b"stuck"
    assert dead.aggregate_id == "A"
    assert dead.headers["X-DLQ-Error-Type"] == HandlerTimeout.__name__
    assert dead.headers["X-DLQ-Attempts"] == "2"
    assert dead.headers["X-DLQ-Original-Topic"] == topic
    assert "X-DLQ-Original-Offset" in dead.headers
    assert stats.failed == 2
    assert stats.retried == 1
    assert stats.dead_lettered == 1


async def test_retry_in_place_then_success(bus_url: str, topic: str) -> None:
    seen: Recorder[tuple[bytes, int]] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        seen.add((message.value, message.attempt))
        if message.value == b"1" and message.attempt < 3:
            raise ValueError("not yet")

    async with open_test_bus(bus_url) as bus:
        await bus.subscribe(topic, handler)
        await bus.publish(topic, b"1", key="k")
        await bus.publish(topic, b"2", key="k")
        await seen.wait_until(lambda: (b"2", 1) in seen.items)
        stats = bus.statistics()
    assert seen.items == [(b"1", 1), (b"1", 2), (b"1", 3), (b"2", 1)]
    assert (stats.failed, stats.retried, stats.dead_lettered) == (2, 2, 0)


async def test_backpressure_never_drops(bus_url: str, topic: str) -> None:
    """A tiny inbox and a stalled handler: dispatch waits, nothing is lost."""
    release = trio.Event()
    handled: Recorder[bytes] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        await release.wait()
        handled.add(message.value)

    n = 60
    async with open_test_bus(bus_url, pool_size=1, inbox_size=2) as bus:
        await bus.subscribe(topic, handler)
        for i in range(n):
            await bus.publish(topic, b"%d" % i, key=f"k{i % 5}")
        await handled.poll_until(lambda: bus.statistics().queued == 2)
        # One running, two queued; the rest waits at the dispatcher or broker.
        assert bus.statistics().in_flight <= 4
        assert len(handled) == 0
        release.set()
        await handled.wait_for_count(n)
    assert sorted(int(v) for v in handled.items) == list(range(n))


async def test_cancel_mid_stream_loses_nothing(bus_url: str, topic: str) -> None:
    """Cancel the bus from outside while handlers run; reopen with the same
    group: every message is handled at least once, so none was acked before
    its handler finished."""
    n = 40
    finished_first: set[int] = set()
    started: Recorder[int] = Recorder()
    baseline = task_count()

    async def slow(message: trio_bus.Message) -> None:
        started.add(int(message.value))
        await trio.sleep(0.05)
        finished_first.add(int(message.value))

    with trio.CancelScope() as outer:
        async with open_test_bus(bus_url, client_id="svc") as bus:
            await bus.subscribe(topic, slow, start="earliest")
            await bus.publish_many(
                trio_bus.OutgoingMessage(topic=topic, value=b"%d" % i, key=f"k{i % 7}")
                for i in range(n)
            )
            await started.wait_for_count(10)
            outer.cancel()
            await trio.sleep_forever()
    assert outer.cancelled_caught
    assert task_count() == baseline
    assert len(finished_first) < n

    second: Recorder[int] = Recorder()

    async def record(message: trio_bus.Message) -> None:
        second.add(int(message.value))

    async with open_test_bus(bus_url, client_id="svc") as bus:
        await bus.subscribe(topic, record, start="earliest")
        missing = set(range(n)) - finished_first
        await second.wait_until(lambda: missing <= set(second.items))
    assert task_count() == baseline


async def test_normal_exit_finishes_in_flight_and_releases_the_rest(
    bus_url: str, topic: str
) -> None:
    started: Recorder[int] = Recorder()
    finished: set[int] = set()
    gate = trio.Event()

    async def handler(message: trio_bus.Message) -> None:
        started.add(int(message.value))
        await gate.wait()
        finished.add(int(message.value))

    async with open_test_bus(bus_url, client_id="svc", pool_size=1) as bus:
        await bus.subscribe(topic, handler)
        for i in range(5):
            await bus.publish(topic, b"%d" % i, key="same")
        await started.wait_for_count(1)
        # Leave the block with a handler mid-call; it finishes in the grace.
        gate.set()
    assert 0 in finished

    again: Recorder[int] = Recorder()
    async with open_test_bus(bus_url, client_id="svc") as bus:
        await bus.subscribe(topic, collect_values(again))
        await again.wait_until(lambda: set(range(5)) - finished <= set(again.items))


def collect_values(recorder: Recorder[int]) -> Callable[[trio_bus.Message], Awaitable[None]]:
    async def handler(message: trio_bus.Message) -> None:
        recorder.add(int(message.value))

    return handler


async def test_grace_expiry_cancels_and_redelivers(bus_url: str, topic: str) -> None:
    started: Recorder[int] = Recorder()

    async def forever(message: trio_bus.Message) -> None:
        started.add(int(message.value))
        await trio.sleep_forever()

    async with open_test_bus(bus_url, client_id="svc", shutdown_grace=0.2) as bus:
        await bus.subscribe(topic, forever)
        await bus.publish(topic, b"7", key="k")
        await started.wait_for_count(1)
    again: Recorder[int] = Recorder()
    async with open_test_bus(bus_url, client_id="svc") as bus:
        await bus.subscribe(topic, collect_values(again))
        await again.wait_for_count(1)
    assert again.items[0] == 7


async def test_actor_crash_restarts_then_escalates(bus_url: str, topic: str) -> None:
    handled: Recorder[trio_bus.Message] = Recorder()
    crashes = 0

    def crash_twice(index: int) -> None:
        nonlocal crashes
        if crashes < 2:
            crashes += 1
            raise RuntimeError("injected actor bug")

    async with open_test_bus(bus_url, pool_size=2, max_restarts=3) as bus:
        bus._pool.fault_hook = crash_twice
        await bus.subscribe(topic, collect(handled))
        await bus.publish(topic, b"survives", key="k")
        await handled.wait_for_count(1)
        assert bus.statistics().restarts == 2

    def always(index: int) -> None:
        raise RuntimeError("injected actor bug")

    with pytest.raises(ActorCrashedError) as info:
        async with open_test_bus(bus_url, pool_size=2, max_restarts=1) as bus:
            bus._pool.fault_hook = always
            await bus.subscribe(topic, collect(handled))
            await bus.publish(topic, b"doomed", key="k")
            await trio.sleep_forever()
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_malformed_envelope_is_dead_lettered_and_bus_continues(
    bus_url: str, topic: str
) -> None:
    got: Recorder[trio_bus.Envelope] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()

    async def on_envelope(envelope: trio_bus.Envelope) -> None:
        assert trio_bus.current_message().envelope is envelope
        got.add(envelope)

    async with open_test_bus(bus_url) as bus:
        await bus.subscribe_envelope(topic, on_envelope)
        await bus.subscribe(f"{topic}.dlq", collect(dlq))
        await bus.publish(topic, b'{"event_id": "x"', key="order-1")
        await bus.publish(topic, b"not json at all", key="order-1")
        good = trio_bus.Envelope.new(aggregate_id="order-1", event_type="Placed", payload={"n": 1})
        await bus.publish_envelope(topic, good)
        await got.wait_for_count(1)
        await dlq.wait_for_count(2)
    assert got.items == [good]
    assert {m.headers["X-DLQ-Error-Type"] for m in dlq.items} == {"EnvelopeError"}
    assert all(m.headers["X-DLQ-Attempts"] == "0" for m in dlq.items)
    assert "malformed envelope" in dlq.items[0].headers["X-DLQ-Error-Message"]


async def test_invalid_aggregate_header_is_dead_lettered(bus_url: str, topic: str) -> None:
    ok: Recorder[trio_bus.Message] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()
    async with open_test_bus(bus_url) as bus:
        await bus.subscribe(topic, collect(ok))
        await bus.subscribe(f"{topic}.dlq", collect(dlq))
        await bus.publish(topic, b"bad", headers={"x-aggregate-id": "has space"})
        await bus.publish(topic, b"good", headers={"X-AGGREGATE-ID": "fine-1"})
        await ok.wait_for_count(1)
        await dlq.wait_for_count(1)
    assert ok.items[0].aggregate_id == "fine-1"
    dead = dlq.items[0]
    assert dead.headers["X-DLQ-Error-Type"] == "InvalidAggregateIDError"
    assert dead.headers["X-DLQ-Original-Aggregate-ID"] == "has space"


async def test_topic_count_does_not_grow_the_pool(bus_url: str) -> None:
    # 100 topics in memory; fewer on real brokers, where each costs a join.
    topics = 100 if bus_url.startswith("memory:") else 10
    baseline = task_count()
    async with open_test_bus(bus_url, pool_size=16) as bus:
        with_pool = task_count()
        # The first subscription may start per-connection I/O tasks (a Kafka
        # group's consumer sockets); count from there.
        await bus.subscribe("many-0", collect(Recorder()))
        with_first = task_count()
        for i in range(1, topics):
            await bus.subscribe(f"many-{i}", collect(Recorder()))
        with_subs = task_count()
    # One fetch task per subscription, no per-topic pool.
    assert with_subs - with_first == topics - 1
    assert with_pool - baseline < 16 + 10  # the pool plus a constant (loop, monitor...)
    assert with_first - with_pool <= 1 + 5  # its fetch task, plus a group's sockets
    assert task_count() == baseline


async def test_groups_share_and_fan_out(bus_url: str, topic: str) -> None:
    # One recorder for both members of "billing", so one wait sees both.
    billing: Recorder[trio_bus.Message] = Recorder()
    audit: Recorder[trio_bus.Message] = Recorder()
    async with open_test_bus(bus_url) as bus:
        await bus.subscribe(topic, collect(billing), group="billing")
        await bus.subscribe(topic, collect(billing), group="billing")
        await bus.subscribe(topic, collect(audit), group="audit")
        for i in range(30):
            await bus.publish(topic, b"%d" % i, key=f"k{i}")
        await audit.wait_for_count(30)
        await billing.wait_for_count(30)
    assert sorted(int(m.value) for m in billing.items) == list(range(30))
    assert sorted(int(m.value) for m in audit.items) == list(range(30))


# ------------------------------------------------------- handlers (issue 13)


async def test_non_retryable_error_dead_letters_at_once(bus_url: str, topic: str) -> None:
    calls: Recorder[bytes] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()

    def refuse() -> None:
        raise NonRetryableError("inner")

    async def handler(message: trio_bus.Message) -> None:
        calls.add(message.value)
        if message.value == b"direct":
            raise NonRetryableError("order is cancelled") from ValueError("status=cancelled")
        if message.value == b"chained":
            try:
                refuse()
            except NonRetryableError:
                raise RuntimeError("while handling") from None
        if message.value == b"group":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                refuse()  # the nursery raises an ExceptionGroup holding it
        if message.value == b"context":
            try:
                refuse()
            except NonRetryableError:
                raise KeyError("missing") from ValueError("x")

    retry = RetryPolicy(max_attempts=5, backoff=0.01)
    async with open_test_bus(bus_url, retry=retry) as bus:
        await bus.subscribe(topic, handler)
        await bus.subscribe(f"{topic}.dlq", collect(dlq))
        for value in (b"direct", b"chained", b"group", b"context", b"ok"):
            await bus.publish(topic, value, key="k")
        await dlq.wait_for_count(4)
        await calls.wait_until(lambda: b"ok" in calls.items)
        stats = bus.statistics()
    # "raise ... from None" hides the context: "chained" is retried.
    assert calls.items == [b"direct"] + [b"chained"] * 5 + [b"group", b"context", b"ok"]
    by_value = {m.value: m.headers for m in dlq.items}
    assert by_value[b"chained"]["X-DLQ-Attempts"] == "5"
    direct = by_value[b"direct"]
    assert direct["X-DLQ-Error-Type"] == "NonRetryableError"
    assert direct["X-DLQ-Error-Message"] == "order is cancelled"
    assert direct["X-DLQ-Cause-Type"] == "ValueError"
    assert direct["X-DLQ-Cause-Message"] == "status=cancelled"
    assert direct["X-DLQ-Attempts"] == "1"
    assert by_value[b"context"]["X-DLQ-Error-Type"] == "KeyError"
    assert by_value[b"context"]["X-DLQ-Attempts"] == "1"
    assert by_value[b"group"]["X-DLQ-Error-Type"] == "ExceptionGroup"
    assert by_value[b"group"]["X-DLQ-Attempts"] == "1"
    assert stats.dead_lettered == 4


async def test_handler_that_swallows_cancellation_times_out(
    bus_url: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    dlq: Recorder[trio_bus.Message] = Recorder()
    calls: Recorder[int] = Recorder()

    async def swallower(message: trio_bus.Message) -> None:
        calls.add(message.attempt)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:  # the bug under test: never do this
            return

    retry = RetryPolicy(max_attempts=2, backoff=0.01)
    async with open_test_bus(bus_url, retry=retry, handler_timeout=0.2) as bus:
        await bus.subscribe(topic, swallower)
        await bus.subscribe(f"{topic}.dlq", collect(dlq))
        await bus.publish(topic, b"1", key="a")
        await bus.publish(topic, b"2", key="a")
        await dlq.wait_for_count(2)
        stats = bus.statistics()
    assert calls.items == [1, 2, 1, 2]
    assert [m.value for m in dlq.items] == [b"1", b"2"]
    assert {m.headers["X-DLQ-Error-Type"] for m in dlq.items} == {"HandlerTimeout"}
    assert {m.headers["X-DLQ-Attempts"] for m in dlq.items} == {"2"}
    # Handled: only the two dead letters, by the DLQ subscription.
    assert (stats.handled, stats.failed, stats.dead_lettered) == (2, 4, 2)
    warnings = [r for r in caplog.records if "swallows trio.Cancelled" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelname == "WARNING"
    assert topic in warnings[0].getMessage()


async def test_per_subscription_retry_dead_letter_and_timeout(bus_url: str, topic: str) -> None:
    strict_calls: Recorder[int] = Recorder()
    default_calls: Recorder[int] = Recorder()
    parked: Recorder[trio_bus.Message] = Recorder()
    default_parked: Recorder[trio_bus.Message] = Recorder()

    async def strict(message: trio_bus.Message) -> None:
        strict_calls.add(message.attempt)
        await trio.sleep(0.3)  # past its own timeout, within the bus's

    async def failing(message: trio_bus.Message) -> None:
        default_calls.add(message.attempt)
        raise RuntimeError("always")

    async with open_test_bus(bus_url) as bus:  # bus: 3 attempts, 10 s, {topic}.dlq
        with pytest.raises(ConfigError):
            await bus.subscribe(topic, strict, retry="twice")
        with pytest.raises(ConfigError):
            await bus.subscribe(topic, strict, dead_letter="no-placeholder")
        await bus.subscribe(
            topic,
            strict,
            group="strict",
            retry=RetryPolicy(max_attempts=2, backoff=0.01),
            dead_letter="{topic}-strict",
            handler_timeout=0.1,
        )
        await bus.subscribe(topic, failing, group="default")
        await bus.subscribe(f"{topic}-strict", collect(parked))
        await bus.subscribe(f"{topic}.dlq", collect(default_parked))
        await bus.publish(topic, b"x", key="k")
        await parked.wait_for_count(1)
        await default_parked.wait_for_count(1)
    assert strict_calls.items == [1, 2]
    assert parked.items[0].headers["X-DLQ-Error-Type"] == "HandlerTimeout"
    assert parked.items[0].headers["X-DLQ-Attempts"] == "2"
    assert default_calls.items == [1, 2, 3]
    assert default_parked.items[0].headers["X-DLQ-Attempts"] == "3"


class Placed(msgspec.Struct):
    total: int


@dataclasses.dataclass
class Paid:
    amount: float


async def test_router_routes_typed_events_in_order_and_dead_letters_bad_ones(
    bus_url: str, topic: str
) -> None:
    router = trio_bus.Router()
    seen: Recorder[tuple[str, str]] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()

    @router.on("Placed")
    async def placed(event: Placed, envelope: trio_bus.Envelope) -> None:
        assert isinstance(event, Placed)
        await trio.sleep(0.002)
        seen.add((envelope.aggregate_id, f"placed:{event.total}"))

    @router.on("Paid")
    async def paid(event: Paid, envelope: trio_bus.Envelope) -> None:
        seen.add((envelope.aggregate_id, f"paid:{event.amount:g}"))

    def env(agg: str, event_type: str, payload: object) -> trio_bus.Envelope:
        return trio_bus.Envelope.new(aggregate_id=agg, event_type=event_type, payload=payload)

    async with open_test_bus(bus_url) as bus:
        await bus.subscribe_envelope(topic, router)
        await bus.subscribe(f"{topic}.dlq", collect(dlq))
        for i in range(5):
            await bus.publish_envelope(topic, env(f"o{i}", "Placed", {"total": i}))
            await bus.publish_envelope(topic, env(f"o{i}", "Paid", {"amount": i}))
        await bus.publish_envelope(topic, env("o0", "Refunded", {"amount": 1}))
        await bus.publish_envelope(topic, env("o1", "Paid", {"amount": "all of it"}))
        await seen.wait_for_count(10)
        await dlq.wait_for_count(2)
    for i in range(5):
        assert [kind for agg, kind in seen.items if agg == f"o{i}"] == [f"placed:{i}", f"paid:{i}"]
    errors = {m.headers["X-DLQ-Error-Type"]: m.headers for m in dlq.items}
    assert set(errors) == {"UnknownEventTypeError", "PayloadDecodeError"}
    assert "'Refunded'" in errors["UnknownEventTypeError"]["X-DLQ-Error-Message"]
    assert "Expected `float`" in errors["PayloadDecodeError"]["X-DLQ-Error-Message"]
    assert {h["X-DLQ-Attempts"] for h in errors.values()} == {"1"}


@pytest.mark.parametrize("bisect", [False, True])
async def test_batch_subscription_keeps_order_and_dead_letters(
    bus_url: str, topic: str, bisect: bool
) -> None:
    """Batches never overlap on an aggregate and keep its order; a
    non-retryable failure parks the whole batch at once, or (bisect) only
    the message that fails alone."""
    aggregates = [f"agg-{i}" for i in range(6)]
    plan = [(aggregates[i % 6], i) for i in range(60)]
    active: set[str] = set()
    overlaps: list[str] = []
    handled: Recorder[tuple[str, int]] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()
    poisoned: list[list[int]] = []

    async def handler(messages: Sequence[trio_bus.Message]) -> None:
        aggs = {m.aggregate_id or "" for m in messages}
        overlaps.extend(aggs & active)
        active.update(aggs)
        try:
            await trio.sleep(0.002)
            values = [int(m.value) for m in messages]
            if 17 in values:
                poisoned.append(values)
                raise NonRetryableError("17 is cursed")
        finally:
            active.difference_update(aggs)
        for m in messages:
            handled.add((m.aggregate_id or "", int(m.value)))

    async def on_dead(message: trio_bus.Message) -> None:
        dlq.add(message)
        handled.notify()

    async with open_test_bus(bus_url, pool_size=4) as bus:
        await bus.subscribe_batch(topic, handler, max_batch=8, max_wait=0.05, bisect=bisect)
        await bus.subscribe(f"{topic}.dlq", on_dead)
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic=topic, value=b"%d" % seq, key=agg) for agg, seq in plan
        )
        await handled.wait_until(lambda: len(handled) + len(dlq) >= len(plan))
    assert overlaps == []
    if bisect:
        assert poisoned[-1] == [17]  # split down to the culprit
        bad = [17]
    else:
        (bad,) = poisoned
    assert sorted(int(m.value) for m in dlq.items) == sorted(bad)
    assert {m.headers["X-DLQ-Attempts"] for m in dlq.items} == {"1"}
    for agg in aggregates:
        expected = [seq for a, seq in plan if a == agg and seq not in bad]
        assert [seq for a, seq in handled.items if a == agg] == expected


async def test_message_carries_the_broker_timestamp(bus_url: str, topic: str) -> None:
    """``Message.timestamp``: when the broker stored the message (seconds
    since the epoch), on every transport."""
    got: Recorder[trio_bus.Message] = Recorder()
    async with open_test_bus(bus_url) as bus:
        await bus.subscribe(topic, collect(got))
        before = time.time()
        await bus.publish(topic, b"x", key="a")
        after = time.time()
        await got.wait_for_count(1)
    stamp = got.items[0].timestamp
    assert stamp is not None
    assert before - 1.0 <= stamp <= after + 1.0


async def test_headers_over_the_wire_limits_are_dead_lettered(bus_url: str, topic: str) -> None:
    """A message with more headers than the bus accepts is dead-lettered
    with the reason, without its headers; the next one is handled."""
    handled: Recorder[trio_bus.Message] = Recorder()
    dead: Recorder[trio_bus.Message] = Recorder()
    async with open_test_bus(bus_url) as bus:
        await bus.subscribe(topic, collect(handled))
        await bus.subscribe(f"{topic}.dlq", collect(dead))
        many = {f"h{i}": "v" for i in range(MAX_WIRE_HEADERS + 1)}
        await bus.publish(topic, b"bloated", key="a", headers=many)
        await bus.publish(topic, b"fine", key="a")
        await handled.wait_for_count(1)
        await dead.wait_for_count(1)
    assert [m.value for m in handled.items] == [b"fine"]
    parked = dead.items[0]
    assert parked.headers["X-DLQ-Error-Type"] == "HeaderLimitError"
    assert "h0" not in parked.headers
