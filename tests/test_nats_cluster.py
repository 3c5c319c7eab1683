"""The NATS transport on a real 3-node JetStream cluster (three
nats-server processes, routed on loopback): SIGKILL of a stream's leader
mid-stream loses no acked publish and needs no user action; replicas and
placement are sent to and checked against the servers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from typing import Any

import nats
import pytest
import trio

import trio_bus
from trio_bus.errors import ConfigError, TopicConfigError, TransportError
from trio_bus.testing import NatsCluster
from trio_bus.transports.nats import NatsOptions, Placement, StreamOptions, stream_name

from .helpers import Recorder

MESSAGES = 3_000
AGGREGATES = 30
#: Acked publishes before the leader is killed: mid-stream.
KILL_AFTER = 1_000
#: Bound on the whole leader-kill test, restart included (the election
#: alone takes 4-9 s; the whole test took 12-18 s on 2 cores).
TEST_BOUND = 50.0

logger = logging.getLogger(__name__)


def cluster_options(**stream: Any) -> NatsOptions:
    return NatsOptions(stream=StreamOptions(**stream))


async def read_back(url: str, topic: str) -> list[bytes]:
    """Every message stored under *topic*, read by a plain nats-py client
    on an asyncio loop of its own (in a thread), not through trio_bus."""

    async def read() -> list[bytes]:
        nc = await nats.connect(url.replace("nats://", "").split(","), connect_timeout=2)
        try:
            js = nc.jetstream(timeout=5)
            state = (await js.stream_info(stream_name(topic))).state
            got: list[bytes] = []
            seqs = list(range(state.first_seq, state.last_seq + 1))
            for at in range(0, len(seqs), 200):  # a few hundred requests in flight
                chunk = seqs[at : at + 200]
                msgs = await asyncio.gather(*(js.get_msg(stream_name(topic), s) for s in chunk))
                got += [msg.data or b"" for msg in msgs]
            return got
        finally:
            await nc.close()

    return await trio.to_thread.run_sync(asyncio.run, read())


async def in_thread(fn: Any, *args: Any) -> Any:
    """A blocking NatsCluster helper, off the Trio thread."""
    return await trio.to_thread.run_sync(fn, *args)


async def test_stream_leader_sigkill_loses_no_acked_publish(nats_cluster: NatsCluster) -> None:
    topic = f"cl-{uuid.uuid4().hex[:10]}"
    stream = stream_name(topic)
    acked: set[int] = set()
    handled: Recorder[int] = Recorder()
    running: set[str] = set()
    overlaps: list[str] = []
    publish_errors: list[str] = []
    killed_at: list[float] = []
    elected_after: list[float] = []
    first_ack_after_kill: list[float] = []
    first_handled_after_kill: list[float] = []
    published_after_kill: set[int] = set()

    async def handler(message: trio_bus.Message) -> None:
        aggregate = message.aggregate_id or "?"
        if aggregate in running:
            overlaps.append(aggregate)
        running.add(aggregate)
        try:
            await trio.lowlevel.checkpoint()  # let a second call overlap, if it could
            seq = int(message.value)
            if killed_at and seq in published_after_kill and not first_handled_after_kill:
                first_handled_after_kill.append(trio.current_time() - killed_at[0])
            handled.add(seq)
        finally:
            running.discard(aggregate)

    async def publish_aggregate(bus: trio_bus.Bus, a: int) -> None:
        for seq in range(a, MESSAGES, AGGREGATES):
            after_kill = bool(killed_at)
            if after_kill:
                published_after_kill.add(seq)
            try:
                await bus.publish(topic, str(seq).encode(), key=f"agg-{a}")
            except TransportError as exc:  # not acked: may or may not be stored
                publish_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            acked.add(seq)
            if after_kill and not first_ack_after_kill:
                first_ack_after_kill.append(trio.current_time() - killed_at[0])

    async def kill_leader() -> str:
        await handled.wait_until(lambda: len(acked) >= KILL_AFTER)
        leader: str = await in_thread(nats_cluster.stream_leader, stream)
        assert leader, "no stream leader before the kill"
        await in_thread(nats_cluster.kill, leader, signal.SIGKILL)
        killed_at.append(trio.current_time())
        # How long the servers take to elect a new leader (for the docs).
        while await in_thread(nats_cluster.stream_leader, stream) in ("", leader):
            await trio.sleep(0.1)  # polling the servers: no event to wait on
        elected_after.append(trio.current_time() - killed_at[0])
        return leader

    deadline = trio.current_time() + TEST_BOUND
    with trio.fail_at(deadline):
        async with trio_bus.open_bus(
            nats_cluster.url,
            client_id=f"c-{uuid.uuid4().hex[:8]}",
            transport_options=cluster_options(replicas=3),
        ) as bus:
            await bus.subscribe(topic, handler, start="earliest")
            assert await in_thread(nats_cluster.current_replicas, stream) == 3
            leader_box: list[str] = []
            async with trio.open_nursery() as nursery:
                for a in range(AGGREGATES):
                    nursery.start_soon(publish_aggregate, bus, a)

                async def killer() -> None:
                    leader_box.append(await kill_leader())

                nursery.start_soon(killer)
            old_leader = leader_box[0]
            # Every acked publish is handled at least once, without any
            # action from us.
            await handled.wait_until(lambda: acked <= set(handled.items), timeout=30)
        new_leader = await in_thread(nats_cluster.stream_leader, stream)
        stored = {int(v) for v in await read_back(nats_cluster.url, topic)}

    logger.warning(
        "leader %s killed: new leader elected after %.2f s; %d/%d publishes acked (%d "
        "failed: %s); first ack after the kill %.2f s, first post-kill message handled "
        "%.2f s; new leader %s; %d handler calls for %d distinct messages",
        old_leader,
        elected_after[0],
        len(acked),
        MESSAGES,
        len(publish_errors),
        sorted(set(publish_errors))[:3],
        first_ack_after_kill[0] if first_ack_after_kill else -1,
        first_handled_after_kill[0] if first_handled_after_kill else -1,
        new_leader,
        len(handled.items),
        len(set(handled.items)),
    )
    assert len(acked) > KILL_AFTER
    assert acked <= set(handled.items)
    assert not overlaps, f"handler calls of one aggregate overlapped: {overlaps[:5]}"
    assert acked <= stored, f"acked but not stored: {sorted(acked - stored)[:10]}"
    assert new_leader, "no stream leader after the kill"
    assert new_leader != old_leader
    assert first_ack_after_kill, "no publish acked after the kill"

    # The killed node comes back with its store and catches up, all within
    # the test's bound.
    await in_thread(nats_cluster.restart, old_leader, deadline - trio.current_time())
    with trio.fail_at(deadline):
        while await in_thread(nats_cluster.current_replicas, stream) < 3:
            await trio.sleep(0.1)  # polling the servers: no event to wait on


async def ignore(message: trio_bus.Message) -> None:
    await trio.lowlevel.checkpoint()


async def test_more_replicas_than_servers_is_a_topic_config_error(
    nats_cluster: NatsCluster,
) -> None:
    with trio.fail_after(20):
        async with trio_bus.open_bus(
            nats_cluster.url, client_id="r5", transport_options=cluster_options(replicas=5)
        ) as bus:
            with pytest.raises(TopicConfigError, match="replicas=5"):
                await bus.subscribe(f"cl-{uuid.uuid4().hex[:10]}", ignore)


async def test_placement_is_sent_and_checked(
    nats_cluster: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"cl-{uuid.uuid4().hex[:10]}"
    here = Placement(cluster="trio-bus-test")
    with trio.fail_after(20):
        async with trio_bus.open_bus(
            nats_cluster.url,
            client_id="pl",
            transport_options=cluster_options(replicas=3, placement=here),
        ) as bus:
            await bus.publish(topic, b"x")
        info = await in_thread(nats_cluster.stream_info, stream_name(topic))
        assert info["config"]["placement"] == {"cluster": "trio-bus-test"}
        assert info["config"]["num_replicas"] == 3

        # Elsewhere: no server matches a new stream...
        nowhere = cluster_options(replicas=1, placement=Placement(tags=("ssd",)))
        async with trio_bus.open_bus(
            nats_cluster.url, client_id="pl", transport_options=nowhere
        ) as bus:
            with pytest.raises(TopicConfigError, match="tags not matched"):
                await bus.subscribe(f"cl-{uuid.uuid4().hex[:10]}", ignore)

        # ... and an existing stream placed differently is a mismatch.
        strict = NatsOptions(
            stream=StreamOptions(replicas=3, placement=Placement(cluster="other")),
            on_mismatch="fail",
        )
        async with trio_bus.open_bus(
            nats_cluster.url, client_id="pl", transport_options=strict
        ) as bus:
            with pytest.raises(TopicConfigError, match="placement: wanted"):
                await bus.subscribe(topic, ignore)


async def test_replicas_on_a_single_server_is_a_topic_config_error(nats_bus_url: str) -> None:
    with trio.fail_after(20):
        async with trio_bus.open_bus(
            nats_bus_url, client_id="r3", transport_options=cluster_options(replicas=3)
        ) as bus:
            with pytest.raises(TopicConfigError, match="non-clustered"):
                await bus.subscribe(f"cl-{uuid.uuid4().hex[:10]}", ignore)


def test_placement_validation() -> None:
    assert Placement(tags=["ssd", "eu"]).tags == ("ssd", "eu")
    with pytest.raises(ConfigError):
        Placement()
    with pytest.raises(ConfigError):
        Placement(tags="ssd")
    with pytest.raises(ConfigError):
        StreamOptions(placement="east")  # type: ignore[arg-type]
