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

import attrs
import pytest
import trio

import trio_bus
from trio_bus import Message
from trio_bus._names import stable_hash
from trio_bus.errors import ConfigError
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
            try:
                if delay:
                    await trio.sleep(delay)
            finally:
                pass
            end = time.monotonic()
            value = int(message.value)
            assert message.aggregate_id is not None
            self.calls.append((member, message.aggregate_id, value, start, end))
            self.done.add(value)

        return handle

    def add_lines(self, path: Path, member: str) -> None:
        """Calls a subprocess member logged (one JSON list per line)."""
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            try:
                aggregate, value, start, end = json.loads(line)
            except ValueError:
                continue  # a line cut by SIGKILL
            self.calls.append((member, aggregate, value, start, end))
            self.done.add(value)


def check(log: Log, published: dict[str, list[int]]) -> None:
    """No overlap per aggregate; first handlings in publish order; all handled."""
    by_aggregate: dict[str, list[tuple[float, float, str, int]]] = defaultdict(list)
    for member, aggregate, value, start, end in log.calls:
        by_aggregate[aggregate].append((start, end, member, value))
    for aggregate, calls in by_aggregate.items():
        calls.sort()
        for (s1, e1, m1, v1), (s2, _, m2, v2) in zip(calls, calls[1:], strict=False):
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


async def publish_stream(
    bus: trio_bus.Bus, topic: str, count: int, published: dict[str, list[int]], pace: float = 0.0
) -> None:
    """Publish *count* messages over AGGREGATES aggregates, in order per
    aggregate (one publisher)."""
    for value in range(count):
        aggregate = f"agg-{value % AGGREGATES}"
        await bus.publish(topic, str(value).encode(), key=aggregate)
        published[aggregate].append(value)
        if pace:
            await trio.sleep(pace)


async def wait_for(condition, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def group_of(bus: trio_bus.Bus):  # type: ignore[no-untyped-def]
    """The GroupConsumer of a bus's only group subscription."""
    from trio_bus.transports.nats.group import GroupConsumer

    transport = bus._transport  # noqa: SLF001 - the test looks at the member
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
    members = ["m1", "m2", "m3"]
    owners = assign(members, 64)
    assert owners == assign(list(reversed(members)), 64)
    counts = {m: list(owners.values()).count(m) for m in members}
    assert all(10 <= n <= 35 for n in counts.values()), counts
    # Removing a member moves only its partitions.
    after = assign(["m1", "m3"], 64)
    for p, owner in owners.items():
        if owner != "m2":
            assert after[p] == owner
    # Adding one takes partitions only to itself.
    grown = assign([*members, "m4"], 64)
    for p, owner in grown.items():
        assert owner in (owners[p], "m4")
    assert assign([], 4) == {}


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
    """Until the members hold every partition between them, each some."""
    await wait_for(lambda: sum(len(group_of(b).held) for b in buses) == 8)
    await wait_for(lambda: all(group_of(b).held for b in buses))


@pytest.mark.trio
@pytest.mark.parametrize("members", [2, 3])
async def test_members_share_without_overlap(nats_server: NatsServer, members: int) -> None:
    url, topic, group = nats_server.url, uid("t"), uid("g")
    log, published = Log(), defaultdict(list)
    count = 1000
    async with AsyncExitStack() as stack:
        producer = await stack.enter_async_context(trio_bus.open_bus(url, transport_options=OPTIONS))
        buses = [
            await stack.enter_async_context(member(url, topic, group, log, f"m{i}"))
            for i in range(members)
        ]
        # Every member holds its share before the stream starts.
        await wait_shared(buses)
        held = [group_of(b).held for b in buses]
        await publish_stream(producer, topic, count, published)
        await wait_for(lambda: len(log.done) >= count)
    check(log, published)
    assert sorted(p for h in held for p in h) == list(range(8))
    handled_by = {m for m, *_ in log.calls}
    assert len(handled_by) == members, handled_by
