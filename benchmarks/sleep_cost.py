"""CPU cost of one handler sleep in Trio and in asyncio, 256 tasks sleeping
1 ms at a time: the floor under every benchmark whose handler sleeps
(``bulk-1ms``, ``pc-*``).

``trio.sleep`` opens a cancel scope with a deadline, parks the task, and
delivers a cancellation when the deadline passes; ``asyncio.sleep`` is one
timer handle and a future. On a 2-core machine that is CPU time the rest of
the pipeline does not get.

Run: python -m benchmarks.sleep_cost [--sleeps 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import trio

TASKS = 256


async def _trio(sleeps: int) -> None:
    async def worker() -> None:
        for _ in range(sleeps // TASKS):
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        for _ in range(TASKS):
            nursery.start_soon(worker)


async def _asyncio(sleeps: int) -> None:
    async def worker() -> None:
        for _ in range(sleeps // TASKS):
            await asyncio.sleep(0.001)

    await asyncio.gather(*(worker() for _ in range(TASKS)))


def measure(sleeps: int) -> dict[str, float]:
    """Microseconds of CPU per sleep, by library."""
    done = sleeps // TASKS * TASKS
    begin = time.process_time()
    trio.run(_trio, sleeps)
    middle = time.process_time()
    asyncio.run(_asyncio(sleeps))
    end = time.process_time()
    return {"trio": (middle - begin) / done * 1e6, "asyncio": (end - middle) / done * 1e6}


def main() -> None:
    """Print the cost per sleep."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--sleeps", type=int, default=20_000)
    args = parser.parse_args()
    for name, micros in measure(args.sleeps).items():
        print(f"{name:8} {micros:6.1f} us CPU per 1 ms sleep")


if __name__ == "__main__":
    main()
