"""The partition fence of a consumer group: one lease per assigned partition
(asyncio side; see :mod:`trio_bus._lease` for what the pool does with it).

The guarantee: a member that lost its partitions -- frozen (SIGSTOP) past
``session_timeout_ms``, or cut off from the group coordinator -- starts no
new handler for them, and a handler suspended at an ``await`` is cancelled
at the lease's expiry (the pool caps its deadline there), so its code after
that ``await`` never runs and its offset is never committed. Another member
can only be given the partitions after the coordinator expired this one,
and that cannot happen before the lease expired here:

* every :class:`~trio_bus._lease.Lease` of the group expires at
  ``(send time of the last request the coordinator answered for this
  member) + session_timeout - margin``. The coordinator restarts a
  member's session timer when it *receives* a heartbeat (or SyncGroup),
  which is after it was sent, so the member's session ends no earlier
  than that (``margin`` covers scheduling and clock-rate slack);
* a heartbeat answered ``REBALANCE_IN_PROGRESS`` still keeps the member
  (Kafka holds a rebalance open for the rebalance timeout), so it renews
  up to ``min(send + session, last stable answer + rebalance_timeout)``:
  the rebalance began after the last answer that found the group stable;
* the leases are revoked when the partitions are given up (at the end of
  ``on_partitions_revoked``: after the grace and the commit, before the
  rejoin), lost (a heartbeat answered ``UNKNOWN_MEMBER_ID``,
  ``ILLEGAL_GENERATION`` or ``FENCED_INSTANCE_ID``), before a LeaveGroup is
  sent, and when the group stops;
* a lease that lapsed before an answer renewed it (a heartbeat answered
  late: a loaded machine, a slow coordinator) is not revived -- the pool may
  have handed deliveries back meanwhile, and reviving it would run the
  partition's later records before them (``Lease.renew`` revokes it). The
  member rejoins the group instead, which re-grants the partitions with new
  leases and seeks them to their committed offsets: what was handed back
  is delivered again, in order;
* the commit loop sends no offset of a partition whose lease is not held.

Heartbeat answers are learned by wrapping the coordinator's request method
(``_send_req``: every JoinGroup, SyncGroup, Heartbeat and LeaveGroup goes
through it in aiokafka 0.11 to 0.14; aiokafka has no public hook, and the
heartbeat routine keeps its last success in a local variable). Requests are
told apart by their Kafka API key. A renewal runs on the asyncio side
within the response's loop turn, once per heartbeat for all partitions;
trio-asyncio runs asyncio callbacks inside a Trio task, in the same thread,
so the lease's synchronous methods (moving cancel-scope deadlines, or
cancelling them) are called directly: no bridge crossing, nothing per
message.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from aiokafka import TopicPartition

from ..._lease import Lease

__all__ = ["Fence"]

logger = logging.getLogger("trio_bus.transports.kafka")

# Kafka API keys of the coordinator requests the fence watches.
_SYNC_GROUP, _HEARTBEAT, _LEAVE_GROUP = 14, 12, 13
# Kafka error codes of their answers.
_NO_ERROR, _REBALANCE_IN_PROGRESS = 0, 27
#: The member is no longer in the group (or not in this generation).
_LOST = {22: "ILLEGAL_GENERATION", 25: "UNKNOWN_MEMBER_ID", 82: "FENCED_INSTANCE_ID"}


class Fence:
    """The leases of one group's assigned partitions.

    Attributes:
        leases: The current assignment's lease per partition (read by the
            poll loop for every delivered batch, and by the commit loop).
        expires: The bound the last answered heartbeat justified (Trio
            clock; -inf while the member has none).
        renewals: Heartbeat and SyncGroup answers that extended it.
    """

    def __init__(
        self, name: str, *, session_timeout: float, rebalance_timeout: float, margin: float
    ) -> None:
        self.name = name
        self.leases: dict[TopicPartition, Lease] = {}
        self.expires = -math.inf
        self.renewals = 0
        self._session = session_timeout
        self._rebalance = rebalance_timeout
        self._margin = margin
        # Send time of the last request answered with no error: the group
        # was stable then, with this member in it.
        self._stable_sent = -math.inf
        #: Asks the coordinator for a rejoin (set by :meth:`install`).
        self._rejoin: Callable[[], None] = lambda: None
        #: Rejoins asked for because leases lapsed before their renewal.
        self.lapses = 0

    def install(self, coordinator: Any) -> None:
        """Watch *coordinator*'s requests (an aiokafka ``GroupCoordinator``,
        right after the consumer started)."""
        send: Callable[[Any], Awaitable[Any]] = coordinator._send_req
        self._rejoin = coordinator.request_rejoin

        async def send_req(request: Any) -> Any:
            key = getattr(request, "API_KEY", None)
            if key == _LEAVE_GROUP:
                self.lose("leaving the group")
            if key not in (_HEARTBEAT, _SYNC_GROUP):
                return await send(request)
            sent = trio.current_time()  # before the request leaves
            response = await send(request)
            self._answered(key, sent, getattr(response, "error_code", None))
            return response

        coordinator._send_req = send_req

    def _answered(self, key: int, sent: float, code: int | None) -> None:
        if code == _NO_ERROR:
            self._stable_sent = max(self._stable_sent, sent)
            self._extend(sent + self._session)
        elif code == _REBALANCE_IN_PROGRESS and key == _HEARTBEAT:
            self._extend(min(sent + self._session, self._stable_sent + self._rebalance))
        elif code in _LOST:
            self.lose(f"the coordinator answered {_LOST[code]}")

    def _extend(self, until: float) -> None:
        until -= self._margin
        if until <= self.expires:
            return
        self.expires = until
        self.renewals += 1
        lapsed = []
        for tp, lease in self.leases.items():
            if not lease.revoked and not lease.renew(until):  # it had lapsed
                lapsed.append(tp)
        if lapsed:
            self.lapses += 1
            logger.warning(
                "group %r: leases of %d partitions lapsed before a heartbeat answer renewed"
                " them; rejoining to get them back in order",
                self.name,
                len(lapsed),
            )
            self._rejoin()

    def grant(self, partitions: Iterable[TopicPartition]) -> None:
        """New leases for a new assignment (``on_partitions_assigned``),
        valid as far as the SyncGroup answer that brought it justifies."""
        for tp in partitions:
            old = self.leases.get(tp)
            if old is not None:
                old.revoke()
            self.leases[tp] = Lease(self.expires, name=f"{self.name}:{tp.topic}/p{tp.partition}")

    def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        """Void the leases of *partitions* (given up): running calls under
        them are cancelled now."""
        for tp in partitions:
            lease = self.leases.pop(tp, None)
            if lease is not None:
                lease.revoke()

    def lose(self, why: str, *, warn: bool = True) -> None:
        """The member is (or is about to be) out of the group: void every
        lease, and trust no earlier heartbeat any more. The void leases stay
        until the next assignment replaces them, so records fetched
        meanwhile carry a void lease (the pool hands them back), never none."""
        self.expires = self._stable_sent = -math.inf
        live = [lease for lease in self.leases.values() if not lease.revoked]
        if live and warn:
            logger.warning("group %r: %s; %d partition leases void", self.name, why, len(live))
        for lease in live:
            lease.revoke()

    def held(self, tp: TopicPartition) -> bool:
        """Whether work of *tp* may be committed now."""
        lease = self.leases.get(tp)
        return lease is not None and lease.held()
