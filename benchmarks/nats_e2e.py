"""End to end on NATS JetStream: trio_bus against a raw nats-py consumer,
same server, same workload, same run.

Workload: N messages of 1 KiB over 100 aggregates (default N=20,000; the
issue's figure is ``--messages 100000``), a no-op handler and a handler
sleeping 1 ms. Each case runs in fresh processes: a consumer process
subscribes, then a producer process publishes 5 probe messages one at a time
(first-message latency: publish -> handler start while idle) and then the
bulk at full speed. Every message carries its publish time
(``time.time_ns()``) in a header.

* ``trio_bus``: ``open_bus(nats://...)`` with its defaults (pool 256, inbox
  1000, handler timeout 30 s), ``subscribe`` -> handler; the producer uses
  ``bus.publish_many``.
* ``raw``: nats-py on plain asyncio, written the way a careful engineer
  would without trio_bus: a durable push consumer with explicit acks
  (``max_ack_pending`` 10,000), messages routed by aggregate ID (crc32) to a
  fixed pool of 256 asyncio worker tasks with bounded queues, each handling
  its messages in order and acking after the handler; the producer uses
  ``js.publish_async`` in windows of 1,000.

Reported per case: end-to-end msg/s (first bulk publish -> last handler
end), p50/p99 latency (publish -> handler start), first-message latency
(median of the probes), per-key order violations; and trio_bus/raw.

Run: python benchmarks/nats_e2e.py [--messages 100000] [--repeat 1]
     [--url nats://127.0.0.1:4222] (default: starts its own nats-server)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
AGGREGATES = 100
PAYLOAD_BYTES = 1024
PROBES = 5
WORKERS = 256
TS = "bench-ts"
IDX = "bench-idx"
AGG = "X-Aggregate-ID"


# ------------------------------------------------------------------ results


def summarize(
    n: int, bulk: list[tuple[int, int, int]], probes: list[int], violations: int
) -> dict[str, Any]:
    """*bulk*: (publish ns, start ns, end ns) per message."""
    first_pub = min(p for p, _, _ in bulk)
    last_end = max(e for _, _, e in bulk)
    lat = sorted((s - p) / 1e6 for p, s, _ in bulk)
    return {
        "messages": n,
        "msg_per_s": n / ((last_end - first_pub) / 1e9),
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "first_ms": statistics.median(p / 1e6 for p in probes) if probes else None,
        "order_violations": violations,
        "consumer_cpu_s": time.process_time(),
    }


class Tracker:
    """Counts handlings, latencies and per-key order; knows when it is done."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bulk: dict[int, tuple[int, int, int]] = {}
        self.probes: list[int] = []
        self.last_idx: dict[str, int] = {}
        self.violations = 0

    def start(self, headers: dict[str, str]) -> tuple[str, int, int]:
        now = time.time_ns()
        idx = headers[IDX]
        pub = int(headers[TS])
        if idx.startswith("p"):
            self.probes.append(now - pub)
            return idx, pub, now
        i = int(idx)
        key = headers[AGG]
        if self.last_idx.get(key, -1) >= i and i not in self.bulk:
            self.violations += 1
        self.last_idx[key] = max(i, self.last_idx.get(key, -1))
        return idx, pub, now

    def end(self, token: tuple[str, int, int]) -> bool:
        idx, pub, start = token
        if not idx.startswith("p"):
            self.bulk.setdefault(int(idx), (pub, start, time.time_ns()))
        return len(self.bulk) >= self.n

    def result(self) -> dict[str, Any]:
        return summarize(self.n, list(self.bulk.values()), self.probes, self.violations)


# ---------------------------------------------------------------- consumers


def consume_trio_bus(url: str, topic: str, n: int, handler_ms: float) -> dict[str, Any]:
    import trio

    import trio_bus

    tracker = Tracker(n)
    done = trio.Event()
    work = handler_ms / 1000

    async def handler(message: trio_bus.Message) -> None:
        token = tracker.start(dict(message.headers))
        if work:
            await trio.sleep(work)
        if tracker.end(token):
            done.set()

    async def main() -> None:
        async with trio_bus.open_bus(url, client_id="bench") as bus:
            await bus.subscribe(topic, handler, start="earliest")
            print("ready", flush=True)
            await done.wait()

    trio.run(main)
    return tracker.result()


def consume_raw(url: str, topic: str, n: int, handler_ms: float) -> dict[str, Any]:
    import nats
    from nats.js import api

    tracker = Tracker(n)
    work = handler_ms / 1000

    async def main() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        stream = topic.replace(".", "_")
        await js.add_stream(name=stream, subjects=[topic, f"{topic}.>"])
        done = asyncio.Event()
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue(maxsize=1000) for _ in range(WORKERS)]

        async def worker(queue: asyncio.Queue[Any]) -> None:
            while True:
                msg = await queue.get()
                token = tracker.start(msg.headers)
                if work:
                    await asyncio.sleep(work)
                await msg.ack()
                if tracker.end(token):
                    done.set()

        tasks = [asyncio.create_task(worker(q)) for q in queues]

        async def on_msg(msg: Any) -> None:
            key = msg.headers.get(AGG, "")
            await queues[zlib.crc32(key.encode()) % WORKERS].put(msg)

        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            max_ack_pending=10_000,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        await js.subscribe(
            topic, durable="bench", stream=stream, cb=on_msg, manual_ack=True, config=config
        )
        print("ready", flush=True)
        await done.wait()
        for task in tasks:
            task.cancel()
        await nc.close()

    asyncio.run(main())
    return tracker.result()


