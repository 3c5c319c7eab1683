"""Run one (system, transport, workload) in fresh processes.

The consumer starts first, in its own process (so peak RSS and task counts
are the consumer's alone); once it reports READY (subscribed and live) the
producer runs in another process, as in PERFORMANCE.md's peer figures
("producer in its own process"). A preloaded workload runs the producer to
completion first. On the memory transport the broker lives in the process,
so one process does both.

Plain synchronous code: one reader thread per child turns its stdout lines
into events on a queue.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import attrs

from ._proto import RunSpec
from .metrics import ConsumerFigures, ProducerFigures, RunResult
from .workloads import Workload

__all__ = ["BASELINE_CAP", "BASE_SRC_ENV", "BASE_SYSTEM", "plan", "run_one", "systems_for"]

#: Seconds without progress (after the producer finished) before a run is
#: stopped and scored with what arrived.
IDLE_TIMEOUT = 20.0
#: Seconds a consumer may take to become live, plus this per topic (on
#: Kafka each subscription of a group is a rebalance, ~1.2 s on Tansu).
READY_TIMEOUT = 60.0
READY_PER_TOPIC = 5.0
#: Largest bulk run FastStream gets: its default mode runs ~1k msg/s, so
#: 100k would take minutes per repeat; its rate is measured on this many.
BASELINE_CAP = 5_000

Event = tuple[str, str, Any]

#: A ``src`` directory of another trio_bus tree (e.g. main's): when set, the
#: system :data:`BASE_SYSTEM` runs trio_bus from it, beside this tree's, in
#: the same invocation (before/after figures under the same load).
BASE_SRC_ENV = "BENCH_BASE_SRC"
BASE_SYSTEM = "trio_bus-base"


def systems_for(transport: str, workload: Workload) -> list[str]:
    """The systems measured on *transport* for *workload*.

    FastStream is left out of the Parallel Consumer workload (no per-key
    order: its default mode runs the 10,000 messages one by one, ~25 s, and
    its concurrent mode breaks the order the workload is about) and of
    topic scaling (measures trio_bus's own growth).
    """
    base = [BASE_SYSTEM] if os.environ.get(BASE_SRC_ENV) else []
    if transport == "memory":
        if workload.family == "topics":
            return ["trio_bus", *base]
        return ["trio_bus", *base, "trio-channels-nowait", "trio-channels"]
    systems = ["trio_bus", *base, "raw"]
    if workload.family in ("seed", "bulk"):
        systems += ["faststream", "faststream-concurrent"]
    return systems


def workload_for(system: str, workload: Workload) -> Workload:
    """FastStream's bulk runs are capped at :data:`BASELINE_CAP` messages."""
    if system.startswith("faststream") and workload.messages > BASELINE_CAP:
        return workload.scaled(BASELINE_CAP)
    return workload


def plan(
    transports: list[str], workloads: list[Workload], systems: list[str] | None = None
) -> list[tuple[str, Workload, str]]:
    """Every (transport, workload, system) to run, in report order."""
    return [
        (transport, workload, system)
        for transport in transports
        for workload in workloads
        for system in systems_for(transport, workload)
        if systems is None or system in systems
    ]


def hard_timeout(workload: Workload) -> float:
    """Upper bound of one run: generous, only to never hang."""
    return 120.0 + workload.total_work_seconds() * 1.5 + workload.messages / 100


class _Child:
    def __init__(
        self,
        role: str,
        spec: RunSpec,
        events: queue.Queue[Event],
        log: IO[bytes],
        *,
        tag: str | None = None,
    ) -> None:
        #: Tag of this child's events: ``consume`` or ``produce``.
        self.role = tag or role
        #: The RESULT payload of this child, and (consumer) of its producer.
        self.result: Any = None
        self.producer_result: Any = None
        argv = [sys.executable, "-m", "benchmarks.worker", role, spec.to_json()]
        profile_dir = os.environ.get("BENCH_PYSPY_DIR")
        if profile_dir and role == "consume":
            # Profiling a run: py-spy's collapsed stacks, one file per run.
            out = Path(profile_dir) / f"{spec.transport}-{spec.workload.name}-{spec.system}.txt"
            argv = ["py-spy", "record", "--format", "raw", "-r", "200", "-o", str(out), "--", *argv]
        env = None
        if spec.system == BASE_SYSTEM and (base := os.environ.get(BASE_SRC_ENV)):
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, (base, os.environ.get("PYTHONPATH")))),
            }
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.thread = threading.Thread(target=self._read, args=(events,), daemon=True)
        self.thread.start()

    def _read(self, events: queue.Queue[Event]) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            kind, _, rest = raw.decode(errors="replace").strip().partition(" ")
            payload: Any = None
            if rest:
                try:
                    payload = json.loads(rest)
                except json.JSONDecodeError:
                    payload = rest
            events.put((self.role, kind, payload))
        events.put((self.role, "EXIT", self.proc.wait()))

    def tell(self, line: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def finish(self, timeout: float = 30.0) -> None:
        """Close stdin (a consumer takes EOF as STOP), wait, then kill by PID."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # The reader sees EOF once the child is gone; then close our end.
        self.thread.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _figures(cls: type[Any], data: Any) -> Any:
    if not isinstance(data, dict):
        return None
    names = {f.name for f in attrs.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def run_one(
    system: str,
    transport: str,
    address: str,
    workload: Workload,
    *,
    log_dir: Path,
    progress: Callable[[int], None] = lambda n: None,
) -> RunResult:
    """One run; never raises for a failed run (the result carries the error)."""
    workload = workload_for(system, workload)
    spec = RunSpec(
        system=system,
        transport=transport,
        address=address,
        workload=workload,
        run_id=uuid.uuid4().hex[:10],
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    events: queue.Queue[Event] = queue.Queue()
    consumer_data: Any = None
    producer_data: Any = None
    error: str | None = None
    in_process = transport == "memory"
    children: list[_Child] = []
    with (log_dir / f"{transport}-{workload.name}-{system}-{spec.run_id}.log").open("wb") as log:
        try:
            if workload.preload and not in_process:
                producer = _Child("produce", spec, events, log)
                children.append(producer)
                producer_data, error = _wait_result(events, "produce", hard_timeout(workload))
                producer.finish()
            if error is None:
                consumer = _Child("consume", spec, events, log)
                children.append(consumer)
                error = _run_consumer(consumer, spec, events, log, children, in_process, progress)
                consumer_data = consumer.result
                if producer_data is None:
                    producer_data = consumer.producer_result
        finally:
            for child in children:
                child.finish()
    if not in_process:
        cleanup(spec)
    consumer_part = None
    if isinstance(consumer_data, dict):
        consumer_part = _figures(ConsumerFigures, consumer_data.get("consumer"))
        if in_process:
            producer_data = consumer_data.get("producer")
    return RunResult.combine(
        system=system,
        transport=transport,
        workload=workload,
        consumer=consumer_part,
        producer=_figures(ProducerFigures, producer_data),
        error=error,
    )


def _wait_result(events: queue.Queue[Event], role: str, timeout: float) -> tuple[Any, str | None]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, f"{role}: no result within {timeout:.0f} s"
        try:
            who, kind, payload = events.get(timeout=left)
        except queue.Empty:
            continue
        if who != role:
            continue
        if kind == "RESULT":
            return payload, None
        if kind in ("ERROR", "EXIT"):
            return None, f"{role}: {payload}"


def _run_consumer(
    consumer: _Child,
    spec: RunSpec,
    events: queue.Queue[Event],
    log: IO[bytes],
    children: list[_Child],
    in_process: bool,
    progress: Callable[[int], None],
) -> str | None:
    """Drive the consumer (and the live producer); return an error or None.
    Sets ``consumer.result`` / ``consumer.producer_result``."""
    error: str | None = None
    start = time.monotonic()
    ready_timeout = READY_TIMEOUT + READY_PER_TOPIC * spec.workload.topics
    hard_deadline = start + ready_timeout + hard_timeout(spec.workload)
    ready_deadline = start + ready_timeout
    ready = False
    producer_done = in_process or spec.workload.preload
    last_progress, last_change = -1, time.monotonic()
    stopped = False
    # The live producer starts with the consumer (imports overlap its
    # setup) and publishes on GO, once the consumer is live.
    waiting: _Child | None = None
    if not producer_done:
        waiting = _Child("produce-on-go", spec, events, log, tag="produce")
        children.append(waiting)
    while True:
        now = time.monotonic()
        if not ready and now > ready_deadline:
            return f"consumer not ready within {ready_timeout:.0f} s"
        if not stopped and (
            now > hard_deadline or (producer_done and ready and now - last_change > IDLE_TIMEOUT)
        ):
            consumer.tell("STOP")  # score what arrived
            stopped = True
            error = "stopped: no progress" if now <= hard_deadline else "stopped: hard timeout"
            hard_deadline = now + 60
        if stopped and now > hard_deadline:
            if consumer.result is not None:
                return error or "producer: no result"
            return "consumer did not stop"
        try:
            who, kind, payload = events.get(timeout=0.5)
        except queue.Empty:
            continue
        if who == "consume":
            if kind == "READY":
                ready = True
                last_change = time.monotonic()
                if waiting is not None:
                    waiting.tell("GO")
            elif kind == "PROGRESS" and isinstance(payload, int):
                if payload != last_progress:
                    last_progress, last_change = payload, time.monotonic()
                progress(payload)
            elif kind == "RESULT":
                consumer.result = payload
                if producer_done:
                    return error
                # Let the producer report its publish rate (bounded).
                hard_deadline = min(hard_deadline, time.monotonic() + 60)
                stopped = True
            elif kind in ("ERROR", "EXIT"):
                return f"consumer: {payload}"
        elif who == "produce":
            if kind == "RESULT":
                consumer.producer_result = payload
                producer_done = True
                last_change = time.monotonic()
                if consumer.result is not None:
                    return error
            elif kind in ("ERROR", "EXIT") and not producer_done:
                producer_done = True
                error = f"producer: {payload}"
                last_change = time.monotonic()
                if consumer.result is not None:
                    return error


def cleanup(spec: RunSpec) -> None:
    """Delete the run's topics (Kafka) or streams (NATS), so the brokers do
    not accumulate gigabytes over a suite and every run meets the same
    broker state. Best effort: a failure is logged, not raised."""

    async def kafka() -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=spec.address)
        await admin.start()
        try:
            await admin.delete_topics(spec.topics)
        finally:
            await admin.close()

    async def nats_streams() -> None:
        import nats

        nc = await nats.connect(f"nats://{spec.address}")
        try:
            js = nc.jetstream()
            for topic in spec.topics:
                await js.delete_stream(topic)
        finally:
            await nc.close()

    try:
        asyncio.run(asyncio.wait_for(kafka() if spec.transport == "kafka" else nats_streams(), 30))
    except Exception as exc:
        print(f"cleanup of run {spec.run_id} failed: {exc!r}", file=sys.stderr)
