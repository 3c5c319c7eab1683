"""One durable pull consumer: bind, pull, hand over, settle (asyncio side).

:meth:`Puller.run` is the consumer's one lifetime loop; the transport runs
it as a Trio task of its nursery. It keeps up to ``prefetch`` messages
requested (``$JS.API.CONSUMER.MSG.NEXT`` with ``expires`` and
``idle_heartbeat``), hands deliveries to Trio through a
:class:`~trio_bus.transports._bridge.Handoff`, drains the settlements Trio
put in the :class:`~trio_bus.transports._bridge.Mailbox`, sends acks and
in-progress acks, and applies the recovery policies (docs/nats.md,
"Reconnection"):

* a silent pull, ``409 Consumer Deleted`` or ``503``: bind again (retried
  with backoff while JetStream is unavailable; a stream that cannot be
  found or recreated per the topic strategy is fatal);
* a reconnection, or a delivery-sequence gap soon after one: resync (see
  :mod:`.resync`).

Anything else it raises ends the transport.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg

from ..._message import Record, new_record
from ...errors import (
    BusClosedError,
    TopicConfigError,
    TransportError,
    TransportUnavailableError,
)
from .._base import ConsumerSpec, LaneState
from .._bridge import Handoff, Mailbox
from .bind import Resume, bind
from .connection import Connection
from .options import TOPIC_HEADER, durable_name
from .partitions import Slot
from .pulls import Pulls
from .resume import Barrier, GapWatch
from .resync import after_deadline, resync, stale_copy
from .settle import ACK, Delivery, Settler, parse_reply
from .streams import Streams, TopicInfo

__all__ = ["ACK_BATCH", "ACK_DELAY", "Puller", "Settlement"]

logger = logging.getLogger("trio_bus.nats")

#: Seconds acks may wait to be sent with others.
ACK_DELAY = 0.005
#: Acks queued that are sent at once.
ACK_BATCH = 256
_BACKOFF = (0.05, 2.0)

#: What Trio puts in the mailbox: (delivery, ACK or NAK), or None after a
#: fetch took deliveries (room to pull more).
Settlement = tuple[Delivery, bytes] | None


class Puller:
    """One durable pull consumer's delivery machinery (asyncio side)."""

    def __init__(
        self,
        conn: Connection,
        streams: Streams,
        spec: ConsumerSpec,
        *,
        slot: Slot | None = None,
        handoff: Handoff[Record] | None = None,
    ) -> None:
        self.conn = conn
        self.streams = streams
        self.spec = spec
        # A partition of a group (see group.py): its own durable, filters,
        # lease and pull timing; its records go to the group's hand-off.
        self.slot = slot
        self.copts = copts = slot.consumer if slot is not None else conn.options.consumer
        prefetch = copts.prefetch or 2 * spec.max_batch
        self.prefetch = max(1, min(prefetch, copts.max_ack_pending))
        self.handoff: Handoff[Record] = handoff if handoff is not None else Handoff()
        self.mailbox: Mailbox[Settlement] = Mailbox()
        self.settler = Settler(conn, copts.wpi_interval)
        self.barrier: Barrier[Record] = Barrier()
        self.gaps = GapWatch(copts.pull_expires)
        self.where: TopicInfo | None = None
        self.durable = ""
        self.inbox = ""
        self.sub: Any = None
        self.pulls = Pulls(copts, self.prefetch)
        self._next = ""  # the pull request subject
        self.max_seq = 0  # highest stream sequence delivered to us
        self.bound_at: datetime | None = None  # when our consumer was created
        self.closing = False
        self.need_bind = False
        self.need_resync = False
        self._resync_rounds = 0  # resyncs in a row past their deadline
        self.peers: Iterable[Puller] = ()
        self._reconnects = conn.nc.stats["reconnects"]  # reconnections seen

    # ---------------------------------------------------------- lifecycle

    async def start(self, peers: Iterable[Puller] = ()) -> None:
        """Bind and issue the first pull; return once deliveries can flow.

        *peers* are the transport's running pullers, a live view (a live
        member of the same group in this process is no previous holder, and
        a resync must not nak what it holds)."""
        loop = asyncio.get_running_loop()
        self.where = await self.streams.ensure(self.spec.topic)
        self.durable = durable_name(self.spec.group, self.spec.topic, self.where.nested)
        if self.spec.ephemeral:
            self.durable = f"{self.durable}_{uuid.uuid4().hex[:12]}"
        if self.slot is not None:
            self.durable += self.slot.suffix
        self.inbox = self.conn.nc.new_inbox()
        self.sub = await self.conn.nc.subscribe(
            self.inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        info = await self._bind()
        self.gaps.advance(info.delivered.consumer_seq or 0)
        # Unacked deliveries and no live member pulling (a live member keeps
        # a pull request waiting): the previous holder died; see
        # ConsumerOptions.ordered_resume.
        self.peers = peers
        live_here = any(self.same_group(p) for p in peers)
        if self.slot is not None and info.num_ack_pending:
            # A partition changing hands: the previous owner's lease is over,
            # so what it left unacked is nak'd back now (a resync) instead of
            # after ack_wait, and handed over before anything newer.
            self.pause(loop.time())
        elif (
            self.copts.ordered_resume
            and not self.spec.ephemeral
            and info.num_ack_pending
            and not info.num_waiting
            and not live_here
        ):
            window = self.copts.ack_wait + 2 * self.copts.idle_heartbeat
            self.barrier.start_up(
                pending=info.num_ack_pending,
                delivered_seq=info.delivered.stream_seq or 0,
                deadline=loop.time() + window,
            )
            logger.info(
                "%s/%s: %d deliveries of a previous holder are unacked; holding new "
                "messages until they are redelivered (<= %.1fs)",
                self.spec.topic,
                self.durable,
                info.num_ack_pending,
                window,
            )
        self.conn.on_reconnect.append(self.reconnected)
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{self.where.stream}.{self.durable}"
        self.pulls.last_activity = loop.time()
        # The first pull request is on its way before open_consumer returns,
        # so a message published right after is delivered.
        await self._maybe_pull()

    def same_group(self, other: Puller) -> bool:
        """Whether *other* is another puller of this one's durable."""
        return other is not self and other.where == self.where and other.durable == self.durable

    def giving_up(self) -> bool:
        """Closing, or a partition being given up: deliveries are held to
        be nak'd at close, not handed over."""
        return self.closing or (self.slot is not None and self.slot.draining)

    async def _bind(self, resume: Resume = "") -> Any:
        assert self.where is not None
        info = await bind(
            self.conn,
            self.where,
            self.durable,
            self.spec,
            resume=resume,
            max_seq=self.max_seq,
            oldest_unsettled=min(self.settler.unsettled, default=None),
            bound_at=self.bound_at,
            filters=self.slot.filters if self.slot is not None else None,
        )
        self.bound_at = info.created
        return info

    async def _rebind(self) -> None:
        """Bind again; a memory-storage stream lost in a server restart is
        created again (per the topic strategy)."""
        try:
            info = await self._bind("consumer_lost")
        except TopicConfigError:
            if self.conn.options.topic_strategy in ("skip", "validate_only"):
                raise
            self.streams.forget(self.spec.topic)
            where = await self.streams.ensure(self.spec.topic)
            if where != self.where:
                raise TopicConfigError(
                    f"topic {self.spec.topic!r} moved to stream {where.stream!r}"
                ) from None
            info = await self._bind("stream_new")
        # A re-created consumer counts its deliveries from 1 again.
        self.gaps.restart(info.delivered.consumer_seq or 0)
        self.pulls.lost()

    def reconnected(self) -> None:
        """Pull requests died with the old connection; deliveries may have
        been lost on it: hold new ones back until resynced.

        Called by the first delivery on a new connection or by the
        connection's reconnect event, whichever comes first (once per
        reconnection)."""
        count = self.conn.nc.stats["reconnects"]
        if count == self._reconnects:
            return
        self._reconnects = count
        now = asyncio.get_running_loop().time()
        self.pulls.lost()
        self.gaps.reconnected(now)
        self.pause(now)

    def pause(self, now: float) -> None:
        """Hold new deliveries and resync (at the next turn of the loop)."""
        self.need_resync = True
        self.barrier.pause(deadline=now + self.copts.ack_wait + 2 * self.copts.idle_heartbeat)
        self.mailbox.wake()

    async def lane(self) -> LaneState:
        """This consumer's progress (asks the server)."""
        assert self.where is not None
        in_flight = len(self.settler.unsettled)
        try:
            info = await self.conn.jsm.consumer_info(self.where.stream, self.durable)
        except Exception as exc:
            logger.debug("consumer info of %s failed: %r", self.durable, exc)
            return LaneState(topic=self.spec.topic, in_flight=in_flight)
        return LaneState(
            topic=self.spec.topic,
            committed=info.ack_floor.stream_seq if info.ack_floor else None,
            lag=(info.num_pending or 0) + (info.num_ack_pending or 0),
            ack_pending=info.num_ack_pending,
            in_flight=in_flight,
        )

    async def flush(self, seconds: float) -> None:
        """Send what Trio settled; wait up to *seconds* for confirmation."""
        self.drain_mailbox()
        await self.settler.send()
        await self.settler.confirm(seconds)

    async def close(self, seconds: float, *, settle: bool = True) -> None:
        """Stop pulling, nak everything unsettled (lowest sequence first),
        send, confirm; at most about *seconds*. ``settle=False`` (a lost
        partition lease): send nothing, the new owner resyncs."""
        if self.closing:
            return
        self.closing = True
        if self.reconnected in self.conn.on_reconnect:
            self.conn.on_reconnect.remove(self.reconnected)
        if self.slot is None:
            self.handoff.discard(lambda _: True)
            self.handoff.fail(BusClosedError("the consumer is closed"))
        else:  # the group's hand-off: take out this partition's records only
            self.handoff.discard(self.slot.owns)
        nc = self.conn.nc
        if self.sub is not None and nc.is_connected and not settle:
            try:
                await self.sub.unsubscribe()
            except Exception as exc:
                logger.debug("unsubscribing the pull inbox failed: %r", exc)
        elif self.sub is not None and nc.is_connected:
            # drain: unsubscribe, then still see (and nak) what the server
            # had already sent to this inbox.
            try:
                await asyncio.wait_for(self.sub.drain(), seconds / 2)
            except Exception as exc:
                logger.debug("draining the pull inbox failed: %r", exc)
        self.drain_mailbox()
        self.barrier.release()
        self.settler.release_all()
        if settle and nc.is_connected:
            await self.settler.send()
            await self.settler.confirm(seconds / 2)
            if self.spec.ephemeral and self.where is not None:
                try:
                    await self.conn.jsm.delete_consumer(self.where.stream, self.durable)
                except Exception as exc:
                    logger.debug("deleting ephemeral consumer %s: %r", self.durable, exc)

    # ---------------------------------------------------------- receiving

    async def _on_msg(self, msg: Msg) -> None:
        if self.conn.nc.stats["reconnects"] != self._reconnects:
            # The first delivery on a new connection: nats-py runs its
            # reconnect callback only after a round trip, and the server
            # may already deliver on a pull request of the old connection
            # (interest came back with the resubscription) while what was
            # in transit on it is lost. Hold from this delivery on.
            self.reconnected()
        now = asyncio.get_running_loop().time()
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            if self.pulls.status(headers, now):
                self.need_bind = True
            if headers.get("Status") != "100":
                self.mailbox.wake()
            return
        reply = msg.reply
        if not reply:
            return
        self.pulls.delivered(now)
        count, seq, dseq, stamp = parse_reply(reply)
        self.max_seq = max(self.max_seq, seq)
        delivery = Delivery(seq, dseq, reply, now, count, stamp)
        if count > 1 and stale_copy(self, delivery, now):
            return
        self.settler.hold(delivery)
        if self.giving_up():
            return  # nak'd at close, in order
        if headers and self.where is not None and not self.where.nested:
            owner = headers.get(TOPIC_HEADER)
            if owner is not None and owner != self.spec.topic:
                # A nested topic's message stored in this topic's stream.
                self.settler.settle(delivery, ACK)
                self.mailbox.wake()
                return
        if self.gaps.seen(dseq, now):
            logger.info("%s: deliveries before %d went missing; resyncing", self.durable, dseq)
            self.pause(now)
        slot = self.slot
        record = new_record(
            topic=self.spec.topic,
            subject=msg.subject,
            value=msg.data,
            key=None,
            headers=headers or {},
            partition=slot.partition if slot is not None else None,
            offset=seq,
            delivery_count=count,
            token=delivery,
            timestamp=stamp,
            lease=slot.lease if slot is not None else None,
        )
        if self.barrier.holding:
            self.hand_over(self.barrier.admit(record, seq=seq, dseq=dseq, count=count, now=now))
        else:
            self.handoff.put(record)

    def hand_over(self, records: list[Record]) -> None:
        """Hand released *records* to Trio, in order."""
        if records:
            self.handoff.put_many(records)

    def drain_mailbox(self) -> None:
        """Take in what Trio settled."""
        for item in self.mailbox.drain():
            if item is not None:
                self.settler.settle(*item)

    # ------------------------------------------------------------ pulling

    async def _maybe_pull(self) -> None:
        if self.closing or not self.conn.nc.is_connected:
            return
        if self.slot is not None and not self.slot.may_pull():
            return  # the request would outlive the lease
        # Held deliveries do not count while redeliveries are awaited (they
        # need room to arrive; max_ack_pending bounds them).
        in_hand = len(self.handoff) + (0 if self.barrier.holding else len(self.barrier))
        room = self.pulls.size(in_hand)
        if room:
            now = asyncio.get_running_loop().time()
            await self.pulls.request(self.conn.nc, self._next, self.inbox, room, now)

    async def run(self) -> None:
        """The consumer's lifetime loop; returns only by cancellation.

        Raises:
            TopicConfigError: the stream is gone for good.
            TransportError: anything else went wrong (the cause chained).
        """
        try:
            await self._run()
        except TransportError:
            raise
        except Exception as exc:
            error = TransportError(f"the loop of nats consumer {self.durable!r} failed: {exc!r}")
            raise error from exc

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        copts, settler = self.copts, self.settler
        tick = min(copts.idle_heartbeat, copts.wpi_interval / 2, 1.0)
        next_wpi = loop.time() + copts.wpi_interval / 2
        backoff = _BACKOFF[0]
        while True:
            self.drain_mailbox()
            if self.conn.nc.is_connected and (self.need_bind or self.need_resync):
                try:
                    if self.need_bind:
                        await self._rebind()
                        self.need_bind = False
                    if self.need_resync and not self.need_bind:
                        await resync(self)
                except TransportUnavailableError as exc:
                    logger.warning("%s: %s; retrying in %.2fs", self.durable, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF[1])
                    continue
                backoff = _BACKOFF[0]
            await self._maybe_pull()
            if 0 < len(settler) < ACK_BATCH:
                await asyncio.sleep(ACK_DELAY)  # let more acks join the write
                self.drain_mailbox()
            if self.slot is None or not self.slot.fenced():
                await settler.send()  # after a lease loss: nothing, acks neither
            now = loop.time()
            self._resync_rounds = after_deadline(self, now, self._resync_rounds)
            if self.pulls.silent(now):
                # The pull is gone (server restart, lost connection): bind
                # and pull again.
                logger.info("pull on %s went silent; pulling again", self.durable)
                self.pulls.lost()
                self.need_bind = True
            if now >= next_wpi and (self.slot is None or not self.slot.fenced()):
                next_wpi = now + copts.wpi_interval / 2
                settler.in_progress(now)
            settler.confirmations()
            wait = tick if not self.barrier.holding else min(tick, self.barrier.deadline - now)
            await self.mailbox.wait(max(0.0, wait))
