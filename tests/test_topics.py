"""``bus.topics`` (configure, describe, list) and persistence modes, on
every transport against real servers."""

from __future__ import annotations

import uuid

import pytest
import trio

import trio_bus
from trio_bus.errors import ConfigError, InvalidTopicError, TopicConfigError
from trio_bus.transports.kafka import TopicConfig
from trio_bus.transports.memory import MemoryRetention
from trio_bus.transports.nats import StreamOptions

from .helpers import Recorder, collect


def options_for(url: str, size: int) -> object:
    """Per-topic options of the URL's transport keeping about *size* messages."""
    if url.startswith("nats"):
        return StreamOptions(max_msgs=size)
    if url.startswith("kafka"):
        return TopicConfig(partitions=2, retention_ms=size * 1000)
    return MemoryRetention(max_messages=size)


def configured_size(url: str, description: trio_bus.TopicDescription) -> object:
    """The size limit *options_for* set, as the broker reports it."""
    if url.startswith("nats"):
        return description.config["max_msgs"]
    if url.startswith("kafka"):
        return int(str(description.config["retention.ms"])) // 1000
    return description.config["max_messages"]


async def test_configure_describe_list(bus_url: str, topic: str) -> None:
    async with trio_bus.open_bus(bus_url, monitoring=None) as bus:
        before = await bus.topics.describe(topic)
        assert not before.exists
        created = await bus.topics.configure(topic, options_for(bus_url, 100))
        assert created.exists
        assert created.persistence == "persistent"
        assert configured_size(bus_url, created) == 100
        assert topic in await bus.topics.list()
        # The options stay in force for the topic: publishing and consuming work.
        got: Recorder[trio_bus.Message] = Recorder()
        await bus.subscribe(topic, collect(got))
        await bus.publish(topic, b"x", key="a")
        await got.wait_for_count(1)
        described = await bus.topics.describe(topic)
        assert configured_size(bus_url, described) == 100


async def test_update_follows_the_strategy(bus_url: str, topic: str) -> None:
    async with trio_bus.open_bus(bus_url, monitoring=None) as bus:
        await bus.topics.configure(topic, options_for(bus_url, 100))
        with pytest.raises(TopicConfigError, match=topic):
            await bus.topics.configure(
                topic, options_for(bus_url, 200), strategy="create_only", on_mismatch="fail"
            )
        assert configured_size(bus_url, await bus.topics.describe(topic)) == 100
        if bus_url.startswith("kafka"):
            # Tansu has no AlterConfigs: a broker refusing an update is a
            # typed error, and the topic is left as it was.
            with pytest.raises(TopicConfigError, match="AlterConfigs"):
                await bus.topics.configure(
                    topic, options_for(bus_url, 200), strategy="create_or_update"
                )
            assert configured_size(bus_url, await bus.topics.describe(topic)) == 100
            return
        updated = await bus.topics.configure(
            topic, options_for(bus_url, 200), strategy="create_or_update"
        )
        assert configured_size(bus_url, updated) == 200
        assert configured_size(bus_url, await bus.topics.describe(topic)) == 200


async def test_bad_requests_are_typed_errors(bus_url: str, topic: str) -> None:
    async with trio_bus.open_bus(bus_url, monitoring=None) as bus:
        with pytest.raises(InvalidTopicError):
            await bus.topics.configure("no spaces")
        with pytest.raises(ConfigError, match="options"):
            await bus.topics.configure(topic, object())
        with pytest.raises(ConfigError, match="persistence"):
            await bus.topics.configure(topic, persistence="forever")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="strategy"):
            await bus.topics.configure(topic, strategy="sometimes")  # type: ignore[arg-type]
        with pytest.raises(TopicConfigError, match=topic):
            await bus.topics.configure(topic, strategy="validate_only")
        assert topic not in await bus.topics.list()


async def test_bad_persistence_at_open_is_a_config_error(memory_bus_url: str) -> None:
    with pytest.raises(ConfigError, match="persistence"):
        async with trio_bus.open_bus(memory_bus_url, persistence="sometimes"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ConfigError, match="persistence"):
        async with trio_bus.open_bus(memory_bus_url, persistence={"t": "nope"}):  # type: ignore[dict-item]
            pass


# ---------------------------------------------------------------- ephemeral


@pytest.fixture(params=["memory", "nats"])
def storeless_url(request: pytest.FixtureRequest) -> str:
    """Transports where ephemeral means no storage at all."""
    url: str = request.getfixturevalue(f"{request.param}_bus_url")
    return url


