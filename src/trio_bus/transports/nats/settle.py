"""Settling deliveries: acks, naks, in-progress acks and their confirmation.

Trio code records an outcome with the synchronous ``ack``/``release``: one
item in the consumer's :class:`~trio_bus.transports._bridge.Mailbox`. The
asyncio side alone owns what follows (:class:`Settler`): which deliveries
are unsettled, the queue of ``+ACK``/``-NAK``/``+WPI`` to send (formatted in
one write), the in-progress ack schedule, and which acks the server is known
to have processed (an echo round trip on the same connection); acks not
confirmed when a connection drops are sent again after the reconnection (an
ack is idempotent), so a handled message is not redelivered behind a later
one of its aggregate.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence

import attrs

from .connection import Connection

__all__ = ["ACK", "NAK", "WPI", "Delivery", "Settler", "parse_reply"]

logger = logging.getLogger("trio_bus.nats")

ACK = b"+ACK"
NAK = b"-NAK"
WPI = b"+WPI"


@attrs.define(slots=True, eq=False)
class Delivery:
    """One delivery (``Record.token``). Trio code only passes it back;
    ``touched`` is the asyncio side's in-progress ack schedule."""

    seq: int
    dseq: int
    reply: str
    touched: float
    count: int = 1
    published: float | None = None


def parse_reply(reply: str) -> tuple[int, int, int, float | None]:
    """(delivery count, stream sequence, consumer delivery sequence, publish
    time in seconds since the epoch) from a JetStream ack subject."""
    tokens = reply.split(".")
    # v1: $JS.ACK.<stream>.<consumer>.<dc>.<sseq>.<dseq>.<ts>.<pending>
    # v2: $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<dc>.<sseq>.<dseq>.<ts>...
    base = 4 if len(tokens) == 9 else 6
    try:
        stamp: float | None = int(tokens[base + 3]) / 1e9
    except (IndexError, ValueError):
        stamp = None
    return int(tokens[base]), int(tokens[base + 1]), int(tokens[base + 2]), stamp


async def publish_bulk(conn: Connection, items: Sequence[tuple[str, bytes]]) -> bool:
    """Queue many bodyless-header publishes (acks) as one write; False when
    the fast path does not apply (then publish one by one).

    ``nc.publish`` costs several microseconds per call (validation, command
    formatting); acks are our own well-formed reply subjects, so they are
    formatted in one go. Relies on nats-py's ``_send_command`` /
    ``_flush_pending``, present since nats-py 2.0; checked, not assumed.
    """
    nc = conn.nc
    send = getattr(nc, "_send_command", None)
    flush = getattr(nc, "_flush_pending", None)
    if send is None or flush is None or not nc.is_connected:
        return False
    data = b"".join(
        b"PUB %s %d\r\n%s\r\n" % (reply.encode(), len(payload), payload) for reply, payload in items
    )
    await send(data)
    await flush()
    return True


