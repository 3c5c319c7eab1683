"""Dispatch: aggregates claim an actor while they have messages in flight,
and go to an idle one otherwise (see ``trio_bus._dispatch``)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import trio
import trio.lowlevel

import trio_bus
from trio_bus import Bus, Message, OutgoingMessage
from trio_bus._config import RetryPolicy
from trio_bus._message import Record, new_record
from trio_bus._names import stable_hash
from trio_bus._pool import ActorPool
from trio_bus._work import Route


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


async def test_a_stuck_handler_holds_up_no_other_aggregate() -> None:
    """After many quick calls, one handler that never returns still holds
    up only its own aggregate: the others of its batch all start (packing
    quick handlers' aggregates onto shared actors was tried, and failed
    exactly this)."""
    quick_done = trio.Event()
    quick = 0
    started: set[str] = set()
    all_started = trio.Event()

    async def handler(message: Message) -> None:
        nonlocal quick
        agg = message.aggregate_id
        assert agg is not None
        if agg.startswith("quick"):
            quick += 1
            if quick == 200:
                quick_done.set()
            return
        started.add(agg)
        if len(started) == 20:
            all_started.set()
        if agg == "stuck-0":
            await trio.sleep_forever()

    async with trio_bus.open_bus(_url(), pool_size=64, shutdown_grace=0.2) as bus:
        await bus.subscribe("t", handler)
        await bus.publish_many(
            [OutgoingMessage(topic="t", value=b"x", key=f"quick-{i % 50}") for i in range(200)]
        )
        with trio.fail_after(5):
            await quick_done.wait()
        await bus.publish_many(
            [OutgoingMessage(topic="t", value=b"x", key=f"stuck-{i}") for i in range(20)]
        )
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


# ------------------------------------------------- a pool run by hand


class _Consumer:
    """Counts settles; never fetches (records are dispatched by hand)."""

    def __init__(self) -> None:
        self.acked = 0
        self.released = 0

    def ack(self, record: Record) -> None:
        self.acked += 1

    def release(self, record: Record) -> None:
        self.released += 1


async def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("nothing is dead-lettered here")


def _pool_and_route(
    size: int, inbox_size: int = 1000, invoke: Callable[[Message], Awaitable[None]] | None = None
) -> tuple[ActorPool, Route, _Consumer]:
    async def noop(message: Message) -> None:
        pass

    consumer = _Consumer()
    pool = ActorPool(
        size=size, inbox_size=inbox_size, max_restarts=3, restart_window=10.0, publish=_never
    )
    route = Route(
        topic="t",
        group="g",
        consumer=consumer,  # type: ignore[arg-type]
        invoke=invoke or noop,
        handler_timeout=None,
        dead_letter_topic="t.dlq",
        wants_envelope=False,
        retry=RetryPolicy(),
    )
    return pool, route, consumer


def _records(keys: Sequence[str]) -> list[Record]:
    return [new_record("t", "t", b"", key, {}, None, offset) for offset, key in enumerate(keys)]


async def test_a_full_inbox_takes_the_rest_in_pieces_and_never_overflows() -> None:
    """A chunk larger than the room left goes in pieces of at most half an
    inbox, each once it fits: the inbox never holds more than its size and
    the aggregate's order holds."""
    seen: list[int] = []
    most = 0

    async def handler(message: Message) -> None:
        nonlocal most
        most = max(most, pool.inbox_depths()[0])
        seen.append(message.offset)
        await trio.lowlevel.checkpoint()

    pool, route, consumer = _pool_and_route(size=1, inbox_size=4, invoke=handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with trio.fail_after(5):
            await pool.dispatch(route, _records(["one"] * 30))
            await route.wait_idle()
        nursery.cancel_scope.cancel()
    assert seen == list(range(30))
    assert most <= 4
    assert consumer.acked == 30
    assert pool._dispatcher.claims == {}
