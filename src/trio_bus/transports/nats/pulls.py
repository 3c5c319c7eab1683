"""The pull requests one consumer has outstanding (asyncio side).

A pull request asks the server for up to ``batch`` messages within
``expires``, with an idle heartbeat; status messages on the inbox say when
a request ended (``404``/``408``/``409``) or the consumer is unreachable
(``503``, ``409 Consumer Deleted``). No message and no heartbeat for
``2 * idle_heartbeat + 0.5 s`` while a request is out means it is gone
(server restart, lost connection).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .options import ConsumerOptions

__all__ = ["Pulls"]

logger = logging.getLogger("trio_bus.nats")


class Pulls:
    """Accounting of outstanding pull requests.

    Attributes:
        requested: Messages requested and not yet delivered.
        last_activity: Loop time of the last message or heartbeat.
    """

    def __init__(self, options: ConsumerOptions, prefetch: int) -> None:
        self.prefetch = prefetch
        self.requested = 0
        self.last_activity = 0.0
        self._silent_after = 2 * options.idle_heartbeat + 0.5
        self._tail = b',"expires":%d,"idle_heartbeat":%d}' % (
            int(options.pull_expires * 1e9),
            int(options.idle_heartbeat * 1e9),
        )

    def lost(self) -> None:
        """Every outstanding request is gone (reconnected, bound again)."""
        self.requested = 0

    def delivered(self, now: float) -> None:
        """A message arrived for a request."""
        self.last_activity = now
        if self.requested > 0:
            self.requested -= 1

    def silent(self, now: float) -> bool:
        """Whether a request is out and nothing was heard for too long."""
        return bool(self.requested) and now - self.last_activity > self._silent_after

    def status(self, headers: Mapping[str, str], now: float) -> bool:
        """Account a status message; True when the consumer must be bound
        again."""
        self.last_activity = now
        status = headers.get("Status")
        if status == "100":  # idle heartbeat
            return False
        pending = headers.get("Nats-Pending-Messages")
        if status in ("404", "408", "409"):
            if pending is not None:
                self.requested = max(0, self.requested - int(pending))
            elif status != "409":
                self.requested = 0
            if status != "409":
                return False
            description = headers.get("Description", "")
            logger.info("pull request ended: 409 %s", description)
            if "Deleted" in description or not pending:
                self.requested = 0
            return "Consumer Deleted" in description
        self.requested = 0
        if status == "503":
            # No responders: JetStream not ready yet (server restarting) or
            # the consumer/stream is gone.
            return True
        logger.warning("unexpected pull status %s %s", status, headers.get("Description"))
        return False

    def size(self, in_hand: int) -> int:
        """Messages to request now: the free room, once it is at least half
        the prefetch window (or anything when nothing is requested)."""
        room = self.prefetch - self.requested - in_hand
        if room <= 0 or (self.requested and room < max(1, self.prefetch // 2)):
            return 0
        return room

    async def request(self, nc: Any, subject: str, inbox: str, room: int, now: float) -> None:
        """Ask for *room* more messages."""
        if not self.requested:
            self.last_activity = now
        self.requested += room
        try:
            await nc.publish(subject, b'{"batch":%d%s' % (room, self._tail), reply=inbox)
        except Exception as exc:
            self.requested -= room
            logger.debug("pull request failed: %r", exc)
