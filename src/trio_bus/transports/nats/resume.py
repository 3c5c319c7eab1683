"""The ordered-resume barrier: pure logic, no I/O (unit-tested on its own).

A JetStream consumer hands over a message again (a *redelivery*) when the
previous delivery was not acked: the previous holder died (start-up) or the
delivery was lost in transit (a reconnection). The bus must not run such a
message after a later message of the same aggregate that it has already
handled, so while redeliveries are due the barrier *holds* every new
delivery back, and releases everything — lowest stream sequence first —
once the awaited ones came back, or at a deadline (a resync past its
deadline is first asked again, up to ``RESYNC_ROUNDS`` times in all, see
:mod:`.puller`).

Two ways to enter it:

* :meth:`Barrier.start_up`: a fresh consumer finds ``num_ack_pending``
  deliveries of a previous holder; they come back after ``ack_wait``.
* :meth:`Barrier.resync`: after a reconnection (or a gap in the consumer
  delivery sequence soon after one) the puller nak'd every pending
  sequence it does not hold (:func:`plan_resync`), which the server
  redelivers at once (``processNak`` in nats-server's consumer.go accepts a
  nak for any pending sequence, whoever it was delivered to).

:class:`GapWatch` notices a gap in the consumer delivery sequence (``dseq``
of the reply subject, +1 per delivery of the consumer): deliveries that went
elsewhere; for a consumer only this bus pulls from, lost in transit.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Generic, TypeVar

__all__ = ["Barrier", "GapWatch", "plan_resync"]

T = TypeVar("T")

#: Most sequences one resync naks; beyond, the oldest wait for ``ack_wait``.
RESYNC_NAK_LIMIT = 50_000


def plan_resync(
    *,
    ack_floor: int,
    delivered: int,
    ack_pending: int,
    held: Collection[int],
    pending: Collection[int],
    limit: int = RESYNC_NAK_LIMIT,
) -> tuple[list[int], int]:
    """What to nak after a reconnection, and how many redeliveries to await.

    Args:
        ack_floor: The consumer's ack floor (stream sequence).
        delivered: The last stream sequence the consumer delivered.
        ack_pending: The server's ``num_ack_pending``.
        held: Stream sequences not to nak: held unsettled, or acked but not
            known to be processed (naking those would bring back handled
            messages).
        pending: Those of *held* the server counts in ``ack_pending``: the
            unsettled ones (acks it processed are not pending).
        limit: Most sequences to nak (the highest ones).

    Returns:
        The sequences to nak in ascending order (the server ignores those
        already acked), and the redeliveries to expect: ``ack_pending``
        minus what is *pending* in the range. Counting acked sequences
        there would expect too few, and release what is held before the
        last redeliveries came back.
    """
    held_in_range = sum(1 for seq in pending if ack_floor < seq <= delivered)
    expect = max(0, ack_pending - held_in_range)
    if not expect:
        return [], 0
    naks: list[int] = []
    seq = delivered
    while seq > ack_floor and len(naks) < limit:
        if seq not in held:
            naks.append(seq)
        seq -= 1
    naks.reverse()
    return naks, min(expect, len(naks))


class Barrier(Generic[T]):
    """Holds deliveries back while redeliveries are due.

    Items are keyed by stream sequence: a later delivery of a sequence
    replaces a held earlier one.
    """

    def __init__(self) -> None:
        self._holding = False
        self._paused = False
        self._expect = 0
        self._deadline = 0.0
        self._old_upto = 0
        self._awaiting: set[int] | None = None
        self._after_dseq = 0
        self._items: dict[int, T] = {}

    @property
    def holding(self) -> bool:
        """Whether deliveries are held back."""
        return self._holding

    @property
    def deadline(self) -> float:
        """When held deliveries are released anyway."""
        return self._deadline

    @property
    def expected(self) -> int:
        """Redeliveries still awaited."""
        return self._expect

    def __len__(self) -> int:
        return len(self._items)

    def start_up(self, *, pending: int, delivered_seq: int, deadline: float) -> None:
        """Await *pending* redeliveries (delivery count > 1) of sequences up
        to *delivered_seq*: those a previous holder left unacked."""
        if pending <= 0:
            return
        self._holding = True
        self._paused = False
        self._expect = pending
        self._old_upto = delivered_seq
        self._awaiting = None
        self._deadline = deadline

    def pause(self, *, deadline: float) -> None:
        """Hold everything from now on until :meth:`resync` says what to
        await (the consumer state is being read), at most until *deadline*."""
        self._deadline = max(self._deadline, deadline) if self._holding else deadline
        self._holding = True
        self._paused = True

    def resync(
        self, *, awaiting: Iterable[int], expect: int, after_dseq: int, deadline: float
    ) -> list[T]:
        """Await *expect* redeliveries of the *awaiting* sequences, nak'd
        after the consumer delivered *after_dseq*, until *deadline*.

        Replaces what an earlier entry awaited (the fresh consumer state
        covers it) and keeps what is held. Returns what to hand over now:
        everything held when there is nothing to await.
        """
        awaited = set(awaiting)
        if expect <= 0 or not awaited:
            return self.release()
        self._holding = True
        self._paused = False
        self._deadline = deadline
        self._expect = expect
        self._awaiting = awaited
        self._after_dseq = after_dseq
        return []

    def admit(self, item: T, *, seq: int, dseq: int, count: int, now: float) -> list[T]:
        """A delivery arrived: what to hand over now, in order."""
        if not self._holding:
            return [item]
        self._items[seq] = item
        return self._arrived(seq, dseq, count, now, copy=False)

    def copy(self, *, seq: int, dseq: int, count: int, now: float) -> list[T]:
        """A further copy of a sequence already held (here or downstream)
        arrived: it may be the awaited redelivery of *seq* (a resync naks
        by sequence; at start-up the first copy counted), and holds nothing."""
        if not self._holding:
            return []
        return self._arrived(seq, dseq, count, now, copy=True)

    def _arrived(self, seq: int, dseq: int, count: int, now: float, *, copy: bool) -> list[T]:
        awaiting = self._awaiting
        if self._paused:
            pass
        elif awaiting is None:
            if seq <= self._old_upto and count > 1 and not copy:
                self._expect -= 1
        elif seq in awaiting and dseq > self._after_dseq:
            awaiting.discard(seq)
            self._expect -= 1
        done = not self._paused and (self._expect <= 0 or awaiting == set())
        # Past a resync's deadline the puller decides (resync again, or
        # expire): releasing here would let a late redelivery come after
        # newer messages of its aggregate.
        if done or (now >= self._deadline and awaiting is None):
            return self.release()
        return []

    def overdue(self, now: float) -> bool:
        """Whether a resync's deadline passed with redeliveries still
        awaited (they may still come: the naks went out under load, or were
        lost; asking again keeps the order, releasing would not)."""
        return (
            self._holding
            and not self._paused
            and self._awaiting is not None
            and self._expect > 0
            and now >= self._deadline
        )

    def expire(self, now: float) -> list[T]:
        """Everything held, if the deadline passed."""
        if self._holding and now >= self._deadline:
            return self.release()
        return []

    def release(self) -> list[T]:
        """Stop holding; everything held, lowest stream sequence first."""
        items = [self._items[seq] for seq in sorted(self._items)]
        self._items.clear()
        self._holding = False
        self._paused = False
        self._expect = 0
        self._awaiting = None
        return items


class GapWatch:
    """Notices gaps in a consumer's delivery sequence within *window*
    seconds after a reconnection (outside it a gap means another member of
    the group got the deliveries: not ours to resync)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.last = 0
        self._until = float("-inf")

    def reconnected(self, now: float) -> None:
        """A reconnection happened at *now*."""
        self._until = now + self.window

    def seen(self, dseq: int, now: float) -> bool:
        """Record a delivery; True when deliveries before it are missing."""
        gap = self.last > 0 and dseq > self.last + 1 and now < self._until
        if dseq > self.last:
            self.last = dseq
        return gap

    def restart(self, dseq: int) -> None:
        """The consumer was re-created: it delivered up to *dseq*."""
        self.last = dseq

    def advance(self, dseq: int) -> None:
        """The consumer is known to have delivered up to *dseq*."""
        if dseq > self.last:
            self.last = dseq
