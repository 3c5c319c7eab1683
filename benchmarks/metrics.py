"""What a benchmark run measures, and the record it produces.

Everything here is plain Python, shared by the Trio and the asyncio runners:
the handler of every system calls :meth:`Recorder.started` first thing and
:meth:`Recorder.finished` last thing, with the publish time taken from the
message's header. Clocks are ``time.time_ns()`` on both sides: producer and
consumer run on the same machine, in different processes.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .workloads import Workload

__all__ = [
    "ConsumerFigures",
    "cpu_seconds",
    "OrderChecker",
    "ProducerFigures",
    "Recorder",
    "RunResult",
    "median_result",
    "peak_rss_bytes",
    "percentile",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0..100) with linear interpolation between the
    closest ranks (numpy's default, "type 7"). NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cpu_seconds() -> float:
    """User plus system CPU seconds of this process so far (getrusage)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@attrs.define(eq=False)
class OrderChecker:
    """Counts per-aggregate order violations and duplicates.

    * a **duplicate** is a delivery of a message (global index) already seen;
      it is not order-checked (a redelivery replays older messages);
    * an **order violation** is a first delivery whose per-key position is
      lower than one already started for that key, or a start while another
      message of the same key is still running (two handlers of one
      aggregate at once).
    """

    duplicates: int = 0
    violations: int = 0
    _seen: set[int] = attrs.field(factory=set, alias="seen")
    _last: dict[str, int] = attrs.field(factory=dict, alias="last")
    _running: dict[str, int] = attrs.field(factory=dict, alias="running")

    @property
    def distinct(self) -> int:
        """Distinct messages seen."""
        return len(self._seen)

    def start(self, key: str, seq: int, index: int) -> bool:
        """A handler starts; return True on a first delivery."""
        if self._running.get(key, 0):
            self.violations += 1
        self._running[key] = self._running.get(key, 0) + 1
        if index in self._seen:
            self.duplicates += 1
            return False
        self._seen.add(index)
        if seq < self._last.get(key, -1):
            self.violations += 1
        else:
            self._last[key] = seq
        return True

    def finish(self, key: str) -> None:
        """The handler of a message of *key* returned."""
        left = self._running.get(key, 0) - 1
        if left > 0:
            self._running[key] = left
        else:
            self._running.pop(key, None)


@attrs.frozen(kw_only=True)
class ConsumerFigures:
    """What the consuming side measured."""

    handled: int
    e2e_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    first_ms: float
    order_violations: int
    duplicates: int
    unknown: int
    elapsed_s: float
    peak_rss_mb: float
    peak_tasks: int
    crossings: int | None
    #: Consumer CPU (getrusage, user + system) per handled message from the
    #: subscription going live to the last handler's end: setup left out.
    cpu_us_per_msg: float = math.nan
    #: Handler calls the bus cancelled (timeout, lapsed lease): they come again.
    cancelled: int = 0


@attrs.frozen(kw_only=True)
class ProducerFigures:
    """What the producing side measured."""

    published: int
    failed: int
    publish_rate: float
    crossings: int | None = None
    #: ms from stamping message 0 to the broker's acknowledgement of it.
    first_ack_ms: float = math.nan


