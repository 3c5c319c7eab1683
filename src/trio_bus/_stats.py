"""Counters and histograms kept as plain numbers on the hot path.

Prometheus client objects take a lock and a label lookup per update (~1 us
each, several per message); instead the bus counts into plain attributes and
a collector turns them into metric families only when scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import attrs

__all__ = ["DURATION_BUCKETS", "Histogram", "TopicStats"]

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

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

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
    """What happened on one topic, for metrics."""

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
