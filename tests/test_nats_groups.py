"""Partitioned consumer groups on NATS (docs/scaling.md): several buses in
one group share a topic's partitions and never run one aggregate in two
places at once, while members join, leave, crash and lose their leases.

Properties checked over the handler log of every member (start and end of
each call on ``time.monotonic``, one clock for every process on Linux):

* no two handler intervals of one aggregate overlap, across members;
* per aggregate, first handlings follow publish order;
* every message whose publish returned is handled at least once.

Short leases (``lease_ttl`` 1.5 s, ``lease_grace`` 0.5 s) keep it fast.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import trio_bus
from trio_bus import Message
from trio_bus._names import stable_hash
from trio_bus.errors import ConfigError, TopicConfigError, TransportError
from trio_bus.testing._proxy import FaultProxy
from trio_bus.transports.nats import (
    ConnectOptions,
    ConsumerOptions,
    GroupOptions,
    NatsOptions,
)
from trio_bus.transports.nats.partitions import (
    assign,
    filters,
    key_token,
    partition_of,
    partition_subject,
)

from ._nats_server import NatsServer

TTL, GRACE = 1.5, 0.5
GROUPS = GroupOptions(lease_ttl=TTL, lease_grace=GRACE)
OPTIONS = NatsOptions(
    consumer=ConsumerOptions(ack_wait=5.0, idle_heartbeat=0.25, pull_expires=5.0),
    connect=ConnectOptions(ping_interval=1.0, reconnect_time_wait=0.1),
    groups=GROUPS,
    publish_timeout=2.0,
)
AGGREGATES = 20
WAIT = 30.0


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@attrs.define
class Log:
    """Handler calls of every member: (member, aggregate, value, start, end)."""

    calls: list[tuple[str, str, int, float, float]] = attrs.field(factory=list)
    done: set[int] = attrs.field(factory=set)

    def handler(self, member: str, delay: float = 0.0):  # type: ignore[no-untyped-def]
        async def handle(message: Message) -> None:
            start = time.monotonic()
            if delay:
                await trio.sleep(delay)
            end = time.monotonic()
            value = int(message.value)
            if value < 0:
                return  # a warm-up message
            assert message.aggregate_id is not None
            self.calls.append((member, message.aggregate_id, value, start, end))
            self.done.add(value)

        return handle


def check(log: Log, published: dict[str, list[int]]) -> None:
    """No overlap per aggregate; first handlings in publish order; all handled."""
    by_aggregate: dict[str, list[tuple[float, float, str, int]]] = defaultdict(list)
    for member, aggregate, value, start, end in log.calls:
        by_aggregate[aggregate].append((start, end, member, value))
    for aggregate, calls in by_aggregate.items():
        calls.sort()
        for (s1, e1, m1, v1), (s2, _, m2, v2) in itertools.pairwise(calls):
            assert s2 >= e1, f"{aggregate}: {v1} on {m1} [{s1}, {e1}] overlaps {v2} on {m2} ({s2})"
        firsts: list[int] = []
        seen: set[int] = set()
        for _, _, _, value in calls:
            if value not in seen:
                seen.add(value)
                firsts.append(value)
        assert firsts == published[aggregate], aggregate
    every = {v for values in published.values() for v in values}
    assert every <= log.done, f"{len(every - log.done)} never handled"


def aggregate_of(value: int) -> str:
    """A fixed pseudo-random aggregate per value: consecutive messages of one
    aggregate are not a fixed distance apart (with ``value % 20`` a member
    getting every other message would get whole aggregates, and the checks
    could not fail on an unpartitioned group)."""
    return f"agg-{stable_hash(str(value)) % AGGREGATES}"


async def publish_stream(
    bus: trio_bus.Bus, topic: str, count: int, published: dict[str, list[int]], pace: float
) -> None:
    """Publish *count* messages over AGGREGATES aggregates one by one,
    *pace* apart (one publisher: in order per aggregate)."""
    for value in range(count):
        await bus.publish(topic, str(value).encode(), key=aggregate_of(value))
        published[aggregate_of(value)].append(value)
        await trio.sleep(pace)


async def wait_for(condition, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def group_of(bus: trio_bus.Bus):  # type: ignore[no-untyped-def]
    """The GroupConsumer of a bus's only group subscription."""
    from trio_bus.transports.nats.group import GroupConsumer

    transport: Any = bus._transport  # the test looks at the member
    [group] = [c for c in transport._consumers if isinstance(c, GroupConsumer)]
    return group


