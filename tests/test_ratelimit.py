"""Publish rate limits: the token bucket on a virtual clock (exact rate,
burst and FIFO order, fast), the bus's use of it, and one rough check on
the real clock."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import prometheus_client
import pytest
import trio
import trio.testing

import trio_bus
from trio_bus import OutgoingMessage, RateLimit
from trio_bus._ratelimit import PublishLimits, TokenBucket
from trio_bus.errors import ConfigError

from .helpers import Recorder, collect

EXACT = 1e-9


class Sends:
    """Wraps a bus's ``transport.publish_batch``: when each record reached
    the transport (virtual time) and its value."""

    def __init__(self, bus: trio_bus.Bus) -> None:
        self.times: list[float] = []
        self.values: list[bytes] = []
        self.batches: list[int] = []
        transport = bus.transport
        original = transport.publish_batch

        async def publish_batch(records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
            now = trio.current_time()
            self.times.extend(now for _ in records)
            self.values.extend(r.value for r in records)
            self.batches.append(len(records))
            return await original(records)

        transport.publish_batch = publish_batch  # type: ignore[method-assign]


def within_envelope(times: Sequence[float], limit: RateLimit) -> bool:
    """Whether at most ``burst + rate * (t - s)`` records fell in every
    window [s, t] (checked at send times, which is where it is tightest)."""
    ordered = sorted(times)
    return all(
        j - i + 1 <= limit.burst + limit.per_second * (ordered[j] - ordered[i]) + EXACT
        for i in range(len(ordered))
        for j in range(i, len(ordered))
    )


# ------------------------------------------------------------------ values


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_second": 0},
        {"per_second": -1},
        {"per_second": math.inf},
        {"per_second": math.nan},
        {"per_second": True},
        {"per_second": "10"},
        {"per_second": 10, "burst": 0},
        {"per_second": 10, "burst": 2.5},
    ],
)
def test_bad_rate_limits_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_burst_defaults_to_one_second_of_messages() -> None:
    assert RateLimit(per_second=250).burst == 250
    assert RateLimit(per_second=2.5).burst == 3
    assert RateLimit(per_second=0.1).burst == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"publish_rate": 10},
        {"publish_rates": [("t", RateLimit(per_second=1))]},
        {"publish_rates": {"bad topic!": RateLimit(per_second=1)}},
        {"publish_rates": {"t": 5}},
    ],
)
async def test_open_bus_refuses_bad_limits(memory_bus_url: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        async with trio_bus.open_bus(memory_bus_url, **kwargs):  # type: ignore[arg-type]
            pass


async def test_nothing_configured_means_no_limiter(memory_bus_url: str) -> None:
    # The single-publish hot path then pays one attribute check, nothing more.
    assert PublishLimits.build(None, {"t": None}) is None
    async with trio_bus.open_bus(memory_bus_url, monitoring=None) as bus:
        assert bus._publisher._limits is None


# ------------------------------------------------------------ the bucket


async def test_bucket_gives_burst_then_rate(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(RateLimit(per_second=10, burst=5))
    start = trio.current_time()
    times = []
    for _ in range(15):
        await bucket.acquire()
        times.append(trio.current_time() - start)
    assert times == pytest.approx([0.0] * 5 + [0.1 * k for k in range(1, 11)], abs=EXACT)


async def test_bucket_refills_up_to_burst_only(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(RateLimit(per_second=10, burst=3))
    for _ in range(3):
        await bucket.acquire()
    await trio.sleep(100)  # a long quiet spell refills 3 tokens, not 1000
    assert bucket.statistics().tokens == pytest.approx(3)
    start = trio.current_time()
    await bucket.acquire(3)
    await bucket.acquire(1)
    assert trio.current_time() - start == pytest.approx(0.1, abs=EXACT)


async def test_bucket_serves_first_come_first_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A big request queued first is not overtaken by a small one that would
    fit earlier; the small one then goes right after it."""
    bucket = TokenBucket(RateLimit(per_second=10, burst=10))
    await bucket.acquire(10)
    start = trio.current_time()
    served: list[tuple[str, float]] = []

    async def take(name: str, tokens: int) -> None:
        await bucket.acquire(tokens)
        served.append((name, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "big", 10)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 1)
        await trio.testing.wait_all_tasks_blocked()
        assert bucket.statistics().waiting == 2
    assert [name for name, _ in served] == ["big", "small"]
    assert [at for _, at in served] == pytest.approx([1.0, 1.1], abs=EXACT)


