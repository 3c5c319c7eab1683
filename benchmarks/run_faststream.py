"""FastStream baselines (Kafka and NATS JetStream), each in its own asyncio
process -- never inside Trio.

* ``faststream``: the documented default subscriber (one message at a time;
  Kafka commits before handling, its default ``AckPolicy.ACK_FIRST``).
* ``faststream-concurrent``: its most concurrent mode, ``max_workers=256``
  (Kafka: ``ConcurrentDefaultSubscriber``; NATS: a concurrent push-stream
  subscriber). FastStream has no per-key concurrency, so this mode may
  break per-key order: the order-violation counter shows by how much.

Both modes run with FastStream's documented defaults -- its per-message
INFO log lines included (they go to the run's log file), and Kafka
``fetch_max_wait_ms=500`` -- except the group timings, which every Kafka
client in the suite shares. ``BENCH_FASTSTREAM_LOGGER=0`` in the
environment switches its logger off (``logger=None``) to see what the log
lines cost. The producer is FastStream's own
publisher, pipelined (Kafka ``no_confirm=True`` futures; NATS 1,000
concurrent ``publish`` calls at a time).
"""

# No ``from __future__ import annotations`` here: FastStream resolves the
# handlers' annotations at decoration time, and they name local imports.

import asyncio
import itertools
import math
import os
import time
from typing import Any

import attrs

from ._proto import POOL, RunSpec, emit
from .metrics import ProducerFigures
from .run_raw import (
    AsyncioHarness,
    assignment_listener,
    create_kafka_topics,
    ensure_nats_streams,
)
from .workloads import AGGREGATE_HEADER

__all__ = ["consume", "produce"]

#: Concurrent NATS publishes in flight (FastStream awaits each ack).
NATS_WINDOW = 1000


def _logger_options() -> dict[str, Any]:
    """FastStream's default logger, unless BENCH_FASTSTREAM_LOGGER=0."""
    if os.environ.get("BENCH_FASTSTREAM_LOGGER", "1") == "0":
        return {"logger": None}
    return {}


async def _consume_kafka(spec: RunSpec, harness: AsyncioHarness) -> None:
    from faststream.kafka import KafkaBroker, KafkaMessage

    await create_kafka_topics(spec)
    wanted = spec.workload.partitions * len(spec.topics)
    listener, joined = assignment_listener(wanted)

    broker = KafkaBroker(spec.address, **_logger_options())
    recorder = harness.recorder
    concurrent = spec.system == "faststream-concurrent"
    subscriber = broker.subscriber(
        *spec.topics,
        group_id=spec.group,
        auto_offset_reset="earliest",
        session_timeout_ms=spec.kafka_setting("session_timeout_ms"),
        heartbeat_interval_ms=spec.kafka_setting("heartbeat_interval_ms"),
        listener=listener,
        max_workers=POOL if concurrent else None,
    )

    async def handle(body: bytes, msg: KafkaMessage) -> None:
        raw: Any = msg.raw_message
        key = raw.key.decode() if isinstance(raw.key, bytes) else None
        k, work = recorder.started(msg.headers, key)
        if work:
            await asyncio.sleep(work)
        recorder.finished(k)

    subscriber(handle)
    await broker.start()
    try:
        await asyncio.wait_for(joined.wait(), 60)
        harness.live()
        emit("READY")
        await harness.done.wait()
    finally:
        await broker.stop()


async def _consume_nats(spec: RunSpec, harness: AsyncioHarness) -> None:
    import nats
    from faststream.nats import JStream, NatsBroker, NatsMessage

    # The streams exist before FastStream looks at them, like the other systems'.
    nc = await nats.connect(f"nats://{spec.address}")
    try:
        await ensure_nats_streams(nc.jetstream(), spec)
    finally:
        await nc.close()
    broker = NatsBroker(f"nats://{spec.address}", **_logger_options())
    recorder = harness.recorder
    concurrent = spec.system == "faststream-concurrent"

    async def handle(body: bytes, msg: NatsMessage) -> None:
        headers = msg.headers
        k, work = recorder.started(headers, headers.get(AGGREGATE_HEADER))
        if work:
            await asyncio.sleep(work)
        recorder.finished(k)

    for topic in spec.topics:
        subscriber = broker.subscriber(
            topic,
            stream=JStream(topic, subjects=[topic], declare=False),
            durable=spec.group,
            max_workers=POOL if concurrent else None,
        )
        subscriber(handle)
    await broker.start()
    try:
        harness.live()
        emit("READY")
        await harness.done.wait()
    finally:
        await broker.stop()


async def consume(spec: RunSpec) -> None:
    """The FastStream consumer process."""
    harness = AsyncioHarness(spec, progress=lambda n: emit("PROGRESS", n))
    harness.start(watch_stop=True)
    if spec.transport == "kafka":
        await _consume_kafka(spec, harness)
    else:
        await _consume_nats(spec, harness)
    figures = await harness.close()
    emit("RESULT", {"consumer": attrs.asdict(figures), "producer": None})


async def produce(spec: RunSpec) -> ProducerFigures:
    """The FastStream producer process (its own publisher, pipelined)."""
    wl, topics, payload = spec.workload, spec.topics, spec.workload.payload()
    outcomes: list[Any] = []
    first_ack = math.nan
    if spec.transport == "kafka":
        from faststream.kafka import KafkaBroker

        await create_kafka_topics(spec)
        kafka = KafkaBroker(spec.address, logger=None)
        await kafka.connect()
        try:
            begin = time.perf_counter()
            futures = []
            for i in range(wl.messages):
                headers = {"bench-ts": str(time.time_ns()), "bench-idx": str(i)}
                future = await kafka.publish(
                    payload,
                    topics[wl.topic_index(i)],
                    key=wl.key(i).encode(),
                    headers=headers,
                    no_confirm=True,
                )
                if i == 0:
                    await future  # the first message alone: first-message latency
                    first_ack = (time.perf_counter() - begin) * 1000
                futures.append(future)
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            elapsed = time.perf_counter() - begin
        finally:
            await kafka.stop()
    else:
        import nats
        from faststream.nats import NatsBroker

        nc = await nats.connect(f"nats://{spec.address}")
        try:
            await ensure_nats_streams(nc.jetstream(), spec)
        finally:
            await nc.close()
        broker = NatsBroker(f"nats://{spec.address}", logger=None)
        await broker.connect()
        try:
            begin = time.perf_counter()
            # The first message goes alone: first-message latency.
            bounds = [0, 1, *range(1 + NATS_WINDOW, wl.messages, NATS_WINDOW), wl.messages]
            for start, stop in itertools.pairwise(bounds):
                calls = []
                for i in range(start, stop):
                    headers = {
                        "bench-ts": str(time.time_ns()),
                        "bench-idx": str(i),
                        AGGREGATE_HEADER: wl.key(i),
                    }
                    topic = topics[wl.topic_index(i)]
                    calls.append(broker.publish(payload, topic, headers=headers, stream=topic))
                outcomes.extend(await asyncio.gather(*calls, return_exceptions=True))
                if start == 0:
                    first_ack = (time.perf_counter() - begin) * 1000
            elapsed = time.perf_counter() - begin
        finally:
            await broker.stop()
    failed = sum(1 for o in outcomes if isinstance(o, BaseException))
    published = wl.messages - failed
    return ProducerFigures(
        published=published,
        failed=failed,
        publish_rate=published / elapsed if elapsed > 0 else math.nan,
        first_ack_ms=first_ack,
    )
