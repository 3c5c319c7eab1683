"""The fault checker's own tests: synthetic runs with each kind of violation.

They run in the default suite; the scenarios that feed the checker real
runs are in tests/faults (``nox -s faults``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.faults.checker import CheckParams, DeadLetter, Held, Report, check
from tests.faults.events import Event, EventLog, LogReader, read_events


class Run:
    """Builds a synthetic run: each call is one event, one tick later."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.held: list[Held] = []
        self.t = 0

    def ev(self, ev: str, proc: str = "c1", **fields: Any) -> Run:
        self.t += 1
        self.events.append({"ev": ev, "proc": proc, "t": self.t, **fields})
        return self

    def publish(self, agg: str, seq: int, *, ok: bool = True, partition: int = 0) -> Run:
        self.ev("pub", "p", agg=agg, seq=seq, ok=ok, err=None if ok else "PublishError")
        if ok:
            self.held.append(Held(agg, seq, partition, len(self.held)))
        return self

    def call(
        self, agg: str, seq: int, *, proc: str = "c1", outcome: str = "ok", attempt: int = 1
    ) -> Run:
        fields = {"agg": agg, "seq": seq, "attempt": attempt, "partition": 0, "offset": 0}
        self.ev("start", proc, **fields)
        return self.ev("end", proc, outcome=outcome, **fields)

    def floor(self, floor: int, partition: int = 0) -> Run:
        return self.ev("floor", "sampler", partition=partition, floor=floor)

    def check(self, dead: list[DeadLetter] | None = None, **params: Any) -> list[str]:
        return check(self.events, self.held, dead or [], CheckParams(**params)).failed()


def clean() -> Run:
    run = Run()
    for seq in range(3):
        run.publish("a", seq)
    for seq in range(3):
        run.call("a", seq).floor(seq + 1)
    return run


def test_a_clean_run_passes_every_property() -> None:
    report = check(clean().events, clean().held, [], CheckParams(expect_no_duplicates=True))
    assert report.ok, report.violations
    assert (report.published, report.acked, report.handled, report.lost) == (3, 3, 3, 0)


def test_l_acked_but_never_handled() -> None:
    run = clean().publish("a", 3)
    assert run.check() == ["L"]


def test_l_dead_lettered_counts_as_handled() -> None:
    run = clean().publish("a", 3)
    for attempt in (1, 2, 3):
        run.call("a", 3, outcome="fail", attempt=attempt)
    assert run.check() == []
    run2 = clean().publish("b", 0)
    assert run2.check([DeadLetter("b", 0, "EnvelopeError: bad")]) == []


def test_l_malformed_needs_a_dead_letter_with_reason() -> None:
    run = clean()
    run.ev("pub", "fuzz", agg="", seq=-1, ok=True, err=None, sha="f00", valid=False)
    assert run.check() == ["L"]
    assert run.check([DeadLetter(None, None, "", "f00")]) == ["L"]
    assert run.check([DeadLetter(None, None, "not JSON", "f00")]) == []


def test_l_failed_publish_without_typed_error() -> None:
    run = clean().ev("pub", "p", agg="a", seq=9, ok=False, err=None)
    assert run.check() == ["L"]
    assert clean().publish("a", 9, ok=False).check() == []


def test_u_unexpected_message_handled() -> None:
    assert clean().call("zzz", 1).check() == ["U"]


def test_u_a_tried_publish_without_outcome_is_expected() -> None:
    # The publisher was stopped mid-send and the broker's copy is gone (not
    # held): the message was still published by someone.
    run = clean().ev("try", "p", agg="b", seq=0).call("b", 0)
    assert run.check() == []
    assert clean().ev("try", "p", agg="b", seq=0).call("b", 1).check() == ["U"]


def test_a_ack_floor_ahead_of_a_finished_handler() -> None:
    run = Run().publish("a", 0).publish("a", 1)
    run.ev("start", agg="a", seq=0, attempt=1, partition=0, offset=0)
    run.floor(1)  # acked while its handler still runs
    run.ev("end", agg="a", seq=0, attempt=1, partition=0, offset=0, outcome="ok")
    run.call("a", 1).floor(2)
    assert run.check() == ["A"]


def test_a_floor_over_a_failed_attempt_that_is_retried() -> None:
    run = Run().publish("a", 0)
    run.call("a", 0, outcome="fail").floor(1).call("a", 0, attempt=2)
    assert run.check() == ["A"]


def test_c_commit_moves_backwards() -> None:
    assert clean().floor(1).check() == ["C"]


def test_c_applies_to_kafka_commits_not_nats_ack_floors() -> None:
    run = clean().ev("floor", "sampler", partition=0, floor=1, kind="ack")
    assert run.check() == []


def test_o_overlapping_handlers_of_one_aggregate_across_processes() -> None:
    run = Run().publish("a", 0).publish("b", 0)
    run.ev("start", "c1", agg="a", seq=0, attempt=1, partition=0, offset=0)
    run.ev("start", "c2", agg="a", seq=0, attempt=1, partition=0, offset=0)
    run.ev("end", "c1", agg="a", seq=0, attempt=1, partition=0, offset=0, outcome="ok")
    run.ev("end", "c2", agg="a", seq=0, attempt=1, partition=0, offset=0, outcome="ok")
    run.call("b", 0, proc="c1").call("b", 0, proc="c2")  # sequential: no overlap
    assert run.check() == ["O"]


def test_o_killed_handler_stays_open_until_its_process_exits() -> None:
    run = Run().publish("a", 0)
    run.ev("start", "c1", agg="a", seq=0, attempt=1, partition=0, offset=0)
    run.call("a", 0, proc="c2")
    run.ev("exit", "c1", rc=-9)
    assert run.check() == ["O"]


