"""Typed payloads with msgspec: publish a ``msgspec.Struct`` as the envelope
payload, decode it in the handler with ``Envelope.decode_payload(T)``.

A payload that does not match the type raises ``msgspec.ValidationError``.
Retrying cannot fix that, so rather than raise (retries, then the
dead-letter topic) the handler parks the event at once on a topic of its own
for inspection.

Run: python examples/e07_typed_payloads.py [URL]   (default: memory://)
"""

from __future__ import annotations

import os
import sys

import msgspec
import trio

import trio_bus


class OrderPlaced(msgspec.Struct, frozen=True):
    """The payload of an ``OrderPlaced`` event (schema version 1)."""

    order_id: str
    total_cents: int
    items: list[str]


async def main(url: str) -> None:
    done = trio.Semaphore(0)

    async with trio_bus.open_bus(url, client_id="shipping") as bus:

        async def on_order(envelope: trio_bus.Envelope) -> None:
            try:
                order = envelope.decode_payload(OrderPlaced)
            except msgspec.ValidationError as exc:
                print(f"rejected {envelope.aggregate_id}: {exc}")
                await bus.publish_envelope("orders.rejected", envelope)
            else:
                print(
                    f"ship {order.order_id}: {', '.join(order.items)} ({order.total_cents} cents)"
                )
            done.release()

        await bus.subscribe_envelope("orders", on_order)
        good = OrderPlaced(order_id="order-1", total_cents=1250, items=["book", "pen"])
        await bus.publish_envelope(
            "orders",
            # Any msgspec-encodable value is a payload; it is stored as JSON.
            trio_bus.Envelope.new(aggregate_id="order-1", event_type="OrderPlaced", payload=good),
        )
        bad = {"order_id": "order-2", "total_cents": "twelve", "items": []}
        await bus.publish_envelope(
            "orders",
            trio_bus.Envelope.new(aggregate_id="order-2", event_type="OrderPlaced", payload=bad),
        )
        with trio.fail_after(30):
            for _ in range(2):
                await done.acquire()


if __name__ == "__main__":
    trio.run(
        main, sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRIO_BUS_URL", "memory://")
    )