async def test_ephemeral_is_at_most_once_and_keeps_order(storeless_url: str, topic: str) -> None:
    modes: dict[str, trio_bus.Persistence] = {topic: "ephemeral"}
    async with trio_bus.open_bus(storeless_url, monitoring=None, persistence=modes) as bus:
        # Nobody listens yet: the message is gone, not kept for later.
        await bus.publish(topic, b"lost", key="a")
        seen: list[tuple[str | None, bytes]] = []
        done = trio.Event()
        count = 200

        async def handler(message: trio_bus.Message) -> None:
            await trio.lowlevel.checkpoint()
            seen.append((message.aggregate_id, message.value))
            if len(seen) == count:
                done.set()

        await bus.subscribe(topic, handler)
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic=topic, value=b"%d" % i, key=f"a{i % 7}")
            for i in range(count)
        )
        with trio.fail_after(10):
            await done.wait()
        description = await bus.topics.describe(topic)
        assert description.persistence == "ephemeral"
        assert not description.exists
        assert topic not in await bus.topics.list()
    assert ("a", b"lost") not in seen
    for agg in {a for a, _ in seen}:
        values = [int(v) for a, v in seen if a == agg]
        assert values == sorted(values)
    assert sorted(int(v) for _, v in seen) == list(range(count))


async def test_ephemeral_failures_are_not_redelivered(storeless_url: str, topic: str) -> None:
    modes: dict[str, trio_bus.Persistence] = {topic: "ephemeral"}
    group = f"g-{uuid.uuid4().hex[:8]}"
    calls: Recorder[bytes] = Recorder()

    async def failing(message: trio_bus.Message) -> None:
        calls.add(message.value)
        await trio.sleep_forever()

    async with trio_bus.open_bus(
        storeless_url, monitoring=None, persistence=modes, shutdown_grace=0.1
    ) as bus:
        await bus.subscribe(topic, failing, group=group)
        await bus.publish(topic, b"once", key="a")
        await calls.wait_for_count(1)
    # The handler never finished; a persistent topic would redeliver it to
    # the group's next member. Ephemeral: it is gone.
    again: Recorder[trio_bus.Message] = Recorder()
    async with trio_bus.open_bus(storeless_url, monitoring=None, persistence=modes) as bus:
        await bus.subscribe(topic, collect(again), group=group)
        await bus.publish(topic, b"next", key="a")
        await again.wait_for_count(1)
        assert [m.value for m in again.items] == [b"next"]


async def test_auto_follows_what_the_broker_stores(storeless_url: str, topic: str) -> None:
    stored, unstored = f"{topic}-s", f"{topic}-u"
    async with trio_bus.open_bus(storeless_url, monitoring=None) as bus:
        await bus.topics.configure(stored)  # persistent: storage now exists
    async with trio_bus.open_bus(storeless_url, monitoring=None, persistence="auto") as bus:
        got: Recorder[trio_bus.Message] = Recorder()
        await bus.subscribe(stored, collect(got))
        await bus.subscribe(unstored, collect(got))
        await bus.publish(stored, b"s")
        await bus.publish(unstored, b"u")
        await got.wait_for_count(2)
        assert (await bus.topics.describe(stored)).persistence == "persistent"
        assert (await bus.topics.describe(unstored)).persistence == "ephemeral"
        listed = await bus.topics.list()
        assert stored in listed
        assert unstored not in listed


async def test_kafka_ephemeral_is_a_short_retention(kafka_bus_url: str, topic: str) -> None:
    modes: dict[str, trio_bus.Persistence] = {topic: "ephemeral"}
    async with trio_bus.open_bus(kafka_bus_url, monitoring=None, persistence=modes) as bus:
        got: Recorder[trio_bus.Message] = Recorder()
        await bus.subscribe(topic, collect(got))
        await bus.publish(topic, b"x", key="a")
        await got.wait_for_count(1)
        description = await bus.topics.describe(topic)
    assert description.persistence == "ephemeral"
    assert description.config["retention.ms"] == "60000"


async def test_dead_letter_topics_stay_persistent(storeless_url: str, topic: str) -> None:
    async def poison(message: trio_bus.Message) -> None:
        raise trio_bus.errors.NonRetryableError("bad")

    async with trio_bus.open_bus(storeless_url, monitoring=None, persistence="ephemeral") as bus:
        await bus.subscribe(topic, poison)
        await bus.publish(topic, b"poison", key="a")
        parked: Recorder[trio_bus.Message] = Recorder()
        await parked.poll_until(lambda: bus.statistics().dead_lettered == 1)
        # Subscribed only once it was parked, from the start: it was stored.
        await bus.subscribe(f"{topic}.dlq", collect(parked), start="earliest")
        await parked.wait_for_count(1)
        assert parked.items[0].value == b"poison"
        assert (await bus.topics.describe(f"{topic}.dlq")).persistence == "persistent"
        assert (await bus.topics.describe(topic)).persistence == "ephemeral"
