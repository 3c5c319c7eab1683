"""Baselines written by hand: what a Python user builds without trio_bus.

* ``trio-channels`` (memory): one producer routes each message by
  ``crc32(key) % 256`` into one of 256 worker tasks' bounded trio memory
  channels with a blocking ``await send`` per message; no broker, no acks,
  no timeouts.
* ``trio-channels-nowait`` (memory): the same fan-out written with the
  technique trio_bus uses (``send_nowait``, ``receive_nowait`` draining, a
  checkpoint every few messages) -- the floor of a keyed Trio fan-out.
* ``raw`` on Kafka: aiokafka, ``getmany`` batches routed by key hash into
  256 per-key asyncio workers (bounded queues), offsets committed after
  handling over each partition's contiguous finished prefix. Producer:
  ``send()`` per message, pipelined, ``acks="all"``, futures awaited at the
  end.
* ``raw`` on NATS: nats-py JetStream pull consumer (``fetch`` batches of
  500) routed the same way, ``msg.ack()`` after handling. Producer:
  ``publish_async`` per message, acks awaited at the end.

The Kafka and NATS producers here feed every consumer system (trio_bus,
raw, FastStream): one external producer process, the same client and
settings, so producer-bound runs do not compare producers.

Every asyncio baseline runs with ``asyncio.run`` in its own process, never
inside Trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from ._proto import POOL, PROGRESS_INTERVAL, RunSpec, emit, watch_stdin
from .metrics import ConsumerFigures, ProducerFigures, Recorder
from .workloads import AGGREGATE_HEADER

__all__ = [
    "AsyncioHarness",
    "consume_kafka",
    "consume_nats",
    "create_kafka_topics",
    "produce_kafka",
    "produce_nats",
    "run_trio_channels",
]

#: Bounded queue per worker (the same bound as trio_bus's inboxes).
INBOX = 1000


def route(key: str | bytes | None) -> int:
    """Worker index of a key: the same crc32 trio_bus uses."""
    if key is None:
        return 0
    data = key.encode() if isinstance(key, str) else key
    return zlib.crc32(data) % POOL


# ------------------------------------------------------------ trio, memory

_Item = tuple[Mapping[str, str], str]


#: The non-blocking fan-out yields every this many messages: a worker as
#: trio_bus's actors do, the producer once per fetch-sized batch.
WORKER_CHECKPOINT = 16
PRODUCER_CHECKPOINT = 500


async def run_trio_channels(
    spec: RunSpec, *, progress: Callable[[int], None] = lambda n: None, nowait: bool = False
) -> tuple[ConsumerFigures, ProducerFigures]:
    """The memory baselines: a keyed fan-out over 256 trio channels.

    Blocking (``trio-channels``): ``await send`` / ``async for`` per message,
    a scheduler round each. Non-blocking (``trio-channels-nowait``, the
    technique trio_bus uses itself): ``send_nowait`` falling back to
    ``await send`` on a full channel, workers draining with ``receive_nowait``
    and a checkpoint every few messages.
    """
    from .run_trio_bus import count_trio_tasks

    wl = spec.workload
    done = trio.Event()
    recorder = Recorder(wl, on_done=done.set)

    async def worker(receive: trio.MemoryReceiveChannel[_Item]) -> None:
        async for headers, key in receive:
            k, work = recorder.started(headers, key)
            if work:
                await trio.sleep(work)
            recorder.finished(k)

    async def worker_nowait(receive: trio.MemoryReceiveChannel[_Item]) -> None:
        in_a_row = 0
        while True:
            try:
                headers, key = receive.receive_nowait()
            except trio.WouldBlock:
                in_a_row = 0
                headers, key = await receive.receive()
            k, work = recorder.started(headers, key)
            if work:
                await trio.sleep(work)
            recorder.finished(k)
            in_a_row += 1
            if in_a_row >= WORKER_CHECKPOINT:
                in_a_row = 0
                await trio.lowlevel.checkpoint()

    async def report() -> None:
        while True:
            progress(recorder.handled)
            await trio.sleep(PROGRESS_INTERVAL)

    async with trio.open_nursery() as nursery:
        sends = []
        for _ in range(POOL):
            send, receive = trio.open_memory_channel[_Item](INBOX)
            sends.append(send)
            nursery.start_soon(worker_nowait if nowait else worker, receive)
        nursery.start_soon(report)
        peak_tasks = count_trio_tasks()
        if wl.preload:
            # Channels cannot hold a preloaded topic; the clock starts at the
            # first send, which is where consuming starts too.
            recorder.origin_ns = time.time_ns()
        recorder.mark_live()
        begin = time.perf_counter()
        for i in range(wl.messages):
            key = wl.key(i)
            headers = {"bench-ts": str(time.time_ns()), "bench-idx": str(i)}
            channel = sends[route(key)]
            if not nowait:
                await channel.send((headers, key))
                continue
            try:
                channel.send_nowait((headers, key))
            except trio.WouldBlock:
                await channel.send((headers, key))  # backpressure
            if i % PRODUCER_CHECKPOINT == PRODUCER_CHECKPOINT - 1:
                await trio.lowlevel.checkpoint()
        publish_elapsed = time.perf_counter() - begin
        await done.wait()
        nursery.cancel_scope.cancel()
    progress(recorder.handled)
    producer = ProducerFigures(
        published=wl.messages, failed=0, publish_rate=wl.messages / publish_elapsed
    )
    return recorder.figures(peak_tasks=peak_tasks, crossings=None), producer


# ----------------------------------------------------------- asyncio shared


@attrs.define(eq=False)
class AsyncioHarness:
    """What every asyncio consumer shares: the recorder, the done/stop
    events, the task-count sampler and the progress reporter."""

    spec: RunSpec
    progress: Callable[[int], None]
    recorder: Recorder = attrs.field(init=False)
    done: asyncio.Event = attrs.field(init=False, factory=asyncio.Event)
    peak_tasks: int = 0
    _background: list[asyncio.Task[None]] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self.recorder = Recorder(self.spec.workload, on_done=self.done.set)

    def start(self, *, watch_stop: bool) -> None:
        """Start sampling and reporting; optionally stop on a STOP line."""
        self._background.append(asyncio.create_task(self._sample()))
        self._background.append(asyncio.create_task(self._report()))
        if watch_stop:
            loop = asyncio.get_running_loop()

            def stop() -> None:
                loop.call_soon_threadsafe(self.done.set)

            watch_stdin(stop)

    def live(self) -> None:
        """The subscription is live: a preloaded workload's clock starts,
        and CPU from here on counts as per-message cost."""
        self.recorder.mark_live()
        if self.spec.workload.preload:
            self.recorder.origin_ns = time.time_ns()

    def spawn(self, coro: Any) -> None:
        """Run *coro* as a background task, cancelled by :meth:`close`."""
        self._background.append(asyncio.create_task(coro))

    async def _sample(self) -> None:
        while True:
            self.peak_tasks = max(self.peak_tasks, len(asyncio.all_tasks()))
            await asyncio.sleep(0.05)

    async def _report(self) -> None:
        last = -1
        while True:
            if self.recorder.handled != last:
                last = self.recorder.handled
                self.progress(last)
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def close(self) -> ConsumerFigures:
        """Stop the background tasks; the figures."""
        self.peak_tasks = max(self.peak_tasks, len(asyncio.all_tasks()))
        figures = self.recorder.figures(peak_tasks=self.peak_tasks, crossings=None)
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.progress(self.recorder.handled)
        return figures


async def _keyed_workers(
    harness: AsyncioHarness, handle_done: Callable[[Any], Any], extract: Callable[[Any], Any]
) -> list[asyncio.Queue[Any]]:
    """Start POOL workers; each handles its queue's items in order, then
    calls ``handle_done(item)`` (ack/commit bookkeeping)."""
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(INBOX) for _ in range(POOL)]
    recorder = harness.recorder

    async def worker(queue: asyncio.Queue[Any]) -> None:
        while True:
            item = await queue.get()
            headers, key = extract(item)
            k, work = recorder.started(headers, key)
            if work:
                await asyncio.sleep(work)
            recorder.finished(k)
            result = handle_done(item)
            if result is not None:
                await result

    for queue in queues:
        harness.spawn(worker(queue))
    return queues


async def _put(queue: asyncio.Queue[Any], item: Any) -> None:
    if queue.full():
        await queue.put(item)  # backpressure: the fetch loop waits
    else:
        queue.put_nowait(item)


# -------------------------------------------------------------------- Kafka


def assignment_listener(wanted: int) -> tuple[Any, asyncio.Event]:
    """An aiokafka rebalance listener and an event set once *wanted*
    partitions are assigned (every runner waits for its group to join)."""
    from aiokafka.abc import ConsumerRebalanceListener

    assigned: set[Any] = set()
    joined = asyncio.Event()

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            pass

        async def on_partitions_assigned(self, new: Any) -> None:
            assigned.update(new)
            if len(assigned) >= wanted:
                joined.set()

    return Listener(), joined


async def create_kafka_topics(spec: RunSpec) -> None:
    """Create the run's topics with the workload's partition count."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=spec.address)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(
                [
                    NewTopic(t, num_partitions=spec.workload.partitions, replication_factor=1)
                    for t in spec.topics
                ]
            )
    finally:
        await admin.close()


