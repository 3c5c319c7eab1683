"""Publish rate limiting: a Trio-native token bucket per limit.

A bucket holds up to ``burst`` tokens (one per message) and refills at
``per_second`` tokens a second, computed from :func:`trio.current_time`
when asked: no background task, no thread, and under
:class:`trio.testing.MockClock` the arithmetic is exact, so tests check
rate and burst without waiting for real time.

Waiters are served strictly first come, first served: a request waits
behind every request queued before it, even one small enough to fit now.
That is what keeps it fair: a ``publish_many`` asks for one chunk at a time
(at most ``burst`` tokens), so a single ``publish`` queued meanwhile goes
out after at most the chunks already queued ahead of it, never starved by
a stream of later ones; and a big request is never overtaken by small ones
forever either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import attrs
import trio

from ._config import RateLimit

__all__ = ["PublishLimits", "TokenBucket", "TokenBucketStatistics"]

# Float slack so that a bucket refilled "exactly" to n tokens (n - 1e-15
# after rounding) does not make its waiter sleep again for nothing.
_EPSILON = 1e-9


@attrs.frozen
class TokenBucketStatistics:
    """A snapshot of one :class:`TokenBucket`."""

    tokens: float
    """Tokens available now (refilled up to the current time)."""
    waiting: int
    """Requests queued for tokens."""
    throttled: int = 0
    """Requests that had to wait for tokens, since the bucket was made."""
    throttled_seconds: float = 0.0
    """Seconds those requests waited in all (cancelled waits included)."""


@attrs.define(eq=False)
class _Waiter:
    tokens: int
    turn: trio.Event = attrs.Factory(trio.Event)


class TokenBucket:
    """Waits callers so that they take tokens no faster than *limit* allows.

    Example::

        bucket = TokenBucket(RateLimit(per_second=100, burst=10))
        await bucket.acquire(1)  # returns at once while tokens are left
    """

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._rate = float(limit.per_second)
        self._burst = limit.burst
        self._tokens = float(limit.burst)
        self._stamp = trio.current_time()
        self._queue: deque[_Waiter] = deque()
        self._throttled = 0
        self._throttled_seconds = 0.0

    def _refill(self) -> float:
        now = trio.current_time()
        self._tokens = min(float(self._burst), self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        return self._tokens

    def _take_nowait(self, tokens: int) -> bool:
        if self._refill() + _EPSILON < tokens:
            return False
        self._tokens -= tokens
        return True

    def statistics(self) -> TokenBucketStatistics:
        """Tokens available and requests waiting, right now."""
        return TokenBucketStatistics(
            tokens=self._refill(),
            waiting=len(self._queue),
            throttled=self._throttled,
            throttled_seconds=self._throttled_seconds,
        )

    async def acquire(self, tokens: int = 1) -> None:
        """Wait until *tokens* are available and every earlier request was
        served; take them.

        A checkpoint. If cancelled while waiting, nothing is taken and the
        next request in line is served.

        Raises:
            ValueError: *tokens* is below 1 or above the bucket's burst (it
                could never be served).
        """
        if not 1 <= tokens <= self._burst:
            raise ValueError(f"cannot take {tokens} tokens from a bucket of {self._burst}")
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._queue and self._take_nowait(tokens):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(tokens)
        self._queue.append(waiter)
        self._throttled += 1
        since = trio.current_time()
        try:
            if self._queue[0] is not waiter:
                await waiter.turn.wait()
            # Only the head of the line sleeps, until the moment its tokens
            # will be there; the others wait for their turn.
            while True:
                if self._take_nowait(tokens):
                    break
                await trio.sleep_until(self._stamp + (tokens - self._tokens) / self._rate)
        finally:
            self._throttled_seconds += trio.current_time() - since
            if self._queue[0] is waiter:
                self._queue.popleft()
                if self._queue:
                    self._queue[0].turn.set()
            else:
                self._queue.remove(waiter)


class PublishLimits:
    """The buckets of one bus: one shared by every topic not listed in
    *per_topic*, and one per listed topic (None there: not limited).

    Example::

        limits = PublishLimits(RateLimit(per_second=1000), {"orders": RateLimit(per_second=50)})
        limits.bucket_for("orders")  # its own bucket
        limits.bucket_for("audit")   # the shared one
    """

    def __init__(
        self, default: RateLimit | None, per_topic: Mapping[str, RateLimit | None]
    ) -> None:
        self._default = None if default is None else TokenBucket(default)
        self._per_topic = {
            topic: None if limit is None else TokenBucket(limit)
            for topic, limit in per_topic.items()
        }

    @classmethod
    def build(
        cls, default: RateLimit | None, per_topic: Mapping[str, RateLimit | None]
    ) -> PublishLimits | None:
        """The limits, or None when nothing is limited (so the publish path
        can skip them with one check)."""
        if default is None and all(limit is None for limit in per_topic.values()):
            return None
        return cls(default, per_topic)

    def bucket_for(self, topic: str) -> TokenBucket | None:
        """The bucket a message to *topic* takes its token from, if any."""
        return self._per_topic.get(topic, self._default)

    def throttling(self) -> tuple[int, float]:
        """``(requests that waited, seconds waited)`` over every bucket."""
        buckets = [b for b in (self._default, *self._per_topic.values()) if b is not None]
        stats = [b.statistics() for b in buckets]
        return sum(s.throttled for s in stats), sum(s.throttled_seconds for s in stats)
