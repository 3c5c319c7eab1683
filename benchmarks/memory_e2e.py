"""End-to-end throughput of the in-memory transport against a bare trio
memory-channel fan-out, same workload, same run; medians of 3.

Workload: N messages of 1 KiB over 100 aggregates, no-op handler.

* trio_bus: publish_many into ``memory://`` -> fetch -> dispatch -> actor
  (pool 256) -> handler -> ack.
* baselines: one producer routes each message by key hash into one of 256
  tasks' memory channels, the tasks run the same no-op handler, with no
  broker, no acks, no timeouts and no retries: with a blocking ``await
  send`` per message, and non-blocking (``send_nowait``, ``receive_nowait``
  draining, a checkpoint every few messages: the technique trio_bus uses,
  and the baseline the ratios are taken against).

Run: python benchmarks/memory_e2e.py [--messages 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable

import trio

import trio_bus

AGGREGATES = 100
POOL = 256
PAYLOAD = b"x" * 1024


def counting_handler(
    n: int,
) -> tuple[Callable[[trio_bus.Message], Awaitable[None]], trio.Event]:
    """A no-op handler and the event it sets at its *n*-th call."""
    done = trio.Event()
    seen = 0

    async def handler(message: trio_bus.Message) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    return handler, done


async def run_trio_bus(n: int, handler_timeout: float | None) -> float:
    handler, done = counting_handler(n)
    url = f"memory://bench-{uuid.uuid4().hex}"
    async with trio_bus.open_bus(url, pool_size=POOL, handler_timeout=handler_timeout) as bus:
        await bus.subscribe("bench", handler)
        records = [
            trio_bus.OutgoingMessage(topic="bench", value=PAYLOAD, key=f"agg-{i % AGGREGATES}")
            for i in range(n)
        ]
        start = time.perf_counter()
        await bus.publish_many(records)
        await done.wait()
        return n / (time.perf_counter() - start)


async def run_baseline(n: int, *, nowait: bool = False) -> float:
    done = trio.Event()
    seen = 0

    async def handler(value: bytes) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    async def worker(receive: trio.MemoryReceiveChannel[bytes]) -> None:
        async for value in receive:
            await handler(value)

    async def worker_nowait(receive: trio.MemoryReceiveChannel[bytes]) -> None:
        # trio_bus's own technique: drain without waiting, yield every 16.
        in_a_row = 0
        while True:
            try:
                value = receive.receive_nowait()
            except trio.WouldBlock:
                in_a_row = 0
                value = await receive.receive()
            await handler(value)
            in_a_row += 1
            if in_a_row >= 16:
                in_a_row = 0
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        sends = []
        for _ in range(POOL):
            send, receive = trio.open_memory_channel[bytes](1000)
            sends.append(send)
            nursery.start_soon(worker_nowait if nowait else worker, receive)
        keys = [f"agg-{i % AGGREGATES}" for i in range(n)]
        start = time.perf_counter()
        for i, key in enumerate(keys):
            channel = sends[zlib.crc32(key.encode()) % POOL]
            if not nowait:
                await channel.send(PAYLOAD)
                continue
            try:
                channel.send_nowait(PAYLOAD)
            except trio.WouldBlock:
                await channel.send(PAYLOAD)
            if i % 500 == 499:
                await trio.lowlevel.checkpoint()
        await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.messages
    results: dict[str, list[float]] = {
        "trio_bus (handler_timeout=30s)": [],
        "trio_bus (no handler timeout)": [],
        "bare trio channel fan-out, 256 tasks": [],
        "non-blocking fan-out (nowait), 256 tasks": [],
    }
    for _ in range(args.repeat):
        results["trio_bus (handler_timeout=30s)"].append(trio.run(run_trio_bus, n, 30.0))
        results["trio_bus (no handler timeout)"].append(trio.run(run_trio_bus, n, None))
        results["bare trio channel fan-out, 256 tasks"].append(trio.run(run_baseline, n))
        results["non-blocking fan-out (nowait), 256 tasks"].append(
            trio.run(functools.partial(run_baseline, n, nowait=True))
        )
    medians = {name: statistics.median(values) for name, values in results.items()}
    baseline = medians["non-blocking fan-out (nowait), 256 tasks"]
    print(
        f"{n} messages of 1 KiB over {AGGREGATES} aggregates, no-op handler, "
        f"median of {args.repeat}"
    )
    print(f"{'variant':40} {'msg/s':>10} {'ratio':>7}")
    for name, value in medians.items():
        print(f"{name:40} {value:10,.0f} {value / baseline:7.2f}")


if __name__ == "__main__":
    main()
