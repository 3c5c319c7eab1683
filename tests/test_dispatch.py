"""Dispatch: aggregates claim an actor while they have messages in flight,
and go to an idle one otherwise (see ``trio_bus._dispatch``)."""

from __future__ import annotations

import uuid
from collections import defaultdict

import trio

import trio_bus
from trio_bus import Bus, Message, OutgoingMessage
from trio_bus._names import stable_hash


def _url() -> str:
    return f"memory://dispatch-{uuid.uuid4().hex}"


def _claims(bus: Bus) -> dict[str, object]:
    return bus._pool._dispatcher.claims  # type: ignore[return-value]


async def test_aggregates_without_a_claim_go_to_idle_actors() -> None:
    """As many aggregates as actors all run at once, even aggregates that
    would all share one actor by hash (routed by hash, this times out)."""
    size = 8
    keys = [k for k in (f"agg-{i}" for i in range(1000)) if stable_hash(k) % size == 0][:size]
    started = 0
    all_started = trio.Event()

    async def handler(message: Message) -> None:
        nonlocal started
        started += 1
        if started == size:
            all_started.set()
        await all_started.wait()

    async with trio_bus.open_bus(_url(), pool_size=size) as bus:
        await bus.subscribe("t", handler)
        await bus.publish_many([OutgoingMessage(topic="t", value=b"x", key=key) for key in keys])
        with trio.fail_after(5):
            await all_started.wait()


async def test_a_busy_aggregate_keeps_its_actor_and_its_order() -> None:
    """Messages of an aggregate that is running stay behind it on its actor
    (never two at once, in order); once it is idle it may move."""
    running: dict[str, int] = defaultdict(int)
    seen: dict[str, list[int]] = defaultdict(list)
    overlaps = 0
    done = trio.Event()
    total = 4 * 50

    async def handler(message: Message) -> None:
        nonlocal overlaps
        agg = message.aggregate_id
        assert agg is not None
        running[agg] += 1
        overlaps += running[agg] > 1
        seen[agg].append(int(message.value))
        await trio.sleep(0.001 * (int(message.value) % 3))
        running[agg] -= 1
        if sum(map(len, seen.values())) == total:
            done.set()

    async with trio_bus.open_bus(_url(), pool_size=4) as bus:
        subscription = await bus.subscribe("t", handler)
        for seq in range(50):
            # Alternate bursts and gaps: some messages find their aggregate
            # busy, some find it idle (and may land on another actor).
            await bus.publish_many(
                [
                    OutgoingMessage(topic="t", value=str(seq).encode(), key=f"a{agg}")
                    for agg in range(4)
                ]
            )
            if seq % 5 == 0:
                await trio.sleep(0.005)
        with trio.fail_after(10):
            await done.wait()
        assert overlaps == 0
        assert all(values == list(range(50)) for values in seen.values())
        await subscription.close()  # waits for the last settle
        assert _claims(bus) == {}


async def test_claims_hold_only_aggregates_in_flight() -> None:
    """20,000 distinct aggregates leave no claim behind once handled: the
    map is bounded by the messages in flight, not by the IDs a sender
    invents."""
    n = 20_000
    handled = 0
    done = trio.Event()
    peak = 0

    async with trio_bus.open_bus(_url(), pool_size=16, inbox_size=8) as bus:

        async def handler(message: Message) -> None:
            nonlocal handled, peak
            peak = max(peak, len(_claims(bus)))
            handled += 1
            if handled == n:
                done.set()

        subscription = await bus.subscribe("t", handler)
        await bus.publish_many(
            [OutgoingMessage(topic="t", value=b"x", key=f"id-{i}") for i in range(n)]
        )
        with trio.fail_after(30):
            await done.wait()
        await subscription.close()
        assert _claims(bus) == {}
    # 16 actors x (8 queued + 1 running) plus one fetched batch waiting for room.
    assert 0 < peak <= 16 * 9 + 1000


async def test_claims_are_dropped_when_the_bus_closes_under_backpressure() -> None:
    """Messages queued behind a handler that never returns, and the ones the
    dispatcher still waits to place, give their claims back at close."""
    started = trio.Event()

    async def handler(message: Message) -> None:
        started.set()
        await trio.sleep_forever()

    async with trio_bus.open_bus(_url(), pool_size=2, inbox_size=2, shutdown_grace=0.5) as bus:
        await bus.subscribe("t", handler)
        await bus.publish_many(
            [OutgoingMessage(topic="t", value=b"x", key="one") for _ in range(20)]
        )
        with trio.fail_after(5):
            await started.wait()
    assert _claims(bus) == {}


async def test_a_cancelled_dispatch_hands_back_what_it_still_held() -> None:
    """Closing a subscription while its dispatcher waits for room on one
    actor releases that chunk's rest and the chunks it had not sent to
    other actors yet: their claims go, and the bus goes on."""
    blocked = trio.Event()

    async def handler(message: Message) -> None:
        if message.aggregate_id == "a":
            blocked.set()
            await trio.sleep_forever()

    async with trio_bus.open_bus(_url(), pool_size=2, inbox_size=2, shutdown_grace=0.2) as bus:
        subscription = await bus.subscribe("t", handler)
        # One fetched batch: "a" (whose first call never returns) fills its
        # actor's inbox, so "b"'s chunk waits behind it, unsent.
        await bus.publish_many(
            [OutgoingMessage(topic="t", value=b"x", key=key) for key in ["a"] * 10 + ["b"] * 10]
        )
        with trio.fail_after(5):
            await blocked.wait()
            assert set(_claims(bus)) == {"a", "b"}
            await subscription.close()
        assert _claims(bus) == {}
