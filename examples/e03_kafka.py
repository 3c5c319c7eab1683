"""Envelopes on Kafka: one consumer group, per-order ordering across
partitions, options given as an object (``KafkaOptions``) and in the URL.

Needs a Kafka broker and ``pip install "trio-bus[kafka]"``.

Run: python examples/e03_kafka.py [kafka://127.0.0.1:9092]
(or set TRIO_BUS_URL)
"""

from __future__ import annotations

import os
import sys
import uuid

import trio

import trio_bus
from trio_bus.transports.kafka import KafkaOptions, TopicConfig

EVENTS = [("order-1", "OrderPlaced"), ("order-2", "OrderPlaced"), ("order-1", "OrderPaid")]


async def main(url: str) -> None:
    topic = f"orders-{uuid.uuid4().hex[:8]}"  # a fresh topic: the example can run twice
    seen: list[str] = []
    done = trio.Event()

    async def on_order(envelope: trio_bus.Envelope) -> None:
        # Events of one order arrive in publish order: the aggregate ID is
        # the Kafka key, so one order always lands on one partition.
        seen.append(f"{envelope.aggregate_id}: {envelope.event_type}")
        if len(seen) == len(EVENTS):
            done.set()

    # Topics the bus creates get this configuration (an existing topic is
    # checked against it instead).
    options = KafkaOptions(topics={topic: TopicConfig(partitions=4)})
    async with trio_bus.open_bus(url, client_id="billing", transport_options=options) as bus:
        # Subscribe first: with the default start="latest" a message published
        # before the group's first subscription is never delivered to it.
        await bus.subscribe_envelope(topic, on_order)
        for order, event_type in EVENTS:
            envelope = trio_bus.Envelope.new(
                aggregate_id=order, event_type=event_type, payload={"order": order}
            )
            await bus.publish_envelope(topic, envelope)  # returns once Kafka stored it
        with trio.fail_after(30):
            await done.wait()
    print("\n".join(seen))


if __name__ == "__main__":
    trio.run(
        main,
        sys.argv[1]
        if len(sys.argv) > 1
        else os.environ.get("TRIO_BUS_URL", "kafka://127.0.0.1:9092"),
    )
