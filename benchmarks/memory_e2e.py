"""End-to-end throughput of the in-memory transport against a bare trio
memory-channel fan-out, same workload, same run; medians of 3.

Workload: N messages of 1 KiB over 100 aggregates, no-op handler.

* trio_bus: publish_many into ``memory://`` -> fetch -> dispatch -> actor
  (pool 256) -> handler -> ack.
* baseline: one producer routes each message by key hash into one of 256
  tasks' memory channels (``await send``), the tasks run the same no-op
  handler: the least a hand-written keyed Trio fan-out does, with no
  broker, no acks, no timeouts and no retries.

Run: python benchmarks/memory_e2e.py [--messages 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
import zlib

import trio

import trio_bus

AGGREGATES = 100
POOL = 256
PAYLOAD = b"x" * 1024


async def run_trio_bus(n: int, handler_timeout: float | None) -> float:
    done = trio.Event()
    seen = 0

    async def handler(message: trio_bus.Message) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

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


async def run_baseline(n: int) -> float:
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

    async with trio.open_nursery() as nursery:
        sends = []
        for _ in range(POOL):
            send, receive = trio.open_memory_channel[bytes](1000)
            sends.append(send)
            nursery.start_soon(worker, receive)
        keys = [f"agg-{i % AGGREGATES}" for i in range(n)]
        start = time.perf_counter()
        for key in keys:
            await sends[zlib.crc32(key.encode()) % POOL].send(PAYLOAD)
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
    }
    for _ in range(args.repeat):
        results["trio_bus (handler_timeout=30s)"].append(trio.run(run_trio_bus, n, 30.0))
        results["trio_bus (no handler timeout)"].append(trio.run(run_trio_bus, n, None))
        results["bare trio channel fan-out, 256 tasks"].append(trio.run(run_baseline, n))
    medians = {name: statistics.median(values) for name, values in results.items()}
    baseline = medians["bare trio channel fan-out, 256 tasks"]
    print(
        f"{n} messages of 1 KiB over {AGGREGATES} aggregates, no-op handler, "
        f"median of {args.repeat}"
    )
    print(f"{'variant':40} {'msg/s':>10} {'ratio':>7}")
    for name, value in medians.items():
        print(f"{name:40} {value:10,.0f} {value / baseline:7.2f}")


if __name__ == "__main__":
    main()
