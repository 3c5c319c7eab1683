"""Messages on NATS JetStream: a stream per topic created with the options
given (``NatsOptions``), a durable consumer per group, retries in place.

Needs a ``nats-server -js`` and ``pip install "trio-bus[nats]"``.

Run: python examples/e04_nats.py [nats://127.0.0.1:4222]
(or set TRIO_BUS_URL)
"""

from __future__ import annotations

import os
import sys
import uuid

import trio

import trio_bus
from trio_bus.transports.nats import NatsOptions, StreamOptions


async def main(url: str) -> None:
    topic = f"payments-{uuid.uuid4().hex[:8]}"  # a fresh stream: the example can run twice
    handled = trio.Event()
    attempts: list[int] = []

    async def on_payment(message: trio_bus.Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 1:
            # Raising retries the message in place (RetryPolicy), and later
            # messages of this aggregate wait behind it: order holds.
            raise RuntimeError("the card processor timed out")
        print(f"{message.aggregate_id}: {message.value.decode()} (attempt {message.attempt})")
        handled.set()

    # Streams the bus creates keep messages in memory for an hour.
    options = NatsOptions(stream=StreamOptions(storage="memory", max_age=3600))
    async with trio_bus.open_bus(
        url,
        client_id="payments",
        transport_options=options,
        retry=trio_bus.RetryPolicy(max_attempts=3, backoff=0.05),
    ) as bus:
        # Subscribe first: the default start="latest" skips older messages.
        await bus.subscribe(topic, on_payment)
        await bus.publish(topic, b"capture 12.50 EUR", key="payment-7")
        with trio.fail_after(30):
            await handled.wait()
    print(f"attempts: {attempts}")


if __name__ == "__main__":
    default = os.environ.get("TRIO_BUS_URL", "nats://127.0.0.1:4222")
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else default)