@attrs.define(eq=False)
class Watermarks:
    """Per-partition commit points over the contiguous finished prefix of
    fetched offsets (what a careful hand-written consumer must do to commit
    after handling with out-of-order completion across keys)."""

    _fetched: dict[Any, deque[int]] = attrs.field(factory=dict, alias="fetched")
    _finished: dict[Any, set[int]] = attrs.field(factory=dict, alias="finished")
    _commit: dict[Any, int] = attrs.field(factory=dict, alias="commit")

    def fetched(self, tp: Any, offset: int) -> None:
        """An offset was handed to a worker (in offset order per partition)."""
        self._fetched.setdefault(tp, deque()).append(offset)

    def finished(self, tp: Any, offset: int) -> None:
        """A worker finished an offset."""
        done = self._finished.setdefault(tp, set())
        done.add(offset)
        queue = self._fetched[tp]
        while queue and queue[0] in done:
            top = queue.popleft()
            done.discard(top)
            self._commit[tp] = top + 1

    def take(self) -> dict[Any, int]:
        """Commit points that moved since the last call."""
        out, self._commit = self._commit, {}
        return out


async def consume_kafka(spec: RunSpec, harness: AsyncioHarness, ready: Callable[[], None]) -> None:
    """The raw aiokafka consumer; returns once every message was handled
    or the harness was told to stop."""
    from aiokafka import AIOKafkaConsumer

    await create_kafka_topics(spec)
    wanted = spec.workload.partitions * len(spec.topics)
    listener, joined = assignment_listener(wanted)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=spec.address,
        group_id=spec.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,  # Tansu answers idle fetches late (PERFORMANCE.md)
        max_poll_records=1000,
        session_timeout_ms=spec.kafka_setting("session_timeout_ms"),
        heartbeat_interval_ms=spec.kafka_setting("heartbeat_interval_ms"),
    )
    consumer.subscribe(topics=spec.topics, listener=listener)
    await consumer.start()
    marks = Watermarks()
    try:
        queues = await _keyed_workers(
            harness,
            lambda rec: marks.finished((rec.topic, rec.partition), rec.offset),
            lambda rec: ({k: v.decode() for k, v in rec.headers}, rec.key.decode()),
        )

        async def fetch_loop() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=1000)
                for records in batches.values():
                    for rec in records:
                        marks.fetched((rec.topic, rec.partition), rec.offset)
                        await _put(queues[route(rec.key)], rec)

        async def commit_loop() -> None:
            from aiokafka import TopicPartition

            while True:
                await asyncio.sleep(0.1)
                points = marks.take()
                if points:
                    await consumer.commit(
                        {TopicPartition(t, p): off for (t, p), off in points.items()}
                    )

        harness.spawn(fetch_loop())
        await asyncio.wait_for(joined.wait(), 60)
        harness.live()
        harness.spawn(commit_loop())
        ready()
        await harness.done.wait()
    finally:
        await consumer.stop()