@asynccontextmanager
async def member(
    url: str, topic: str, group: str, log: Log, name: str, *, delay: float = 0.002, **kw: object
) -> AsyncIterator[trio_bus.Bus]:
    async with trio_bus.open_bus(url, transport_options=kw.get("options", OPTIONS)) as bus:
        await bus.subscribe(topic, log.handler(name, delay), group=group, start="earliest")
        yield bus


# ----------------------------------------------------------- pure logic


def test_partition_function_is_the_pools_crc32() -> None:
    assert partition_of("order-7", 8) == stable_hash("order-7") % 8
    assert partition_subject("orders", "order-7", 8) == f"orders.~.{stable_hash('order-7') % 8}"
    assert partition_subject("orders", None, 8) == "orders"
    assert partition_subject("orders", "order-7", 1) == "orders"
    assert filters("orders", 3) == ["orders.~.3", "orders.~.3.>"]
    assert filters("orders", 0)[2:] == ["orders", "orders.*"]
    spread = {partition_of(f"a{i}", 8) for i in range(100)}
    assert spread == set(range(8))


def test_hrw_assignment_is_stable_and_balanced() -> None:
    for trial in range(200):
        members = [f"m{trial}-{i}" for i in range(3)]
        owners = assign(members, 8)
        assert owners == assign(list(reversed(members)), 8)  # same on every member
        counts = sorted(list(owners.values()).count(m) for m in members)
        assert counts == [2, 3, 3], counts  # within one of the mean
        # A member leaves: its partitions move, few others do.
        after = assign(members[:2], 8)
        kept = [p for p, owner in owners.items() if owner != members[2]]
        assert sum(after[p] != owners[p] for p in kept) <= 2
        # One joins: it takes its share, few others move.
        grown = assign([*members, "new"], 8)
        assert 2 <= list(grown.values()).count("new") <= 3
        assert sum(grown[p] not in (owners[p], "new") for p in owners) <= 3
    assert assign([], 4) == {}
    assert set(assign(["solo"], 8).values()) == {"solo"}


def test_key_token_escapes() -> None:
    assert key_token("orders_eu") == "orders_eu"
    assert key_token("a.b=c") == "a=2Eb=3Dc"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"partitions": 0},
        {"partitions": 2000},
        {"partitions": "8"},
        {"lease_ttl": 0},
        {"lease_grace": -1},
        {"member_id": "a.b"},
        {"member_id": ""},
        {"groups_bucket": "has space"},
    ],
)
def test_group_options_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        GroupOptions(**kwargs)  # type: ignore[arg-type]


def test_nats_options_take_group_options_only() -> None:
    with pytest.raises(ConfigError):
        NatsOptions(groups={"partitions": 4})  # type: ignore[arg-type]


# --------------------------------------------------------- real server


async def wait_shared(buses: list[trio_bus.Bus]) -> None:
    """Until each member holds exactly its share of the assignment over all
    of them (a rebalance is over)."""
    groups = [group_of(b) for b in buses]
    owners = assign([g.member for g in groups], 8)

    def settled() -> bool:
        return all(g.held == [p for p, m in owners.items() if m == g.member] for g in groups)

    await wait_for(settled)


@pytest.mark.trio
@pytest.mark.parametrize("members", [2, 3])
async def test_members_share_without_overlap(nats_server: NatsServer, members: int) -> None:
    url, topic, group = nats_server.url, uid("t"), uid("g")
    log, published = Log(), defaultdict[str, list[int]](list)
    count = 1000
    async with AsyncExitStack() as stack:
        producer = await stack.enter_async_context(
            trio_bus.open_bus(url, transport_options=OPTIONS)
        )
        buses = [
            await stack.enter_async_context(member(url, topic, group, log, f"m{i}", delay=0.01))
            for i in range(members)
        ]
        # Every member holds its share before the stream starts.
        await wait_shared(buses)
        held = [group_of(b).held for b in buses]
        # Live, paced publishing and 10 ms handlers: on an unpartitioned
        # group (partitions=1) the same run shows overlaps across members.
        await publish_stream(producer, topic, count, published, 0.0005)
        await wait_for(lambda: len(log.done) >= count)
    check(log, published)
    assert sorted(p for h in held for p in h) == list(range(8))
    handled_by = {m for m, *_ in log.calls}
    assert len(handled_by) == members, handled_by


