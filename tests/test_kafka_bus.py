"""The bus on Kafka: crash and restart, SIGKILL, and rebalances, against a
real Kafka-protocol broker (Tansu).

Invariants checked throughout:

* every acknowledged publish is handled at least once (across restarts);
* nothing is committed before its handler finished: every offset below a
  partition's committed offset was handled to completion;
* per-aggregate order holds on first deliveries, and a partition has one
  owner at a time across bus instances.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

import trio_bus
from trio_bus.transports.kafka import KafkaOptions, KafkaTransport, TopicConfig

from ._kafka_broker import KafkaBroker
from .helpers import WAIT, Recorder

PARTITIONS = 4


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _options(topic: str) -> KafkaOptions:
    return KafkaOptions(topics={topic: TopicConfig(partitions=PARTITIONS)})


async def committed_offsets(bus: trio_bus.Bus, group: str, topic: str) -> dict[int, int]:
    """Committed offset per partition (0 when none), read by a separate
    client through the broker's OffsetFetch API."""
    import aiokafka

    transport = bus.transport
    assert isinstance(transport, KafkaTransport)

    async def read() -> dict[int, int]:
        client = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=list(transport.hosts), group_id=group, enable_auto_commit=False
        )
        await client.start()
        try:
            out: dict[int, int] = {}
            for p in range(PARTITIONS):
                offset = await client.committed(aiokafka.TopicPartition(topic, p))
                out[p] = offset or 0
            return out
        finally:
            await client.stop()

    return await transport.bridge.call(read)


async def publish_plan(bus: trio_bus.Bus, topic: str, n: int, aggregates: int) -> set[int]:
    """Publish seq 0..n-1 over *aggregates* keys; return the acked seqs."""
    acked: set[int] = set()
    batch = [
        trio_bus.OutgoingMessage(topic=topic, value=b"%d" % i, key=f"agg-{i % aggregates}")
        for i in range(n)
    ]
    await bus.publish_many(batch)
    acked.update(range(n))
    return acked


def assert_committed_were_handled(
    committed: dict[int, int], finished: set[tuple[int, int]]
) -> None:
    for partition, offset in committed.items():
        missing = [o for o in range(offset) if (partition, o) not in finished]
        assert not missing, f"partition {partition}: committed {offset} but {missing[:5]}..."


