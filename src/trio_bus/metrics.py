"""Prometheus metrics: one registry per bus, and a Trio HTTP endpoint.

Every bus has its own :class:`prometheus_client.CollectorRegistry`
(``bus.metrics_registry``), so two buses in one process never collide. The
metrics are read from the bus's plain counters when scraped (nothing on the
hot path takes a lock), under the namespace ``{transport}_eventbus_{client_id}``
(the seed system's convention) with characters Prometheus rejects replaced by
``_``::

    async with trio_bus.open_bus(url, client_id="billing") as bus, trio.open_nursery() as n:
        port = await n.start(trio_bus.metrics.serve_metrics, bus.metrics_registry)

Metrics (``<ns>_`` prefix omitted; counters end in ``_total``):

=================================== ======================================================
``messages_published_total``        accepted by the broker, by topic
``messages_publish_failed_total``   refused or unknown outcome, by topic
``messages_consumed_total``         fetched and dispatched to actors, by topic
``messages_handled_total``          handler succeeded, by topic
``messages_failed_total``           failed attempts (timeouts included), by topic
``messages_retried_total``          attempts scheduled again, by topic
``messages_dead_lettered_total``    parked in the dead-letter topic, by topic
``handler_duration_seconds``        histogram, by topic
``end_to_end_latency_seconds``      publish -> handler start, histogram, by topic
``publish_latency_seconds``         publish call -> broker ack, histogram, by topic
``in_flight_messages``              dispatched, not yet settled
``inbox_depth_messages``            queued in actor inboxes (sum; ``_max``: deepest inbox)
``actors_busy``                     actors running a handler
``actor_restarts_total``            supervisor restarts
``publish_backlog_messages``        awaiting a broker acknowledgement
``publish_results_dropped_total``   publish results dropped (reader behind, policy drop)
``publish_throttled_total``         publish requests that waited for the rate limit
``publish_throttled_seconds_total`` seconds they waited
``consumer_lag_messages``           lag per topic, group, partition (Kafka: end - committed;
                                    NATS: pending; memory: unacked)
``consumer_committed_offset``       commit point per lane (Kafka offset, NATS ack floor)
``consumer_ack_pending_messages``   delivered, not acked (NATS, memory)
``backlog_severity``                0 ok, 1 warning, 2 critical, per backlog
=================================== ======================================================

Actor ids are never labels: cardinality stays bounded by topics and
partitions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._stats import Histogram
from .health import Monitor, Observed

__all__ = ["metric_namespace", "serve_metrics"]

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def metric_namespace(transport: str, client_id: str) -> str:
    """``{transport}_eventbus_{client_id}`` with invalid characters as ``_``."""
    name = _INVALID.sub("_", f"{transport}_eventbus_{client_id}")
    return name if not name[0].isdigit() else f"_{name}"


_COUNTERS = (
    ("messages_published", "published", "Messages the broker accepted."),
    ("messages_publish_failed", "publish_failed", "Publishes refused or with unknown outcome."),
    ("messages_consumed", "consumed", "Messages fetched and dispatched to actors."),
    ("messages_handled", "handled", "Handler calls that succeeded."),
    ("messages_failed", "failed", "Handler attempts that failed or timed out."),
    ("messages_retried", "retried", "Attempts scheduled again after a failure."),
    ("messages_dead_lettered", "dead_lettered", "Messages parked in a dead-letter topic."),
)
_HISTOGRAMS = (
    ("handler_duration_seconds", "handler_duration", "Handler call duration."),
    ("end_to_end_latency_seconds", "end_to_end", "Publish to handler start."),
    ("publish_latency_seconds", "publish_latency", "Publish call to broker acknowledgement."),
)


class BusCollector(Collector):
    """Reads a bus's counters into metric families at scrape time."""

    def __init__(self, bus: Observed, monitor: Monitor) -> None:
        self._bus = bus
        self._monitor = monitor
        self._ns = metric_namespace(bus.transport.name, bus.client_id)

    def collect(self) -> Iterator[Metric]:
        ns = self._ns
        statistics = self._bus.statistics()
        topics = statistics.topics
        for name, attr, doc in _COUNTERS:
            family = CounterMetricFamily(f"{ns}_{name}", doc, labels=["topic"])
            for stats in topics:
                family.add_metric([stats.topic], getattr(stats, attr))
            yield family
        for name, attr, doc in _HISTOGRAMS:
            hist = HistogramMetricFamily(f"{ns}_{name}", doc, labels=["topic"])
            for stats in topics:
                h: Histogram = getattr(stats, attr)
                if h.count:
                    hist.add_metric([stats.topic], h.cumulative(), h.sum)
            yield hist
        yield _gauge(
            f"{ns}_in_flight_messages", "Dispatched, not yet settled.", statistics.in_flight
        )
        yield _gauge(f"{ns}_inbox_depth_messages", "Queued in actor inboxes.", statistics.queued)
        yield _gauge(
            f"{ns}_inbox_depth_messages_max", "Deepest actor inbox.", statistics.max_inbox_depth
        )
        yield _gauge(f"{ns}_actors_busy", "Actors running a handler.", len(statistics.running))
        restarts = CounterMetricFamily(f"{ns}_actor_restarts", "Actor restarts.")
        restarts.add_metric([], statistics.restarts)
        yield restarts
        yield _gauge(
            f"{ns}_publish_backlog_messages",
            "Messages awaiting a broker acknowledgement.",
            statistics.publish_backlog,
        )
        dropped = CounterMetricFamily(
            f"{ns}_publish_results_dropped", "Publish results dropped (reader behind)."
        )
        dropped.add_metric([], statistics.publish_results_dropped)
        yield dropped
        throttled = CounterMetricFamily(
            f"{ns}_publish_throttled", "Publish requests that waited for the rate limit."
        )
        throttled.add_metric([], statistics.publish_throttled)
        yield throttled
        waited = CounterMetricFamily(
            f"{ns}_publish_throttled_seconds", "Seconds publish requests waited for the rate limit."
        )
        waited.add_metric([], statistics.publish_throttled_seconds)
        yield waited
        yield from self._lanes()

    def _lanes(self) -> Iterator[Metric]:
        ns, monitor = self._ns, self._monitor
        labels = ["topic", "group", "partition"]
        lag = GaugeMetricFamily(f"{ns}_consumer_lag_messages", "Consumer lag.", labels=labels)
        committed = GaugeMetricFamily(
            f"{ns}_consumer_committed_offset", "Commit point per lane.", labels=labels
        )
        pending = GaugeMetricFamily(
            f"{ns}_consumer_ack_pending_messages", "Delivered, not acked.", labels=labels
        )
        severity = GaugeMetricFamily(
            f"{ns}_backlog_severity", "0 ok, 1 warning, 2 critical.", labels=["kind", *labels]
        )
        for (topic, group, partition), state in sorted(
            monitor.lanes.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)
        ):
            values = [topic, group, "" if partition is None else str(partition)]
            if state.lag is not None:
                lag.add_metric(values, state.lag)
                level = monitor.severity_of("consumer_lag", topic, group, partition)
                severity.add_metric(["consumer_lag", *values], _RANK[level])
            if state.committed is not None:
                committed.add_metric(values, state.committed)
            if state.ack_pending is not None:
                pending.add_metric(values, state.ack_pending)
        level = monitor.severity_of("publish_backlog", None, None, None)
        severity.add_metric(["publish_backlog", "", "", ""], _RANK[level])
        yield from (lag, committed, pending, severity)


_RANK = {"ok": 0, "warning": 1, "critical": 2}


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def registry_for(bus: Observed, monitor: Monitor) -> CollectorRegistry:
    """A fresh registry holding only *bus*'s metrics (lanes as *monitor*
    last sampled them)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BusCollector(bus, monitor))
    return registry


async def serve_metrics(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *registry* in the Prometheus text format over HTTP, forever.

    Loopback by default; ``port=0`` picks a free port. Use with
    ``nursery.start``, which returns the bound port. Any path answers with
    the metrics (``/metrics`` by convention).
    """

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
            body = generate_latest(registry)
            head = (
                "HTTP/1.1 200 OK\r\n"
                "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            await stream.send_all(head + body)

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)
