"""A partitioned consumer group's member (Trio side): :class:`GroupConsumer`.

One subscription of a group on a partitioned topic. It is one member of the
group (a heartbeat key in the KV bucket, see :mod:`.leases`) and holds the
partitions rendezvous hashing gives it over the live members, each as a
:class:`~.puller.Puller` of the partition's durable (``<durable>_p<p>``)
under a :class:`~trio_bus._lease.Lease`. All its pullers put records into
one hand-off, so ``fetch`` is one wait, as for a plain consumer.

A *round* (every ``lease_ttl / 3``, from the transport's lease task in
:mod:`.rounds`, and at once when the view sees a member come or go or a
lease given up):

1. partitions whose lease lapsed locally (renewals failed for a whole
   ``lease_ttl``) are dropped without sending anything: the pool already
   stopped their handlers at the lease's expiry;
2. partitions now another live member's are given up gracefully: drained
   (nothing more handed over; the handlers of what was fetched may finish,
   briefly), lease revoked (the pool starts no handler, running ones are
   cancelled), unsettled deliveries nak'd in order and confirmed, lease key
   deleted;
3. one batch of compare-and-set writes: the heartbeat, a renewal per held
   partition, a claim per partition that is ours and free (no key, deleted,
   or not renewed for its owner's ttl + ``lease_grace`` as seen here).
   ``t0`` is read before the batch is sent, and a renewal or claim the
   server accepted makes the lease valid until ``t0 + lease_ttl``: never
   later than another member could see it expire.

A claimed partition's puller resyncs when the previous owner left deliveries
unacked (:mod:`.resume`): they are nak'd back and handed over before
anything newer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..._lease import Lease
from ..._message import Record
from ...errors import BusClosedError, TransportError, TransportUnavailableError
from .._base import Consumer, ConsumerSpec, LaneState
from .._bridge import Handoff
from .bind import bind
from .leases import Scope, Write
from .options import durable_name
from .partitions import Slot, assign, filters, key_token, slot_consumer_options
from .puller import Puller
from .settle import ACK, NAK, Delivery
from .streams import TopicInfo

if TYPE_CHECKING:
    from .transport import NatsTransport

__all__ = ["GroupConsumer"]

logger = logging.getLogger("trio_bus.nats")


class GroupConsumer(Consumer):
    """One member of a partitioned group on one topic."""

    def __init__(
        self, transport: NatsTransport, spec: ConsumerSpec, where: TopicInfo, member: str
    ) -> None:
        self._transport = transport
        self._bridge = transport._bridge
        self._conn = transport._conn
        self.spec = spec
        self.where = where
        self.member = member
        self.options = groups = transport.options.groups
        self.partitions = where.partitions
        self._incarnation = uuid.uuid4().hex  # a restarted member is another
        base = durable_name(spec.group, spec.topic, where.nested)
        self.name = f"{spec.topic}/{base}"
        self.scope = Scope(
            self._conn,
            groups.groups_bucket,
            f"{key_token(where.stream)}.{key_token(base)}",
            on_change=self.poke,
            timeout=min(transport.options.request_timeout, groups.lease_ttl / 3),
        )
        copts = transport.options.consumer
        prefetch = max(1, min(copts.prefetch or 2 * spec.max_batch, copts.max_ack_pending))
        self._copts = attrs.evolve(slot_consumer_options(copts, groups), prefetch=prefetch)
        self._low_water = prefetch // 2
        self.handoff: Handoff[Record] = Handoff()
        self.slots: dict[int, tuple[Slot, Puller]] = {}
        self._revisions: dict[int, int] = {}  # our lease keys' revisions
        # Acks in flight when a partition's lease lapsed (see _let_go).
        self._carried: dict[int, list[str]] = {}
        self._lock = trio.Lock()
        self._closed = False
        #: Trio time of the next round (the lease task reads it).
        self.next_round = -math.inf
        #: Rounds done, partitions claimed and lost (tests, metrics).
        self.rounds = self.claimed = self.lost = 0

    # ------------------------------------------------------------ rounds

    def poke(self) -> None:
        """The view saw a member come or go, or a lease given up: a round now."""
        self.next_round = -math.inf
        self._transport._rounds.wake()

    @property
    def held(self) -> list[int]:
        """The partitions this member holds."""
        return sorted(self.slots)

    async def open(self) -> None:
        """Join: start the view, heartbeat, and claim what is free for us
        (return once those partitions pull)."""
        await self._bridge.call(self.scope.open)
        await self._bridge.call(self._ensure_durables)
        [first] = await self._bridge.call(self.scope.write, [self._heartbeat()])
        if isinstance(first, Exception):
            raise first
        if isinstance(first, int):
            # Our own write is the newest: once seen, the view is complete.
            timeout = self._conn.options.request_timeout
            await self._bridge.call(self.scope.wait_seen, first, timeout)
        await self.round()

    async def _ensure_durables(self) -> None:
        """Create the partitions' durables that do not exist yet (asyncio
        side): a group's ``start`` applies when the group is created, to
        every partition, not when a member first claims one."""
        base = durable_name(self.spec.group, self.spec.topic, self.where.nested)
        topic = self.spec.topic
        await asyncio.gather(
            *(
                bind(self._conn, self.where, f"{base}_p{p}", self.spec, filters=filters(topic, p))
                for p in range(self.partitions)
            )
        )

    def _heartbeat(self) -> Write:
        return Write(f"m.{self.member}", {"inc": self._incarnation, "ttl": self._ttl}, None)

    @property
    def _ttl(self) -> float:
        return self.options.lease_ttl

    async def round(self) -> None:
        """One lease round (see the module doc)."""
        async with self._lock:
            if not self._closed:
                await self._round()
                self.rounds += 1

    async def _round(self) -> None:
        ttl, grace = self._ttl, self.options.lease_grace
        self.next_round = trio.current_time() + ttl / 3
        lapsed = [p for p, (slot, _) in self.slots.items() if not slot.lease.held()]
        if lapsed:
            logger.warning("%s: leases of partitions %s lapsed; dropped", self.name, lapsed)
            await self._let_go(lapsed, settle=False)
        now = trio.current_time()
        live = set(self.scope.members(now)) | {self.member}
        mine = {p for p, owner in assign(live, self.partitions).items() if owner == self.member}
        moving = sorted(set(self.slots) - mine)
        if moving:
            logger.info("%s: giving partitions %s to other members", self.name, moving)
            await self._drain(moving)
            await self._let_go(moving, settle=True)
        held = sorted(self.slots)
        writes = [self._heartbeat()]
        value = {"owner": self.member, "inc": self._incarnation, "ttl": ttl}
        writes += [Write(f"p.{p}", value, self._revisions[p]) for p in held]
        claims: list[int] = []
        for p in sorted(mine - set(self.slots)):
            last = self._claimable(p, now, grace)
            if last is not None:
                claims.append(p)
                writes.append(Write(f"p.{p}", value, last))
        t0 = trio.current_time()  # before anything is sent
        results = await self._bridge.call(self.scope.write, writes)
        _fatal(results)
        lost = [p for p, r in zip(held, results[1 : 1 + len(held)], strict=True) if r is None]
        for p, result in zip(held, results[1 : 1 + len(held)], strict=True):
            if isinstance(result, int):
                self._revisions[p] = result
                self.slots[p][0].lease.renew(t0 + ttl)
        if lost:
            logger.warning("%s: partitions %s were taken over; dropped", self.name, lost)
            await self._let_go(lost, settle=False)
        for p, result in zip(claims, results[1 + len(held) :], strict=True):
            if isinstance(result, int):
                await self._start(p, result, Lease(t0 + ttl, name=f"{self.name}/p{p}"))

    def _claimable(self, p: int, now: float, grace: float) -> int | None:
        """The revision to claim partition *p* at, or None: not yet (the
        round is brought forward to when it will be)."""
        entry = self.scope.lease(p)
        if entry is None:
            return 0
        owner = entry.value
        if owner is None or owner.get("inc") == self._incarnation:
            return entry.revision  # given up, or ours and lapsed here
        due = entry.seen + float(owner.get("ttl", self._ttl)) + grace
        if now >= due:
            return entry.revision
        self.next_round = min(self.next_round, due)
        return None

    async def _start(self, p: int, revision: int, lease: Lease) -> None:
        topic = self.spec.topic
        slot = Slot(partition=p, filters=filters(topic, p), lease=lease, consumer=self._copts)
        streams = self._transport._streams
        puller = Puller(self._conn, streams, self.spec, slot=slot, handoff=self.handoff)
        for reply in self._carried.pop(p, ()):
            puller.settler.send_later(reply, ACK)
        self._revisions[p] = revision
        self.slots[p] = (slot, puller)
        try:
            await self._bridge.call(self._transport._supervisor.open_consumer, puller)
        except TransportUnavailableError as exc:
            logger.warning("%s: starting partition %d: %s; retrying", self.name, p, exc)
            await self._let_go([p], settle=True)
            return
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._let_go([p], settle=True)
            raise
        self.claimed += 1

    async def _drain(self, partitions: Sequence[int]) -> None:
        """Let the handlers of what the bus fetched from *partitions* finish
        (at most ``min(lease_ttl / 6, 1 s)``, well within the lease): hand
        nothing more over, take back what is still queued."""
        slots = [self.slots[p][0] for p in partitions]
        for slot in slots:
            slot.draining = True
            self.handoff.discard(slot.owns)
            if not slot.in_pool:
                slot.drained.set()
        with trio.move_on_after(min(self._ttl / 6, 1.0)):
            for slot in slots:
                await slot.drained.wait()

    async def _let_go(self, partitions: Sequence[int], *, settle: bool) -> None:
        """Stop handling *partitions*: revoke their leases first, then close
        their pullers (``settle``: nak what is unsettled and delete the lease
        keys; else send nothing, the lease is not ours any more)."""
        taken = [(p, *self.slots.pop(p)) for p in partitions if p in self.slots]
        for _, slot, _ in taken:
            slot.lease.revoke()
        if not settle:
            self.lost += len(taken)
        seconds = _close_budget()
        pullers = [puller for _, _, puller in taken]
        await self._bridge.call(_close_all, self._transport, pullers, seconds, settle)
        if not settle:
            # Acks of handlers that finished under the lease, unconfirmed
            # (sent into an outage, or not sent): a lapsed lease sends
            # nothing, so they are lost unless this process claims the
            # partition again, whose puller then sends them before it
            # resyncs, so a handled message does not run again behind newer
            # ones. (Bounded: at most max_ack_pending per partition.)
            for p, _, puller in taken:
                self._carried[p] = puller.settler.acks_in_flight()
        revisions = [(p, self._revisions.pop(p, 0)) for p, _, _ in taken]
        if settle:
            deletes = [Write(f"p.{p}", None, rev) for p, rev in revisions if rev]
            _fatal(await self._bridge.call(self.scope.write, deletes))

    # ---------------------------------------------------------- consuming

    async def fetch(self, max_records: int) -> Sequence[Record]:
        """Wait for deliveries of any held partition (cancel-atomic).

        Raises:
            BusClosedError: the consumer is closed.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise BusClosedError("the consumer is closed")
        records = await self.handoff.take(max_records)
        for record in records:
            entry = self.slots.get(record.partition) if record.partition is not None else None
            if entry is not None and entry[0].lease is record.lease:
                entry[0].in_pool += 1
        if len(self.handoff) <= self._low_water:
            for _, puller in self.slots.values():
                puller.mailbox.put(None)  # room: the loops may pull more
        return records

    def _settle(self, record: Record, payload: bytes, *, fetched: bool = True) -> None:
        # Only under the lease it was delivered with, while it is held: a
        # settlement after the lease was lost is dropped (the new owner
        # gets the message again).
        entry = self.slots.get(record.partition) if record.partition is not None else None
        lease = record.lease
        if entry is None or lease is None or entry[0].lease is not lease or not lease.held():
            return
        if fetched:
            entry[0].settled()
        if isinstance(record.token, Delivery):
            entry[1].mailbox.put((record.token, payload))

    def ack(self, record: Record) -> None:
        """The handler finished: ``+ACK`` (dropped once the lease is lost)."""
        self._settle(record, ACK)

    def release(self, record: Record) -> None:
        """``-NAK`` it and everything queued after it (see NatsConsumer)."""
        self._settle(record, NAK)
        for queued in self.handoff.take_nowait(len(self.handoff)):
            self._settle(queued, NAK, fetched=False)

    async def flush(self) -> None:
        """Send the queued acks of every held partition and wait for the
        server to confirm them."""
        pullers = [puller for _, puller in self.slots.values()]
        await self._bridge.call(_flush_all, pullers, _close_budget())

    async def lanes(self) -> Sequence[LaneState]:
        """One lane per held partition (asks the server)."""
        if self._closed or not self.slots:
            await trio.lowlevel.checkpoint()
            return ()
        held = list(self.slots.items())
        states = await self._bridge.call(_lanes, [puller for _, (_, puller) in held])
        return [attrs.evolve(s, partition=p) for (p, _), s in zip(held, states, strict=True)]

    async def aclose(self) -> None:
        """Leave the group: give every partition up (naks, lease keys
        deleted), delete the heartbeat; bounded, also when cancelled."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._transport._consumers.discard(self)
        self._transport._rounds.groups.discard(self)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _close_budget() * 1.5
            async with self._lock:
                self._closed = True
                try:
                    await self._let_go(list(self.slots), settle=True)
                    await self._leave()
                except TransportError as exc:  # the leases lapse instead
                    logger.warning("leaving group %s: %s", self.name, exc)
                finally:
                    self.handoff.fail(BusClosedError("the consumer is closed"))
                    try:
                        await self._bridge.call(self.scope.close)
                    except TransportError as exc:
                        logger.debug("closing the KV view of %s: %s", self.name, exc)
        if scope.cancelled_caught:
            logger.warning("leaving group %s took too long", self.name)

    async def _leave(self) -> None:
        """Delete the heartbeat, then every lease key still ours (a claim
        whose answer a cancellation cut off): once the view has seen the
        delete, it has seen our earlier writes too (one connection)."""
        [gone] = await self._bridge.call(self.scope.write, [Write(f"m.{self.member}", None, None)])
        if isinstance(gone, int):
            await self._bridge.call(self.scope.wait_seen, gone, _close_budget() / 2)
        ours = []
        for p in range(self.partitions):
            entry = self.scope.lease(p)
            if entry is not None and entry.value and entry.value.get("inc") == self._incarnation:
                ours.append(Write(f"p.{p}", None, entry.revision))
        if ours:
            await self._bridge.call(self.scope.write, ours)


def _close_budget() -> float:
    from .transport import CLOSE_TIMEOUT

    return CLOSE_TIMEOUT * 0.8


def _fatal(results: Sequence[int | Exception | None]) -> None:
    """A write that failed for another reason than being unavailable (the
    bucket refuses us, say) is a failure of the lease machinery: raise it
    (it ends the transport as a TransportError)."""
    for result in results:
        if isinstance(result, TransportError) and not isinstance(result, TransportUnavailableError):
            raise result
        if isinstance(result, Exception) and not isinstance(result, TransportError):
            raise TransportError(f"partition lease write failed: {result!r}") from result


async def _close_all(
    transport: NatsTransport, pullers: Sequence[Puller], seconds: float, settle: bool
) -> None:
    close = transport._supervisor.close_consumer
    await asyncio.gather(*(close(p, seconds, settle=settle) for p in pullers))


async def _flush_all(pullers: Sequence[Puller], seconds: float) -> None:
    await asyncio.gather(*(p.flush(seconds) for p in pullers))


async def _lanes(pullers: Sequence[Puller]) -> list[Any]:
    return list(await asyncio.gather(*(p.lane() for p in pullers)))
