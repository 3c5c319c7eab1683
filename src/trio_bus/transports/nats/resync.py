"""Redelivery on the asyncio side: resyncs and copies of redeliveries.

A resync asks the server to redeliver now what it delivered to this
consumer and the consumer never got (lost on a dead connection, or left
unacked by a previous holder), and holds newer deliveries in the
:class:`~.resume.Barrier` until those are back, so an aggregate's order
survives a reconnection (docs/nats.md, "Reconnection"). The decisions are
pure functions in :mod:`.resume`; this module applies them to a
:class:`~.puller.Puller`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import nats.js.errors

from ...errors import TransportUnavailableError
from .resume import plan_resync
from .settle import ACK, NAK, Delivery
from .streams import map_api_error

if TYPE_CHECKING:
    from .puller import Puller

__all__ = ["RESYNC_ROUNDS", "RESYNC_TIMEOUT", "after_deadline", "resync", "stale_copy"]

logger = logging.getLogger("trio_bus.nats")

#: Seconds a resync waits for the nak'd deliveries to come back.
RESYNC_TIMEOUT = 5.0
#: Resyncs in a row while redeliveries are still awaited, before what is
#: held is released anyway (in order, but a redelivery that comes later
#: then runs after newer messages of its aggregate).
RESYNC_ROUNDS = 3


def held_by_group(puller: Puller) -> tuple[set[int], set[int]]:
    """What this process holds of *puller*'s group, (not to nak, still
    pending on the server): a resync must not nak the first and counts the
    second (see :func:`.resume.plan_resync`)."""
    settlers = [puller.settler, *(p.settler for p in puller.peers if puller.same_group(p))]
    held: set[int] = set()
    pending: set[int] = set()
    for settler in settlers:
        held |= settler.held()
        pending.update(settler.unsettled)
    return held, pending


async def fresh_state(puller: Puller) -> Any:
    """The consumer's state once the server processed our acks (None: the
    consumer is gone)."""
    assert puller.where is not None
    puller.drain_mailbox()
    puller.settler.reconnected()
    await puller.settler.send()  # acks before the naks, on one connection
    conn = puller.conn
    if not await conn.round_trip(conn.options.request_timeout):
        # Which acks the state below reflects would be unknown.
        raise TransportUnavailableError("no round trip to the server for a resync")
    try:
        return await conn.jsm.consumer_info(puller.where.stream, puller.durable)
    except nats.js.errors.NotFoundError:
        return None
    except Exception as exc:
        raise map_api_error(exc, f"reading consumer {puller.durable!r}") from exc


async def resync(puller: Puller) -> None:
    """Have the server redeliver now what it delivered and *puller* never
    got; hold new deliveries until those are back."""
    assert puller.where is not None
    # Cleared first: a reconnection while this runs asks for another.
    puller.need_resync = False
    try:
        info = await fresh_state(puller)
    except BaseException:
        puller.need_resync = True
        raise
    if info is None:
        puller.need_resync = puller.need_bind = True  # resync the new consumer
        return
    delivered = info.delivered.consumer_seq or 0
    puller.gaps.advance(delivered)
    held, pending = held_by_group(puller)
    naks, expect = plan_resync(
        ack_floor=info.ack_floor.stream_seq or 0,
        delivered=info.delivered.stream_seq or 0,
        ack_pending=info.num_ack_pending or 0,
        held=held,
        pending=pending,
    )
    prefix = f"$JS.ACK.{puller.where.stream}.{puller.durable}.1."
    for seq in naks:
        puller.settler.send_later(f"{prefix}{seq}.{delivered}.0.0", NAK)
    await puller.settler.send()
    if puller.need_resync:
        return  # reconnected meanwhile: the next resync decides
    now = asyncio.get_running_loop().time()
    logger.info("%s: resync, %d redeliveries awaited", puller.durable, expect)
    released = puller.barrier.resync(
        awaiting=naks, expect=expect, after_dseq=delivered, deadline=now + RESYNC_TIMEOUT
    )
    puller.hand_over(released)


def after_deadline(puller: Puller, now: float, rounds: int) -> int:
    """Once a held barrier's deadline passed: resync again (the count of
    *rounds* in a row grows) or, after ``RESYNC_ROUNDS``, release what is
    held. Returns the new count (0 when nothing is held)."""
    barrier = puller.barrier
    if not barrier.holding:
        return 0
    if barrier.overdue(now) and rounds < RESYNC_ROUNDS - 1:
        logger.info(
            "%s: %d redeliveries still awaited; resyncing again", puller.durable, barrier.expected
        )
        puller.pause(now)
        return rounds + 1
    puller.hand_over(barrier.expire(now))
    return rounds


def stale_copy(puller: Puller, delivery: Delivery, now: float) -> bool:
    """Whether a redelivery is a further copy of a sequence *puller* holds
    unsettled, or acked: then it is dropped (acked again in the second case;
    the server acks by stream sequence, so the earlier delivery's ack
    settles it) and only counted by the barrier.

    Copies come from naks of resyncs in a row (the server queues a sequence
    again once it redelivered it) and from ``ack_wait`` running out under a
    slow handler. Handing one over would run the message again, after newer
    messages of its aggregate."""
    settler = puller.settler
    if delivery.seq not in settler.unsettled:
        if not settler.acked(delivery.seq):
            return False
        settler.settle(delivery, ACK)
        puller.mailbox.wake()
    if puller.giving_up():
        return True  # hands nothing over (see Puller._on_msg)
    if puller.gaps.seen(delivery.dseq, now):
        puller.pause(now)
    barrier = puller.barrier
    if barrier.holding:
        puller.hand_over(
            barrier.copy(seq=delivery.seq, dseq=delivery.dseq, count=delivery.count, now=now)
        )
    return True
