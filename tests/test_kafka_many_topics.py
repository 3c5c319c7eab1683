"""One join for many topics on Kafka (Tansu): ``Bus.subscribe_many`` makes
a group's consumer join with all of its topics in one rebalance, every
subscription is live when it returns, and on failure none is left.

The group's ``rebalances`` counts the assignments it received (one per
completed join). Memory is compared in separate processes running the same
workload (``benchmarks/kafka_join.py``, psutil RSS).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_bus
from trio_bus.errors import InvalidTopicError
from trio_bus.transports.kafka import KafkaOptions, KafkaTransport, TopicConfig

from ._kafka_broker import KafkaBroker

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0
TOPICS = 100


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _kafka(bus: trio_bus.Bus) -> KafkaTransport:
    transport = bus.transport
    assert isinstance(transport, KafkaTransport)
    return transport


async def _create(bus: trio_bus.Bus, topics: list[str]) -> None:
    """All topics with one admin call (create_topics names them all)."""
    transport = _kafka(bus)
    assert transport._topics is not None
    await transport.bridge.call(transport._topics.ensure, set(topics))


async def test_a_hundred_topics_go_live_in_one_rebalance(kafka_broker: KafkaBroker) -> None:
    tag = _name("many")
    topics = [f"{tag}-{i}" for i in range(TOPICS)]
    group = f"{tag}-g"
    seen: dict[str, list[str]] = {}
    all_seen = trio.Event()

    async def handler(message: trio_bus.Message) -> None:
        seen.setdefault(message.topic, []).append(message.value.decode())
        if len(seen) == TOPICS:
            all_seen.set()

    options = KafkaOptions(topic=TopicConfig(partitions=2))
    async with trio_bus.open_bus(kafka_broker.url, client_id=tag, transport_options=options) as bus:
        await _create(bus, topics)
        with trio.fail_after(WAIT):
            subs = await bus.subscribe_many([(t, handler) for t in topics], group=group)
        assert [s.topic for s in subs] == topics
        assert all(s.live and s.group == group for s in subs)
        state = _kafka(bus).groups[group]
        assert state.rebalances == 1
        # Every partition of every topic is assigned and positioned.
        assert len(state.tracks) == 2 * TOPICS
        # Live means live: published right after subscribe_many returned,
        # with the default start="latest", every message is handled.
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic=t, value=t.encode(), key="k") for t in topics
        )
        with trio.fail_after(WAIT):
            await all_seen.wait()
        assert seen == {t: [t] for t in topics}
        assert state.rebalances == 1  # consuming caused no further join


async def test_concurrent_subscribes_still_share_joins(kafka_broker: KafkaBroker) -> None:
    tag = _name("conc")
    topics = [f"{tag}-{i}" for i in range(6)]

    async def handler(message: trio_bus.Message) -> None:
        pass

    async with trio_bus.open_bus(kafka_broker.url, client_id=tag) as bus:
        await _create(bus, topics)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for topic in topics:
                    nursery.start_soon(bus.subscribe, topic, handler)
        assert len(bus.subscriptions()) >= len(topics)
        # They wait for one metadata answer and re-subscribe in one loop
        # turn: one join, two when one lands while the first is under way.
        assert _kafka(bus).groups[tag].rebalances <= 2


async def test_subscribe_many_validates_everything_first(kafka_broker: KafkaBroker) -> None:
    tag = _name("bad")

    async def handler(message: trio_bus.Message) -> None:
        pass

    def not_async(message: trio_bus.Message) -> None:
        pass

    async with trio_bus.open_bus(kafka_broker.url, client_id=tag) as bus:
        with pytest.raises(InvalidTopicError):
            await bus.subscribe_many({f"{tag}-ok": handler, "bad topic!": handler})
        with pytest.raises(TypeError):
            await bus.subscribe_many([(f"{tag}-ok", handler), (f"{tag}-2", not_async)])  # type: ignore[list-item]
        assert bus.subscriptions() == ()
        assert _kafka(bus).groups == {}


async def test_cancelled_subscribe_many_leaves_nothing(kafka_broker: KafkaBroker) -> None:
    tag = _name("cancel")
    topics = [f"{tag}-{i}" for i in range(10)]
    got: list[str] = []

    async def handler(message: trio_bus.Message) -> None:
        got.append(message.topic)

    async with trio_bus.open_bus(kafka_broker.url, client_id=tag) as bus:
        await _create(bus, topics)
        with trio.move_on_after(0.3) as scope:  # a join takes about a second
            await bus.subscribe_many(dict.fromkeys(topics, handler))
        assert scope.cancelled_caught
        assert bus.subscriptions() == ()
        state = _kafka(bus).groups.get(tag)
        assert state is None or not state.routes
        # The group works afterwards, for all of them, in one more join.
        with trio.fail_after(WAIT):
            subs = await bus.subscribe_many(dict.fromkeys(topics, handler))
        assert len(subs) == len(topics)


def _measure(url: str, topics: int, messages: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.kafka_join",
            "--url",
            url,
            "--topics",
            str(topics),
            "--messages",
            str(messages),
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_rss_with_a_hundred_topics_is_within_ten_percent_of_one(
    kafka_broker: KafkaBroker,
) -> None:
    """Same workload (200 messages, handled), one process each: one topic,
    then a hundred topics in one group."""
    one = _measure(kafka_broker.url, 1, 200)
    many = _measure(kafka_broker.url, TOPICS, 200)
    assert one["rebalances"] == many["rebalances"] == 1
    assert many["rss_mb"] <= one["rss_mb"] * 1.10, (one, many)