class Settler:
    """Unsettled deliveries and outgoing acks of one consumer (asyncio side).

    Attributes:
        unsettled: Stream sequence -> the latest delivery not settled.
    """

    def __init__(self, conn: Connection, wpi_interval: float) -> None:
        self.conn = conn
        self.wpi_interval = wpi_interval
        self.unsettled: dict[int, Delivery] = {}
        #: (reply subject, payload) waiting to be sent, in order.
        self._outbox: list[tuple[str, bytes]] = []
        #: Acks sent, not yet confirmed: reply subject -> stream sequence.
        self._unconfirmed: dict[str, int] = {}
        self._marks: deque[tuple[asyncio.Future[None], list[str]]] = deque()

    def __len__(self) -> int:
        return len(self._outbox)

    def hold(self, delivery: Delivery) -> None:
        """A delivery arrived (not a copy of one held: see ``Puller``)."""
        self.unsettled[delivery.seq] = delivery

    def acked(self, seq: int) -> bool:
        """Whether an ack of stream sequence *seq* is queued, or sent and not
        confirmed. A scan: for redeliveries only, off the hot path."""
        if seq in self._unconfirmed.values():
            return True
        return any(p is ACK and parse_reply(reply)[1] == seq for reply, p in self._outbox)

    def settle(self, delivery: Delivery, payload: bytes) -> None:
        """Trio code settled *delivery* (``ACK`` or ``NAK``)."""
        if self.unsettled.get(delivery.seq) is delivery:
            del self.unsettled[delivery.seq]
        self._outbox.append((delivery.reply, payload))

    def send_later(self, reply: str, payload: bytes) -> None:
        """Queue a raw ack subject (skipped nested-topic messages, resync naks)."""
        self._outbox.append((reply, payload))

    def release_all(self) -> None:
        """Nak every unsettled delivery, lowest stream sequence first (so the
        next holder gets them back in order)."""
        for seq in sorted(self.unsettled):
            self._outbox.append((self.unsettled[seq].reply, NAK))
        self.unsettled.clear()

    def held(self) -> set[int]:
        """Stream sequences the server must not redeliver: unsettled, or
        acked and not confirmed."""
        seqs = set(self.unsettled)
        seqs.update(self._unconfirmed.values())
        seqs.update(parse_reply(reply)[1] for reply, p in self._outbox if p is ACK)
        return seqs

    def acks_in_flight(self) -> list[str]:
        """Reply subjects of acks queued or not confirmed (for a partition
        whose lease lapsed: they go with it to this process's next puller
        of the partition, see ``PartitionedGroup``)."""
        queued = [reply for reply, p in self._outbox if p is ACK]
        return [*self._unconfirmed, *queued]

    def in_progress(self, now: float) -> None:
        """Queue ``+WPI`` for every delivery not touched for an interval."""
        older_than = now - self.wpi_interval
        for delivery in self.unsettled.values():
            if delivery.touched <= older_than:
                delivery.touched = now
                self._outbox.append((delivery.reply, WPI))

    def reconnected(self) -> None:
        """Acks in flight may be lost with the old connection: send again."""
        self._outbox[:0] = [(reply, ACK) for reply in self._unconfirmed]
        self._unconfirmed.clear()
        self._marks.clear()

    def confirmations(self) -> None:
        """Forget the acks the server confirmed."""
        marks = self._marks
        while marks and marks[0][0].done():
            _, replies = marks.popleft()
            for reply in replies:
                self._unconfirmed.pop(reply, None)

    async def send(self) -> None:
        """Send everything queued; acks stay unconfirmed until an echo
        round trip comes back."""
        batch, self._outbox = self._outbox, []
        if not batch:
            return
        sent: Iterable[tuple[str, bytes]]
        if await publish_bulk(self.conn, batch):
            sent = batch
        else:
            sent = []
            nc = self.conn.nc
            for i, (reply, payload) in enumerate(batch):
                try:
                    await nc.publish(reply, payload)
                except Exception as exc:
                    # Not connected and the reconnect buffer is full, or
                    # closed: keep the rest for later, never drop an ack.
                    self._outbox[:0] = batch[i:]
                    logger.debug("sending acks failed: %r", exc)
                    break
                sent.append((reply, payload))
        acks = [reply for reply, payload in sent if payload is ACK]
        if not acks:
            return
        for reply in acks:
            self._unconfirmed[reply] = parse_reply(reply)[1]
        try:
            self._marks.append((await self.conn.echo(), acks))
        except Exception as exc:  # confirmed after the next reconnection
            logger.debug("ack confirmation failed: %r", exc)

    async def confirm(self, seconds: float) -> bool:
        """Wait up to *seconds* until every sent ack is confirmed."""
        if not self._unconfirmed:
            return True
        if not self._marks:
            return False
        await asyncio.wait({self._marks[-1][0]}, timeout=seconds)
        self.confirmations()
        return not self._unconfirmed