async def produce_kafka(spec: RunSpec) -> ProducerFigures:
    """The raw aiokafka producer: pipelined ``send()``, acks awaited."""
    from aiokafka import AIOKafkaProducer

    wl, topics, payload = spec.workload, spec.topics, spec.workload.payload()
    await create_kafka_topics(spec)
    producer = AIOKafkaProducer(bootstrap_servers=spec.address, acks="all", linger_ms=2)
    await producer.start()
    try:
        begin = time.perf_counter()
        first_ack = math.nan
        futures = []
        for i in range(wl.messages):
            headers = [
                ("bench-ts", str(time.time_ns()).encode()),
                ("bench-idx", str(i).encode()),
            ]
            future = await producer.send(
                topics[wl.topic_index(i)], payload, key=wl.key(i).encode(), headers=headers
            )
            if i == 0:
                await future  # the first message alone: first-message latency
                first_ack = (time.perf_counter() - begin) * 1000
            futures.append(future)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        elapsed = time.perf_counter() - begin
    finally:
        await producer.stop()
    failed = sum(1 for o in outcomes if isinstance(o, BaseException))
    return ProducerFigures(
        published=wl.messages - failed,
        failed=failed,
        publish_rate=(wl.messages - failed) / elapsed if elapsed > 0 else math.nan,
        first_ack_ms=first_ack,
    )


