"""The whole bus on NATS JetStream when things break: the server restarts
mid-stream, the bus is cancelled, the bus's process is SIGKILLed.

Properties checked (docs/nats.md, "Order on redelivery"):

* every message whose publish returned without error is handled at least
  once;
* per aggregate, first handlings follow publish order (a redelivered older
  message never runs after a newer one of its aggregate);
* nothing is acked before its handler finished: whatever a killed bus had
  not finished is handled by the next one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import trio

import trio_bus
from trio_bus import RetryPolicy
from trio_bus.errors import PublishError
from trio_bus.transports.nats import ConnectOptions, ConsumerOptions, NatsOptions

from ._nats_server import NatsServer
from .helpers import Recorder

WAIT = 30.0

#: Short timers so redelivery and failure detection fit in a test.
OPTIONS = NatsOptions(
    consumer=ConsumerOptions(ack_wait=2.0, idle_heartbeat=0.25, pull_expires=5.0),
    connect=ConnectOptions(ping_interval=1.0, reconnect_time_wait=0.1),
    publish_timeout=1.0,
)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def first_handlings_in_order(handled: list[tuple[str, int]]) -> dict[str, list[int]]:
    """Per aggregate, the values in the order they were first handled."""
    seen: set[int] = set()
    out: dict[str, list[int]] = defaultdict(list)
    for aggregate, value in handled:
        if value not in seen:
            seen.add(value)
            out[aggregate].append(value)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_server_restart_mid_stream(private_nats_server: NatsServer, sig: int) -> None:
    server = private_nats_server
    topic = uid("t")
    n, aggregates = 300, 10
    handled: Recorder[tuple[str, int]] = Recorder()
    acked: set[int] = set()

    async def handler(message: trio_bus.Message) -> None:
        assert message.aggregate_id is not None
        await trio.sleep(0.001)
        handled.add((message.aggregate_id, int(message.value)))

    async with trio_bus.open_bus(
        server.url, transport_options=OPTIONS, pool_size=32, client_id="svc"
    ) as bus:
        await bus.subscribe(topic, handler)

        async def publish_all() -> None:
            for i in range(n):
                if i == n // 3:
                    await trio.to_thread.run_sync(server.restart, sig)
                with trio.fail_after(WAIT):
                    while True:
                        try:
                            await bus.publish(topic, b"%d" % i, key=f"agg-{i % aggregates}")
                        except PublishError:
                            # Bounded failure during the outage; publish
                            # again (Nats-Msg-Id differs: a duplicate is
                            # possible, a loss is not).
                            continue
                        acked.add(i)
                        break

        await publish_all()
        await handled.wait_until(lambda: acked <= {v for _, v in handled.items}, WAIT)
    assert acked == set(range(n))
    for aggregate, values in first_handlings_in_order(handled.items).items():
        assert values == sorted(values), aggregate


async def test_bus_cancelled_mid_stream_then_resumed_in_order(nats_bus_url: str) -> None:
    topic = uid("t")
    n, aggregates = 200, 10
    finished: set[int] = set()
    handled: list[tuple[str, int]] = []
    started: Recorder[int] = Recorder()

    async def slow(message: trio_bus.Message) -> None:
        assert message.aggregate_id is not None
        started.add(int(message.value))
        await trio.sleep(0.01)
        handled.append((message.aggregate_id, int(message.value)))
        finished.add(int(message.value))

    with trio.CancelScope() as outer:
        async with trio_bus.open_bus(
            nats_bus_url, transport_options=OPTIONS, client_id="svc", pool_size=8
        ) as bus:
            await bus.subscribe(topic, slow, start="earliest")
            await bus.publish_many(
                trio_bus.OutgoingMessage(topic=topic, value=b"%d" % i, key=f"a{i % aggregates}")
                for i in range(n)
            )
            await started.wait_for_count(40)
            outer.cancel()
    assert len(finished) < n

    second: Recorder[tuple[str, int]] = Recorder()

    async def record(message: trio_bus.Message) -> None:
        assert message.aggregate_id is not None
        second.add((message.aggregate_id, int(message.value)))

    async with trio_bus.open_bus(
        nats_bus_url, transport_options=OPTIONS, client_id="svc", pool_size=8
    ) as bus:
        await bus.subscribe(topic, record, start="earliest")
        missing = set(range(n)) - finished
        await second.wait_until(lambda: missing <= {v for _, v in second.items})
    for aggregate, values in first_handlings_in_order(handled + second.items).items():
        assert values == sorted(values), aggregate


CHILD = textwrap.dedent(
    """
    import sys, trio, trio_bus
    from trio_bus.transports.nats import ConsumerOptions, NatsOptions

    url, topic, path = sys.argv[1:4]
    options = NatsOptions(consumer=ConsumerOptions(ack_wait=2.0, idle_heartbeat=0.25))

    async def main():
        out = open(path, "a", buffering=1)

        async def handler(message):
            await trio.sleep(0.02)
            # Written before the handler returns, so before any ack.
            out.write(f"{message.aggregate_id} {int(message.value)}\\n")

        async with trio_bus.open_bus(
            url, transport_options=options, client_id="svc", pool_size=8
        ) as bus:
            await bus.subscribe(topic, handler, start="earliest")
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_sigkilled_bus_loses_nothing_and_resumes_in_order(
    nats_bus_url: str, tmp_path: Path
) -> None:
    topic = uid("t")
    n, aggregates = 200, 10
    done_file = tmp_path / "done.txt"
    done_file.touch()
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, nats_bus_url, topic, str(done_file)],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        with trio.fail_after(WAIT):
            line = b""
            while not line.endswith(b"\n"):
                line += await child.stdout.receive_some(100)
        assert line.strip() == b"ready"
        async with trio_bus.open_bus(nats_bus_url, transport_options=OPTIONS) as bus:
            await bus.publish_many(
                trio_bus.OutgoingMessage(topic=topic, value=b"%d" % i, key=f"a{i % aggregates}")
                for i in range(n)
            )
        with trio.fail_after(WAIT):
            while len(done_file.read_text().splitlines()) < 30:
                await trio.sleep(0.01)  # polling another process's file
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    done_lines = [line.split() for line in done_file.read_text().splitlines()]
    done = [(a, int(v)) for a, v in done_lines]
    assert len(done) < n

    second: Recorder[tuple[str, int]] = Recorder()

    async def record(message: trio_bus.Message) -> None:
        assert message.aggregate_id is not None
        second.add((message.aggregate_id, int(message.value)))

    async with trio_bus.open_bus(
        nats_bus_url,
        transport_options=OPTIONS,
        client_id="svc",
        pool_size=8,
        retry=RetryPolicy(max_attempts=1),
    ) as bus:
        await bus.subscribe(topic, record, start="earliest")
        missing = set(range(n)) - {v for _, v in done}
        await second.wait_until(lambda: missing <= {v for _, v in second.items})
    for aggregate, values in first_handlings_in_order(done + second.items).items():
        assert values == sorted(values), aggregate
