"""Health, stall detection, backlog detection and the round-trip probe.

``await bus.health()`` answers "is this bus doing its job?" from facts, not
a hard-coded status: the transport's connection, every subscription's fetch
task, every actor, the last successful round trip, and **stalls** — a lane
(Kafka partition, NATS/memory consumer) whose commit point has not moved for
``stall_after`` seconds while work is in flight, and a handler running for
longer than that.

With :class:`Monitoring` (on by default) a monitor task samples every
``interval`` seconds: it updates lag metrics, reports backlog crossings
(consumer lag, publisher backlog) through ``on_backlog`` with a severity,
and, when ``probe_interval`` is set, publishes a probe on ``probe_topic``
and waits for it to come back through the bus (the seed system's
health-check publisher/subscriber).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal, Protocol

import attrs
import trio

from ._config import at_least
from ._message import Message
from ._stats import BusStatistics
from ._subscription import Subscription
from .transports._base import HEALTH_TOPIC, LaneState, Transport

__all__ = [
    "BacklogEvent",
    "HealthReport",
    "LaneReport",
    "Monitoring",
    "Stall",
    "SubscriptionHealth",
]

logger = logging.getLogger("trio_bus.health")

Severity = Literal["ok", "warning", "critical"]
_SEVERITY_RANK = {"ok": 0, "warning": 1, "critical": 2}
PROBE_HEADER = "X-Health-Probe"


def _optional_positive(
    _: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None:
        at_least(0.001)(None, attribute, value)


@attrs.frozen(kw_only=True)
class Monitoring:
    """Settings of the monitor task (``open_bus(monitoring=...)``).

    Attributes:
        interval: Seconds between samples of lag, backlog and stalls.
        stall_after: A commit point unmoved with work in flight, or a handler
            running, for this many seconds is a stall.
        lag_warning, lag_critical: Consumer lag thresholds (messages).
        publish_backlog_warning, publish_backlog_critical: Messages awaiting
            a broker acknowledgement.
        on_backlog: Called (in the monitor task) when a backlog crosses a
            threshold either way.
        probe_interval: Seconds between round-trip probes; None: no probe.
        probe_topic: Topic the probes travel on. The default one gets
            small, short-lived storage on the brokers (NATS: a memory stream
            with a max age and message limit; Kafka: one partition, short
            retention); configure another one yourself.
        probe_timeout: Seconds a probe may take.
        probe_failures: Consecutive failed probes that make the bus
            unhealthy.
        on_health_change: Called when the probe verdict flips.
    """

    interval: float = attrs.field(default=5.0, validator=at_least(0.001))
    stall_after: float = attrs.field(default=60.0, validator=at_least(0))
    lag_warning: int = attrs.field(default=10_000, validator=at_least(1, integer=True))
    lag_critical: int = attrs.field(default=100_000, validator=at_least(1, integer=True))
    publish_backlog_warning: int = attrs.field(default=10_000, validator=at_least(1, integer=True))
    publish_backlog_critical: int = attrs.field(
        default=100_000, validator=at_least(1, integer=True)
    )
    on_backlog: Callable[[BacklogEvent], None] | None = None
    probe_interval: float | None = attrs.field(default=None, validator=_optional_positive)
    probe_topic: str = HEALTH_TOPIC
    probe_timeout: float = attrs.field(default=5.0, validator=at_least(0.001))
    probe_failures: int = attrs.field(default=3, validator=at_least(1, integer=True))
    on_health_change: Callable[[bool], None] | None = None


@attrs.frozen(kw_only=True)
class BacklogEvent:
    """A backlog crossed a threshold (up or down).

    Attributes:
        kind: ``"consumer_lag"`` or ``"publish_backlog"``.
        topic, group, partition: Where (None for the publisher).
        value: The backlog now (messages).
        severity: ``"ok"``, ``"warning"`` or ``"critical"``.
        previous: The severity before.
    """

    kind: Literal["consumer_lag", "publish_backlog"]
    topic: str | None
    group: str | None
    partition: int | None
    value: int
    severity: Severity
    previous: Severity


@attrs.frozen(kw_only=True)
class Stall:
    """Something that should move and has not.

    Attributes:
        kind: ``"handler"`` (a handler call running too long) or
            ``"commit"`` (a lane's commit point stuck with work in flight).
        where: Human-readable location.
        seconds: How long it has been stuck.
    """

    kind: Literal["handler", "commit"]
    where: str
    seconds: float


@attrs.frozen(kw_only=True)
class LaneReport:
    """One lane's progress as last sampled, with its group."""

    group: str
    state: LaneState


@attrs.frozen(kw_only=True)
class SubscriptionHealth:
    """One subscription: is its fetch task running, how much is in flight."""

    topic: str
    group: str
    live: bool
    in_flight: int


@attrs.frozen(kw_only=True)
class HealthReport:
    """What :meth:`Bus.health` found.

    Attributes:
        healthy: Connected, no transport problem, every subscription live,
            every actor alive, no stall, and the probe (if any) not failing.
        transport: The transport's name.
        connected: The transport's connection is up.
        subscriptions: Each subscription's state.
        actors_alive: Actor tasks running (out of ``pool_size``).
        pool_size: Actors in the pool.
        last_round_trip: Seconds since the last successful probe, or None.
        round_trip_latency: Latency of that probe in seconds, or None.
        probe_failures: Consecutive failed probes.
        stalls: What is stuck.
        lanes: Lag and commit points per lane, as last sampled.
        problem: What the transport reports failing (e.g. its credentials
            refused), without secrets; None if nothing.
    """

    healthy: bool
    transport: str
    connected: bool
    subscriptions: tuple[SubscriptionHealth, ...]
    actors_alive: int
    pool_size: int
    last_round_trip: float | None
    round_trip_latency: float | None
    probe_failures: int
    stalls: tuple[Stall, ...]
    lanes: tuple[LaneReport, ...]
    problem: str | None = None

    def describe(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"{'HEALTHY' if self.healthy else 'UNHEALTHY'} ({self.transport}, "
            f"{'connected' if self.connected else 'disconnected'}, "
            f"{self.actors_alive}/{self.pool_size} actors)",
        ]
        if self.problem is not None:
            lines.append(f"transport problem: {self.problem}")
        if self.round_trip_latency is not None:
            lines.append(f"round trip: {self.round_trip_latency * 1000:.1f} ms")
        if self.probe_failures:
            lines.append(f"probe failures in a row: {self.probe_failures}")
        lines.extend(
            f"subscription {s.topic} [{s.group}]: {'live' if s.live else 'DOWN'}, "
            f"{s.in_flight} in flight"
            for s in self.subscriptions
        )
        lines.extend(
            f"lane {lane.state.topic}"
            + (f"[{lane.state.partition}]" if lane.state.partition is not None else "")
            + f" [{lane.group}]: lag {lane.state.lag}, committed {lane.state.committed}"
            for lane in self.lanes
        )
        lines.extend(f"STALL {s.kind} {s.where}: {s.seconds:.1f}s" for s in self.stalls)
        return "\n".join(lines)


def _severity(value: int, warning: int, critical: int) -> Severity:
    if value >= critical:
        return "critical"
    if value >= warning:
        return "warning"
    return "ok"


class Observed(Protocol):
    """What the monitor reads of a bus: public snapshots only."""

    @property
    def client_id(self) -> str: ...

    @property
    def transport(self) -> Transport: ...

    def statistics(self) -> BusStatistics: ...

    def subscriptions(self) -> Sequence[Subscription]: ...


SubscribeProbe = Callable[[str, Callable[[Message], Awaitable[None]], str], Awaitable[Subscription]]
PublishProbe = Callable[[str, bytes, Mapping[str, str]], Awaitable[None]]


class Monitor:
    """Samples a bus's lanes and backlogs; runs the probe.

    The probe subscribes with a group private to the bus and publishes
    without reporting to the bus's publish-result streams (the two
    callables the bus gives it).
    """

    def __init__(
        self,
        bus: Observed,
        settings: Monitoring,
        *,
        subscribe_probe: SubscribeProbe,
        publish_probe: PublishProbe,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self._subscribe_probe = subscribe_probe
        self._publish_probe = publish_probe
        self.lanes: dict[tuple[str, str, int | None], LaneState] = {}
        # lane -> (committed position, time it last moved or had no work)
        self._progress: dict[tuple[str, str, int | None], tuple[int | None, float]] = {}
        self._severity: dict[tuple[str, str | None, int | None], Severity] = {}
        self.last_round_trip: float | None = None
        self.round_trip_latency: float | None = None
        self.probe_failures = 0
        self.probe_healthy = True
        self._health_changed = trio.Event()
        self._probe_waiters: dict[str, trio.Event] = {}
        self._probe_subscription: Subscription | None = None

    # -------------------------------------------------------------- sampling

    async def sample(self) -> None:
        """Ask every consumer for its lanes; update stalls and backlogs."""
        now = trio.current_time()
        seen: set[tuple[str, str, int | None]] = set()
        for sub in self.bus.subscriptions():
            try:
                states = await sub.lanes()
            except Exception:
                logger.warning("sampling lanes of %s failed", sub.topic, exc_info=True)
                continue
            for state in states:
                key = (state.topic, sub.group, state.partition)
                seen.add(key)
                self.lanes[key] = state
                committed, since = self._progress.get(key, (None, now))
                if committed != state.committed or not (state.in_flight or state.ack_pending):
                    since = now
                self._progress[key] = (state.committed, since)
                if state.lag is not None:
                    self._check(
                        ("consumer_lag", sub.group, state.partition),
                        state.topic,
                        state.lag,
                        self.settings.lag_warning,
                        self.settings.lag_critical,
                    )
        for key in set(self.lanes) - seen:
            del self.lanes[key]
            self._progress.pop(key, None)
        self._check(
            ("publish_backlog", None, None),
            None,
            self.bus.statistics().publish_backlog,
            self.settings.publish_backlog_warning,
            self.settings.publish_backlog_critical,
        )

    def _check(
        self,
        key: tuple[str, str | None, int | None],
        topic: str | None,
        value: int,
        warning: int,
        critical: int,
    ) -> None:
        kind, group, partition = key
        full_key = (f"{kind}:{topic}", group, partition)
        severity = _severity(value, warning, critical)
        previous = self._severity.get(full_key, "ok")
        if severity == previous:
            return
        self._severity[full_key] = severity
        event = BacklogEvent(
            kind=kind,  # type: ignore[arg-type]
            topic=topic,
            group=group,
            partition=partition,
            value=value,
            severity=severity,
            previous=previous,
        )
        log = logger.warning if _SEVERITY_RANK[severity] > _SEVERITY_RANK[previous] else logger.info
        log("backlog %s on %s: %d messages (%s -> %s)", kind, topic, value, previous, severity)
        if self.settings.on_backlog is not None:
            try:
                self.settings.on_backlog(event)
            except Exception:
                logger.exception("on_backlog callback failed")

    def stalls(self) -> list[Stall]:
        now = trio.current_time()
        limit = self.settings.stall_after
        out = [
            Stall(kind="handler", where=running.describe(), seconds=now - running.since)
            for running in self.bus.statistics().running
            if now - running.since >= limit
        ]
        for (topic, group, partition), (_, since) in self._progress.items():
            if now - since >= limit:
                lane = topic if partition is None else f"{topic}[{partition}]"
                out.append(Stall(kind="commit", where=f"{lane} group {group}", seconds=now - since))
        return out

    def severity_of(
        self, kind: str, topic: str | None, group: str | None, partition: int | None
    ) -> Severity:
        return self._severity.get((f"{kind}:{topic}", group, partition), "ok")

    # ----------------------------------------------------------------- probe

    async def start_probe(self) -> None:
        """Subscribe to the probe topic with a group private to this bus."""
        if self._probe_subscription is None:
            self._probe_subscription = await self._subscribe_probe(
                self.settings.probe_topic,
                self._on_probe,
                f"{self.bus.client_id}.probe.{uuid.uuid4().hex[:12]}",
            )

    async def _on_probe(self, message: Message) -> None:
        waiter = self._probe_waiters.get(message.headers.get(PROBE_HEADER, ""))
        if waiter is not None:
            waiter.set()
        await trio.lowlevel.checkpoint()

    async def probe(self) -> float:
        """One round trip through the broker and the actor pool; returns its
        latency in seconds. Raises ``trio.TooSlowError`` after
        ``probe_timeout``."""
        await self.start_probe()
        probe_id = uuid.uuid4().hex
        arrived = self._probe_waiters[probe_id] = trio.Event()
        start = trio.current_time()
        try:
            with trio.fail_after(self.settings.probe_timeout):
                await self._publish_probe(
                    self.settings.probe_topic, probe_id.encode(), {PROBE_HEADER: probe_id}
                )
                await arrived.wait()
        except BaseException:
            self._probe_failed()
            raise
        finally:
            del self._probe_waiters[probe_id]
        latency = trio.current_time() - start
        self.last_round_trip = trio.current_time()
        self.round_trip_latency = latency
        self.probe_failures = 0
        self._set_probe_healthy(True)
        return latency

    def _probe_failed(self) -> None:
        self.probe_failures += 1
        if self.probe_failures >= self.settings.probe_failures:
            self._set_probe_healthy(False)

    def _set_probe_healthy(self, healthy: bool) -> None:
        if healthy == self.probe_healthy:
            return
        self.probe_healthy = healthy
        self._health_changed.set()
        self._health_changed = trio.Event()
        logger.warning("health probe verdict: %s", "healthy" if healthy else "UNHEALTHY")
        if self.settings.on_health_change is not None:
            try:
                self.settings.on_health_change(healthy)
            except Exception:
                logger.exception("on_health_change callback failed")

    async def wait_probe_verdict(self, healthy: bool) -> None:
        while self.probe_healthy != healthy:
            await self._health_changed.wait()

    # ------------------------------------------------------------------- run

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample (and probe) forever."""
        task_status.started()
        interval = self.settings.interval
        probe_every = self.settings.probe_interval
        next_probe = trio.current_time()
        while True:
            await self.sample()
            if probe_every is not None and trio.current_time() >= next_probe:
                next_probe = trio.current_time() + probe_every
                try:
                    await self.probe()
                except (trio.TooSlowError, Exception) as exc:
                    logger.warning("health probe failed: %r", exc)
            wake = trio.current_time() + interval
            if probe_every is not None:
                wake = min(wake, next_probe)
            await trio.sleep_until(wake)

    def report(self) -> HealthReport:
        bus = self.bus
        subs = tuple(
            SubscriptionHealth(topic=s.topic, group=s.group, live=s.live, in_flight=s.in_flight)
            for s in sorted(bus.subscriptions(), key=lambda s: (s.topic, s.group))
            if s is not self._probe_subscription
        )
        stalls = tuple(self.stalls())
        connected = bus.transport.connected
        problem = bus.transport.problem
        statistics = bus.statistics()
        alive = statistics.actors_alive
        now = trio.current_time()
        healthy = (
            connected
            and problem is None
            and all(s.live for s in subs)
            and alive == statistics.pool_size
            and not stalls
            and self.probe_healthy
        )
        return HealthReport(
            healthy=healthy,
            transport=bus.transport.name,
            connected=connected,
            problem=problem,
            subscriptions=subs,
            actors_alive=alive,
            pool_size=statistics.pool_size,
            last_round_trip=None if self.last_round_trip is None else now - self.last_round_trip,
            round_trip_latency=self.round_trip_latency,
            probe_failures=self.probe_failures,
            stalls=stalls,
            lanes=tuple(
                LaneReport(group=group, state=state)
                for (_, group, _), state in sorted(
                    self.lanes.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)
                )
            ),
        )
