"""Scale-out scenarios (issues 10 and 15): three consumer processes in one
group on one topic, members joining, leaving, crashing and freezing while
a publisher streams over 50 aggregates. The checker's O is the point: no
two handler calls of one aggregate overlap across all processes, first
deliveries per aggregate in publish order; L and A as everywhere.

Kafka keeps order across members with its partitions and the partition
fence; NATS with partitioned groups (leases in a KV bucket,
docs/scaling.md). With one shared durable consumer (``partitions=1``) a
NATS group of three overlaps by construction: these scenarios fail then.
"""

from __future__ import annotations

import signal

import pytest
import trio

from .checker import CheckParams, Report
from .events import Event, now_ns
from .harness import Harness, Worker, scale

pytestmark = pytest.mark.faults

#: Shutdown grace of the members; the documented bound is grace + 4 s.
GRACE = 3.0
PARAMS = CheckParams(shutdown_bound_s=GRACE + 4)
#: Every member traps SIGTERM: a SIGTERM is a graceful leave.
MEMBER = ["--trap-sigterm", "--work-ms", "2", "--shutdown-grace", str(GRACE)]
AGGREGATES = 50
#: Handler work per call in the freeze scenario, in ms, and how many
#: freezes it may take to catch a call in flight.
WORK_MS, FREEZE_TRIES = 50, 20
#: Least time a frozen member stays frozen: twice the Kafka test URL's
#: 2 s session, so its leases certainly lapsed (the outage, not a wait).
FREEZE_MIN = 4.0


def assert_holds(report: Report) -> None:
    assert report.ok, f"{report.summary()}\n{dict(report.violations)}"


def handlers_of(h: Harness) -> dict[str, int]:
    """proc -> handler calls it started."""
    out: dict[str, int] = {}
    for e in h.events():
        if e["ev"] == "start":
            out[e["proc"]] = out.get(e["proc"], 0) + 1
    return out


async def test_group_join_leave_kill_restart(harness: Harness) -> None:
    """Two members, then a third joins mid-stream; one leaves gracefully
    (SIGTERM, trapped: leave the group, commit, exit 0); one is SIGKILLed
    and a new one started. Every property over the whole run, and every
    member that was live long enough handled part of the stream."""
    h = harness
    n = scale(5000, 2000)
    await h.sampler()
    await h.consumer("c1", *MEMBER)
    c2 = await h.consumer("c2", *MEMBER)
    interval = str(scale(150, 250))
    publisher = await h.publisher(
        "p1", n, "--aggregates", str(AGGREGATES), "--interval-ms", interval
    )
    await h.count("start", n * 15 // 100, timeout=120)
    await h.consumer("c3", *MEMBER)  # joins mid-stream
    await h.count("start", n * 35 // 100, timeout=120)
    c1 = next(w for w in h.workers if w.proc == "c1")
    assert await h.signal(c1, signal.SIGTERM, timeout=PARAMS.shutdown_bound_s + 2) == 0
    await h.count("start", n * 55 // 100, timeout=120)
    await h.signal(c2, signal.SIGKILL)
    await h.consumer("c4", *MEMBER)  # c2's replacement
    await h.wait_exit(publisher, timeout=240)
    await h.settle_published(timeout=180)
    report = await h.finish("group join/leave/SIGKILL", PARAMS)
    assert_holds(report)
    calls = handlers_of(h)
    assert all(calls.get(p, 0) > 0 for p in ("c1", "c2", "c3", "c4")), calls


async def test_group_member_frozen_past_its_session(harness: Harness) -> None:
    """A member is frozen (SIGSTOP) until the others have taken over its
    aggregates and at least twice the session timeout passed, then thawed
    (SIGCONT) while the stream goes on. Its calls cancelled by the lapsed
    lease end at the freeze (the checker's frozen-member rule); any other
    overlap with the member that took its partitions fails O."""
    h = harness
    await h.sampler()
    # WORK_MS of work a call, so the freeze catches calls in flight.
    args = [*MEMBER, "--work-ms", str(WORK_MS)]
    members = [await h.consumer(f"c{i}", *args) for i in (1, 2, 3)]
    publisher = await h.publisher(
        "p1", 10**6, "--aggregates", str(AGGREGATES), "--interval-ms", "100"
    )
    await h.count("start", scale(1500, 600), timeout=120)
    victim = members[0]
    for _ in range(FREEZE_TRIES):
        await h.wait_for(
            lambda evs: bool(_running(evs, victim)), f"a call running in {victim.proc}"
        )
        recent = _recent_aggregates(h, victim, window_s=1.0)
        frozen_at = now_ns()
        h.freeze(victim)
        # A call started within the last WORK_MS - 10 ms cannot have ended
        # yet; an older one may have (its end event not written): then thaw
        # at once (a freeze of milliseconds, no lease lapses) and try again.
        if _running_since(h, victim, frozen_at - (WORK_MS - 10) * 1_000_000, frozen_at):
            break
        h.thaw(victim)
    else:
        raise AssertionError(f"no freeze of {victim.proc} caught a call in {FREEZE_TRIES} tries")
    try:
        await _taken_over(h, victim, recent, since=frozen_at)
        await trio.sleep(max(0.0, FREEZE_MIN - (now_ns() - frozen_at) / 1e9))  # the outage
    finally:
        h.thaw(victim)
    before = sum(e["ev"] == "start" for e in h.events())
    await h.count("start", before + scale(1500, 600), timeout=120)
    await h.stop_quietly(publisher)
    await h.settle_published(timeout=180)
    report = await h.finish("group member SIGSTOP/SIGCONT", PARAMS)
    assert_holds(report)
    # The freeze caught calls in flight, and their ends were checked.
    caught = _running([e for e in h.events() if e["t"] <= frozen_at], victim)
    assert caught, "no call of the frozen member was in flight at the freeze"


def _running(events: list[Event], worker: Worker) -> set[tuple[str, int, int]]:
    """Calls of *worker* started and not ended in *events*."""
    running: set[tuple[str, int, int]] = set()
    for e in events:
        if e["proc"] == worker.proc and e["ev"] in ("start", "end"):
            call = (str(e["agg"]), int(e["seq"]), int(e["attempt"]))
            (running.add if e["ev"] == "start" else running.discard)(call)
    return running


def _running_since(h: Harness, worker: Worker, since: int, until: int) -> bool:
    """Whether a call of *worker* that started in [since, until] had not
    ended by *until* (as far as the events written so far say)."""
    running = _running([e for e in h.events() if e["t"] <= until], worker)
    starts = {
        (str(e["agg"]), int(e["seq"]), int(e["attempt"]))
        for e in h.events()
        if e["proc"] == worker.proc and e["ev"] == "start" and since <= e["t"] <= until
    }
    return bool(running & starts)


def _recent_aggregates(h: Harness, worker: Worker, window_s: float) -> set[str]:
    """Aggregates *worker* started a call of in the last *window_s* seconds."""
    since = now_ns() - int(window_s * 1e9)
    return {
        str(e["agg"])
        for e in h.events()
        if e["ev"] == "start" and e["proc"] == worker.proc and e["t"] >= since
    }


async def _taken_over(h: Harness, victim: Worker, aggs: set[str], *, since: int) -> None:
    """Wait until another member started a call of one of *aggs* after *since*."""

    def taken(events: list[Event]) -> bool:
        return any(
            e["ev"] == "start" and e["proc"] != victim.proc and e["agg"] in aggs and e["t"] > since
            for e in events
        )

    await h.wait_for(taken, f"another member taking over {victim.proc}'s aggregates", 60)