# ---------------------------------------------------------------- producers


def headers_for(idx: str, key: str) -> dict[str, str]:
    return {TS: str(time.time_ns()), IDX: idx, AGG: key}


def produce_raw(url: str, topic: str, n: int) -> None:
    import nats

    payload = b"x" * PAYLOAD_BYTES

    async def main() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for p in range(PROBES):
            await js.publish(topic, payload, headers=headers_for(f"p{p}", "probe"))
            await asyncio.sleep(0.05)
        for start in range(0, n, 1000):
            futures = [
                await js.publish_async(
                    topic, payload, headers=headers_for(str(i), f"agg-{i % AGGREGATES}")
                )
                for i in range(start, min(n, start + 1000))
            ]
            await asyncio.gather(*futures)
        await nc.close()

    asyncio.run(main())


def produce_trio_bus(url: str, topic: str, n: int) -> None:
    import trio

    import trio_bus

    payload = b"x" * PAYLOAD_BYTES

    async def main() -> None:
        async with trio_bus.open_bus(url, client_id="bench-producer") as bus:
            for p in range(PROBES):
                await bus.publish(
                    topic, payload, key="probe", headers=headers_for(f"p{p}", "probe")
                )
                await trio.sleep(0.05)
            for start in range(0, n, 1000):
                await bus.publish_many(
                    trio_bus.OutgoingMessage(
                        topic=topic,
                        value=payload,
                        key=f"agg-{i % AGGREGATES}",
                        headers=headers_for(str(i), f"agg-{i % AGGREGATES}"),
                    )
                    for i in range(start, min(n, start + 1000))
                )

    trio.run(main)


# ------------------------------------------------------------- orchestration


def child(args: list[str]) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env
    )


def run_case(url: str, system: str, producer: str, n: int, handler_ms: float) -> dict[str, Any]:
    topic = f"bench-{uuid.uuid4().hex[:10]}"
    consumer = child(["_consume", system, url, topic, str(n), str(handler_ms)])
    assert consumer.stdout is not None
    ready = consumer.stdout.readline().strip()
    if ready != "ready":
        consumer.kill()
        raise RuntimeError(f"consumer did not start: {ready!r}")
    prod = child(["_produce", producer, url, topic, str(n)])
    prod.wait()
    out, _ = consumer.communicate(timeout=600)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result.update(system=system, producer=producer, handler_ms=handler_ms)
    return result


def start_server() -> tuple[Any, str]:
    sys.path.insert(0, str(ROOT))
    from tests._nats_server import NatsServer

    server = NatsServer(Path(tempfile.mkdtemp(prefix="nats-bench-")))
    server.start()
    return server, server.url


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_consume":
        system, url, topic, n, handler_ms = sys.argv[2:7]
        fn = consume_trio_bus if system == "trio_bus" else consume_raw
        print(json.dumps(fn(url, topic, int(n), float(handler_ms))), flush=True)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_produce":
        system, url, topic, n = sys.argv[2:6]
        (produce_trio_bus if system == "trio_bus" else produce_raw)(url, topic, int(n))
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (median)")
    parser.add_argument("--handlers", default="0,1", help="handler sleeps in ms")
    parser.add_argument(
        "--producer",
        choices=["same", "raw"],
        default="same",
        help="'same': each system publishes with its own client; 'raw': both with nats-py",
    )
    parser.add_argument("--url", default=None, help="use this server instead of starting one")
    opts = parser.parse_args()

    server = None
    url = opts.url
    if url is None:
        server, url = start_server()
    try:
        rows = []
        for sleep_ms in (float(h) for h in opts.handlers.split(",")):
            per_system: dict[str, dict[str, Any]] = {}
            for system in ("raw", "trio_bus"):
                producer = system if opts.producer == "same" else "raw"
                runs = [
                    run_case(url, system, producer, opts.messages, sleep_ms)
                    for _ in range(opts.repeat)
                ]
                runs.sort(key=lambda r: r["msg_per_s"])
                median = runs[len(runs) // 2]
                per_system[system] = median
                rows.append(median)
                print(
                    f"{system:8} handler {sleep_ms:g} ms: {median['msg_per_s']:8.0f} msg/s  "
                    f"p50 {median['p50_ms']:7.1f} ms  p99 {median['p99_ms']:7.1f} ms  "
                    f"first {median['first_ms']:5.1f} ms  order violations "
                    f"{median['order_violations']}  "
                    f"consumer cpu {median['consumer_cpu_s']:.1f}s  (runs: "
                    + ", ".join(f"{r['msg_per_s']:.0f}" for r in runs)
                    + ")",
                    flush=True,
                )
            ratio = per_system["trio_bus"]["msg_per_s"] / per_system["raw"]["msg_per_s"]
            print(f"  trio_bus/raw at {sleep_ms:g} ms: {ratio:.2f}x", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
