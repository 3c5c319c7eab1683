"""The Kafka partition fence against a real broker (Tansu), in one process.

Two buses share a group. Member A's heartbeats stop (its coordinator's
heartbeat request hangs, as if the process were frozen or cut off from the
coordinator while its fetches still work); the broker expires it after the
session timeout and member B takes A's partition over. The fence must make
A's running handlers end -- cancelled at their ``await`` -- at its lease's
expiry, before B starts the same records, commit nothing for them, and start
no handler for records A still fetches afterwards.

(The multi-process SIGSTOP/SIGCONT test is in tests/faults.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiokafka
import trio
import trio.testing

import trio_bus
from trio_bus.transports.kafka import KafkaOptions, KafkaTransport, TopicConfig
from trio_bus.transports.kafka.fence import Fence
from trio_bus.transports.kafka.group import Group

from ._kafka_broker import KafkaBroker

WAIT = 60.0
#: The test URL's session timeout (KAFKA_URL_PARAMS), seconds.
SESSION = 2.0
#: Scheduling slack allowed on top of the lease bound (2 busy cores).
SLACK = 0.5


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _group(bus: trio_bus.Bus, name: str) -> Group:
    transport = bus.transport
    assert isinstance(transport, KafkaTransport)
    return transport.groups[name]


async def _wait_for(condition: Any, what: str, timeout: float = WAIT) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)  # polling a condition, not synchronising on time
    assert condition(), what


async def _committed(url: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """The group's committed offsets, read through the broker by a client
    of its own (on a loop of its own: no state shared with the buses)."""

    async def read() -> dict[int, int | None]:
        hosts = url.split("//", 1)[1].split("?", 1)[0]
        client = aiokafka.AIOKafkaConsumer(bootstrap_servers=hosts, group_id=group)
        await client.start()
        try:
            tps = [aiokafka.TopicPartition(topic, p) for p in range(partitions)]
            return {tp.partition: await client.committed(tp) for tp in tps}
        finally:
            await client.stop()

    return await trio.to_thread.run_sync(lambda: asyncio.run(read()))


@asynccontextmanager
async def _member(url: str, name: str) -> AsyncIterator[trio_bus.Bus]:
    options = KafkaOptions(topic=TopicConfig(partitions=2))
    async with trio_bus.open_bus(
        url, client_id=name, transport_options=options, shutdown_grace=1.0
    ) as bus:
        yield bus


async def test_a_member_whose_heartbeats_stop_is_fenced_before_takeover(
    kafka_broker: KafkaBroker,
) -> None:
    topic, group = _name("fence"), _name("g")
    url = kafka_broker.url
    a_started: dict[tuple[int, int], float] = {}
    a_cancelled: dict[tuple[int, int], float] = {}
    a_after_await: list[tuple[int, int]] = []
    b_started: dict[tuple[int, int], float] = {}
    b_may_finish = trio.Event()
    never = trio.Event()

    async def on_a(message: trio_bus.Message) -> None:
        assert message.partition is not None
        where = (message.partition, message.offset)
        a_started[where] = trio.current_time()
        try:
            await never.wait()  # a handler stuck at an await
        except trio.Cancelled:
            a_cancelled[where] = trio.current_time()
            raise
        a_after_await.append(where)  # never reached

    async def on_b(message: trio_bus.Message) -> None:
        assert message.partition is not None
        where = (message.partition, message.offset)
        b_started.setdefault(where, trio.current_time())
        if where in a_started:
            await b_may_finish.wait()  # hold it until the commit check below

    async with AsyncExitStack() as stack:
        bus_a = await stack.enter_async_context(_member(url, _name("a")))
        bus_b = await stack.enter_async_context(_member(url, _name("b")))
        await bus_a.subscribe(topic, on_a, group=group)
        await bus_b.subscribe(topic, on_b, group=group)
        group_a, group_b = _group(bus_a, group), _group(bus_b, group)
        await _wait_for(
            lambda: len(group_a.tracks) == len(group_b.tracks) == 1,
            "each member owns one partition",
        )
        (a_partition,) = {tp.partition for tp in group_a.tracks}
        await bus_a.publish_many(
            trio_bus.OutgoingMessage(topic=topic, value=b"x", key=f"k{i}") for i in range(20)
        )
        await _wait_for(lambda: bool(a_started), "A handles records of its partition")
        assert all(p == a_partition for p, _ in a_started)

        # A's heartbeats stop: the next heartbeat request never returns.
        coordinator = group_a.consumer._coordinator

        async def hang() -> bool:
            await asyncio.get_running_loop().create_future()
            raise AssertionError("unreachable")

        coordinator._do_heartbeat = hang
        frozen_at = trio.current_time()
        # The last renewal can come from a heartbeat sent just before.
        bound = frozen_at + group_a.options.heartbeat_interval_ms / 1000 + SESSION

        await _wait_for(lambda: set(a_cancelled) >= set(a_started), "A's handlers are cancelled")
        assert a_after_await == []
        assert max(a_cancelled.values()) <= bound + SLACK
        assert all(not lease.held() for lease in group_a.fence.leases.values())

        # B takes the partition over and gets every record A had started...
        await _wait_for(lambda: set(b_started) >= set(a_started), "B takes A's records over")
        for where, cancelled in a_cancelled.items():
            assert b_started[where] > cancelled, (where, cancelled, b_started[where])
        # ...because A committed none of them (B holds them unfinished).
        committed = await _committed(url, group, topic, 2)
        assert (committed[a_partition] or 0) <= min(o for _, o in a_started)
        b_may_finish.set()

        # A still fetches the partition it believes it owns, but starts no
        # handler for it: its lease is void.
        count = len(a_started)
        await bus_b.publish_many(
            trio_bus.OutgoingMessage(topic=topic, value=b"y", key=f"k{i}") for i in range(20)
        )
        await _wait_for(
            lambda: sum(1 for p, _ in b_started if p == a_partition) >= count + 1,
            "B handles new records of the partition",
        )
        assert len(a_started) == count
        assert all(t <= bound + SLACK for t in a_started.values())


# -- the fence's rules, on a fake coordinator (pure logic, MockClock) --------


class _Request:
    def __init__(self, api_key: int) -> None:
        self.API_KEY = api_key


class _Response:
    def __init__(self, error_code: int) -> None:
        self.error_code = error_code


class _Coordinator:
    """Answers every request after ``delay`` seconds with ``code``; records
    whether the fence's leases were held when a request was sent."""

    def __init__(self, fence: Fence) -> None:
        self.code = 0
        self.delay = 0.5
        self.held_at_send: list[bool] = []
        self.rejoins = 0
        self._fence = fence

    def request_rejoin(self) -> None:
        self.rejoins += 1

    async def _send_req(self, request: _Request) -> _Response:
        self.held_at_send.append(all(lease.held() for lease in self._fence.leases.values()))
        await trio.sleep(self.delay)
        return _Response(self.code)


