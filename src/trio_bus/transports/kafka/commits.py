"""Committing a group's finished offsets (asyncio side).

Fence: no offset of a partition whose lease is not held is sent (the
member may be out of the group already; see :mod:`.fence`): a commit
point only moves while the member provably owns the partition.

Recovery policy: a commit that fails with a Kafka error (a rebalance is
under way, the member was fenced, the coordinator moved or cannot be
reached) is logged and simply not counted as committed; the next periodic
commit sends the then-current points again. Nothing is committed past an
unfinished record, so a lost commit only means more redelivery
(at-least-once). Anything else a commit raises is a bug and fails the
group (and so the transport).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import aiokafka.errors as kafka_errors

from .errors import retrieve_when_done
from .fence import Fence
from .flow import Flow

__all__ = ["Committer", "commit_offsets"]

logger = logging.getLogger("trio_bus.transports.kafka")


class Committer:
    """Sends the contiguous finished prefix of every partition of a group.

    Attributes:
        enabled: False for ephemeral groups (health probes) and once the
            group's consumer stopped: commits nothing.
    """

    def __init__(
        self, name: str, flow: Flow, interval: float, *, enabled: bool, fence: Fence
    ) -> None:
        self.name = name
        self.flow = flow
        self.fence = fence
        self.interval = interval
        self.enabled = enabled
        self.consumer: Any = None
        self._lock = asyncio.Lock()

    async def run(self) -> NoReturn:
        """Commit every ``interval`` seconds (a loop owned by a Trio task)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.commit()

    async def commit(self) -> None:
        """Apply pending settles, then commit every point that moved in a
        partition whose lease is held."""
        async with self._lock:
            self.flow.apply_settles()
            tracks, held = self.flow.tracks, self.fence.held
            due = {
                tp: point
                for tp, track in tracks.items()
                if (point := track.commit_due()) is not None and held(tp)
            }
            if not due or not self.enabled or self.consumer is None:
                return
            try:
                await commit_offsets(self.consumer, due)
            except kafka_errors.KafkaError as exc:
                logger.warning("group %r: commit failed, retried next time: %s", self.name, exc)
                return
            for tp, point in due.items():
                track = tracks.get(tp)
                if track is not None and point > track.committed:
                    track.committed = point


async def commit_offsets(consumer: Any, offsets: dict[Any, int]) -> None:
    """``consumer.commit(offsets)``, safe to abandon.

    aiokafka commits in an inner task it shields from cancellation; a
    cancelled ``commit`` (a bounded close while the broker is unreachable)
    would leave that task to fail later with nobody to retrieve its error,
    which trio-asyncio raises into the loop. Here the commit runs in a task
    whose outcome is always retrieved, and only the wait for it is
    cancelled: the request ends with the connection (or the loop).
    """
    task = asyncio.ensure_future(consumer.commit(offsets))
    retrieve_when_done(task)
    await asyncio.shield(task)