def test_o_later_message_runs_before_an_earlier_one_finished() -> None:
    # The reconnect reorder: seq 0 in flight is lost, seq 1 runs, 0 comes back.
    run = Run().publish("a", 0).publish("a", 1)
    run.ev("start", agg="a", seq=0, attempt=1, partition=0, offset=0)
    run.call("a", 1).call("a", 0)
    assert run.check() == ["O"]


def test_o_first_deliveries_out_of_publish_order() -> None:
    run = Run().publish("a", 0).publish("a", 1).call("a", 1).call("a", 0)
    assert run.check() == ["O"]


def test_o_replay_after_restart_is_a_duplicate_not_a_reorder() -> None:
    run = Run().publish("a", 0).publish("a", 1).call("a", 0).call("a", 1)
    run.call("a", 0, proc="c2").call("a", 1, proc="c2")
    assert run.check() == []
    assert run.check(expect_no_duplicates=True) == ["D"]


def test_other_partitions_do_not_order_each_other() -> None:
    run = Run().publish("a", 0).publish("b", 0, partition=1).call("b", 0).call("a", 0)
    assert run.check(expect_no_duplicates=True) == []


def _frozen_call(end_outcome: str, *, freeze: bool = True, takeover_first: bool = False) -> Run:
    """c1 runs a/0, is frozen; c2 runs a/0 meanwhile; c1 thaws and its call
    ends with *end_outcome* (takeover_first: c2 starts before the freeze)."""
    fields = {"agg": "a", "seq": 0, "attempt": 1, "partition": 0, "offset": 0}
    run = Run().publish("a", 0)
    run.ev("start", "c1", **fields)
    if takeover_first:
        run.ev("start", "c2", **fields)
    if freeze:
        run.ev("freeze", "c1")
    if not takeover_first:
        run.ev("start", "c2", **fields)
    run.ev("end", "c2", outcome="ok", **fields)
    if freeze:
        run.ev("thaw", "c1")
    return run.ev("end", "c1", outcome=end_outcome, **fields)


def _report(run: Run) -> Report:
    return check(run.events, run.held, [], CheckParams())


def test_o_frozen_members_cancelled_call_ends_at_the_freeze() -> None:
    run = _frozen_call("cancelled")
    report = _report(run)
    assert report.failed() == [], report.violations
    assert (report.overlaps, report.frozen_overlaps) == (0, 1)


def test_o_frozen_members_call_that_completes_after_the_thaw_overlaps() -> None:
    for outcome in ("ok", "fail"):
        report = _report(_frozen_call(outcome))
        assert report.failed() == ["O"], outcome
        assert (report.overlaps, report.frozen_overlaps) == (1, 0)


def test_o_cancelled_call_without_a_freeze_keeps_its_end() -> None:
    report = _report(_frozen_call("cancelled", freeze=False))
    assert report.failed() == ["O"]
    assert report.overlaps == 1


def test_o_overlap_before_the_freeze_is_not_excused() -> None:
    report = _report(_frozen_call("cancelled", takeover_first=True))
    assert report.failed() == ["O"]
    assert (report.overlaps, report.frozen_overlaps) == (1, 0)


def test_t_ignores_freeze_and_thaw() -> None:
    run = clean().ev("freeze", "c1").ev("thaw", "c1")
    assert run.check() == []


@pytest.mark.parametrize(
    ("sig", "rc", "took_ticks", "expected"),
    [
        (2, -2, 5, []),
        (2, 130, 5, []),
        (2, 1, 5, ["T"]),  # undocumented exit status
        (15, 0, 5, []),
        (15, -15, 5, ["T"]),
        (2, -2, 10**12, ["T"]),  # too slow
    ],
)
def test_t_shutdown_bound_and_exit_status(
    sig: int, rc: int, took_ticks: int, expected: list[str]
) -> None:
    run = clean().ev("signal", sig=sig)
    run.t += took_ticks
    run.ev("exit", rc=rc)
    assert run.check(shutdown_bound_s=10.0) == expected


def test_t_hang_and_leftovers() -> None:
    assert clean().ev("signal", sig=2).check() == ["T"]
    assert clean().ev("closed", tasks_left=0, threads=[]).check() == []
    assert clean().ev("closed", tasks_left=2, threads=[]).check() == ["T"]
    assert clean().ev("closed", tasks_left=0, threads=["asyncio_0"]).check() == ["T"]


def test_event_log_round_trip(tmp_path: Path) -> None:
    a, b = EventLog(tmp_path / "a.log", "a"), EventLog(tmp_path / "b.log", "b")
    a.write("start", seq=1)
    b.write("end", seq=1)
    a.close()
    b.close()
    with (tmp_path / "a.log").open("ab") as f:
        f.write(b'{"torn": ')  # a partial line is skipped
    events = read_events(tmp_path / "a.log", tmp_path / "b.log", tmp_path / "missing.log")
    assert [(e["ev"], e["proc"]) for e in events] == [("start", "a"), ("end", "b")]
    assert events[0]["t"] <= events[1]["t"]


def test_log_reader_parses_only_what_was_appended(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log, reader = EventLog(path, "a"), LogReader()
    log.write("start", seq=1)
    assert [e["seq"] for e in reader.read([path, tmp_path / "missing.log"])] == [1]
    with path.open("ab") as f:
        f.write(b'{"ev": "end", "proc": "a", "t": 1')  # not a whole line yet
    assert [e["seq"] for e in reader.read([path])] == [1]
    with path.open("ab") as f:
        f.write(b', "seq": 2}\n')
    log.write("end", seq=3)
    log.close()
    assert sorted(e["seq"] for e in reader.read([path])) == [1, 2, 3]