HEARTBEAT, SYNC_GROUP, LEAVE_GROUP = 12, 14, 13


async def test_fence_rules(autojump_clock: trio.testing.MockClock) -> None:
    fence = Fence("g", session_timeout=10.0, rebalance_timeout=13.0, margin=1.0)
    coordinator = _Coordinator(fence)
    fence.install(coordinator)
    send = coordinator._send_req
    tp = aiokafka.TopicPartition("t", 0)
    t0 = trio.current_time()

    # A new assignment's leases run from the SyncGroup's send time.
    await send(_Request(SYNC_GROUP))
    fence.grant([tp])
    lease = fence.leases[tp]
    assert lease.expires == t0 + 10.0 - 1.0  # sent at t0, answered at t0 + 0.5

    # An answered heartbeat renews from its send time, not its answer.
    await trio.sleep(2.0)
    sent = trio.current_time()
    await send(_Request(HEARTBEAT))
    assert lease.expires == sent + 9.0

    # An unanswered (failed) heartbeat renews nothing.
    coordinator.code = 7  # REQUEST_TIMED_OUT
    await send(_Request(HEARTBEAT))
    assert lease.expires == sent + 9.0

    # REBALANCE_IN_PROGRESS: at most the rebalance timeout after the last
    # stable answer's send time.
    coordinator.code = 27
    await trio.sleep(7.0)  # answered just before the lease would lapse
    await send(_Request(HEARTBEAT))
    assert lease.expires == sent + 13.0 - 1.0

    # The member is gone: leases void now, and a running call is cancelled.
    scope = trio.CancelScope()
    lease.enter(scope)
    coordinator.code = 25  # UNKNOWN_MEMBER_ID
    await send(_Request(HEARTBEAT))
    assert lease.revoked
    assert scope.cancel_called
    assert not fence.held(tp)
    lease.exit(scope)
    # ...and records fetched meanwhile carry the void lease, not none.
    assert fence.leases[tp] is lease

    # A new generation: fresh leases; LeaveGroup voids them before it is sent.
    coordinator.code = 0
    await send(_Request(SYNC_GROUP))
    fence.grant([tp])
    assert fence.held(tp)
    assert fence.leases[tp] is not lease
    await send(_Request(LEAVE_GROUP))
    assert coordinator.held_at_send[-1] is False
    assert not fence.held(tp)


async def test_a_lapsed_lease_is_not_revived_the_member_rejoins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A heartbeat answered after the lease had lapsed (a loaded machine):
    # the pool may have handed deliveries back meanwhile, so the lease stays
    # void and the member rejoins (new leases, committed positions) instead.
    fence = Fence("g", session_timeout=10.0, rebalance_timeout=13.0, margin=1.0)
    coordinator = _Coordinator(fence)
    fence.install(coordinator)
    tp = aiokafka.TopicPartition("t", 0)
    await coordinator._send_req(_Request(SYNC_GROUP))  # through the fence's wrapper
    fence.grant([tp])
    lease = fence.leases[tp]
    coordinator.delay = 12.0  # the answer comes after the lease expired
    await coordinator._send_req(_Request(HEARTBEAT))
    assert lease.revoked
    assert not fence.held(tp)
    assert coordinator.rejoins == 1
    assert fence.lapses == 1
    # An answer in time after that renews nothing void and asks no more.
    coordinator.delay = 0.5
    await coordinator._send_req(_Request(HEARTBEAT))
    assert coordinator.rejoins == 1
    # The rejoin's new assignment brings a fresh, held lease.
    await coordinator._send_req(_Request(SYNC_GROUP))
    fence.grant([tp])
    assert fence.held(tp)
    assert fence.leases[tp] is not lease
