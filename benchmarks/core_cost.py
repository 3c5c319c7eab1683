"""CPU per message of trio_bus's core alone: dispatch, the actors, the
handler call and the ack, with no broker client and no producer running.

The memory transport's log is filled first (``publish_many``); the CPU
clock runs only from ``subscribe(start="earliest")`` until the no-op
handler has seen every message, so the figure is the consuming side of
the bus. Beside it: gen-0 collections of the cyclic garbage collector in
that window (every object living from fetch to ack counts towards them).

Run: python -m benchmarks.core_cost [--messages 50000] [--repeat 5]
Before/after: the same with ``PYTHONPATH=<other tree>/src``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import uuid

import trio

import trio_bus

from .memory_e2e import AGGREGATES, PAYLOAD, POOL, counting_handler


async def consume_cost(n: int) -> tuple[float, int]:
    """One run: (CPU µs per consumed message, gen-0 collections)."""
    handler, done = counting_handler(n)
    async with trio_bus.open_bus(f"memory://core-{uuid.uuid4().hex}", pool_size=POOL) as bus:
        await bus.publish_many(
            [
                trio_bus.OutgoingMessage(topic="bench", value=PAYLOAD, key=f"agg-{i % AGGREGATES}")
                for i in range(n)
            ]
        )
        collections = gc.get_stats()[0]["collections"]
        cpu = time.process_time()
        await bus.subscribe("bench", handler, start="earliest")
        await done.wait()
        cpu = time.process_time() - cpu
        return 1e6 * cpu / n, gc.get_stats()[0]["collections"] - collections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    runs = [trio.run(consume_cost, args.messages) for _ in range(args.repeat)]
    for cost, collections in runs:
        print(f"run: {cost:.2f} us/msg, {collections} gen-0 collections")
    median = statistics.median(cost for cost, _ in runs)
    print(f"{args.messages} messages, median of {args.repeat}: {median:.2f} us/msg consumed")


if __name__ == "__main__":
    main()