@attrs.define(eq=False)
class Recorder:
    """Collects one consumer's observations.

    ``on_done`` is called once, from the handler that completed the
    workload (every message handled at least once).
    """

    workload: Workload
    on_done: Callable[[], None] = lambda: None
    checker: OrderChecker = attrs.field(factory=OrderChecker)
    unknown: int = 0
    latencies_ns: list[int] = attrs.field(factory=list)
    first_publish_ns: int | None = None
    first_message_ns: int | None = None
    first_start_ns: int | None = None
    #: Preloaded workloads: when the subscription went live (the clock
    #: starts there, or at the first handler start if that came earlier).
    origin_ns: int | None = None
    last_end_ns: int = 0
    #: CPU seconds of the process when it went live and at the last
    #: handler's end (see :meth:`mark_live`).
    cpu_live: float | None = None
    cpu_end: float | None = None
    #: Handler calls cancelled by the bus (see ConsumerFigures.cancelled).
    cancelled: int = 0
    _done: bool = attrs.field(default=False, alias="done")

    def mark_live(self) -> None:
        """The consumer is set up: CPU from here on is per-message cost."""
        self.cpu_live = cpu_seconds()

    @property
    def handled(self) -> int:
        """Distinct messages handled so far."""
        return self.checker.distinct

    def started(self, headers: Mapping[str, str], key: str | None) -> tuple[str, float]:
        """A handler starts: record latency and order. Returns the key to
        pass to :meth:`finished` and the seconds of work to simulate."""
        now = time.time_ns()
        try:
            ts = int(headers["bench-ts"])
            index = int(headers["bench-idx"])
        except (KeyError, ValueError):
            self.unknown += 1
            return "", 0.0
        expected = self.workload.key(index)
        if key is not None and key != expected:
            # The wire lost the key: count it as an order problem.
            self.checker.violations += 1
        latency = now - ts
        if self.first_start_ns is None:
            self.first_start_ns = now
        if self.checker.start(expected, self.workload.seq(index), index):
            self.latencies_ns.append(latency)
            if self.first_publish_ns is None or ts < self.first_publish_ns:
                self.first_publish_ns = ts
            if index == 0:
                self.first_message_ns = latency
        return expected, self.workload.work_seconds(index)

    def finished(self, key: str) -> None:
        """The handler returned."""
        if not key:
            return
        self.checker.finish(key)
        self.last_end_ns = time.time_ns()
        if not self._done and self.checker.distinct >= self.workload.messages:
            self._done = True
            self.cpu_end = cpu_seconds()
            self.on_done()

    def figures(self, *, peak_tasks: int, crossings: int | None) -> ConsumerFigures:
        """The summary of everything recorded."""
        lat_ms = [v / 1e6 for v in self.latencies_ns]
        handled = self.checker.distinct
        start = self.first_publish_ns
        if self.origin_ns is not None:
            start = min(self.origin_ns, self.first_start_ns or self.origin_ns)
        elapsed = (
            (self.last_end_ns - start) / 1e9 if start is not None and self.last_end_ns else math.nan
        )
        cpu = math.nan
        if self.cpu_live is not None and handled:
            end = self.cpu_end if self.cpu_end is not None else cpu_seconds()
            cpu = (end - self.cpu_live) / handled * 1e6
        return ConsumerFigures(
            handled=handled,
            e2e_rate=handled / elapsed if elapsed and elapsed > 0 else math.nan,
            p50_ms=percentile(lat_ms, 50),
            p95_ms=percentile(lat_ms, 95),
            p99_ms=percentile(lat_ms, 99),
            first_ms=(
                self.first_message_ns / 1e6 if self.first_message_ns is not None else math.nan
            ),
            order_violations=self.checker.violations,
            duplicates=self.checker.duplicates,
            unknown=self.unknown,
            elapsed_s=elapsed,
            peak_rss_mb=peak_rss_bytes() / 2**20,
            peak_tasks=peak_tasks,
            crossings=crossings,
            cpu_us_per_msg=cpu,
            cancelled=self.cancelled,
        )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``), in bytes."""
    status = Path("/proc/self/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@attrs.frozen(kw_only=True)
class RunResult:
    """One (system, transport, scenario) measurement, or the median of
    several.

    Rates are msg/s, latencies ms, RSS MiB. ``crossings_per_msg`` counts
    trio-asyncio bridge crossings (consumer and producer) per message;
    None where there is no bridge.
    """

    system: str
    transport: str
    scenario: str
    messages: int
    publish_rate: float
    e2e_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    first_ms: float
    success_ratio: float
    order_violations: int
    duplicates: int
    peak_rss_mb: float
    peak_tasks: int
    crossings_per_msg: float | None
    elapsed_s: float
    runs: int = 1
    error: str | None = None
    #: Producer side of ``first_ms``: message 0 stamped -> acknowledged.
    first_ack_ms: float = math.nan
    #: Consumer CPU per message, µs (see :class:`ConsumerFigures`).
    cpu_us_per_msg: float = math.nan

    @classmethod
    def combine(
        cls,
        *,
        system: str,
        transport: str,
        workload: Workload,
        consumer: ConsumerFigures | None,
        producer: ProducerFigures | None,
        error: str | None = None,
    ) -> RunResult:
        """One run's record from both sides' figures (either may be missing
        when the run failed)."""
        nan = math.nan
        published = producer.published if producer else 0
        crossings: float | None = None
        if consumer and consumer.crossings is not None:
            produced = (producer.crossings or 0) if producer else 0
            total = consumer.crossings + produced
            crossings = total / max(workload.messages, 1)
        return cls(
            system=system,
            transport=transport,
            scenario=workload.name,
            messages=workload.messages,
            publish_rate=producer.publish_rate if producer else nan,
            e2e_rate=consumer.e2e_rate if consumer else nan,
            p50_ms=consumer.p50_ms if consumer else nan,
            p95_ms=consumer.p95_ms if consumer else nan,
            p99_ms=consumer.p99_ms if consumer else nan,
            first_ms=consumer.first_ms if consumer else nan,
            success_ratio=(consumer.handled / published if consumer and published else 0.0),
            order_violations=consumer.order_violations if consumer else 0,
            duplicates=consumer.duplicates if consumer else 0,
            peak_rss_mb=consumer.peak_rss_mb if consumer else nan,
            peak_tasks=consumer.peak_tasks if consumer else 0,
            crossings_per_msg=crossings,
            elapsed_s=consumer.elapsed_s if consumer else nan,
            error=error,
            first_ack_ms=producer.first_ack_ms if producer else nan,
            cpu_us_per_msg=consumer.cpu_us_per_msg if consumer else nan,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NaN becomes None)."""
        out: dict[str, Any] = attrs.asdict(self)
        for name, value in out.items():
            if isinstance(value, float) and math.isnan(value):
                out[name] = None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResult:
        """Inverse of :meth:`to_json`."""
        names = {f.name for f in attrs.fields(cls)}
        values: dict[str, Any] = {
            k: (math.nan if v is None else v) for k, v in data.items() if k in names
        }
        if data.get("crossings_per_msg") is None:
            values["crossings_per_msg"] = None
        if data.get("error") is None:
            values["error"] = None
        return cls(**values)