@pytest.mark.parametrize("cancelled", ["head", "middle"])
async def test_cancelled_waiter_takes_nothing(
    autojump_clock: trio.testing.MockClock, cancelled: str
) -> None:
    bucket = TokenBucket(RateLimit(per_second=1, burst=5))
    await bucket.acquire(5)
    start = trio.current_time()
    served: dict[str, float] = {}
    scopes: dict[str, trio.CancelScope] = {}

    async def take(name: str, tokens: int) -> None:
        with trio.CancelScope() as scopes[name]:
            await bucket.acquire(tokens)
            served[name] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for name, tokens in [("head", 5), ("middle", 5), ("last", 1)]:
            nursery.start_soon(take, name, tokens)
            await trio.testing.wait_all_tasks_blocked()
        scopes[cancelled].cancel()
    if cancelled == "head":
        assert served == {"middle": pytest.approx(5.0), "last": pytest.approx(6.0)}
    else:
        assert served == {"head": pytest.approx(5.0), "last": pytest.approx(6.0)}
    assert bucket.statistics().waiting == 0


async def test_requests_larger_than_burst_are_refused() -> None:
    bucket = TokenBucket(RateLimit(per_second=10, burst=5))
    with pytest.raises(ValueError, match="6 tokens"):
        await bucket.acquire(6)


# ------------------------------------------------------------- on the bus


