"""The NATS transport's pure logic, without a server: the ordered-resume
barrier and resync planning, URL redaction as the transport uses it, the
mailbox wake-up."""

from __future__ import annotations

import asyncio

import trio

from trio_bus._secrets import redact_text
from trio_bus.transports._bridge import Mailbox, open_bridge
from trio_bus.transports.nats.resume import Barrier, GapWatch, plan_resync


def holding(barrier: Barrier[str]) -> bool:
    # A call, so that the type checker does not narrow the property.
    return barrier.holding


def test_plan_naks_what_we_do_not_hold() -> None:
    # Delivered 11..20 (ack floor 10); we hold 12 and 15; the server has 5
    # pending: 3 of them are lost in transit.
    naks, expect = plan_resync(
        ack_floor=10, delivered=20, ack_pending=5, held={12, 15, 3}, pending={12, 15, 3}
    )
    assert naks == [11, 13, 14, 16, 17, 18, 19, 20]
    assert expect == 3


def test_plan_does_not_count_processed_acks_as_pending() -> None:
    # 11..18 delivered: 11 and 14 held unsettled; 12 and 13 acked (the
    # server processed the acks, the client has not seen them confirmed
    # yet); 15..18 lost in transit. Counting the acks as pending would
    # expect two redeliveries of the four, and release what is held before
    # the last two came back, after newer messages of their aggregates.
    naks, expect = plan_resync(
        ack_floor=10, delivered=18, ack_pending=6, held={11, 12, 13, 14}, pending={11, 14}
    )
    assert naks == [15, 16, 17, 18]
    assert expect == 4


def test_plan_nothing_pending_beyond_what_we_hold() -> None:
    held = {12, 15}
    assert plan_resync(ack_floor=10, delivered=20, ack_pending=2, held=held, pending=held) == (
        [],
        0,
    )
    assert plan_resync(ack_floor=20, delivered=20, ack_pending=0, held=set(), pending=set()) == (
        [],
        0,
    )


def test_plan_is_bounded_and_naks_the_newest() -> None:
    naks, expect = plan_resync(
        ack_floor=0, delivered=1000, ack_pending=900, held=set(), pending=set(), limit=10
    )
    assert naks == list(range(991, 1001))
    assert expect == 10


def test_resync_holds_later_deliveries_until_the_lost_ones_are_back() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.pause(deadline=100.0)
    # New deliveries on the new connection are held while the state is read.
    assert barrier.admit("m21", seq=21, dseq=31, count=1, now=1.0) == []
    assert barrier.resync(awaiting=[18, 19], expect=2, after_dseq=31, deadline=10.0) == []
    assert barrier.admit("m22", seq=22, dseq=32, count=1, now=2.0) == []
    # A redelivery of 19 (dseq after the naks) counts; out of order is fine.
    assert barrier.admit("m19", seq=19, dseq=33, count=2, now=2.0) == []
    assert holding(barrier)
    assert barrier.admit("m18", seq=18, dseq=34, count=2, now=2.0) == ["m18", "m19", "m21", "m22"]
    assert not holding(barrier)
    assert barrier.admit("m23", seq=23, dseq=35, count=1, now=2.0) == ["m23"]


def test_a_copy_in_flight_before_the_naks_does_not_count() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.pause(deadline=100.0)
    assert barrier.resync(awaiting=[18], expect=1, after_dseq=30, deadline=10.0) == []
    # The original delivery of 18 (dseq 30) was still in flight: held; the
    # redelivery the nak causes is a copy (the puller drops it) and counts.
    assert barrier.admit("m18-first", seq=18, dseq=30, count=1, now=1.0) == []
    assert barrier.copy(seq=18, dseq=31, count=2, now=1.0) == ["m18-first"]


def test_a_dropped_copy_counts_as_the_awaited_redelivery_once() -> None:
    # 18 arrived before the naks took effect (not counted), so the puller
    # holds it; the nak'd copy of 18 is dropped but is the redelivery.
    barrier: Barrier[str] = Barrier()
    barrier.pause(deadline=100.0)
    assert barrier.resync(awaiting=[18, 19], expect=2, after_dseq=30, deadline=10.0) == []
    assert barrier.admit("m18", seq=18, dseq=29, count=2, now=1.0) == []
    assert barrier.admit("m21", seq=21, dseq=31, count=1, now=1.0) == []
    assert barrier.copy(seq=18, dseq=32, count=3, now=1.0) == []
    # A second copy of 18 does not stand in for 19.
    assert barrier.copy(seq=18, dseq=33, count=4, now=1.0) == []
    assert holding(barrier)
    assert barrier.admit("m19", seq=19, dseq=34, count=2, now=1.0) == ["m18", "m19", "m21"]
    assert barrier.copy(seq=19, dseq=35, count=3, now=1.0) == []


def test_a_copy_does_not_count_at_start_up() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.start_up(pending=2, delivered_seq=10, deadline=100.0)
    assert barrier.admit("m4", seq=4, dseq=1, count=2, now=1.0) == []
    assert barrier.copy(seq=4, dseq=2, count=3, now=1.0) == []
    assert holding(barrier)
    assert barrier.admit("m7", seq=7, dseq=3, count=2, now=1.0) == ["m4", "m7"]


