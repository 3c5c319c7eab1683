"""The transport contract: one pytest suite every transport runs on itself.

The rules are numbered in :mod:`trio_bus.transports._base`; each test's name
starts with its rule's number (``test_r05_fetch_is_cancel_atomic``). The
suite reaches a transport only through that interface, so a third-party
transport proves itself as the built-in ones do (the model: Watermill's
``TestPubSub``, trio's ``check_one_way_stream``): subclass
:class:`TransportContract` in a ``Test*`` class with a ``contract_target``
fixture returning a :class:`ContractTarget` (example in docs/transports.md).

Every test uses fresh topics and groups, so one broker serves a session.
Waits are bounded by ``ContractTarget.wait``; nothing sleeps to synchronise:
a "nothing more" check publishes a sentinel and fetches up to it (a lane is
ordered, so anything extra shows up before it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import ClassVar

import pytest
import trio

from .._message import Record
from ..errors import BusClosedError
from ..transports._base import Consumer
from ._contract_support import (
    Capabilities,
    ContractTarget,
    _b,
    _Case,
    _clear_frames,
    _collect_leaks,
    _task_count,
    _uid,
    _values,
    contract_settings,
)

__all__ = ["Capabilities", "ContractTarget", "TransportContract", "contract_settings"]


class TransportContract:
    """The contract suite; subclass it in a ``Test*`` class providing a
    ``contract_target`` fixture that returns a :class:`ContractTarget`."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.trio]

    @pytest.fixture(autouse=True)
    def _contract_checks(
        self, request: pytest.FixtureRequest, contract_target: ContractTarget
    ) -> Iterator[None]:
        name = getattr(request.node, "originalname", request.node.name)
        reason = contract_target.known_defects.get(name)
        if reason is not None:
            run = name not in contract_target.not_run
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason, run=run))
        _collect_leaks()  # what earlier tests left is not this test's doing
        yield
        # The trio run is over: what the transport left unclosed is garbage
        # now, unless a failure's traceback (kept by pytest in sys.last_*)
        # holds it; free that too, so a leak is reported here, not later.
        _clear_frames(getattr(sys, "last_value", None))
        leaks = _collect_leaks()
        if leaks:
            pytest.fail(f"left unclosed: {leaks}", pytrace=False)

    async def test_r01_publish_outcomes(self, contract_target: ContractTarget) -> None:
        case = _Case(contract_target)
        async with case.transport() as transport:
            assert list(await transport.publish_batch([])) == []
            outcomes = await transport.publish_batch(case.msgs(0, 1, 2))
            assert list(outcomes) == [None, None, None]
            consumer = await transport.open_consumer(case.spec(_uid("g"), "earliest"))
            assert _values(await case.fetch_to(consumer, 2)) == _b(0, 1, 2)
            await consumer.aclose()

    async def test_r02_lanes_keep_publish_order(self, contract_target: ContractTarget) -> None:
        case = _Case(contract_target)
        async with case.transport() as transport:
            consumer = await transport.open_consumer(case.spec(_uid("g")))
            await case.publish(transport, *range(8), keys=3)
            await case.publish(transport, *range(8, 16), keys=3)
            got = await case.fetch(consumer, lambda got: len(got) >= 16, max_records=3)
            assert sorted(int(v) for v in _values(got)) == list(range(16))
            if not contract_target.capabilities.partitions:
                assert _values(got) == _b(*range(16))
            lanes: dict[object, list[int]] = {}
            for record in got:
                lanes.setdefault(record.partition, []).append(int(record.value))
            for lane in lanes.values():
                assert lane == sorted(lane), lanes
            # One key, one lane: label i was published with key k{i % 3}.
            lane_of_key = {(int(r.value) % 3, r.partition) for r in got}
            assert len(lane_of_key) == 3, lane_of_key
            await consumer.aclose()

    async def test_r03_new_group_start_positions(self, contract_target: ContractTarget) -> None:
        case = _Case(contract_target)
        async with case.transport() as transport:
            # One record per batch: Tansu misreports a batch's end offset.
            await case.publish(transport, "old0")
            await case.publish(transport, "old1")
            latest = await transport.open_consumer(case.spec(_uid("g"), "latest"))
            earliest = await transport.open_consumer(case.spec(_uid("g"), "earliest"))
            await case.publish(transport, "new")
            assert _values(await case.fetch_to(latest, "new")) == _b("new")
            assert _values(await case.fetch_to(earliest, "new")) == _b("old0", "old1", "new")
            await latest.aclose()
            await earliest.aclose()

    async def test_r04_existing_group_resumes(self, contract_target: ContractTarget) -> None:
        case, group = _Case(contract_target), _uid("g")
        async with case.transport() as transport:
            consumer = await transport.open_consumer(case.spec(group, "earliest"))
            await case.publish(transport, 0, 1, 2)
            r0, r1, _ = await case.fetch_to(consumer, 2, ack=False)
            consumer.ack(r0)
            consumer.ack(r1)
            await consumer.aclose()
            await case.publish(transport, 3)
        async with case.transport() as transport:
            # "latest" is for new groups: this one resumes after its acks.
            consumer = await transport.open_consumer(case.spec(group, "latest"))
            assert _values(await case.fetch_to(consumer, 3)) == _b(2, 3)
            await consumer.aclose()
        async with case.transport() as transport:
            consumer = await transport.open_consumer(case.spec(group, "earliest"))
            await case.publish(transport, 4)
            assert _values(await case.fetch_to(consumer, 4)) == _b(4)
            await consumer.aclose()

    async def test_r05_fetch_is_cancel_atomic(self, contract_target: ContractTarget) -> None:
        case = _Case(contract_target)
        async with case.transport() as transport:
            consumer = await transport.open_consumer(case.spec(_uid("g")))
            # More than the rounds below can take: each round finds records.
            await case.publish(transport, *range(24))
            got: list[Record] = []
            # Each round takes one record, so more wait in the transport;
            # then fetches cancelled before the call (None) and at deadlines
            # landing anywhere in it. Each returns records or takes none.
            for _ in range(4):
                got += await case.fetch(consumer, bool, max_records=1)
                for delay in (None, None, 0.0, 0.0005, 0.005):
                    with trio.move_on_after(delay or 0.0) as scope:
                        if delay is None:
                            scope.cancel()
                        got += await case.fetch(consumer, bool, max_records=1)
            await case.publish(transport, "end")
            got += await case.fetch_to(consumer, "end")
            assert _values(got) == _b(*range(24), "end")
            if contract_target.capabilities.delivery_count:
                assert {r.delivery_count for r in got} == {1}
            await consumer.aclose()

    async def test_r06_settling_twice_changes_nothing(
        self, contract_target: ContractTarget
    ) -> None:
        case, group = _Case(contract_target), _uid("g")
        async with case.transport() as transport:
            consumer = await transport.open_consumer(case.spec(group))
            await case.publish(transport, 0, 1, 2)
            r0, r1, r2 = await case.fetch_to(consumer, 2, ack=False)
            consumer.ack(r0)
            consumer.ack(r0)
            consumer.release(r0)  # after ack: too late, ignored
            consumer.release(r1)
            consumer.release(r1)  # one redelivery, not two
            consumer.ack(r2)
            consumer.release(r2)
            await consumer.flush()  # order after release is rule 7's matter
            await case.publish(transport, "end")
            again = await case.fetch_to(consumer, "end")
            if contract_target.capabilities.per_message_ack:
                assert _values(again) == _b(1, "end")
            else:
                assert _values(again) == _b(1, 2, "end")
            case.redelivered(again[0])
            await consumer.aclose()
        async with case.transport() as transport:
            consumer = await transport.open_consumer(case.spec(group))
            await case.publish(transport, "after")
            assert _values(await case.fetch_to(consumer, "after")) == _b("after")
            await consumer.aclose()

    async def test_r07_released_comes_before_newer(self, contract_target: ContractTarget) -> None:
        case = _Case(contract_target)
        async with case.transport() as transport:
            consumer = await transport.open_consumer(case.spec(_uid("g")))
            await case.publish(transport, *range(6))
            # Four taken; 4 and 5 may already wait in the transport's buffer.
            r0, r1, r2, r3 = await case.fetch(
                consumer, lambda got: len(got) >= 4, ack=False, max_records=1
            )
            consumer.release(r2)
            consumer.ack(r1)
            consumer.release(r0)
            consumer.ack(r3)
            await case.publish(transport, 6)
            again = await case.fetch_to(consumer, 6)
            if contract_target.capabilities.per_message_ack:
                # The released ones first, in any order, then the newer ones.
                assert sorted(_values(again[:2])) == _b(0, 2)
                assert _values(again[2:]) == _b(4, 5, 6)
                for record in again[:2]:
                    case.redelivered(record)
            else:  # the lane rewinds to the first released record
                assert _values(again) == _b(*range(7))
                case.redelivered(again[0])
            await consumer.aclose()

    async def test_r08_aclose_releases_unsettled(self, contract_target: ContractTarget) -> None:
        case, group = _Case(contract_target), _uid("g")
        async with case.transport() as transport:
            first = await transport.open_consumer(case.spec(group))
            await case.publish(transport, 0, 1, 2)
            r0, _, _ = await case.fetch_to(first, 2, ack=False)
            first.ack(r0)
            with trio.CancelScope() as outer:
                outer.cancel()  # closing must work while being cancelled
                with trio.CancelScope(shield=True):
                    await first.aclose()
            with pytest.raises(BusClosedError):
                await first.fetch(1)
            await first.aclose()  # a second close is harmless
            second = await transport.open_consumer(case.spec(group))
            await case.publish(transport, "end")
            again = await case.fetch_to(second, "end")
            assert _values(again) == _b(1, 2, "end")
            case.redelivered(again[0])
            await second.aclose()

    async def test_r09_flush_makes_acks_durable(self, contract_target: ContractTarget) -> None:
        case, group = _Case(contract_target), _uid("g")
        async with case.transport() as transport:
            consumer = await transport.open_consumer(case.spec(group))
            await case.publish(transport, 0, 1, 2)
            await case.fetch_to(consumer, 2)
            await consumer.flush()
            await consumer.flush()  # nothing pending: returns all the same
            await case.publish(transport, 3)
            # Another member, on a connection of its own, joins after the flush.
            async with case.transport() as other:
                member = await other.open_consumer(case.spec(group))
                await consumer.aclose()
                await case.publish(other, "end")
                assert _values(await case.fetch_to(member, "end")) == _b(3, "end")
                await member.aclose()

    async def test_r10_cancelled_open_consumer_leaves_nothing(
        self, contract_target: ContractTarget
    ) -> None:
        case, group = _Case(contract_target), _uid("g")
        async with case.transport() as transport:
            # What the transport opens on first use and keeps is no leftover.
            warm_up = await transport.open_consumer(case.spec(_uid("g")))
            await warm_up.aclose()
            baseline = _task_count()
            leftover: dict[float, int] = {}  # delay -> tasks still running
            for delay in (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.5):
                opened: list[Consumer] = []
                with trio.move_on_after(delay):
                    opened.append(await transport.open_consumer(case.spec(group)))
                for consumer in opened:  # it returned: the caller owns it
                    await consumer.aclose()
                if _task_count() != baseline:  # work outlived the call
                    leftover[delay] = _task_count() - baseline
            consumer = await transport.open_consumer(case.spec(group))
            await case.publish(transport, 0, 1, 2)
            # No leftover member of the group took a share.
            got = _values(await case.fetch_to(consumer, 2))
            await consumer.aclose()
        assert not leftover, f"tasks left running after open_consumer (delay: tasks): {leftover}"
        assert got == _b(0, 1, 2)

    async def test_r11_groups_fan_out_members_share(self, contract_target: ContractTarget) -> None:
        case, group = _Case(contract_target), _uid("g")
        labels = list(range(12))
        async with case.transport() as transport:
            members = [await transport.open_consumer(case.spec(group)) for _ in range(2)]
            others = [await transport.open_consumer(case.spec(_uid("h"))) for _ in range(2)]
            await case.publish(transport, *labels, keys=4)
            for other in others:  # each group gets every record once
                got = await case.fetch(other, lambda got: len(got) >= len(labels))
                assert sorted(_values(got)) == sorted(_b(*labels))
            shared: list[Record] = []
            done = trio.Event()

            async def drain(member: Consumer) -> None:
                while True:
                    batch = await member.fetch(3)
                    for record in batch:
                        member.ack(record)
                    shared.extend(batch)
                    if len(shared) >= len(labels):
                        done.set()

            async with trio.open_nursery() as nursery:
                for member in members:
                    nursery.start_soon(drain, member)
                with trio.move_on_after(contract_target.wait):
                    await done.wait()
                nursery.cancel_scope.cancel()
            # Each record to one member: none twice, none missing.
            assert sorted(_values(shared)) == sorted(_b(*labels))
            for consumer in [*members, *others]:
                await consumer.aclose()


def _rule_tests() -> list[str]:
    return [name for name in vars(TransportContract) if name.startswith("test_r")]