async def test_publish_waits_for_tokens(
    memory_bus_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    limit = RateLimit(per_second=20, burst=4)
    async with trio_bus.open_bus(memory_bus_url, monitoring=None, publish_rate=limit) as bus:
        sends = Sends(bus)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(bus.publish, "t", b"%d" % i)
        times = [t - start for t in sends.times]
    assert times == pytest.approx([0.0] * 4 + [0.05 * k for k in range(1, 9)], abs=EXACT)


async def test_throttling_is_counted_in_statistics_and_metrics(
    memory_bus_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    limit = RateLimit(per_second=20, burst=4)
    async with trio_bus.open_bus(memory_bus_url, monitoring=None, publish_rate=limit) as bus:
        assert bus.statistics().publish_throttled == 0
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(bus.publish, "t", b"%d" % i)
        stats = bus.statistics()
        exposition = prometheus_client.generate_latest(bus.metrics_registry).decode()
    # 4 went at once; the other 8 waited 0.05, 0.10, ... 0.40 s.
    assert stats.publish_throttled == 8
    assert stats.publish_throttled_seconds == pytest.approx(0.05 * 36, abs=EXACT)
    assert re.search(r"_publish_throttled_total 8\.0$", exposition, re.M)
    waited = re.search(r"^\S+_publish_throttled_seconds_total (\S+)$", exposition, re.M)
    assert waited is not None
    assert float(waited[1]) == pytest.approx(1.8, abs=EXACT)


async def test_publish_envelope_is_limited_too(
    memory_bus_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    limit = RateLimit(per_second=2, burst=1)
    async with trio_bus.open_bus(memory_bus_url, monitoring=None, publish_rate=limit) as bus:
        start = trio.current_time()
        for i in range(3):
            envelope = trio_bus.Envelope.new(aggregate_id=f"a-{i}", event_type="T", payload={})
            await bus.publish_envelope("t", envelope)
        assert trio.current_time() - start == pytest.approx(1.0, abs=EXACT)


async def test_publish_many_chunks_wait_for_tokens(
    memory_bus_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    limit = RateLimit(per_second=100, burst=25)
    async with trio_bus.open_bus(memory_bus_url, monitoring=None, publish_rate=limit) as bus:
        sends = Sends(bus)
        start = trio.current_time()
        await bus.publish_many(
            OutgoingMessage(topic="t", value=b"%d" % i, key=f"k{i % 10}") for i in range(200)
        )
        elapsed = trio.current_time() - start
    assert max(sends.batches) <= limit.burst
    assert sum(sends.batches) == 200
    assert within_envelope(sends.times, limit)
    # 25 at once, then the other 175 at 100/s.
    assert elapsed == pytest.approx(1.75, abs=EXACT)


async def test_single_publish_is_not_starved_by_publish_many(
    memory_bus_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    """100 messages in chunks of 10 at one chunk a second; a publish issued
    at 0.5 s waits only for the chunks queued before it (3 other streams'
    first chunks and the first stream's second), not for all ten."""
    limit = RateLimit(per_second=10, burst=10)
    async with trio_bus.open_bus(memory_bus_url, monitoring=None, publish_rate=limit) as bus:
        sends = Sends(bus)
        start = trio.current_time()
        single_sent = 0.0

        async def single() -> None:
            nonlocal single_sent
            await trio.sleep(0.5)
            await bus.publish("t", b"single")
            single_sent = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(single)
            await bus.publish_many(
                OutgoingMessage(topic="t", value=b"%d" % i, key=f"k{i % 10}") for i in range(100)
            )
        many_done = max(sends.times) - start
    assert single_sent == pytest.approx(4.1, abs=EXACT)
    # Ten chunks a second apart, the later ones 0.1 s behind the single one.
    assert many_done == pytest.approx(9.1, abs=EXACT)


async def test_per_topic_limits_replace_the_shared_one(
    memory_bus_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio_bus.open_bus(
        memory_bus_url,
        monitoring=None,
        publish_rate=RateLimit(per_second=1, burst=1),
        publish_rates={"fast": RateLimit(per_second=100, burst=10), "free": None},
    ) as bus:
        start = trio.current_time()
        for _ in range(20):
            await bus.publish("free", b"x")
        for _ in range(30):
            await bus.publish("fast", b"x")
        assert trio.current_time() - start == pytest.approx(0.2, abs=EXACT)
        for _ in range(3):
            await bus.publish("other", b"x")
        assert trio.current_time() - start == pytest.approx(2.2, abs=EXACT)


async def test_dead_letters_and_probes_are_not_limited(
    memory_bus_url: str, autojump_clock: trio.testing.MockClock
) -> None:
    # One token, then one a day: anything limited after the first would wait.
    limit = RateLimit(per_second=1 / 86400, burst=1)
    dead: Recorder[trio_bus.Message] = Recorder()

    async def fail(message: trio_bus.Message) -> None:
        raise RuntimeError("poison")

    async with trio_bus.open_bus(
        memory_bus_url,
        monitoring=None,
        publish_rate=limit,
        retry=trio_bus.RetryPolicy(max_attempts=1),
    ) as bus:
        await bus.subscribe("t", fail)
        await bus.subscribe("t.dlq", collect(dead))
        start = trio.current_time()
        await bus.publish("t", b"x", key="a")
        await dead.wait_for_count(1)
        await bus.probe()
        assert trio.current_time() - start < 60


async def test_rate_holds_roughly_on_the_real_clock(memory_bus_url: str) -> None:
    """Real time, loaded machine: only a loose lower bound (the limit must
    bite) and a generous upper bound."""
    limit = RateLimit(per_second=200, burst=10)
    async with trio_bus.open_bus(memory_bus_url, monitoring=None, publish_rate=limit) as bus:
        with trio.fail_after(10):
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(bus.publish, "t", b"%d" % i)
            await bus.publish_many(OutgoingMessage(topic="t", value=b"m") for _ in range(30))
            elapsed = trio.current_time() - start
    assert elapsed >= (60 - limit.burst) / limit.per_second * 0.99