_MEDIAN_FIELDS = (
    "publish_rate",
    "e2e_rate",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "first_ms",
    "first_ack_ms",
    "peak_rss_mb",
    "elapsed_s",
    "cpu_us_per_msg",
)


def _median(values: Iterable[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def median_result(results: Sequence[RunResult]) -> RunResult:
    """The median of repeated runs of one (system, transport, scenario).

    Speed figures take the median; correctness figures take the worst run
    (lowest success ratio, most order violations and duplicates), so one
    bad run is never hidden by two good ones.
    """
    if not results:
        raise ValueError("no results")
    first = results[0]
    medians: dict[str, Any] = {
        name: _median(getattr(r, name) for r in results) for name in _MEDIAN_FIELDS
    }
    crossings = [r.crossings_per_msg for r in results if r.crossings_per_msg is not None]
    errors = [r.error for r in results if r.error]
    return attrs.evolve(
        first,
        **medians,
        success_ratio=min(r.success_ratio for r in results),
        order_violations=max(r.order_violations for r in results),
        duplicates=max(r.duplicates for r in results),
        peak_tasks=max(r.peak_tasks for r in results),
        crossings_per_msg=statistics.median(crossings) if crossings else None,
        runs=len(results),
        error="; ".join(errors) if errors else None,
    )
