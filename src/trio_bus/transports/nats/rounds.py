"""The lease task: one Trio task per transport runs every group member's
lease rounds (:meth:`.group.GroupConsumer.round`).

It lives in the transport's nursery, so leaving the bus cancels it, and a
failure of the lease machinery ends ``open_bus`` as a
:class:`~trio_bus.errors.TransportError` like any other transport loop's.
A round is due every ``lease_ttl / 3``, at once when a member's view saw
the group change, or when a lease it waits for can be claimed. KV requests
cross to asyncio through the transport's bridge, one crossing per round and
member; a KV server that does not answer is not a failure (the leases
lapse and the pool stops their handlers), only a refusal is.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from ...errors import TransportError

if TYPE_CHECKING:
    from .group import GroupConsumer

__all__ = ["Rounds"]

logger = logging.getLogger("trio_bus.nats")


class Rounds:
    """The group members of one transport and their lease schedule."""

    def __init__(self) -> None:
        self.groups: set[GroupConsumer] = set()
        self._wake = trio.Event()

    def wake(self) -> None:
        """Run the due rounds now (a member's ``next_round`` moved)."""
        self._wake.set()

    async def run(self) -> None:
        """Run rounds as they fall due, until cancelled.

        Raises:
            TransportError: a round failed (the cause chained).
        """
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            for group in [g for g in self.groups if g.next_round <= now]:
                try:
                    await group.round()
                except TransportError:
                    raise
                except Exception as exc:
                    raise TransportError(
                        f"the partition lease round of {group.name!r} failed: {exc!r}"
                    ) from exc
            due = min((g.next_round for g in self.groups), default=math.inf)
            with trio.move_on_at(due):
                await self._wake.wait()
