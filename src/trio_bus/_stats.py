"""Counters and histograms kept as plain numbers on the hot path, and the
frozen snapshots observers read.

Prometheus client objects take a lock and a label lookup per update (~1 us
each, several per message); instead the bus counts into plain attributes and
a collector turns them into metric families only when scraped. Observers
(:mod:`trio_bus.health`, :mod:`trio_bus.metrics`, users) read
:class:`BusStatistics` snapshots, never the bus's private state.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import attrs

__all__ = [
    "DURATION_BUCKETS",
    "BusStatistics",
    "Histogram",
    "RunningHandler",
    "TopicStatistics",
    "TopicStats",
]

#: Seconds; from sub-millisecond handlers up to the default 30 s timeout.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Histogram:
    """Cumulative-on-read bucket counts, sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def copy(self) -> Histogram:
        """A copy that no longer changes."""
        other = Histogram(self.bounds)
        other.counts = list(self.counts)
        other.sum, other.count = self.sum, self.count
        return other

    def observe(self, value: float, times: int = 1) -> None:
        """Count *value* (*times* over: a batch that took it for each)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: ``[(le, cumulative count), ...]`` ending in +Inf."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile *q* (None if empty)."""
        if not self.count:
            return None
        rank = q * self.count
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            if total >= rank:
                return bound
        return float("inf")  # pragma: no cover - total reaches count


@attrs.define(eq=False)
class TopicStats:
    """What happened on one topic (mutable, updated by the bus)."""

    published: int = 0
    publish_failed: int = 0
    consumed: int = 0
    handled: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    handler_duration: Histogram = attrs.Factory(Histogram)
    end_to_end: Histogram = attrs.Factory(Histogram)
    publish_latency: Histogram = attrs.Factory(Histogram)

    def snapshot(self, topic: str) -> TopicStatistics:
        """A frozen copy for observers."""
        return TopicStatistics(
            topic=topic,
            published=self.published,
            publish_failed=self.publish_failed,
            consumed=self.consumed,
            handled=self.handled,
            failed=self.failed,
            retried=self.retried,
            dead_lettered=self.dead_lettered,
            handler_duration=self.handler_duration.copy(),
            end_to_end=self.end_to_end.copy(),
            publish_latency=self.publish_latency.copy(),
        )


@attrs.frozen(kw_only=True)
class TopicStatistics:
    """What happened on one topic since the bus opened.

    Attributes:
        topic: The topic.
        published: Messages the broker accepted.
        publish_failed: Publishes refused or with an unknown outcome.
        consumed: Messages fetched and dispatched to actors.
        handled: Handler calls that succeeded.
        failed: Handler attempts that failed or timed out.
        retried: Attempts scheduled again after a failure.
        dead_lettered: Messages parked in a dead-letter topic.
        handler_duration: Seconds per successful handler call.
        end_to_end: Seconds from publish to handler start.
        publish_latency: Seconds from publish call to broker acknowledgement.
    """

    topic: str
    published: int
    publish_failed: int
    consumed: int
    handled: int
    failed: int
    retried: int
    dead_lettered: int
    handler_duration: Histogram = attrs.field(repr=False)
    end_to_end: Histogram = attrs.field(repr=False)
    publish_latency: Histogram = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class RunningHandler:
    """A handler call in progress.

    Attributes:
        actor: Index of the actor running it.
        topic: Its message's topic.
        offset: Its message's offset / sequence.
        aggregate_id: Its message's aggregate ID, or None.
        since: When it started (``trio.current_time()`` clock).
    """

    actor: int
    topic: str
    offset: int
    aggregate_id: str | None
    since: float

    def describe(self) -> str:
        """``actor 3: orders offset 17 aggregate order-7``."""
        where = f"actor {self.actor}: {self.topic} offset {self.offset}"
        if self.aggregate_id is not None:
            where += f" aggregate {self.aggregate_id}"
        return where


@attrs.frozen(kw_only=True)
class BusStatistics:
    """A snapshot of a bus's activity, from :meth:`Bus.statistics`.

    Attributes:
        pool_size: Actors in the pool.
        actors_alive: Actor tasks running their loop (``pool_size`` when
            healthy).
        subscriptions: Live subscriptions.
        in_flight: Messages dispatched to actors and not yet acked/released.
        queued: Messages waiting in actor inboxes (sum of ``inbox_depths``).
        max_inbox_depth: The deepest inbox.
        inbox_depths: Messages waiting per actor, by actor index (not in
            the repr).
        published: Messages the transport accepted.
        handled: Handler calls that succeeded.
        failed: Handler calls that failed or timed out (each attempt counts).
        retried: Attempts scheduled again after a failure.
        dead_lettered: Messages parked in a dead-letter topic.
        restarts: Actor restarts after a crash of the actor's own loop.
        publish_backlog: Messages handed to the transport and not yet
            answered for by the broker.
        publish_results_dropped: Publish results dropped because a reader
            of :meth:`Bus.open_publish_results` fell behind.
        publish_throttled: Publish requests that waited for the publish
            rate limit (``open_bus(publish_rate=...)``).
        publish_throttled_seconds: Seconds they waited in all.
        running: Handler calls in progress (not in the repr).
        topics: Per-topic counters and histograms (not in the repr).
    """

    pool_size: int
    actors_alive: int
    subscriptions: int
    in_flight: int
    queued: int
    max_inbox_depth: int
    inbox_depths: tuple[int, ...] = attrs.field(repr=False)
    published: int
    handled: int
    failed: int
    retried: int
    dead_lettered: int
    restarts: int
    publish_backlog: int
    publish_results_dropped: int
    running: tuple[RunningHandler, ...] = attrs.field(repr=False)
    topics: tuple[TopicStatistics, ...] = attrs.field(repr=False)
    publish_throttled: int = 0
    publish_throttled_seconds: float = 0.0
