"""One checker for every fault scenario, with named properties.

Input: the merged event log of a run (:mod:`tests.faults.events`) and what
the broker holds afterwards, read back by a raw client. Event kinds:

* ``try`` (publishers, before each send): ``agg``, ``seq``.
* ``pub`` (publishers, the send's outcome): ``agg``, ``seq``, ``ok``, ``err``
  (error type name), ``sha`` (body digest), ``valid`` (False for fuzzed
  malformed bodies).
* ``start`` / ``end`` (consumer workers): ``agg``, ``seq``, ``attempt``,
  ``partition``, ``offset``; ``end`` has ``outcome`` (``ok``, ``fail``, or
  ``cancelled``: trio.Cancelled reached the handler at an await).
* ``floor`` (ack-floor sampler): ``partition`` and ``floor``: every offset
  below it is acked (NATS ack floor + 1, Kafka committed offset); ``kind``
  is ``ack`` (NATS) or ``commit`` (Kafka, the default).
* ``signal`` / ``exit`` (harness): ``sig`` / ``rc`` of a worker ``proc``.
* ``freeze`` / ``thaw`` (harness): SIGSTOP / SIGCONT sent to a worker ``proc``
  (not shutdown signals: T ignores them).
* ``closed`` (worker, after ``open_bus`` returned or raised): ``tasks_left``
  and ``threads`` (names of threads still alive other than trio's idle cache).

Properties (docs/reliability.md):

L  every acked publish was handled or dead-lettered, and every acked
   malformed message is in the dead-letter topic with a reason;
U  nothing unexpected was handled (every handled message was published,
   or its publish was tried: a publisher stopped mid-send logs no outcome,
   and a broker that lost its log, e.g. Tansu restarted empty, cannot be
   read back);
A  no ack or commit ahead of a finished handler;
C  Kafka commits never move backwards (contiguity itself is A);
O  no overlapping handler intervals of one aggregate across all processes,
   and no message of an aggregate starts before every earlier one (in broker
   order) has finished once: first deliveries come in publish order and
   redeliveries settle before later messages run. Frozen-member rule: a
   handler call of a process that was frozen (``freeze``) while the call
   ran, and whose ``end`` is ``cancelled``, ends at the freeze -- nothing of
   its own code ran after it (it was cancelled at the await it was
   suspended in when the process stopped). An overlap that exists only
   with such a call's logged end is counted apart (``frozen_overlaps``),
   not a violation; a call that ends ``ok`` or ``fail`` after the thaw
   keeps its logged end;
D  no duplicate deliveries (only enforced when the scenario has no faults);
T  every signalled worker exited within the bound with a documented status,
   leaving no task or thread behind.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import attrs

from .events import Event

__all__ = ["CheckParams", "DeadLetter", "Held", "Report", "check"]

Key = tuple[str, int]  # (aggregate, sequence number)


@attrs.frozen
class Held:
    """A message the broker holds in the consumed topic."""

    agg: str
    seq: int
    partition: int
    offset: int


@attrs.frozen
class DeadLetter:
    """A message in the dead-letter topic (``agg``/``seq`` None when its body
    is not one of ours; ``sha`` identifies it then)."""

    agg: str | None
    seq: int | None
    reason: str
    sha: str = ""


@attrs.frozen(kw_only=True)
class CheckParams:
    """What a scenario expects.

    Attributes:
        max_attempts: Handler attempts before the bus dead-letters.
        expect_no_duplicates: Enforce D (scenarios without faults).
        shutdown_bound_s: Most seconds from a signal to the worker's exit.
        exit_codes: Allowed return codes per signal number (subprocess
            convention: -N is killed by signal N).
    """

    max_attempts: int = 3
    expect_no_duplicates: bool = False
    shutdown_bound_s: float = 14.0
    exit_codes: Mapping[int, frozenset[int]] = attrs.field(
        factory=lambda: {2: frozenset({-2, 130}), 15: frozenset({0}), 9: frozenset({-9})}
    )


@attrs.define
class Report:
    """Counts and violations of one run; ``violations`` maps a property
    letter to human-readable findings (empty: the property holds)."""

    published: int = 0
    acked: int = 0
    handled: int = 0
    dead_lettered: int = 0
    lost: int = 0
    unexpected: int = 0
    early_acks: int = 0
    order_violations: int = 0
    overlaps: int = 0
    frozen_overlaps: int = 0
    duplicates: int = 0
    shutdown_max_s: float = 0.0
    violations: dict[str, list[str]] = attrs.Factory(lambda: defaultdict(list))

    @property
    def ok(self) -> bool:
        """Whether every property held."""
        return not any(self.violations.values())

    def failed(self) -> list[str]:
        """Letters of the properties that failed."""
        return sorted(k for k, v in self.violations.items() if v)

    def summary(self) -> str:
        """One line for logs and the results table."""
        return (
            f"published={self.published} acked={self.acked} handled={self.handled} "
            f"dlq={self.dead_lettered} lost={self.lost} unexpected={self.unexpected} "
            f"early_acks={self.early_acks} "
            f"order={self.order_violations} overlaps={self.overlaps} "
            f"frozen_overlaps={self.frozen_overlaps} dups={self.duplicates} "
            f"shutdown_max={self.shutdown_max_s:.2f}s failed={','.join(self.failed()) or '-'}"
        )

    def add(self, prop: str, finding: str, limit: int = 20) -> None:
        if len(self.violations[prop]) < limit:
            self.violations[prop].append(finding)
        elif len(self.violations[prop]) == limit:
            self.violations[prop].append("...")


def _key(e: Event) -> Key:
    return (str(e["agg"]), int(e["seq"]))


def _completions(events: Sequence[Event], max_attempts: int) -> dict[Key, int]:
    """Earliest time each message was settled: handled, or failed its last
    attempt (the bus then dead-letters it)."""
    done: dict[Key, int] = {}
    for e in events:
        if e["ev"] == "end" and (e["outcome"] == "ok" or e["attempt"] >= max_attempts):
            done.setdefault(_key(e), e["t"])
    return done


def check(
    events: Iterable[Event],
    held: Sequence[Held],
    dead: Sequence[DeadLetter] = (),
    params: CheckParams | None = None,
) -> Report:
    """Check every property over one run; see the module docstring."""
    params = params or CheckParams()
    evs = sorted(events, key=lambda e: e["t"])
    report = Report()
    done = _completions(evs, params.max_attempts)
    dead_keys: set[Key] = {(d.agg, d.seq) for d in dead if d.agg is not None and d.seq is not None}
    _check_publishes(evs, held, dead, dead_keys, done, report)
    _check_acks(evs, held, done, report)
    _check_order(evs, held, done, report)
    _check_duplicates(evs, params, report)
    _check_shutdown(evs, params, report)
    return report


def _check_publishes(
    evs: Sequence[Event],
    held: Sequence[Held],
    dead: Sequence[DeadLetter],
    dead_keys: set[Key],
    done: Mapping[Key, int],
    report: Report,
) -> None:
    pubs = [e for e in evs if e["ev"] == "pub"]
    report.published = len(pubs)
    acked = [e for e in pubs if e["ok"]]
    report.acked = len(acked)
    report.handled = len(done)
    report.dead_lettered = len(dead)
    dead_shas = {d.sha for d in dead if d.reason}
    published = {_key(e) for e in pubs if e.get("valid", True)} | {(h.agg, h.seq) for h in held}
    published.update(_key(e) for e in evs if e["ev"] == "try")
    for e in acked:
        if not e.get("valid", True):
            if e["sha"] not in dead_shas:
                report.lost += 1
                report.add("L", f"malformed {e['sha'][:12]} acked, not dead-lettered with a reason")
        elif _key(e) not in done and _key(e) not in dead_keys:
            report.lost += 1
            report.add("L", f"{_key(e)} acked by the broker, never handled nor dead-lettered")
    for e in pubs:
        if not e["ok"] and not e.get("err"):
            report.add("L", f"publish of {_key(e)} failed without a typed error")
    for e in evs:
        if e["ev"] == "start" and _key(e) not in published:
            report.unexpected += 1
            report.add("U", f"{e['proc']} handled {_key(e)}, which nobody published")


def _check_acks(
    evs: Sequence[Event], held: Sequence[Held], done: Mapping[Key, int], report: Report
) -> None:
    by_partition: dict[int, list[Held]] = defaultdict(list)
    for h in held:
        by_partition[h.partition].append(h)
    for msgs in by_partition.values():
        msgs.sort(key=lambda h: h.offset)
    early: set[Key] = set()
    last_floor: dict[int, int] = {}
    for e in evs:
        if e["ev"] != "floor":
            continue
        part, floor = int(e["partition"]), int(e["floor"])
        # A NATS ack floor may fall back when a killed server lost ack state
        # it had not synced; a Kafka commit must never (C).
        if e.get("kind", "commit") == "commit" and floor < last_floor.get(part, floor):
            report.add("C", f"partition {part}: commit went back {last_floor[part]} -> {floor}")
        last_floor[part] = max(floor, last_floor.get(part, floor))
        for h in by_partition.get(part, ()):
            if h.offset >= floor:
                break
            key = (h.agg, h.seq)
            finished = done.get(key)
            if (finished is None or finished > e["t"]) and key not in early:
                early.add(key)
                report.add(
                    "A", f"{key} at {part}/{h.offset} acked (floor {floor}) before it finished"
                )
    report.early_acks = len(early)


def _check_order(
    evs: Sequence[Event], held: Sequence[Held], done: Mapping[Key, int], report: Report
) -> None:
    # Per message: the latest first-completion among the messages before it
    # in broker order (partition, offset) and which one that was.
    never = 2**63
    gate: dict[Key, tuple[int, Key]] = {}
    per_agg: dict[str, list[Held]] = defaultdict(list)
    for h in held:
        per_agg[h.agg].append(h)
    for agg, msgs in per_agg.items():
        msgs.sort(key=lambda h: (h.partition, h.offset))
        latest: tuple[int, Key] = (-1, (agg, -1))
        for h in msgs:
            key = (agg, h.seq)
            if key not in gate:  # a re-published copy keeps the first position
                gate[key] = latest
            finished = done.get(key, never)
            if finished > latest[0]:
                latest = (finished, key)
    exits = {e["proc"]: e["t"] for e in evs if e["ev"] == "exit"}
    freezes = _freezes(evs)
    open_calls: dict[tuple[str, str, int, int], int] = {}
    # aggregate -> (start, effective end, logged end, proc) of every call
    intervals: dict[str, list[tuple[int, int, int, str]]] = defaultdict(list)
    inversions = 0
    for e in evs:
        call = (
            e.get("proc", ""),
            str(e.get("agg")),
            int(e.get("seq", -1)),
            int(e.get("attempt", 0)),
        )
        if e["ev"] == "start":
            open_calls[call] = e["t"]
            key = _key(e)
            finished, blame = gate.get(key, (-1, key))
            if finished > e["t"] and blame != key:
                inversions += 1
                report.add("O", f"{key} started in {e['proc']} before {blame} finished")
        elif e["ev"] == "end" and call in open_calls:
            start, end = open_calls.pop(call), e["t"]
            effective = end
            if e["outcome"] == "cancelled":
                frozen = [f for f, _ in freezes.get(call[0], ()) if start <= f < end]
                effective = min(frozen, default=end)
            intervals[call[1]].append((start, effective, end, call[0]))
    for call, started in open_calls.items():  # killed mid-handler: open until exit
        end = exits.get(call[0], never)
        intervals[call[1]].append((started, end, end, call[0]))
    overlaps = frozen_overlaps = 0
    for agg, spans in intervals.items():
        spans.sort()
        busy_until, owner = -1, ""  # by effective ends
        logged_until = -1  # by logged ends
        for start, effective, end, proc in spans:
            if start < busy_until:
                overlaps += 1
                report.add("O", f"aggregate {agg}: {proc} overlapped {owner}")
            elif start < logged_until:
                frozen_overlaps += 1
            if effective > busy_until:
                busy_until, owner = effective, proc
            logged_until = max(logged_until, end)
    report.order_violations = inversions
    report.overlaps = overlaps
    report.frozen_overlaps = frozen_overlaps


def _freezes(evs: Sequence[Event]) -> dict[str, list[tuple[int, int]]]:
    """proc -> (freeze time, thaw time) of each SIGSTOP the harness sent
    (a process never thawed stays frozen until the end of the run)."""
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    stopped: dict[str, int] = {}
    for e in evs:
        if e["ev"] == "freeze":
            stopped.setdefault(e["proc"], e["t"])
        elif e["ev"] == "thaw" and e["proc"] in stopped:
            out[e["proc"]].append((stopped.pop(e["proc"]), e["t"]))
    for proc, t in stopped.items():
        out[proc].append((t, 2**63))
    return out


def _check_duplicates(evs: Sequence[Event], params: CheckParams, report: Report) -> None:
    firsts: dict[Key, int] = defaultdict(int)
    for e in evs:
        if e["ev"] == "start" and e["attempt"] == 1 and e["seq"] >= 0:  # -1: not ours (U)
            firsts[_key(e)] += 1
    dups = [k for k, n in firsts.items() if n > 1]
    report.duplicates = len(dups)
    if params.expect_no_duplicates:
        for k in dups:
            report.add("D", f"{k} delivered {firsts[k]} times without a fault")


def _check_shutdown(evs: Sequence[Event], params: CheckParams, report: Report) -> None:
    signalled: dict[str, Event] = {}
    for e in evs:
        if e["ev"] == "signal":
            signalled.setdefault(e["proc"], e)
        elif e["ev"] == "exit" and e["proc"] in signalled:
            sig = signalled.pop(e["proc"])
            took = (e["t"] - sig["t"]) / 1e9
            report.shutdown_max_s = max(report.shutdown_max_s, took)
            if took > params.shutdown_bound_s:
                report.add("T", f"{e['proc']} took {took:.1f} s to exit after signal {sig['sig']}")
            allowed = params.exit_codes.get(int(sig["sig"]), frozenset())
            if e["rc"] not in allowed:
                report.add("T", f"{e['proc']} exit status {e['rc']} after signal {sig['sig']}")
        elif e["ev"] == "closed" and (e.get("tasks_left") or e.get("threads")):
            report.add(
                "T", f"{e['proc']} left tasks {e.get('tasks_left')} threads {e.get('threads')}"
            )
    for proc, sig in signalled.items():
        report.add("T", f"{proc} never exited after signal {sig['sig']}")
