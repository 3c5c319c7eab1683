"""The transactional-outbox pattern with the publish result stream.

The application writes each event to its own database in the same
transaction as the state change (the outbox), then publishes it; a relay
task reads ``bus.open_publish_results()`` and marks each outbox row by
``event_id``: sent, failed (publish again), or unknown (it may have been
stored: publish again, consumers deduplicate by ``event_id``).

Run: python examples/e05_publish_results.py [URL]   (default: memory://)
"""

from __future__ import annotations

import os
import sys

import trio

import trio_bus


async def relay_results(
    results: trio.MemoryReceiveChannel[trio_bus.PublishResult], outbox: dict[str, str]
) -> None:
    """Mark outbox rows from the result stream, until it is closed."""
    async with results:
        async for result in results:
            if result.event_id in outbox:
                outbox[result.event_id] = result.status  # "success", "failure" or "unknown"
                if all(status != "pending" for status in outbox.values()):
                    return


async def main(url: str) -> None:
    events = [
        trio_bus.Envelope.new(aggregate_id=f"order-{n}", event_type="OrderPlaced", payload={"n": n})
        for n in range(3)
    ]
    # In a real application these rows live in the database.
    outbox = {event.event_id: "pending" for event in events}

    async with trio_bus.open_bus(url, client_id="shop") as bus, trio.open_nursery() as nursery:
        # Open the stream before publishing: it carries results of later
        # publishes only. "wait" (the default) slows publishers down rather
        # than lose a result when the relay falls behind.
        results = bus.open_publish_results(when_full="wait")
        nursery.start_soon(relay_results, results, outbox)
        for event in events:
            try:
                await bus.publish_envelope("orders", event)
            except trio_bus.errors.PublishError:
                pass  # reported on the stream as well: the relay decides
    for event_id, status in outbox.items():
        print(f"{event_id}: {status}")


if __name__ == "__main__":
    trio.run(
        main, sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRIO_BUS_URL", "memory://")
    )
