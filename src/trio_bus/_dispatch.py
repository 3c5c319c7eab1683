"""Dispatch: fetched batches into the actors' inboxes, in order.

A message goes to ``actors[stable_hash(aggregate_id) % pool_size]``, so one
aggregate always lands on one actor; messages without an aggregate ID are
spread round-robin. Each actor gets one chunk (a list, in delivery order)
per fetched batch through its bounded memory-channel inbox with
``send_nowait``; only when the inbox's messages would exceed its size do
they go one at a time, each waiting for room, which is where backpressure
lives. The actors' side is ``_pool.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ._message import Record, bind
from ._names import stable_hash
from ._routing import classify
from ._work import Actor, Route, settle

__all__ = ["ROUTE_CACHE_ENTRIES", "Dispatcher"]

#: Aggregate IDs whose actor index is remembered at most (IDs are at most
#: 256 bytes, so the cache stays within a few MiB).
ROUTE_CACHE_ENTRIES = 16384


class Dispatcher:
    """Routes records to actors (the pool's dispatch side)."""

    def __init__(self, actors: list[Actor], inbox_size: int) -> None:
        self._actors = actors
        self._inbox_size = inbox_size
        #: aggregate ID -> actor index (see _cache_route).
        self._route_cache: dict[str, int] = {}
        self._round_robin = 0

    async def dispatch(self, route: Route, records: Sequence[Record]) -> None:
        """Route a fetched batch into the actors' inboxes, in order.

        An inbox never holds more than ``inbox_size`` messages: past that,
        this waits for room (backpressure on the fetch loop).
        """
        actors, size = self._actors, len(self._actors)
        route.stats.consumed += len(records)
        wants_envelope = route.wants_envelope
        cache = self._route_cache
        chunks: dict[int, list[Record]] = {}
        for record in records:
            aggregate, envelope, rejection = classify(record, wants_envelope=wants_envelope)
            if aggregate is not None:
                index = cache.get(aggregate)
                if index is None:
                    index = self._cache_route(aggregate)
            else:
                index = self._round_robin = (self._round_robin + 1) % size
            bind(record, route, aggregate, envelope, rejection)
            chunk = chunks.get(index)
            if chunk is None:
                chunks[index] = [record]
            else:
                chunk.append(record)
        limit = self._inbox_size
        for index, chunk in chunks.items():
            actor = actors[index]
            count = len(chunk)
            if actor.queued + count <= limit:
                route._dispatched(count)
                # Never full: it holds at most `queued` chunks.
                actor.send.send_nowait(chunk)
                actor.queued += count
            else:
                await self._send_waiting(route, actor, chunk)
        await trio.lowlevel.checkpoint()

    async def _send_waiting(self, route: Route, actor: Actor, chunk: list[Record]) -> None:
        # The inbox is full: one message at a time, each once there is room
        # (in flight from here: the dispatcher holds it).
        limit = self._inbox_size
        for sent, work in enumerate(chunk):
            route._dispatched()
            try:
                await actor.wait_for_room(limit)
            except BaseException:
                settle(work, release=True)
                for left in chunk[sent + 1 :]:
                    route.consumer.release(left)
                raise
            actor.send.send_nowait([work])
            actor.queued += 1

    def _cache_route(self, aggregate: str) -> int:
        """The actor index of *aggregate*, remembered (bounded: emptied
        when full, so wire input cannot grow it without limit)."""
        cache = self._route_cache
        if len(cache) >= ROUTE_CACHE_ENTRIES:
            cache.clear()
        index = cache[aggregate] = stable_hash(aggregate) % len(self._actors)
        return index
