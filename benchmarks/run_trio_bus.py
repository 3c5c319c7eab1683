"""trio_bus: the consumer and the producer of a benchmark run.

The consumer subscribes one handler to every topic of the workload with the
bus's defaults (pool 256, handler timeout 30 s), so the figures are those a
user gets out of the box. The producer publishes with ``publish_many`` in
chunks of 1000 (one transport call each), stamping each chunk's publish time
just before its call. On the memory transport both run in one process (the
broker lives in the process); elsewhere the producer is its own process.

Bridge crossings are counted by wrapping
:meth:`trio_bus.transports._bridge.Bridge.call`, the only place trio_bus
crosses to asyncio.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

import trio_bus

from ._proto import PROGRESS_INTERVAL, RunSpec, emit, watch_stdin
from .metrics import ConsumerFigures, ProducerFigures, Recorder

__all__ = ["consume", "count_trio_tasks", "produce", "produce_with", "run_consumer"]

logger = logging.getLogger("benchmarks")

#: Messages per ``publish_many`` call (trio_bus sends 1000 per transport call).
CHUNK = 1000


class CrossingCounter:
    """Counts ``Bridge.call`` invocations in this process."""

    def __init__(self) -> None:
        self.count = 0
        self.installed = False

    def install(self) -> None:
        """Wrap ``Bridge.call`` (idempotent; only if the bridge imports)."""
        if self.installed:
            return
        try:
            from trio_bus.transports import _bridge
        except ImportError:  # no trio-asyncio: no bridge to count
            return
        original = _bridge.Bridge.call
        counter = self

        async def call(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
            counter.count += 1
            return await original(self, fn, *args, **kwargs)

        _bridge.Bridge.call = call  # type: ignore[method-assign]
        self.installed = True


CROSSINGS = CrossingCounter()


def count_trio_tasks() -> int:
    """Tasks alive in the current Trio run (the whole task tree)."""
    count = 0
    root = trio.lowlevel.current_root_task()
    stack = [root] if root is not None else []
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def _sample_tasks(peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], count_trio_tasks())
        await trio.sleep(0.05)


async def _report_progress(recorder: Recorder, report: Callable[[int], None]) -> None:
    last = -1
    while True:
        if recorder.handled != last:
            last = recorder.handled
            report(last)
        await trio.sleep(PROGRESS_INTERVAL)


def _records(spec: RunSpec, start: int, stop: int) -> list[trio_bus.OutgoingMessage]:
    wl, topics, payload = spec.workload, spec.topics, spec.workload.payload()
    ts = str(time.time_ns())
    return [
        trio_bus.OutgoingMessage(
            topic=topics[wl.topic_index(i)],
            value=payload,
            key=wl.key(i),
            headers={"bench-ts": ts, "bench-idx": str(i)},
        )
        for i in range(start, stop)
    ]


async def produce_with(bus: trio_bus.Bus, spec: RunSpec) -> ProducerFigures:
    """Publish the workload on *bus*; the rate counts acknowledged messages."""
    n = spec.workload.messages
    published = failed = 0
    first_ack = math.nan
    begin = time.perf_counter()
    # The first message goes alone on an idle bus: first-message latency.
    bounds = [0, 1, *range(1 + CHUNK, n, CHUNK), n] if n > 1 else [0, n]
    for start, stop in itertools.pairwise(bounds):
        chunk = _records(spec, start, stop)
        try:
            await bus.publish_many(chunk)
            published += len(chunk)
        except trio_bus.errors.PublishError:
            failed += len(chunk)  # counted whole: the success ratio shows it
        if start == 0:
            first_ack = (time.perf_counter() - begin) * 1000
    elapsed = time.perf_counter() - begin
    return ProducerFigures(
        published=published,
        failed=failed,
        publish_rate=published / elapsed if elapsed > 0 else math.nan,
        crossings=CROSSINGS.count if CROSSINGS.installed else None,
        first_ack_ms=first_ack,
    )


async def produce(spec: RunSpec) -> ProducerFigures:
    """The producer process: open a bus, publish, report."""
    CROSSINGS.install()
    async with trio_bus.open_bus(spec.bus_url, client_id=f"{spec.group}-producer") as bus:
        # Crossings of opening the bus are setup, not per-message cost.
        CROSSINGS.count = 0
        return await produce_with(bus, spec)


@attrs.frozen
class ConsumerOutcome:
    """What :func:`run_consumer` returns."""

    consumer: ConsumerFigures
    producer: ProducerFigures | None


async def run_consumer(
    spec: RunSpec,
    *,
    ready: Callable[[], None] = lambda: None,
    progress: Callable[[int], None] = lambda n: None,
    stop: trio.Event | None = None,
    deadline: float = math.inf,
    produce_here: bool | None = None,
) -> ConsumerOutcome:
    """Subscribe, signal *ready*, wait until every message was handled (or
    *stop* is set, or *deadline* seconds passed).

    With *produce_here* (default: on the memory transport, whose broker
    lives in the process) the workload is published from this bus too,
    before subscribing when the workload is preloaded.
    """
    CROSSINGS.install()
    done = trio.Event()
    recorder = Recorder(spec.workload, on_done=done.set)
    peak = [0]
    producer: ProducerFigures | None = None

    async def handler(message: trio_bus.Message) -> None:
        key, work = recorder.started(message.headers, message.aggregate_id)
        try:
            if work:
                await trio.sleep(work)
        except trio.Cancelled:
            recorder.cancelled += 1
            raise
        finally:
            # Also when the bus cancels the call (a timeout, or a lapsed
            # partition lease): the call is over, so a later start of the
            # key is not "two at once"; the message comes again (a
            # duplicate).
            recorder.finished(key)

    memory = spec.transport == "memory"
    here = memory if produce_here is None else produce_here
    async with trio_bus.open_bus(spec.bus_url, client_id=spec.group) as bus:
        if here and spec.workload.preload:
            producer = await produce_with(bus, spec)
        for topic in spec.topics:
            await bus.subscribe(topic, handler, start="earliest")
        if spec.workload.preload:
            recorder.origin_ns = time.time_ns()
        crossings_at_start = CROSSINGS.count
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sample_tasks, peak)
            nursery.start_soon(_report_progress, recorder, progress)
            if stop is not None:

                async def stop_on_request() -> None:
                    await stop.wait()
                    done.set()

                nursery.start_soon(stop_on_request)
            recorder.mark_live()
            ready()
            with trio.move_on_after(deadline):
                if here and not spec.workload.preload:
                    producer = await produce_with(bus, spec)
                await done.wait()
            peak[0] = max(peak[0], count_trio_tasks())
            nursery.cancel_scope.cancel()
        crossings = (
            CROSSINGS.count - crossings_at_start if CROSSINGS.installed and not memory else None
        )
        if producer is not None:
            # In one process the producer's crossings are inside ours already.
            producer = attrs.evolve(producer, crossings=None)
        figures = recorder.figures(peak_tasks=peak[0], crossings=crossings)
    if figures.cancelled:
        logger.warning("%d handler calls were cancelled by the bus", figures.cancelled)
    progress(recorder.handled)
    return ConsumerOutcome(figures, producer)


async def consume(spec: RunSpec) -> None:
    """The consumer process: the protocol around :func:`run_consumer`."""
    stop = trio.Event()
    token = trio.lowlevel.current_trio_token()
    watch_stdin(lambda: token.run_sync_soon(stop.set))
    outcome = await run_consumer(
        spec,
        ready=lambda: emit("READY"),
        progress=lambda n: emit("PROGRESS", n),
        stop=stop,
    )
    emit(
        "RESULT",
        {
            "consumer": attrs.asdict(outcome.consumer),
            "producer": None if outcome.producer is None else attrs.asdict(outcome.producer),
        },
    )
