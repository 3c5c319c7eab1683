"""Dispatch: fetched batches into the actors' inboxes, in order.

An aggregate with a message queued or running on an actor holds a
:class:`~._work.Claim` on it, and its next messages go to that actor, so
they run one at a time, in order. An aggregate without one (all its
messages settled) goes to an idle actor: the first without work among the
next few in turn, else the least loaded of them, so aggregates do not pile
up behind each other on one actor as they would by hash (100 aggregates
hashed onto 256 actors put 2 or 3 on some of them and leave most idle).
Messages without an aggregate ID are spread round-robin. Each actor gets
one chunk (a list, in delivery order) per fetched batch through its
bounded memory-channel inbox with ``send_nowait``; only when the inbox's
messages would exceed its size does the rest go in pieces, each waiting for
room, which is where backpressure lives. The actors' side is ``_pool.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ._message import Record, bind
from ._routing import classify
from ._work import Actor, Claim, Route, settle, unclaim

__all__ = ["PICK_AMONG", "Dispatcher"]

#: Actors looked at, in turn, for an aggregate without a claim.
PICK_AMONG = 8


class Dispatcher:
    """Routes records to actors (the pool's dispatch side)."""

    def __init__(self, actors: list[Actor], inbox_size: int) -> None:
        self._actors = actors
        self._inbox_size = inbox_size
        #: Aggregates with messages in flight -> their claim.
        self.claims: dict[str, Claim] = {}
        self._round_robin = 0
        self._next_pick = 0

    async def dispatch(self, route: Route, records: Sequence[Record]) -> None:
        """Route a fetched batch into the actors' inboxes, in order.

        An inbox never holds more than ``inbox_size`` messages: past that,
        this waits for room (backpressure on the fetch loop).
        """
        actors, size = self._actors, len(self._actors)
        route.stats.consumed += len(records)
        wants_envelope = route.wants_envelope
        claims = self.claims
        chunks: dict[int, list[Record]] = {}
        for record in records:
            aggregate, envelope, rejection = classify(record, wants_envelope=wants_envelope)
            claim = None
            if aggregate is not None:
                claim = claims.get(aggregate)
                if claim is None:
                    claim = claims[aggregate] = Claim(claims, aggregate, self._pick(chunks))
                claim.count += 1
                index = claim.index
            else:
                index = self._round_robin = (self._round_robin + 1) % size
            bind(record, route, aggregate, envelope, rejection, claim)
            chunk = chunks.get(index)
            if chunk is None:
                chunks[index] = [record]
            else:
                chunk.append(record)
        limit = self._inbox_size
        ordered = list(chunks.items())
        for position, (index, chunk) in enumerate(ordered):
            actor = actors[index]
            count = len(chunk)
            if actor.queued + count <= limit:
                route._dispatched(count)
                # Never full: it holds at most `queued` chunks.
                actor.send.send_nowait(chunk)
                actor.queued += count
                continue
            try:
                await self._send_waiting(route, actor, chunk)
            except BaseException:
                for _, left in ordered[position + 1 :]:  # held here: hand them back
                    _hand_back(route, left)
                raise
        await trio.lowlevel.checkpoint()

    async def _send_waiting(self, route: Route, actor: Actor, chunk: list[Record]) -> None:
        # The inbox is full: send the chunk in pieces of at most half an
        # inbox, each once the inbox has room for all of it (a wake-up per
        # piece, not per message). A piece is in flight from here: the
        # dispatcher holds it.
        limit = self._inbox_size
        step = max(1, limit // 2)
        for start in range(0, len(chunk), step):
            piece = chunk[start : start + step]
            route._dispatched(len(piece))
            try:
                await actor.wait_for_room(limit - len(piece))
            except BaseException:
                for work in piece:
                    settle(work, release=True)
                _hand_back(route, chunk[start + step :])
                raise
            actor.send.send_nowait(piece)
            actor.queued += len(piece)

    def _pick(self, chunks: dict[int, list[Record]]) -> int:
        """An actor for an aggregate without a claim: the first idle one of
        the next :data:`PICK_AMONG` in turn, else the least loaded of them
        (*chunks*: what this batch gives each actor so far)."""
        actors = self._actors
        start = self._next_pick
        window = actors[start : start + PICK_AMONG]
        if len(window) < PICK_AMONG:  # wrap around (at most the whole pool)
            window += actors[: min(PICK_AMONG - len(window), start)]
        best, best_load = window[0], -1
        for actor in window:
            load = actor.queued
            if actor.current is not None:
                load += 1
            if chunks:
                chunk = chunks.get(actor.index)
                if chunk is not None:
                    load += len(chunk)
            if not load:
                best = actor
                break
            if best_load < 0 or load < best_load:
                best, best_load = actor, load
        index = best.index
        self._next_pick = index + 1 if index + 1 < len(actors) else 0
        return index


def _hand_back(route: Route, records: list[Record]) -> None:
    """Release records never sent to an actor (they were claimed, not
    counted in flight on the route)."""
    for record in records:
        unclaim(record)
        route.consumer.release(record)
