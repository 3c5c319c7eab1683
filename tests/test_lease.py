"""The pool honours partition leases (trio_bus._lease): a pure-logic test
of the fence on a fake consumer, on Trio's MockClock."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

from trio_bus._config import RetryPolicy
from trio_bus._lease import Lease
from trio_bus._message import Message, Record, new_record
from trio_bus._pool import ActorPool
from trio_bus._work import Route
from trio_bus.transports._base import LaneState


class FakeConsumer:
    """Records settles; never fetches (the test dispatches by hand)."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.released: list[int] = []

    async def fetch(self, max_records: int) -> Sequence[Record]:
        raise NotImplementedError

    def ack(self, record: Record) -> None:
        self.acked.append(record.offset)

    def release(self, record: Record) -> None:
        self.released.append(record.offset)

    async def flush(self) -> None:
        pass

    async def lanes(self) -> Sequence[LaneState]:
        return ()

    async def aclose(self) -> None:
        pass


def record(offset: int, lease: Lease | None) -> Record:
    return new_record(
        topic="t",
        subject="t",
        value=b"",
        key="agg",
        headers={},
        partition=None,
        offset=offset,
        lease=lease,
    )


async def noop_publish(*args: object, **kwargs: object) -> None:
    raise AssertionError("nothing is dead-lettered under a lapsed lease")


def make(handler_timeout: float | None = 60.0, attempts: int = 3) -> tuple[ActorPool, Route]:
    pool = ActorPool(
        size=4, inbox_size=8, max_restarts=3, restart_window=10.0, publish=noop_publish
    )
    consumer = FakeConsumer()

    async def invoke(message: Message) -> None:
        await handler(message)

    route = Route(
        topic="t",
        group="g",
        consumer=consumer,  # type: ignore[arg-type]
        invoke=invoke,
        handler_timeout=handler_timeout,
        dead_letter_topic="t.dlq",
        wants_envelope=False,
        retry=RetryPolicy(max_attempts=attempts, backoff=1.0),
    )
    return pool, route


calls: list[tuple[int, str]] = []
handler_sleep = 10.0


async def handler(message: Message) -> None:
    calls.append((message.offset, "start"))
    await trio.sleep(handler_sleep)
    calls.append((message.offset, "end"))


@pytest.fixture(autouse=True)
def _reset() -> None:
    global handler_sleep
    calls.clear()
    handler_sleep = 10.0


async def run(pool: ActorPool, route: Route, records: list[Record], until: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.dispatch(route, records)
        await trio.sleep_until(until)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_lapsing_lease_cancels_the_call_at_its_await(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool, route = make()
    lease = Lease(trio.current_time() + 5.0, name="t/p0")
    await run(pool, route, [record(1, lease), record(2, lease)], until=trio.current_time() + 30)
    consumer = route.consumer
    assert isinstance(consumer, FakeConsumer)
    # The first call was cancelled at its sleep: its "end" never ran, it was
    # not retried, and the second message never started.
    assert calls == [(1, "start")]
    assert consumer.acked == []
    assert consumer.released == [1, 2]


@pytest.mark.trio
async def test_renewals_keep_a_long_call_alive(autojump_clock: trio.testing.MockClock) -> None:
    pool, route = make()
    start = trio.current_time()
    lease = Lease(start + 5.0)

    async def renew() -> None:
        for _ in range(10):
            await trio.sleep(2.0)
            lease.renew(trio.current_time() + 5.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(renew)
        await run(pool, route, [record(1, lease)], until=start + 15)
    consumer = route.consumer
    assert isinstance(consumer, FakeConsumer)
    assert calls == [(1, "start"), (1, "end")]
    assert consumer.acked == [1]


@pytest.mark.trio
async def test_revoke_cancels_now_and_nothing_starts_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool, route = make()
    lease = Lease(trio.current_time() + 100.0)
    other = Lease(trio.current_time() + 100.0)

    async def revoke_soon() -> None:
        await trio.sleep(1.0)
        lease.revoke()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(revoke_soon)
        # One actor (same key): 3 waits behind 1 and 2; 3 has another lease.
        await run(pool, route, [record(1, lease), record(2, lease), record(3, other)], until=40)
    consumer = route.consumer
    assert isinstance(consumer, FakeConsumer)
    assert calls == [(1, "start"), (3, "start"), (3, "end")]
    assert consumer.released == [1, 2]
    assert consumer.acked == [3]


@pytest.mark.trio
async def test_no_retry_or_dead_letter_once_the_lease_lapsed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    global handler_sleep
    handler_sleep = 0.0
    pool, route = make(attempts=2)
    failing: list[int] = []

    async def fail(message: Message) -> None:
        failing.append(message.offset)
        raise RuntimeError("boom")

    route.invoke = fail
    # The lease lapses during the retry backoff (1 s): no second attempt and
    # no dead-lettering (noop_publish would raise).
    lease = Lease(trio.current_time() + 0.5)
    await run(pool, route, [record(1, lease)], until=trio.current_time() + 10)
    consumer = route.consumer
    assert isinstance(consumer, FakeConsumer)
    assert failing == [1]
    assert consumer.released == [1]
    assert consumer.acked == []


async def test_a_lapsed_lease_is_not_revived(autojump_clock: trio.testing.MockClock) -> None:
    # Deliveries may have been handed back while it was not held: a late
    # renewal must not let the partition's later ones run before them.
    lease = Lease(trio.current_time() + 1.0)
    assert lease.renew(trio.current_time() + 2.0)
    await trio.sleep(2.5)
    assert not lease.held()
    assert not lease.renew(trio.current_time() + 5.0)
    assert lease.revoked
    assert not lease.held()
