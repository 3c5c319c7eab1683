"""Property test of the ordering contract on the memory transport.

Hypothesis draws the aggregates, publish order, handler delays and failures;
each example runs in its own trio run on a virtual clock (autojump), so
hundreds of examples with real timeouts and backoffs take seconds.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_bus

from .helpers import Recorder


def messages(aggregates: int) -> st.SearchStrategy[tuple[int, float, int]]:
    """(aggregate, handler delay, failures before success) of one message."""
    return st.tuples(
        st.integers(0, aggregates - 1),
        st.sampled_from([0.0, 0.001, 0.01, 0.2]),  # 0.2 > the handler timeout
        st.integers(0, 3),  # 3 = always fails
    )


message = messages(12)
Done = Recorder[tuple[str | None, int]]  # (aggregate, seq); aggregate None: parked


def run_plan(
    plan: list[tuple[int, float, int]],
    done: Done,
    pool_size: int,
    inbox_size: int,
    subscribe: Callable[[trio_bus.Bus], Awaitable[object]],
) -> None:
    """Publish *plan* to topic ``p`` (subscribed by *subscribe*) on a fresh
    memory bus under a MockClock; parked messages are recorded with None."""
    retry = trio_bus.RetryPolicy(max_attempts=3, backoff=0.01)

    async def on_dead(msg: trio_bus.Message) -> None:
        done.add((None, int(msg.value)))

    async def scenario() -> None:
        url = f"memory://prop-{uuid.uuid4().hex}"
        async with trio_bus.open_bus(
            url, pool_size=pool_size, inbox_size=inbox_size, retry=retry, handler_timeout=0.1
        ) as bus:
            await subscribe(bus)
            await bus.subscribe("p.dlq", on_dead)
            await bus.publish_many(
                trio_bus.OutgoingMessage(topic="p", value=b"%d" % i, key=f"a{agg}")
                for i, (agg, _, _) in enumerate(plan)
            )
            await done.wait_for_count(len(plan))

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def assert_order(plan: list[tuple[int, float, int]], done: Done, doomed: set[int]) -> None:
    """Each aggregate's handled messages came in publish order."""
    order: dict[str, list[int]] = defaultdict(list)
    for agg, seq in done.items:
        if agg is not None:
            order[agg].append(seq)
    for agg, seqs in order.items():
        expected = [i for i, (a, _, _) in enumerate(plan) if f"a{a}" == agg and i not in doomed]
        assert seqs == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(message, min_size=1, max_size=80),
    pool_size=st.integers(1, 6),
    inbox_size=st.integers(1, 4),
)
def test_order_holds_under_random_delays_and_failures(
    plan: list[tuple[int, float, int]], pool_size: int, inbox_size: int
) -> None:
    active: set[str] = set()
    overlaps: list[str] = []
    done: Done = Recorder()
    attempts: dict[int, int] = defaultdict(int)

    async def handler(msg: trio_bus.Message) -> None:
        agg, seq = msg.aggregate_id, int(msg.value)
        assert agg is not None
        if agg in active:
            overlaps.append(agg)
        active.add(agg)
        try:
            attempts[seq] += 1
            _, delay, failures = plan[seq]
            await trio.sleep(delay)
            if attempts[seq] <= failures:
                raise RuntimeError("planned")
        finally:
            active.discard(agg)
        done.add((agg, seq))

    run_plan(plan, done, pool_size, inbox_size, lambda bus: bus.subscribe("p", handler))

    assert overlaps == []
    # A message fails for good when it always fails or always times out.
    doomed = {i for i, (_, delay, failures) in enumerate(plan) if failures >= 3 or delay > 0.1}
    assert {seq for agg, seq in done.items if agg is None} == doomed
    assert_order(plan, done, doomed)


# Fewer aggregates and bigger inboxes than above: batches of several
# messages of one aggregate, where order inside and across batches matters.
batched_message = messages(4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(batched_message, min_size=1, max_size=80),
    pool_size=st.integers(1, 4),
    inbox_size=st.integers(1, 8),
    max_batch=st.integers(1, 8),
    max_wait=st.sampled_from([0.0, 0.005, 0.05]),
    bisect=st.booleans(),
)
def test_batch_order_holds_under_random_sizes_delays_and_failures(
    plan: list[tuple[int, float, int]],
    pool_size: int,
    inbox_size: int,
    max_batch: int,
    max_wait: float,
    bisect: bool,
) -> None:
    """A batch fails while any of its messages has planned failures left
    (counted per attempt of the batch) and sleeps for its slowest message;
    the whole batch is retried, then parked or (bisect) split."""
    active: set[str] = set()
    overlaps: list[str] = []
    sizes: list[int] = []
    first_attempts: list[list[int]] = []
    done: Done = Recorder()

    async def handler(batch: Sequence[trio_bus.Message]) -> None:
        seqs = [int(m.value) for m in batch]
        aggs = {m.aggregate_id or "" for m in batch}
        overlaps.extend(aggs & active)
        active.update(aggs)
        attempt = batch[0].attempt
        sizes.append(len(batch))
        if attempt == 1:
            first_attempts.append(seqs)
        try:
            await trio.sleep(max(plan[s][1] for s in seqs))
            if any(attempt <= plan[s][2] for s in seqs):
                raise RuntimeError("planned")
        finally:
            active.difference_update(aggs)
        for m in batch:
            done.add((m.aggregate_id, int(m.value)))

    run_plan(
        plan,
        done,
        pool_size,
        inbox_size,
        lambda bus: bus.subscribe_batch(
            "p", handler, max_batch=max_batch, max_wait=max_wait, bisect=bisect
        ),
    )

    assert overlaps == []
    assert max(sizes) <= max_batch
    # A message is doomed when it always fails or is slower than the
    # timeout; without bisecting, its whole batch is parked with it.
    doomed = {i for i, (_, delay, failures) in enumerate(plan) if failures >= 3 or delay > 0.1}
    if not bisect:
        doomed = {s for batch in first_attempts if doomed.intersection(batch) for s in batch}
    assert sorted(seq for agg, seq in done.items if agg is None) == sorted(doomed)
    assert sorted(seq for _, seq in done.items) == list(range(len(plan)))
    assert_order(plan, done, doomed)