# --------------------------------------------------------------------- NATS


async def ensure_nats_streams(js: Any, spec: RunSpec) -> None:
    """One file-backed stream per topic (trio_bus's default storage too).

    A stream a trio_bus consumer created already (its subjects include
    ``topic.>``) is used as it is: the producer publishes to ``topic``.
    """
    from nats.js.errors import NotFoundError

    for topic in spec.topics:
        try:
            await js.stream_info(topic)
        except NotFoundError:
            await js.add_stream(name=topic, subjects=[topic])


async def consume_nats(spec: RunSpec, harness: AsyncioHarness, ready: Callable[[], None]) -> None:
    """The raw nats-py JetStream pull consumer."""
    import nats
    import nats.errors
    from nats.js.api import ConsumerConfig

    nc = await nats.connect(f"nats://{spec.address}")
    try:
        js = nc.jetstream()
        await ensure_nats_streams(js, spec)
        subs = [
            await js.pull_subscribe(
                topic,
                durable=spec.group,
                stream=topic,
                config=ConsumerConfig(max_ack_pending=10_000, ack_wait=30),
            )
            for topic in spec.topics
        ]
        queues = await _keyed_workers(
            harness,
            lambda msg: msg.ack(),
            lambda msg: (msg.headers or {}, (msg.headers or {}).get(AGGREGATE_HEADER)),
        )

        async def fetch_loop(sub: Any) -> None:
            while True:
                try:
                    msgs = await sub.fetch(batch=500, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    key = (msg.headers or {}).get(AGGREGATE_HEADER)
                    await _put(queues[route(key)], msg)

        harness.live()
        for sub in subs:
            harness.spawn(fetch_loop(sub))
        ready()
        await harness.done.wait()
    finally:
        await nc.close()


async def produce_nats(spec: RunSpec) -> ProducerFigures:
    """The raw nats-py producer: ``publish_async`` per message, acks awaited."""
    import nats

    wl, topics, payload = spec.workload, spec.topics, spec.workload.payload()
    nc = await nats.connect(f"nats://{spec.address}")
    try:
        js = nc.jetstream()
        await ensure_nats_streams(js, spec)
        begin = time.perf_counter()
        first_ack = math.nan
        futures = []
        for i in range(wl.messages):
            headers = {
                "bench-ts": str(time.time_ns()),
                "bench-idx": str(i),
                AGGREGATE_HEADER: wl.key(i),
            }
            future = await js.publish_async(topics[wl.topic_index(i)], payload, headers=headers)
            if i == 0:
                await future  # the first message alone: first-message latency
                first_ack = (time.perf_counter() - begin) * 1000
            futures.append(future)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        elapsed = time.perf_counter() - begin
    finally:
        await nc.close()
    failed = sum(1 for o in outcomes if isinstance(o, BaseException))
    return ProducerFigures(
        published=wl.messages - failed,
        failed=failed,
        publish_rate=(wl.messages - failed) / elapsed if elapsed > 0 else math.nan,
        first_ack_ms=first_ack,
    )


# ------------------------------------------------------------ process entry


async def consume(spec: RunSpec) -> None:
    """The consumer process of the raw baseline (asyncio)."""
    harness = AsyncioHarness(spec, progress=lambda n: emit("PROGRESS", n))
    harness.start(watch_stop=True)
    body = consume_kafka if spec.transport == "kafka" else consume_nats
    await body(spec, harness, lambda: emit("READY"))
    figures = await harness.close()
    emit("RESULT", {"consumer": attrs.asdict(figures), "producer": None})


async def produce(spec: RunSpec) -> ProducerFigures:
    """The producer process of the raw baseline (asyncio)."""
    if spec.transport == "kafka":
        return await produce_kafka(spec)
    return await produce_nats(spec)
