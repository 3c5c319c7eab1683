"""Time to go live for N topics in one Kafka consumer group.

Each run uses a fresh group and N fresh topics (created beforehand with one
admin call, so the figure is the subscription's own cost: metadata, joins,
positions), subscribes a no-op handler to all of them, and reports:

* ``live_s``: seconds from the first subscribe call until every
  subscription returned (all live);
* ``rebalances``: assignments the group received (one per completed join);
* ``handled_s``: seconds more until one message published to each topic
  was handled (every subscription really consumes), None when some were
  not within a minute (``topics_missed`` says how many topics);
* ``rss_mb``: the process's resident memory after handling (psutil).

Modes: ``many`` (``bus.subscribe_many``, one join), ``concurrent`` (plain
``subscribe`` calls started together in a nursery) and ``sequential`` (one
``subscribe`` after the other, the issue's "before" figure). A mode the
checked-out trio_bus lacks is skipped.

Run::

    python -m benchmarks.kafka_join --topics 1 10 100 --mode many concurrent
    python -m benchmarks.kafka_join --url kafka://127.0.0.1:9092 --topics 100 --json

Without ``--url`` it starts its own Tansu broker (memory storage). One JSON
object per run is printed with ``--json``; a table otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import uuid
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio

import trio_bus
from trio_bus.testing.plugin import KAFKA_URL_PARAMS
from trio_bus.transports.kafka import KafkaOptions, TopicConfig

MODES = ("many", "concurrent", "sequential")
#: Seconds the subscribe calls may take, and then the handling.
RUN_TIMEOUT = 600.0
HANDLE_TIMEOUT = 60.0


async def _create_topics(bus: trio_bus.Bus, topics: list[str]) -> None:
    """One admin call for all topics (the transport's provisioner)."""
    transport: Any = bus.transport
    await transport.bridge.call(transport._topics.ensure, set(topics))


def _rebalances(bus: trio_bus.Bus, group: str) -> int | None:
    transport: Any = bus.transport
    state = transport.groups.get(group)
    if state is None:
        return None
    count = getattr(state, "rebalances", None)
    if count is not None:
        return int(count)
    return int(state.consumer._coordinator.generation)  # before the counter existed


async def run_one(url: str, n: int, mode: str, partitions: int, messages: int) -> dict[str, Any]:
    """Subscribe one group to *n* fresh topics in *mode*; measure."""
    tag = uuid.uuid4().hex[:8]
    topics = [f"join-{tag}-{i}" for i in range(n)]
    group = f"join-{tag}"
    handled: set[str] = set()
    count = 0
    done = trio.Event()
    want = max(messages, n)

    async def handler(message: trio_bus.Message) -> None:
        nonlocal count
        handled.add(message.topic)
        count += 1
        if count >= want and len(handled) == n:
            done.set()

    options = KafkaOptions(topic=TopicConfig(partitions=partitions))
    async with trio_bus.open_bus(url, client_id=f"bench-{tag}", transport_options=options) as bus:
        await _create_topics(bus, topics)
        started = time.perf_counter()
        with trio.fail_after(RUN_TIMEOUT):
            if mode == "many":
                await bus.subscribe_many([(t, handler) for t in topics], group=group)
            elif mode == "concurrent":
                async with trio.open_nursery() as nursery:
                    for topic in topics:
                        nursery.start_soon(
                            functools.partial(bus.subscribe, topic, handler, group=group)
                        )
            else:
                for topic in topics:
                    await bus.subscribe(topic, handler, group=group)
        live = time.perf_counter() - started
        await bus.publish_many(
            trio_bus.OutgoingMessage(topic=topics[i % n], value=b"x", key=f"k{i}")
            for i in range(want)
        )
        handled_s: float | None = None
        with trio.move_on_after(HANDLE_TIMEOUT):
            await done.wait()
            handled_s = round(time.perf_counter() - started - live, 3)
        rss = psutil.Process().memory_info().rss / 1e6
        return {
            "mode": mode,
            "topics": n,
            "partitions": partitions,
            "messages": want,
            "live_s": round(live, 3),
            "rebalances": _rebalances(bus, group),
            # None: a subscription that had returned missed a message.
            "handled_s": handled_s,
            "topics_missed": n - len(handled),
            "rss_mb": round(rss, 1),
        }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for mode in args.mode:
        if mode == "many" and not hasattr(trio_bus.Bus, "subscribe_many"):
            print("skipping mode 'many': this trio_bus has no subscribe_many", file=sys.stderr)
            continue
        for n in args.topics:
            result = await run_one(args.url, n, mode, args.partitions, args.messages)
            results.append(result)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(
                    f"{mode:>10} topics={n:<4} live={result['live_s']:7.2f}s "
                    f"rebalances={result['rebalances']} handled+{result['handled_s']}s "
                    f"missed={result['topics_missed']} rss={result['rss_mb']:.0f}MB",
                    flush=True,
                )
    return results


def cli(argv: list[str] | None = None) -> None:
    """Parse arguments, start a broker when no URL is given, run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="kafka:// URL (default: start a Tansu broker)")
    parser.add_argument("--topics", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--mode", choices=MODES, nargs="+", default=["many"])
    parser.add_argument("--partitions", type=int, default=1, help="partitions per topic")
    parser.add_argument("--messages", type=int, default=0, help="messages (at least one a topic)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    args = parser.parse_args(argv)
    from ._brokers import broker_url

    with broker_url("kafka", args.url, KAFKA_URL_PARAMS) as args.url:
        trio.run(main, args)


if __name__ == "__main__":
    cli()