async def test_cancel_mid_stream_then_restart_handles_everything(
    kafka_broker: KafkaBroker,
) -> None:
    topic, group = _name("crash"), _name("g")
    n = 400
    finished: set[tuple[int, int]] = set()  # (partition, offset), handler returned
    handled: Recorder[int] = Recorder()

    async def slow(message: trio_bus.Message) -> None:
        await trio.sleep(0.002)
        assert message.partition is not None
        finished.add((message.partition, message.offset))
        handled.add(int(message.value))

    with trio.move_on_after(WAIT) as outer:
        async with trio_bus.open_bus(kafka_broker.url, transport_options=_options(topic)) as bus:
            acked = await publish_plan(bus, topic, n, aggregates=20)
            with trio.CancelScope() as scope:
                async with trio_bus.open_bus(
                    kafka_broker.url, transport_options=_options(topic), pool_size=8
                ) as consumer_bus:
                    await consumer_bus.subscribe(topic, slow, group=group, start="earliest")
                    await handled.wait_for_count(n // 3)
                    scope.cancel()  # cancelled from outside, mid-stream
            first_run = set(handled.items)
            assert len(first_run) < n
            committed = await committed_offsets(bus, group, topic)
            assert_committed_were_handled(committed, finished)
            assert sum(committed.values()) > 0  # the periodic commit ran

            async with trio_bus.open_bus(
                kafka_broker.url, transport_options=_options(topic), pool_size=8
            ) as restarted:
                await restarted.subscribe(topic, slow, group=group, start="latest")
                await handled.wait_until(lambda: set(handled.items) >= acked)
            committed = await committed_offsets(bus, group, topic)
            assert_committed_were_handled(committed, finished)
    assert not outer.cancelled_caught


CONSUMER_SCRIPT = textwrap.dedent(
    """
    import os, sys, trio, trio_bus
    from trio_bus.transports.kafka import KafkaOptions, TopicConfig

    url, topic, group, path = sys.argv[1:5]

    async def main():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        async def handler(message):
            await trio.sleep(0.002)
            # "finished": written before the handler returns (and so
            # before the offset can be committed)
            os.write(fd, b"%d %d %s\\n" % (message.partition, message.offset, message.value))
        options = KafkaOptions(topics={topic: TopicConfig(partitions=4)})
        async with trio_bus.open_bus(url, transport_options=options, pool_size=8) as bus:
            await bus.subscribe(topic, handler, group=group, start="earliest")
            os.write(fd, b"ready\\n")
            await trio.sleep_forever()

    trio.run(main)
    """
)


def _read_finished(path: Path) -> tuple[set[tuple[int, int]], set[int]]:
    finished: set[tuple[int, int]] = set()
    seqs: set[int] = set()
    if not path.exists():
        return finished, seqs
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            finished.add((int(parts[0]), int(parts[1])))
            seqs.add(int(parts[2]))
    return finished, seqs


async def test_sigkilled_consumer_process_then_restart(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    topic, group = _name("kill"), _name("g")
    n = 600
    path = tmp_path / "finished.txt"
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER_SCRIPT)
    handled: Recorder[int] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        handled.add(int(message.value))

    with trio.fail_after(WAIT * 2):
        async with trio_bus.open_bus(kafka_broker.url, transport_options=_options(topic)) as bus:
            acked = await publish_plan(bus, topic, n, aggregates=25)
            env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            proc = await trio.lowlevel.open_process(
                [sys.executable, str(script), kafka_broker.url, topic, group, str(path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                # Wait (bounded) until the child handled a part of the stream.
                while len(_read_finished(path)[1]) < n // 4:
                    assert proc.poll() is None, "the consumer process died"
                    await trio.sleep(0.02)  # polling another process's file
                os.kill(proc.pid, signal.SIGKILL)
            finally:
                if proc.poll() is None:
                    proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            finished, child_seqs = _read_finished(path)
            assert len(child_seqs) < n
            committed = await committed_offsets(bus, group, topic)
            assert_committed_were_handled(committed, finished)

            # Restart with the same group (after the dead member's session).
            async with trio_bus.open_bus(
                kafka_broker.url, transport_options=_options(topic)
            ) as restarted:
                await restarted.subscribe(topic, handler, group=group, start="latest")
                await handled.wait_until(lambda: child_seqs | set(handled.items) >= acked)
            # Redelivery starts exactly at the commit point.
            assert set(handled.items) <= acked


async def test_second_bus_joins_then_leaves_no_loss_order_single_owner(
    kafka_broker: KafkaBroker,
) -> None:
    topic, group = _name("rebal"), _name("g")
    n, aggregates = 1500, 40
    deliveries: list[tuple[str, int, int]] = []  # (bus, partition, seq) at start
    intervals: dict[int, list[tuple[str, float, float]]] = defaultdict(list)
    first_seen: dict[str, list[int]] = defaultdict(list)
    seen: set[int] = set()
    progress: Recorder[int] = Recorder()

    def handler_for(name: str) -> Callable[[trio_bus.Message], Awaitable[None]]:
        async def handler(message: trio_bus.Message) -> None:
            assert message.partition is not None
            assert message.aggregate_id is not None
            seq = int(message.value)
            start = trio.current_time()
            deliveries.append((name, message.partition, seq))
            if seq not in seen:
                seen.add(seq)
                first_seen[message.aggregate_id].append(seq)
            await trio.sleep(0.001)
            intervals[message.partition].append((name, start, trio.current_time()))
            progress.add(seq)

        return handler

    options = _options(topic)
    with trio.fail_after(WAIT * 2):
        async with (
            trio_bus.open_bus(kafka_broker.url, transport_options=options) as a,
            trio.open_nursery() as nursery,
        ):
            await a.subscribe(topic, handler_for("a"), group=group, start="earliest")

            async def produce() -> None:
                for chunk in range(0, n, 50):
                    await a.publish_many(
                        [
                            trio_bus.OutgoingMessage(
                                topic=topic, value=b"%d" % i, key=f"agg-{i % aggregates}"
                            )
                            for i in range(chunk, min(n, chunk + 50))
                        ]
                    )
                    await trio.sleep(0.01)  # a steady stream, not one burst

            nursery.start_soon(produce)
            await progress.wait_until(lambda: len(seen) >= n // 5)
            async with trio_bus.open_bus(kafka_broker.url, transport_options=options) as b:
                await b.subscribe(topic, handler_for("b"), group=group, start="earliest")
                await progress.wait_until(
                    lambda: any(name == "b" for name, _, _ in deliveries) and len(seen) >= n // 2
                )
            # b left: a takes every partition back and finishes the stream.
            await progress.wait_until(lambda: len(seen) >= n)
    assert seen == set(range(n))
    assert {name for name, _, _ in deliveries} == {"a", "b"}
    for agg, seqs in first_seen.items():
        assert seqs == sorted(seqs), agg
    for partition, spans in intervals.items():
        spans.sort(key=lambda s: s[1])
        for (n1, _, end1), (n2, start2, _) in itertools.pairwise(spans):
            if n1 != n2:
                assert start2 >= end1, f"partition {partition}: {n1} and {n2} overlap"
