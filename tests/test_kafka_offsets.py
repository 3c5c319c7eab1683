"""Unit tests of the Kafka commit watermark (pure logic, no broker)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_bus.transports.kafka import PartitionTrack


def test_point_moves_over_contiguous_finished_prefix() -> None:
    track = PartitionTrack(10)
    for offset in range(10, 15):
        assert track.add(offset)
    assert track.point == 10
    assert track.commit_due() is None
    assert track.finish(11)
    assert track.finish(13)
    assert track.point == 10  # 10 is still running
    assert track.finish(10)
    assert track.point == 12
    assert track.commit_due() == 12
    assert track.finish(12)
    assert track.finish(14)
    assert track.point == 15
    assert track.unsettled == 0


def test_gaps_in_offsets_are_skipped() -> None:
    # Compacted topics and transaction markers leave holes.
    track = PartitionTrack(0)
    for offset in (0, 3, 7):
        track.add(offset)
    track.finish(0)
    assert track.point == 3
    assert not track.finish(5)  # never fetched: refused
    assert not track.release(5)
    track.finish(7)
    assert track.point == 3
    track.finish(3)
    assert track.point == 8


def test_duplicates_and_stale_offsets_are_refused() -> None:
    track = PartitionTrack(5)
    assert not track.add(4)
    assert track.add(5)
    assert not track.add(5)
    assert track.finish(5)
    assert not track.finish(5)  # a second ack changes nothing
    assert track.unsettled == 0


def test_release_holds_the_point() -> None:
    track = PartitionTrack(0)
    for offset in range(4):
        track.add(offset)
    track.finish(0)
    assert track.release(1)
    assert not track.release(1)
    assert not track.finish(1)  # settled already: released
    track.finish(2)
    track.finish(3)
    assert track.released == 1
    assert track.point == 1
    assert track.unsettled == 0


def test_committed_starts_at_start_unless_given() -> None:
    assert PartitionTrack(7).committed == 7
    assert PartitionTrack(7, committed=3).committed == 3
    assert PartitionTrack(7, committed=3).commit_due() == 7


@given(
    gaps=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=60),
    data=st.data(),
)
def test_point_never_passes_an_unfinished_offset(gaps: list[int], data: st.DataObject) -> None:
    track = PartitionTrack(100)
    offsets: list[int] = []
    offset = 100
    for gap in gaps:
        offsets.append(offset)
        assert track.add(offset)
        offset += gap
    settle_order = data.draw(st.permutations(offsets))
    released: set[int] = set()
    finished: set[int] = set()
    for o in settle_order:
        if data.draw(st.booleans(), label=f"release {o}") and len(released) < 3:
            assert track.release(o)
            released.add(o)
        else:
            assert track.finish(o)
            finished.add(o)
        unfinished = [x for x in offsets if x not in finished]
        expected = min(unfinished) if unfinished else offsets[-1] + 1
        assert track.point == expected
        assert track.unsettled == len(offsets) - len(finished) - len(released)
    assert track.released == (min(released) if released else None)