@asynccontextmanager
async def running(
    url: str,
    topic: str,
    group: str,
    log: Log,
    name: str,
    options: NatsOptions = OPTIONS,
    delay: float = 0.002,
) -> AsyncIterator[tuple[trio_bus.Bus, trio.Event]]:
    """A member in a task of its own; set the event to make it leave (the
    block's end waits until it left)."""
    leave = trio.Event()

    async def run(task_status: trio.TaskStatus[trio_bus.Bus]) -> None:
        async with trio_bus.open_bus(url, transport_options=options) as bus:
            await bus.subscribe(topic, log.handler(name, delay), group=group, start="earliest")
            task_status.started(bus)
            await leave.wait()

    async with trio.open_nursery() as nursery:
        bus = await nursery.start(run)
        try:
            yield bus, leave
        finally:
            leave.set()


@pytest.mark.trio
async def test_member_joins_then_leaves_mid_stream(nats_server: NatsServer) -> None:
    url, topic, group = nats_server.url, uid("t"), uid("g")
    log, published = Log(), defaultdict[str, list[int]](list)
    count = 1200
    async with (
        trio_bus.open_bus(url, transport_options=OPTIONS) as producer,
        trio.open_nursery() as nursery,
        running(url, topic, group, log, "stays", delay=0.005) as (stays, _),
    ):
        nursery.start_soon(publish_stream, producer, topic, count, published, 0.002)
        await wait_for(lambda: len(log.done) >= count // 4)
        # A member joins: the other drains the partitions it gives up.
        async with running(url, topic, group, log, "visits", delay=0.005) as (visits, leave):
            await wait_shared([stays, visits])
            await wait_for(lambda: len(log.done) >= count // 2)
            left_at = time.monotonic()
            leave.set()
            await wait_for(lambda: len(group_of(stays).held) == 8)
            moved = time.monotonic() - left_at
        await wait_for(lambda: len(log.done) >= count)
    check(log, published)
    assert {m for m, *_ in log.calls} == {"stays", "visits"}
    # Given up and taken at once (no lease expiry to wait for).
    print(f"partitions moved {moved:.3f}s after the graceful leave began")
    assert moved < TTL, moved


MEMBER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, trio, trio_bus
    from trio_bus.transports.nats import ConnectOptions, ConsumerOptions, GroupOptions, NatsOptions

    url, topic, group, path, ttl, grace = sys.argv[1:7]
    options = NatsOptions(
        consumer=ConsumerOptions(ack_wait=5.0, idle_heartbeat=0.25, pull_expires=5.0),
        connect=ConnectOptions(ping_interval=1.0, reconnect_time_wait=0.1),
        groups=GroupOptions(lease_ttl=float(ttl), lease_grace=float(grace)),
    )

    async def main():
        out = open(path, "a", buffering=1)

        def note(kind, message):
            line = [kind, message.aggregate_id, int(message.value), time.monotonic()]
            out.write(json.dumps(line) + "\\n")

        async def handle(message):
            if int(message.value) < 0:
                return
            note("s", message)
            await trio.sleep(0.002)
            note("e", message)

        async with trio_bus.open_bus(url, transport_options=options) as bus:
            await bus.subscribe(topic, handle, group=group, start="earliest")
            from trio_bus.transports.nats.group import GroupConsumer
            [g] = [c for c in bus._transport._consumers if isinstance(c, GroupConsumer)]
            while True:
                print("held", *g.held, flush=True)
                await trio.sleep(0.1)

    trio.run(main)
    """
)


def read_member_log(path: Path, log: Log, name: str, killed_at: float) -> None:
    """Calls a subprocess member logged; a call the kill cut off ends at the kill."""
    open_calls: dict[int, tuple[str, float]] = {}
    for line in path.read_text().splitlines():
        try:
            kind, aggregate, value, at = json.loads(line)
        except ValueError:
            continue  # a line cut by SIGKILL
        if kind == "s":
            open_calls[value] = (aggregate, at)
        elif value in open_calls:
            aggregate, start = open_calls.pop(value)
            log.calls.append((name, aggregate, value, start, at))
            log.done.add(value)
    for value, (aggregate, start) in open_calls.items():
        log.calls.append((name, aggregate, value, start, killed_at))  # not done


@pytest.mark.trio
async def test_sigkilled_member_partitions_move_within_the_bound(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, topic, group = nats_server.url, uid("t"), uid("g")
    log, published = Log(), defaultdict[str, list[int]](list)
    path = tmp_path / "victim.log"
    count = 1000
    async with trio_bus.open_bus(url, transport_options=OPTIONS) as producer:
        # The topic's stream exists before the victim subscribes.
        await producer.publish(topic, b"-1", key="warm-up")
        async with (
            trio.open_nursery() as nursery,
            running(url, topic, group, log, "survivor") as (survivor, _),
        ):
            # A child process, read from a thread: the bus stays responsive.
            proc = subprocess.Popen(  # noqa: ASYNC220
                [
                    sys.executable,
                    "-c",
                    MEMBER_SCRIPT,
                    url,
                    topic,
                    group,
                    str(path),
                    str(TTL),
                    str(GRACE),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert proc.stdout is not None
                victim_held: list[str] = []

                def victim_holds() -> None:
                    while True:
                        line = proc.stdout.readline()  # type: ignore[union-attr]
                        if not line:
                            return
                        words = line.split()[1:]
                        if words and len(words) + len(group_of(survivor).held) == 8:
                            victim_held[:] = words
                            return

                with trio.fail_after(WAIT):
                    await trio.to_thread.run_sync(victim_holds)
                nursery.start_soon(publish_stream, producer, topic, count, published, 0.002)
                await wait_for(lambda: path.exists() and path.read_text().count('"e"') >= 100)
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                await wait_for(lambda: len(group_of(survivor).held) == 8)
                failover = time.monotonic() - killed_at
            finally:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            read_member_log(path, log, "victim", killed_at)
            await wait_for(lambda: len(log.done) >= count)
    check(log, published)
    print(f"failover after SIGKILL: {failover:.2f}s (lease_ttl {TTL}s + grace {GRACE}s)")
    assert victim_held
    assert {m for m, *_ in log.calls} == {"survivor", "victim"}
    assert TTL * 0.5 < failover < TTL + GRACE + 1.5, failover


@pytest.mark.trio
async def test_member_cut_off_stops_before_its_lease_expires(nats_server: NatsServer) -> None:
    url, topic, group = nats_server.url, uid("t"), uid("g")
    log, published = Log(), defaultdict[str, list[int]](list)
    count = 800
    async with (
        trio_bus.open_bus(url, transport_options=OPTIONS) as producer,
        trio.open_nursery() as nursery,
    ):
        proxy: FaultProxy = await nursery.start(FaultProxy("127.0.0.1", nats_server.port).run)
        cut_url = f"nats://127.0.0.1:{proxy.port}"
        async with (
            running(url, topic, group, log, "healthy") as (healthy, _),
            running(cut_url, topic, group, log, "cut", delay=0.01) as (cut, _),
        ):
            await wait_shared([healthy, cut])
            cut_group = group_of(cut)
            nursery.start_soon(publish_stream, producer, topic, count, published, 0.002)
            await wait_for(lambda: len(log.done) >= 150)
            proxy.blackhole()
            cut_at = time.monotonic()
            await wait_for(lambda: len(group_of(healthy).held) == 8)
            taken = time.monotonic() - cut_at
            await wait_for(lambda: len(log.done) >= count)
            assert cut_group.lost >= 1  # its leases lapsed
            proxy.heal()
        nursery.cancel_scope.cancel()
    check(log, published)
    # The cut-off member started nothing once its last lease could have run out.
    last_cut_start = max(start for m, _, _, start, _ in log.calls if m == "cut")
    assert last_cut_start < cut_at + TTL
    print(f"partitions of the cut-off member taken after {taken:.2f}s")
    # Not before the cut-off member's lease (renewed at most TTL / 3 before
    # the cut) plus the grace ran out; well within the bound.
    assert TTL + GRACE - TTL / 3 - 0.1 < taken < TTL + GRACE + 2.5, taken


@pytest.mark.trio
async def test_lease_machinery_failure_ends_the_bus(nats_server: NatsServer) -> None:
    url, topic, group = nats_server.url, uid("t"), uid("g")
    log = Log()

    async def refused(writes: Any) -> list[Exception]:
        return [TopicConfigError("the bucket refuses us") for _ in writes]

    with pytest.raises(TransportError, match="refuses us"):
        async with member(url, topic, group, log, "m") as bus:
            consumer = group_of(bus)
            consumer.scope.write = refused  # what the next round sends is refused
            consumer.poke()
            await trio.sleep(WAIT)
