"""Publish and subscribe with per-aggregate order, on the in-memory default.

Run: python examples/e01_publish_subscribe.py
"""

from __future__ import annotations

import trio

import trio_bus


async def main() -> None:
    received = trio.Event()
    seen: list[str] = []

    async def handle(message: trio_bus.Message) -> None:
        # One aggregate's messages arrive here one at a time, in order.
        seen.append(f"{message.aggregate_id}: {message.value.decode()}")
        if len(seen) == 4:
            received.set()

    async with trio_bus.open_bus("memory://", client_id="example") as bus:
        await bus.subscribe("accounts", handle)
        for account, amount in [("acc-1", 10), ("acc-2", 5), ("acc-1", -3), ("acc-2", 7)]:
            await bus.publish("accounts", f"deposit {amount}".encode(), key=account)
        await received.wait()
    print("\n".join(seen))


if __name__ == "__main__":
    trio.run(main)
