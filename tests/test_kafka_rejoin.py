"""A Kafka group of three survives one member's SIGKILL and restart: the
other members complete their own rejoin, and no partition is handled in
two members at once (a member must stop handling partitions that were
reassigned before their new owner starts them).

Members A and B are buses in this process (their group state can be
inspected); member C is a fault-suite consumer process (tests/faults/worker)
that is SIGKILLed and started again. Handler intervals of all of them are
taken on CLOCK_MONOTONIC (``time.monotonic_ns``), which the worker's event
log uses too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import trio

import trio_bus
from trio_bus.transports.kafka import KafkaTransport
from trio_bus.transports.kafka.group import Group

from ._kafka_broker import KafkaBroker
from .faults.events import read_events

REPO = Path(__file__).resolve().parents[1]
WAIT = 60.0
PARTITIONS = 8  # the transport's default partition count


def _group(bus: trio_bus.Bus, name: str) -> Group:
    transport = bus.transport
    assert isinstance(transport, KafkaTransport)
    return transport.groups[name]


async def _until(condition: object, what: str, timeout: float = WAIT) -> None:
    assert callable(condition)
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.05)  # polling a condition, not synchronising on time
    assert condition(), what


def _rejoining(group: Group) -> bool:
    """Whether aiokafka's coordinator still owes the group a rejoin."""
    consumer = group.consumer
    return bool(consumer._coordinator.need_rejoin(consumer._subscription.subscription))


def _state(groups: dict[str, Group]) -> str:
    return "; ".join(
        f"{name}: gen {g.consumer._coordinator.generation} rejoining {_rejoining(g)} "
        f"owns {sorted(tp.partition for tp in g.tracks)}"
        for name, g in groups.items()
    )


class Member:
    """A worker process of the fault suite in the group."""

    def __init__(self, url: str, topic: str, group: str, log: Path, proc: str) -> None:
        cmd = [sys.executable, "-m", "tests.faults.worker", "consume", url, topic, str(log)]
        cmd += ["--proc", proc, "--group", group, "--work-ms", "2", "--trap-sigterm"]
        self.proc, self.log = proc, log
        with log.with_suffix(f".{proc}.out").open("ab") as out:
            self.process = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def events(self, ev: str) -> list[dict[str, object]]:
        return [e for e in read_events(self.log) if e["ev"] == ev and e["proc"] == self.proc]


async def test_survivors_complete_their_rejoin_after_a_member_restarts(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    url = kafka_broker.url
    tag = uuid.uuid4().hex[:8]
    topic, group = f"rejoin-{tag}", f"rejoin-{tag}"
    # partition -> (start, end) intervals per member, monotonic ns
    spans: dict[str, list[tuple[int, int, int]]] = {"a": [], "b": []}

    def handler(name: str) -> object:
        async def handle(message: trio_bus.Message) -> None:
            start = time.monotonic_ns()
            await trio.sleep(0.002)
            spans[name].append((message.partition or 0, start, time.monotonic_ns()))

        return handle

    log = tmp_path / "c.log"
    members: list[Member] = []
    try:
        async with AsyncExitStack() as stack:
            buses = {}
            for name in ("a", "b"):
                bus = await stack.enter_async_context(
                    trio_bus.open_bus(url, client_id=f"{group}-{name}", shutdown_grace=1.0)
                )
                await bus.subscribe(topic, handler(name), group=group, start="earliest")  # type: ignore[arg-type]
                buses[name] = bus
            groups = {name: _group(bus, group) for name, bus in buses.items()}

            async def publish() -> None:
                i = 0
                while True:
                    agg = f"k{i % 40}"
                    body = json.dumps({"agg": agg, "seq": i // 40}).encode()
                    await buses["a"].publish(topic, body, key=agg)
                    i += 1
                    await trio.sleep(0.005)  # pacing the load

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish)
                members.append(Member(url, topic, group, log, "c1"))
                await _until(lambda: members[0].events("start"), "c1 handles part of the topic")
                killed_at = time.monotonic_ns()
                members[0].process.kill()
                members[0].process.wait()
                members.append(Member(url, topic, group, log, "c2"))
                await _until(lambda: members[1].events("ready"), "c2 is live")
                await _until(lambda: members[1].events("start"), "c2 handles part of the topic")
                ready_at = int(members[1].events("ready")[0]["t"])  # type: ignore[call-overload]

                # The survivors complete their own rejoin: one generation for all,
                # disjoint assignments that leave c2 its share.
                def settled() -> bool:
                    gens = {g.consumer._coordinator.generation for g in groups.values()}
                    owned = [set(g.tracks) for g in groups.values()]
                    return (
                        len(gens) == 1
                        and not any(_rejoining(g) for g in groups.values())
                        and not (owned[0] & owned[1])
                        and len(owned[0] | owned[1]) < PARTITIONS
                    )

                await _until(settled, "A and B completed their rejoin after c2 joined")
                # Let the settled group run a little, then stop publishing.
                mark = time.monotonic_ns()
                await _until(
                    lambda: sum(int(e["t"]) > mark for e in members[1].events("end")) >= 20,  # type: ignore[call-overload]
                    f"c2 goes on handling {_state(groups)}",
                )
                nursery.cancel_scope.cancel()
    finally:
        for member in members:
            if member.process.poll() is None:
                member.process.kill()
                member.process.wait()

    # No partition handled in two members at once. c1's calls that never
    # ended were cut by the SIGKILL.
    intervals: list[tuple[int, int, int, str]] = [
        (p, s, e, name) for name, calls in spans.items() for p, s, e in calls
    ]
    for m in members:
        opened: dict[tuple[object, object], tuple[int, int]] = {}
        for ev in read_events(m.log):
            if ev["proc"] != m.proc or ev["ev"] not in ("start", "end"):
                continue
            key = (ev["agg"], ev["seq"])
            if ev["ev"] == "start":
                opened[key] = (int(ev["partition"]), int(ev["t"]))
            elif key in opened:
                p, s = opened.pop(key)
                intervals.append((p, s, int(ev["t"]), m.proc))
        end = killed_at if m.proc == "c1" else time.monotonic_ns()
        intervals.extend((p, s, end, m.proc) for p, s in opened.values())
    overlaps = []
    for partition in range(PARTITIONS):
        calls = sorted(i for i in intervals if i[0] == partition)
        busy, owner = -1, ""
        for _, s, e, who in calls:
            if s < busy and who != owner:
                overlaps.append((partition, who, owner, (busy - s) / 1e6))
            if e > busy:
                busy, owner = e, who
    assert not overlaps, overlaps[:10]
    assert ready_at > killed_at