def test_resync_with_nothing_to_await_releases_in_order() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.pause(deadline=100.0)
    barrier.admit("b", seq=5, dseq=5, count=1, now=0.0)
    barrier.admit("a", seq=4, dseq=6, count=1, now=0.0)
    assert barrier.resync(awaiting=[], expect=0, after_dseq=6, deadline=10.0) == ["a", "b"]
    assert not holding(barrier)


def test_deadline_releases_everything_lowest_first() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.pause(deadline=100.0)
    barrier.resync(awaiting=[1], expect=1, after_dseq=9, deadline=10.0)
    assert barrier.admit("c", seq=7, dseq=10, count=1, now=5.0) == []
    assert barrier.admit("b", seq=6, dseq=11, count=1, now=5.0) == []
    assert barrier.expire(9.9) == []
    assert barrier.expire(10.0) == ["b", "c"]
    assert not holding(barrier)
    assert barrier.expire(20.0) == []


def test_pause_never_shortens_a_running_hold() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.start_up(pending=2, delivered_seq=10, deadline=50.0)
    barrier.pause(deadline=20.0)
    assert barrier.deadline == 50.0
    assert barrier.admit("x", seq=11, dseq=12, count=1, now=30.0) == []  # paused: no count


def test_start_up_barrier_waits_for_the_previous_holders_deliveries() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.start_up(pending=2, delivered_seq=10, deadline=30.0)
    assert barrier.admit("new11", seq=11, dseq=1, count=1, now=1.0) == []
    assert barrier.admit("old9", seq=9, dseq=2, count=2, now=1.0) == []
    # A first delivery of an old sequence is not a redelivery: no count.
    assert barrier.admit("first8", seq=8, dseq=3, count=1, now=1.0) == []
    assert barrier.admit("old7", seq=7, dseq=4, count=3, now=1.0) == [
        "old7",
        "first8",
        "old9",
        "new11",
    ]


def test_start_up_with_nothing_pending_does_not_hold() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.start_up(pending=0, delivered_seq=10, deadline=30.0)
    assert barrier.admit("a", seq=11, dseq=1, count=1, now=1.0) == ["a"]


def test_gap_watch_only_soon_after_a_reconnection() -> None:
    gaps = GapWatch(window=30.0)
    gaps.advance(10)
    assert not gaps.seen(11, now=0.0)
    assert not gaps.seen(15, now=1.0)  # no reconnection: another member's
    gaps.reconnected(now=2.0)
    assert not gaps.seen(16, now=3.0)
    assert gaps.seen(20, now=4.0)
    assert not gaps.seen(19, now=4.0)  # older: no gap
    assert not gaps.seen(25, now=40.0)  # window over


async def test_mailbox_wake_ends_a_wait_with_nothing_put() -> None:
    """The bridge addition the consumer loop relies on: its own side wakes
    the loop that waits on its mailbox."""
    async with open_bridge("test") as bridge:
        box: Mailbox[int] = Mailbox()

        async def woken() -> bool:
            asyncio.get_running_loop().call_soon(box.wake)
            return await box.wait(30)

        with trio.fail_after(10):
            assert await bridge.call(woken) is False
            box.put(1)
            assert await bridge.call(box.wait, 30) is True
            assert box.drain() == [1]


def test_redact_masks_url_secrets() -> None:
    assert (
        redact_text("nats://svc:secret@h:4222, nats://h2:4222")
        == "nats://svc:***@h:4222, nats://h2:4222"
    )
    assert redact_text("cannot reach tls://tok3n@h:4222") == "cannot reach tls://***@h:4222"
    assert redact_text("nats://h:4222 said no") == "nats://h:4222 said no"


def test_past_a_resync_deadline_nothing_is_released_until_asked_again() -> None:
    """A redelivery later than the resync's deadline (naks sent under load)
    must not run after newer messages: the barrier keeps holding and says it
    is overdue; the next resync's fresh state lets the late one through first."""
    barrier: Barrier[str] = Barrier()
    barrier.pause(deadline=100.0)
    barrier.resync(awaiting=[5], expect=1, after_dseq=9, deadline=10.0)
    assert barrier.admit("newer", seq=8, dseq=10, count=1, now=9.0) == []
    assert not barrier.overdue(9.9)
    assert barrier.admit("newest", seq=9, dseq=11, count=1, now=10.5) == []
    assert barrier.overdue(10.5)
    barrier.pause(deadline=60.0)  # the puller asks again
    assert not barrier.overdue(20.0)
    assert barrier.resync(awaiting=[5], expect=1, after_dseq=11, deadline=25.0) == []
    assert barrier.admit("late", seq=5, dseq=12, count=2, now=21.0) == ["late", "newer", "newest"]
    assert not barrier.holding


def test_a_start_up_hold_still_ends_at_its_deadline_on_admit() -> None:
    barrier: Barrier[str] = Barrier()
    barrier.start_up(pending=1, delivered_seq=10, deadline=30.0)
    assert barrier.admit("a", seq=11, dseq=1, count=1, now=29.0) == []
    assert not barrier.overdue(31.0)
    assert barrier.admit("b", seq=12, dseq=2, count=1, now=31.0) == ["a", "b"]
