"""The orders demo: ``trio-bus demo`` (or ``python -m trio_bus demo``).

Runs on the embedded memory transport, no server needed. Several orders
publish their life-cycle events; handlers do simulated I/O concurrently
across orders and strictly in order within one; one event fails every time,
is retried in place, and lands in the dead-letter topic while its order's
later events wait behind it. Then a throughput run.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import trio

import trio_bus

__all__ = ["run"]

LIFECYCLE = ["OrderCreated", "ItemAdded", "ItemAdded", "PaymentCaptured", "OrderShipped"]
#: The event that always fails, to show retry and dead-lettering.
POISON = ("order-03", "PaymentCaptured")


async def run(*, orders: int = 8, throughput_messages: int = 20_000, seed: int = 7) -> None:
    """Run the demo and print what happened."""
    rng = random.Random(seed)
    handled: dict[str, list[str]] = defaultdict(list)
    concurrent = peak = 0
    parked: list[trio_bus.Message] = []
    done = trio.Event()
    total = orders * len(LIFECYCLE)

    async def on_event(envelope: trio_bus.Envelope) -> None:
        nonlocal concurrent, peak
        concurrent += 1
        peak = max(peak, concurrent)
        try:
            await trio.sleep(rng.uniform(0.001, 0.01))  # simulated I/O
            if (envelope.aggregate_id, envelope.event_type) == POISON:
                attempt = trio_bus.current_message().attempt
                raise RuntimeError(f"payment gateway said no (attempt {attempt})")
        finally:
            concurrent -= 1
        handled[envelope.aggregate_id].append(envelope.event_type)
        _check_done()

    async def on_dead_letter(message: trio_bus.Message) -> None:
        parked.append(message)
        _check_done()

    def _check_done() -> None:
        if sum(map(len, handled.values())) + len(parked) == total:
            done.set()

    print("trio_bus demo: orders on the in-memory transport\n")
    retry = trio_bus.RetryPolicy(max_attempts=3, backoff=0.02)
    async with trio_bus.open_bus("memory://demo", client_id="demo", retry=retry) as bus:
        await bus.subscribe_envelope("orders", on_event)
        await bus.subscribe("orders.dlq", on_dead_letter)
        started = time.perf_counter()
        # Interleave the orders' events the way concurrent users would.
        for step, event_type in enumerate(LIFECYCLE):
            for n in range(orders):
                env = trio_bus.Envelope.new(
                    aggregate_id=f"order-{n:02d}",
                    event_type=event_type,
                    payload={"step": step, "order": n},
                )
                await bus.publish_envelope("orders", env)
        with trio.fail_after(30):
            await done.wait()
        elapsed = time.perf_counter() - started
        stats = bus.statistics()

    for aggregate in sorted(handled):
        events = handled[aggregate]
        print(f"  {aggregate}: {' -> '.join(events)}")
    print(
        f"\n{total} events over {orders} orders in {elapsed * 1000:.0f} ms; "
        f"up to {peak} handlers ran at once (one per order at most)."
    )
    print(
        f"failed attempts: {stats.failed}, retries: {stats.retried}, "
        f"dead-lettered: {stats.dead_lettered}"
    )
    for message in parked:
        h = message.headers
        print(
            f"  DLQ {message.topic}: {message.aggregate_id} {h.get('X-Event-Type')} after "
            f"{h['X-DLQ-Attempts']} attempts: {h['X-DLQ-Error-Type']}: {h['X-DLQ-Error-Message']}"
        )
    blocked = handled.get(POISON[0], [])
    print(
        f"  {POISON[0]} shipped after its payment was parked: "
        f"{blocked[-1:] == ['OrderShipped']} (order kept, nothing lost)\n"
    )
    if throughput_messages:
        await _throughput(throughput_messages)


async def _throughput(n: int) -> None:
    aggregates = 100
    seen = 0
    done = trio.Event()

    async def handler(message: trio_bus.Message) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    async with trio_bus.open_bus("memory://demo-throughput") as bus:
        await bus.subscribe("load", handler)
        payload = b"x" * 1024
        started = time.perf_counter()
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic="load", value=payload, key=f"agg-{i % aggregates}")
            for i in range(n)
        )
        with trio.fail_after(120):
            await done.wait()
        elapsed = time.perf_counter() - started
    print(
        f"throughput: {n} messages of 1 KiB over {aggregates} aggregates, no-op handler: "
        f"{n / elapsed:,.0f} msg/s end to end"
    )
